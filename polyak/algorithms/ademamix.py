"""AdEMAMix: Adam whose step mixes a fast and a slow momentum."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from polyak import _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists

#: pytorch-optimizer's options (taken as keyword arguments) that polyak does not implement.
_NOT_IMPLEMENTED = ("cautious", "stable_adamw")


class AdEMAMix(Optimizer):
    """AdEMAMix: a mixture of two exponential moving averages of the gradient.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

        s_t ← β_3(t) s_{t-1} + (1 - β_3(t)) g_t

        θ_t ← θ_{t-1} - γ (m_t / (1 - β_1^t) + α(t) s_t) / (√v_t / √(1 - β_2^t) + ε)

    where γ = ``lr``, (β_1, β_2, β_3) = ``betas``, α = ``alpha``, ε = ``eps`` and λ =
    ``weight_decay``; the gradient is negated (−) when ``maximize``. With ``weight_decouple``,
    λ θ_{t-1} is left out of g_t and the parameters shrink first, θ_{t-1} ← (1 - γ λ) θ_{t-1}
    (by 1 - λ with ``fixed_decay``). Without a schedule α(t) = α and β_3(t) = β_3. With one
    over T steps (``t_alpha``, ``t_beta3``, or ``t_alpha_beta3`` for both), α(t) =
    min(t α / T, α) and β_3(t) = min(exp(ln β_1 ln β_3 / ((1 - t / T) ln β_3 + t / T ln β_1)),
    β_3). The state keys are ``exp_avg`` (m), ``exp_avg_sq`` (v), ``exp_avg_slow`` (s) and
    ``step``.

    Note:
        This is pytorch-optimizer 4.1.0's ``AdEMAMix``, bit for bit (its per-tensor and
        foreach paths compute the same numbers on the CPU), with bitsandbytes' schedules of
        α and β_3 over steps of their own, ``t_alpha`` and ``t_beta3``, as Hugging Face's
        Trainer passes them to bitsandbytes' ``AdEMAMix``. That one (32-bit) computes the
        same rule in another order (its momenta by multiply and add, its step by a division
        then an add), within rounding, with decoupled decay: pass ``weight_decouple=True``
        for its ``weight_decay``. pytorch-optimizer counts steps per group
        (``param_groups[i]["step"]``); polyak counts them per parameter, which is the same
        where every parameter has a gradient at every step, and a state_dict written here
        also holds the group's count, so checkpoints interchange. pytorch-optimizer negates
        (``maximize``) and decays the gradient in ``.grad`` itself; polyak leaves ``.grad``
        as it is. The bias correction takes a square root of a number that the flat kernel's
        scalar program does not compute as Python does: the default step runs the loop.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, >= 0 (default: 1e-3).
        betas: (β_1, β_2, β_3), β_1 and β_2 in [0, 1), β_3 in [0, 1]
            (default: (0.9, 0.999, 0.9999)).
        weight_decay: λ, >= 0 (default: 0).
        weight_decouple: shrink the parameters instead of adding λ θ to the gradient
            (default: False).
        fixed_decay: with ``weight_decouple``, shrink by λ rather than γ λ (default: False).
        alpha: α, >= 0 (default: 5).
        t_alpha_beta3: T of both schedules, >= 0, or None for none (default: None).
        eps: ε, >= 0 (default: 1e-8).
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        t_alpha: T of α's schedule, taking the place of ``t_alpha_beta3`` (default: None).
        t_beta3: T of β_3's schedule, taking the place of ``t_alpha_beta3`` (default: None).
        **kwargs: ``cautious`` and ``stable_adamw`` of pytorch-optimizer, False only; any other
            raises TypeError.

    References:
        M. Pagliardini, P. Ablin, D. Grangier. The AdEMAMix Optimizer: Better, Faster, Older.
        ICLR 2025. https://arxiv.org/abs/2409.03033
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq", "exp_avg_slow")
    param_shaped_state = ("exp_avg", "exp_avg_sq", "exp_avg_slow")
    unsigned_state = ("exp_avg_sq",)
    # Checkpoints of pytorch-optimizer and older ones lack the bitsandbytes schedules.
    backfill = {"t_alpha": None, "t_beta3": None}  # noqa: RUF012 - read-only table

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        fixed_decay: bool = False,
        alpha: float = 5.0,
        t_alpha_beta3: float | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        foreach: bool | None = None,
        *,
        t_alpha: float | None = None,
        t_beta3: float | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(_NOT_IMPLEMENTED))
        if unknown:
            raise TypeError(f"AdEMAMix got unexpected keyword arguments: {unknown}")
        for name, value in kwargs.items():
            if value:
                raise ValueError(
                    f"Invalid {name} value: {value!r} (expected False: polyak's AdEMAMix does "
                    "not implement it)"
                )
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "alpha": alpha,
            "t_alpha_beta3": t_alpha_beta3,
            "eps": eps,
            "foreach": foreach,
            "maximize": maximize,
            "t_alpha": t_alpha,
            "t_beta3": t_beta3,
        }
        self.check_hyperparameters(defaults)
        # The optimizer's own setting, as pytorch-optimizer keeps it: not a checkpoint's.
        self.fixed = {"maximize": maximize}  # type: ignore[misc]
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(_common.with_group_steps)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """pytorch-optimizer's checks, in its order and wording (but ``lr``'s, whose error is
        a ValueError here, as bitsandbytes raises)."""
        lr = group["lr"]
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        betas = group["betas"]
        for i, (beta, top) in enumerate(zip(betas, (False, False, True), strict=False)):
            if not (0.0 <= beta <= 1.0 if top else 0.0 <= beta < 1.0):
                interval = "[0.0, 1.0]" if top else "[0.0, 1.0)"
                raise ValueError(f"beta{i + 1} must be in the range {interval}")
        for name in ("alpha", "t_alpha_beta3", "weight_decay", "eps", "t_alpha", "t_beta3"):
            value = group[name]
            if value is not None and value < 0.0:
                raise ValueError(f"{name} must be non-negative")

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """AdEMAMix takes dense, real gradients."""
        _common.check_dense("AdEMAMix", grads)
        if any(p.is_complex() for p in params):
            raise RuntimeError("AdEMAMix does not support complex parameters")

    # pytorch-optimizer keeps the step count in the group: each parameter takes it.
    upgrade_state = _common.upgrade_group_step_state

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero moments."""
        return {
            "step": _common.zero_step(param, False),
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
            "exp_avg_slow": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one AdEMAMix step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        beta1, beta2, beta3 = hp.betas
        g = _ops.neg(grads) if hp.maximize else grads
        _ops.increment_(steps)
        t = _ops.values(steps)
        decay = hp.weight_decay
        if decay != 0:
            if hp.weight_decouple:
                _ops.mul_(params, 1.0 - decay * (1.0 if hp.fixed_decay else hp.lr))
            else:
                g = _ops.add_scaled(g, params, decay)
        m: list[Any] = state["exp_avg"]
        v: list[Any] = state["exp_avg_sq"]
        s: list[Any] = state["exp_avg_slow"]
        t_alpha = hp.t_alpha_beta3 if hp.t_alpha is None else hp.t_alpha
        t_beta3 = hp.t_alpha_beta3 if hp.t_beta3 is None else hp.t_beta3
        _ops.lerp_(m, g, 1.0 - beta1)
        _ops.mul_(v, beta2)
        _ops.addcmul_(v, g, g, 1.0 - beta2)
        _ops.lerp_(s, g, [1.0 - _scheduled_beta3(beta1, beta3, k, t_beta3) for k in t])
        denom = _ops.sqrt(v)
        _ops.div_(denom, [math.sqrt(1.0 - math.pow(beta2, k)) for k in t])
        _ops.add_(denom, hp.eps)
        u = _ops.div(m, [1.0 - math.pow(beta1, k) for k in t])
        alphas = [hp.alpha if t_alpha is None else min(k * hp.alpha / t_alpha, hp.alpha) for k in t]
        _ops.add_scaled_each_(u, s, alphas)
        _ops.addcdiv_(params, u, denom, -hp.lr)


def _scheduled_beta3(beta1: float, beta3: float, step: float, total: float | None) -> float:
    """β_3 at ``step`` of a schedule over ``total`` steps (β_3 itself without one)."""
    if total is None:
        return beta3
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    part = step / total
    return min(
        math.exp(log_beta1 * log_beta3 / ((1.0 - part) * log_beta3 + part * log_beta1)), beta3
    )
