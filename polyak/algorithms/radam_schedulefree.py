"""Schedule-Free RAdam: RAdam's rectified step, averaged in place of a learning-rate schedule
and of a warmup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from polyak import _ops
from polyak.algorithms import _common, _schedule_free
from polyak.algorithms._schedule_free import ScheduleFree
from polyak.optimizer import Hyper, ParamsT, StateLists


class RAdamScheduleFree(ScheduleFree):
    """Schedule-Free RAdam: RAdam's rectified, normalized gradient steps a sequence z, whose
    weighted average x is the model to evaluate, and gradients are taken at a point y between
    the two; the rectification takes the place of a warmup.

    For each parameter with gradient g at step t = k + 1, the parameter holding y in train
    mode:

    .. math::

        ρ_t ← ρ_∞ - 2 t β_2^t / (1 - β_2^t)

        γ_t ← γ √((ρ_t - 4) (ρ_t - 2) ρ_∞ / ((ρ_∞ - 4) (ρ_∞ - 2) ρ_t)) while ρ_t > 4

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

        u_t ← g_t / (√(v_t / (1 - β_2^t)) + ε) + λ y_{t-1}

        w_t ← t^r (max_{s ≤ t} γ_s)^p

        c_t ← w_t / Σ_{s ≤ t} w_s

        y_t ← (1 - c_t) y_{t-1} + c_t z_{t-1} + γ_t (β_1 (1 - c_t) - 1) u_t

        z_t ← z_{t-1} - γ_t u_t

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps``, λ = ``weight_decay``, r = ``r``,
    p = ``weight_lr_power`` and ρ_∞ = 2 / (1 - β_2) - 1. While ρ_t <= 4 (the first steps),
    u_t ← g_t + λ y_{t-1} and γ_t = 0 with ``silent_sgd_phase``, which leaves y and z where
    they are, or γ_t = γ without it (plain SGD steps). This is x_t ← (1 - c_t) x_{t-1} + c_t
    z_t with y_t = (1 - β_1) z_t + β_1 x_t, the parameters holding y. ``eval()`` sets them to
    x, ``train()`` back to y. The state keys are ``z`` (starting at the parameter) and
    ``exp_avg_sq`` (v); each group keeps ``k`` (the steps taken), ``weight_sum`` (Σ w_s),
    ``lr_max``, ``scheduled_lr`` (γ_t) and ``train_mode``, as schedulefree does.

    Note:
        This is schedulefree 1.4.1's ``RAdamScheduleFree``, bit for bit (its foreach path, its
        default, and its per-tensor path compute the same numbers on the CPU). As there, the
        optimizer starts in eval mode: call ``train()`` before training and ``eval()`` before
        evaluating; a step in eval mode raises schedulefree's message, as a RuntimeError (its is an
        Exception). ``state_dict()`` in train mode warns (``checkpoint_warning``, a UserWarning):
        the checkpoint resumes exactly, with its ``train_mode``, but the parameters saved beside it
        are y, not x, and schedulefree asks for checkpoints in eval mode. schedulefree normalizes
        (and decays) the gradient in ``.grad`` itself; polyak leaves ``.grad`` as it is. ``foreach``
        belongs to the optimizer: a schedulefree checkpoint's (its default, True) does not replace
        it. ``state_dtype`` may store z narrower, but not in 8 or 4 bits, from which ``train()`` and
        ``eval()`` cannot switch. Complex parameters are refused, and so are torch.distributed's
        functional optimizers, which would step the update rule without the schedule.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ (default: 0.0025).
        betas: (β_1, β_2): β_1 interpolates y between z and x, β_2 averages v
            (default: (0.9, 0.999)).
        eps: ε (default: 1e-8).
        weight_decay: λ, taken at y (default: 0).
        r: the power r of t in the averaging weights (default: 0).
        weight_lr_power: the power p of the largest learning rate so far in the averaging
            weights (default: 2).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        silent_sgd_phase: take no steps while ρ_t <= 4, rather than SGD steps (default: True).

    References:
        A. Defazio, X. A. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky. The Road Less
        Scheduled. NeurIPS 2024. https://arxiv.org/abs/2405.15682

        L. Liu, H. Jiang, P. He, W. Chen, X. Liu, J. Gao, J. Han. On the Variance of the
        Adaptive Learning Rate and Beyond. ICLR 2020. https://arxiv.org/abs/1908.03265
    """

    state_keys = ("z", "exp_avg_sq")
    param_shaped_state = ("z", "exp_avg_sq")
    unsigned_state = ("exp_avg_sq",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        silent_sgd_phase: bool = True,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "r": r,
            "k": 0,
            "train_mode": False,
            "weight_sum": 0.0,
            "lr_max": -1.0,
            "scheduled_lr": 0.0,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "silent_sgd_phase": silent_sgd_phase,
        }
        super().__init__(params, defaults, foreach)

    check_hyperparameters = staticmethod(_schedule_free.check_train_mode)

    @staticmethod
    def interpolation(group: Mapping[str, Any]) -> float:
        """β_1."""
        beta1: float = group["betas"][0]
        return beta1

    @staticmethod
    def next_lr(group: Mapping[str, Any]) -> Any:
        """γ rectified, as schedulefree computes it."""
        rho_t, rho_inf = _rho(group["k"], group["betas"][1])
        if rho_t > 4.0:
            rect = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
        else:
            rect = float(not group["silent_sgd_phase"])
        return group["lr"] * rect

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """z at the parameter, a zero second moment."""
        return {**super().init_state(param, hp), "exp_avg_sq": _common.zeros_like(param)}

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Schedule-Free RAdam step to ``params`` (y) given their ``grads``."""
        beta1, beta2 = hp.betas
        z: list[Any] = state["z"]
        v: list[Any] = state["exp_avg_sq"]
        lr = hp.scheduled_lr
        c = _schedule_free.average_coefficient(
            hp.k, hp.r, hp.lr_max, hp.weight_lr_power, hp.weight_sum
        )
        _ops.mul_(v, beta2)
        _ops.addcmul_(v, grads, grads, 1 - beta2)
        rho_t, _ = _rho(hp.k, beta2)
        if rho_t > 4.0:
            denom = _ops.div(v, 1 - beta2 ** (hp.k + 1))
            _ops.sqrt_(denom)
            _ops.add_(denom, hp.eps)
            u = _ops.copy(grads)
            _ops.div_tensors_(u, denom)
            if hp.weight_decay != 0:
                _ops.add_scaled_(u, params, hp.weight_decay)
        elif hp.weight_decay != 0:
            u = _ops.add_scaled(grads, params, hp.weight_decay)
        else:
            u = grads
        # y moves towards z by c, then along u; x is not kept.
        _ops.lerp_(params, z, c)
        _ops.add_scaled_(params, u, lr * (beta1 * (1 - c) - 1))
        _ops.sub_scaled_(z, u, lr)


def _rho(k: Any, beta2: Any) -> tuple[Any, Any]:
    """ρ_t at step t = k + 1, and ρ_∞, as schedulefree computes them."""
    step = k + 1
    beta2_t = beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * step * beta2_t / (1 - beta2_t), rho_inf
