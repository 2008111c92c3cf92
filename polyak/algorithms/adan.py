"""Adan: adaptive Nesterov momentum from the gradient and its change between steps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class Adan(Optimizer):
    """Adan: adaptive Nesterov momentum.

    For each parameter θ with gradient g at step t (g_0 = g_1):

    .. math::

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        d_t ← β_2 d_{t-1} + (1 - β_2) (g_t - g_{t-1})

        n_t ← β_3 n_{t-1} + (1 - β_3) (g_t + β_2 (g_t - g_{t-1}))^2

        r_t ← √n_t / √(1 - β_3^t) + ε

        θ_t ← (θ_{t-1} - γ / (1 - β_1^t) · m_t / r_t - γ β_2 / (1 - β_2^t) · d_t / r_t) / (1 + γ λ)

    where γ = ``lr``, (β_1, β_2, β_3) = ``betas``, ε = ``eps`` and λ = ``weight_decay``. With
    ``no_prox`` the decay is applied first, θ_{t-1} ← (1 - γ λ) θ_{t-1}, and the division by
    (1 + γ λ) is left out. With ``caution``, m_t enters the step only where it agrees in sign
    with g_t, divided by the share of such coordinates (at least 10^{-3}). The state keys are
    ``exp_avg`` (m), ``exp_avg_diff`` (d), ``exp_avg_sq`` (n), ``neg_pre_grad`` (-g_{t-1})
    and ``step``.

    Note:
        This is timm 1.0.31's ``Adan``, written in the same order of operations. timm counts
        steps per group (``param_groups[i]["step"]``) and restarts ``neg_pre_grad`` from the
        gradient on the group's first step; polyak counts them per parameter, as torch.optim
        does, which is the same where every parameter has a gradient at every step. A
        state_dict written here also holds the group's count, so that timm continues from it,
        and timm's loads here. The moments start at zero. ``caution`` takes a mean over each
        tensor, so its steps do not run on the flat kernel; nor, for now, do the others, whose
        bias correction takes a square root the kernel's scalar program does not compute.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, >= 0 (default: 1e-3).
        betas: (β_1, β_2, β_3), each in [0, 1) (default: (0.98, 0.92, 0.99)).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: λ (default: 0).
        no_prox: decay before the update instead of the proximal division after it
            (default: False).
        caution: mask the momentum where it disagrees with the gradient (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).

    References:
        X. Xie, P. Zhou, H. Li, Z. Lin, S. Yan. Adan: Adaptive Nesterov Momentum Algorithm for
        Faster Optimizing Deep Models. IEEE TPAMI 2024. https://arxiv.org/abs/2208.06677

        K. Liang, L. Chen, B. Liu, Q. Liu. Cautious Optimizers: Improving Training with One
        Line of Code. 2024. https://arxiv.org/abs/2411.16085
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")
    param_shaped_state = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")
    unsigned_state = ("exp_avg_sq",)
    backfill = {"no_prox": False, "caution": False}  # noqa: RUF012 - read-only table

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
        caution: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "no_prox": no_prox,
            "caution": caution,
            "foreach": foreach,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(_common.with_group_steps)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """timm's checks, in its order and wording."""
        _checks.check_at_least("learning rate", group["lr"])
        _checks.check_at_least("epsilon value", group["eps"])
        for i, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Adan takes dense gradients."""
        _common.check_dense("Adan", grads)

    # timm keeps the step count in the group: each parameter takes it.
    upgrade_state = _common.upgrade_group_step_state

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero moments; ``neg_pre_grad`` is set at the first step."""
        return {
            "step": _common.zero_step(param, False),
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
            "exp_avg_diff": _common.zeros_like(param),
            "neg_pre_grad": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Adan step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        beta1, beta2, beta3 = hp.betas
        m: list[Any] = state["exp_avg"]
        v: list[Any] = state["exp_avg_sq"]
        d: list[Any] = state["exp_avg_diff"]
        n: list[Any] = state["neg_pre_grad"]
        _ops.increment_(steps)
        t = _ops.values(steps)
        # On a first step the previous gradient is taken to be this one.
        first = [i for i, s in enumerate(t) if s == 1]
        if first:
            _ops.copy_([n[i] for i in first], _ops.neg([grads[i] for i in first]))
        _ops.add_scaled_(n, grads, 1)
        _ops.lerp_(m, grads, 1 - beta1)
        _ops.mul_(d, beta2)
        _ops.add_scaled_(d, n, 1 - beta2)
        _ops.mul_(n, beta2)
        _ops.add_scaled_(n, grads, 1)
        _ops.mul_(v, beta3)
        _ops.addcmul_(v, n, n, 1 - beta3)
        denom = _ops.sqrt(v)
        _ops.div_(denom, [math.sqrt(1 - beta3**s) for s in t])
        _ops.add_(denom, hp.eps)
        step_sizes = [-(hp.lr / (1 - beta1**s)) for s in t]
        diff_step_sizes = [-(hp.lr * beta2 / (1 - beta2**s)) for s in t]
        if hp.caution:
            m = _cautious(m, grads)
        decay = hp.weight_decay
        if decay != 0 and hp.no_prox:
            _ops.mul_(params, 1 - hp.lr * decay)
        _ops.addcdiv_(params, m, denom, step_sizes)
        _ops.addcdiv_(params, d, denom, diff_step_sizes)
        if decay != 0 and not hp.no_prox:
            _ops.div_(params, 1 + hp.lr * decay)
        # -g_t for the next step, made as timm makes it, 0 + (-1) g_t: a zero gradient leaves +0.
        _ops.copy_(n, _ops.neg(grads))
        _ops.add_(n, 0.0)


def _cautious(exp_avgs: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """Each m, kept where m g > 0 and divided by the share of such coordinates (at least
    10^-3): a mean over each tensor, computed as timm computes it."""
    out = []
    for m, g in zip(exp_avgs, grads, strict=True):
        mask = (m * g > 0).to(g.dtype)
        mask.div_(mask.mean().clamp_(min=1e-3))
        out.append(m * mask)
    return out
