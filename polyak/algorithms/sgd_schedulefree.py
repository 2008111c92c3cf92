"""Schedule-Free SGD: SGD's steps, averaged in place of a learning-rate schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from polyak import _ops
from polyak.algorithms import _schedule_free
from polyak.algorithms._schedule_free import ScheduleFree
from polyak.optimizer import Hyper, ParamsT, StateLists


class SGDScheduleFree(ScheduleFree):
    """Schedule-Free SGD: the gradient steps a sequence z, whose weighted average x is the
    model to evaluate, and gradients are taken at a point y between the two.

    For each parameter with gradient g at step t = k + 1, the parameter holding y in train
    mode:

    .. math::

        u_t ← g_t + λ y_{t-1}

        γ_t ← γ t / T_w while t ≤ T_w, γ after

        w_t ← t^r (max_{s ≤ t} γ_s)^p

        c_t ← w_t / Σ_{s ≤ t} w_s

        y_t ← (1 - c_t) y_{t-1} + c_t z_{t-1} + γ_t (β (1 - c_t) - 1) u_t

        z_t ← z_{t-1} - γ_t u_t

    where γ = ``lr``, β = ``momentum``, λ = ``weight_decay``, T_w = ``warmup_steps``, r =
    ``r`` and p = ``weight_lr_power``. This is x_t ← (1 - c_t) x_{t-1} + c_t z_t with y_t =
    (1 - β) z_t + β x_t, the parameters holding y. ``eval()`` sets them to x, ``train()``
    back to y. The state key is ``z`` (starting at the parameter); each group keeps ``k``
    (the steps taken), ``weight_sum`` (Σ w_s), ``lr_max``, ``scheduled_lr`` (γ_t) and
    ``train_mode``, as schedulefree does.

    Note:
        This is schedulefree 1.4.1's ``SGDScheduleFree``, bit for bit (its foreach path, its
        default, and its per-tensor path compute the same numbers on the CPU), with its argument
        checks. As there, the optimizer starts in eval mode: call ``train()`` before training and
        ``eval()`` before evaluating; a step in eval mode raises schedulefree's message, as a
        RuntimeError (its is an Exception). ``state_dict()`` in train mode warns
        (``checkpoint_warning``, a UserWarning): the checkpoint resumes exactly, with its
        ``train_mode``, but the parameters saved beside it are y, not x, and schedulefree asks for
        checkpoints in eval mode. schedulefree decays the gradient in ``.grad`` itself; polyak
        leaves ``.grad`` as it is. ``foreach`` belongs to the optimizer: a schedulefree checkpoint's
        (its default, True) does not replace it. ``state_dtype`` may store z narrower, but not in 8
        or 4 bits, from which ``train()`` and ``eval()`` cannot switch. Complex parameters are
        refused, and so are torch.distributed's functional optimizers, which would step the update
        rule without the schedule.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, >= 0 (default: 1.0).
        momentum: β, in (0, 1), which interpolates y between z and x (default: 0.9).
        weight_decay: λ, >= 0, taken at y (default: 0).
        warmup_steps: T_w, the steps of a linear warmup of γ (default: 0).
        r: the power r of t in the averaging weights (default: 0).
        weight_lr_power: the power p of the largest learning rate so far in the averaging
            weights (default: 2).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).

    References:
        A. Defazio, X. A. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky. The Road Less
        Scheduled. NeurIPS 2024. https://arxiv.org/abs/2405.15682
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "r": r,
            "k": 0,
            "warmup_steps": warmup_steps,
            "train_mode": False,
            "weight_sum": 0.0,
            "lr_max": -1.0,
            "scheduled_lr": 0.0,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            "foreach": foreach,
        }
        super().__init__(params, defaults, foreach)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """schedulefree's checks, in its order and wording."""
        if group["lr"] < 0.0:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        momentum = group["momentum"]
        if momentum <= 0 or momentum >= 1:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")
        _schedule_free.check_train_mode(group)

    @staticmethod
    def interpolation(group: Mapping[str, Any]) -> float:
        """β, the momentum."""
        momentum: float = group["momentum"]
        return momentum

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Schedule-Free SGD step to ``params`` (y) given their ``grads``."""
        z: list[Any] = state["z"]
        lr = hp.scheduled_lr
        c = _schedule_free.average_coefficient(
            hp.k, hp.r, hp.lr_max, hp.weight_lr_power, hp.weight_sum
        )
        u = _ops.add_scaled(grads, params, hp.weight_decay) if hp.weight_decay != 0 else grads
        # y moves towards z by c, then along u; x is not kept.
        _ops.lerp_(params, z, c)
        _ops.add_scaled_(params, u, lr * (hp.momentum * (1 - c) - 1))
        _ops.sub_scaled_(z, u, lr)
