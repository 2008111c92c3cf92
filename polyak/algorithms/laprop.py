"""LaProp: momentum over gradients already divided by their running RMS."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists

#: heavyball's arguments for features polyak's LaProp does not implement, with the value that
#: leaves each off; another value is refused.
_OFF: dict[str, Any] = {
    "storage_dtype": "float32",
    "mars": False,
    "gradient_clipping": None,
    "update_clipping": None,
    "palm": None,
    "ecc": None,
    "param_ecc": None,
    "orig_shapes": None,
}

#: The ε heavyball 3.2.1's fused LaProp step uses, whatever ``eps`` says.
_EPS = 1e-8


class LaProp(Optimizer):
    """LaProp: Adam's moments in the other order, the momentum taken of normalized gradients.

    For each parameter θ with gradient g at step t:

    .. math::

        γ_t ← γ t / max(t, w + 1)

        v_t ← β̂_2 v_{t-1} + (1 - β̂_2) g_t^2

        m_t ← β̂_1 m_{t-1} + (1 - β̂_1) g_t / max(√v_t, ε)

        θ_t ← (1 - γ_t λ) θ_{t-1} - γ_t m_t

    where γ = ``lr``, w = ``warmup_steps``, (β_1, β_2) = ``betas``, λ = ``weight_decay`` and
    ε = 10^{-8}, and β̂ = 1 - (1 - β) / (1 - β^t) is each β debiased for step t (so that the
    moments need no bias correction: β̂ = 0 at t = 1). With ``cautious_weight_decay`` the
    decay applies only where θ and m_t have the same sign; with ``caution``, m_t enters the
    step only where it has the sign of g_t, scaled by the number of coordinates over the
    number kept. The state keys are ``exp_avg`` (m), ``exp_avg_sq`` (v) and ``step``.

    Note:
        This is heavyball 3.2.1's ``LaProp`` run eagerly (``heavyball.utils.compile_mode =
        None``), bit for bit: its step numbers are float32 tensors (β̂ computed as 1 - (1 - β)
        / -expm1(t log1p(β - 1)), γ_t, the weights of its interpolations, each rounded as
        there), its interpolations are x (1 - a) + y a, and its ``eps`` has no effect (its
        fused step takes ε = 10^{-8}). These numbers are tensor arithmetic that the flat
        kernel's scalar program (double precision, without expm1 or log1p) cannot follow, so
        the default step runs the loop. heavyball counts steps per group and keeps its state
        nested under each transform (``update_by_laprop_exp_avg_0``, with a set of
        initialized transforms), which torch's checkpoint format does not hold: polyak counts
        them per parameter (the same where every parameter has a gradient at every step) and
        keeps its state flat, so checkpoints do not interchange. heavyball's other features
        (MARS, PaLM's β_2 schedule, gradient and update clipping, low-precision and
        error-corrected storage) are refused unless left at their defaults (None stands for
        heavyball's ``use_default``); ``multi_tensor``, ``compile_step`` and ``promote`` are
        taken and change nothing: polyak chooses how the step runs.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ (default: 0.0025).
        betas: (β_1, β_2) (default: (0.9, 0.99)).
        eps: kept in the groups, unused, as in heavyball (default: 1e-8).
        weight_decay: λ (default: 0).
        cautious_weight_decay: decay only where θ and m agree in sign (default: False).
        warmup_steps: w, steps of linear learning-rate warmup (default: 0).
        multi_tensor: no effect (default: True).
        storage_dtype: ``"float32"`` only (default: ``"float32"``).
        mars: False only (default: False).
        caution: mask m where it disagrees in sign with g (default: False).
        mars_gamma: kept in the groups, unused without MARS (default: 0.0025).
        gradient_clipping: None only (default: None).
        update_clipping: None only (default: None).
        palm: None or False only (default: None).
        beta2_scale: kept in the groups, unused without PaLM (default: 0.8).
        compile_step: no effect (default: None).
        promote: no effect (default: None).
        ecc: None only (default: None).
        param_ecc: None only (default: None).
        orig_shapes: None only (default: None).
        **kwargs: none is taken; any raises TypeError, as heavyball's unknown ones do.

    References:
        L. Ziyin, Z. T. Wang, M. Ueda. LaProp: Separating Momentum and Adaptivity in Adam.
        2020. https://arxiv.org/abs/2002.04839
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq")
    param_shaped_state = ("exp_avg", "exp_avg_sq")
    unsigned_state = ("exp_avg_sq",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0,
        cautious_weight_decay: bool = False,
        warmup_steps: int = 0,
        multi_tensor: bool = True,
        storage_dtype: str = "float32",
        mars: bool = False,
        caution: bool = False,
        mars_gamma: float = 0.0025,
        gradient_clipping: Any = None,
        update_clipping: Any = None,
        palm: bool | None = None,
        beta2_scale: float = 0.8,
        compile_step: bool | None = None,
        promote: bool | None = None,
        ecc: str | None = None,
        param_ecc: str | None = None,
        orig_shapes: dict[int, tuple[int, ...]] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"unknown keyword arguments: {sorted(kwargs)}")
        given = {
            "storage_dtype": storage_dtype,
            "mars": mars,
            "gradient_clipping": gradient_clipping,
            "update_clipping": update_clipping,
            "palm": palm or None,
            "ecc": ecc,
            "param_ecc": param_ecc,
            "orig_shapes": orig_shapes,
        }
        for name, value in given.items():
            if value != _OFF[name]:
                raise ValueError(
                    f"Invalid {name} value: {value!r} (expected {_OFF[name]!r}: polyak's LaProp "
                    "does not implement it; use heavyball's)"
                )
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "cautious_weight_decay": cautious_weight_decay,
            "warmup_steps": warmup_steps,
            "multi_tensor": multi_tensor,
            "storage_dtype": storage_dtype,
            "mars": mars,
            "caution": caution,
            "mars_gamma": mars_gamma,
            "beta2_scale": beta2_scale,
        }
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """heavyball checks none of its numbers; a loaded group must leave MARS off."""
        if group.get("mars", False) or group.get("storage_dtype", "float32") != "float32":
            raise ValueError("polyak's LaProp runs without MARS, in float32 storage")

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """LaProp takes dense, real gradients."""
        _common.check_dense("LaProp", grads)
        if any(p.is_complex() for p in params):
            raise RuntimeError("LaProp does not support complex parameters")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero moments."""
        return {
            "step": _common.zero_step(param, False),
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one LaProp step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        m: list[Any] = state["exp_avg"]
        v: list[Any] = state["exp_avg_sq"]
        _ops.increment_(steps)
        beta1, beta2 = hp.betas
        # The step's numbers, as heavyball computes them: tensors in the parameter's dtype.
        lrs = [
            _warmed_up(hp.lr, t, hp.warmup_steps).to(p.dtype)
            for p, t in zip(params, steps, strict=True)
        ]
        w1 = [1 - _debiased(beta1, t, p.dtype) for p, t in zip(params, steps, strict=True)]
        w2 = [1 - _debiased(beta2, t, p.dtype) for p, t in zip(params, steps, strict=True)]
        # v ← v (1 - w_2) + g^2 w_2, computed as heavyball's interpolation is.
        _interpolate_(v, _ops.mul_tensors(grads, grads), w2)
        denom = _ops.clamp_min(v, 0)
        _ops.sqrt_(denom)
        _ops.clamp_min_(denom, _EPS)
        normed = _ops.copy(grads)
        _ops.div_tensors_(normed, denom)
        _interpolate_(m, normed, w1)
        u = _cautious(m, grads) if hp.caution else m
        decay = hp.weight_decay
        if hp.cautious_weight_decay:
            shrink = [
                1 - decay * (1 - (x.signbit() ^ y.signbit()).to(x.dtype)) * lr
                for x, y, lr in zip(params, u, lrs, strict=True)
            ]
            new = _ops.mul_tensors(params, shrink)
        elif decay != 0:
            new = _ops.mul(
                params,
                [1 - _scalar(decay, p.dtype) * lr for p, lr in zip(params, lrs, strict=True)],
            )
        else:
            new = _ops.copy(params)
        _ops.add_scaled_(new, _ops.mul(u, [-lr for lr in lrs]), 1)
        _ops.copy_(params, new)


def _scalar(value: float, dtype: torch.dtype) -> Tensor:
    """``value`` as a 0-dim tensor of ``dtype``, as heavyball makes its numbers tensors."""
    return torch.tensor(float(value), dtype=dtype)


def _warmed_up(lr: float, step: Tensor, warmup_steps: int) -> Tensor:
    """γ t / max(t, w + 1), in tensor arithmetic."""
    return lr * step / step.clamp(min=warmup_steps + 1)


def _debiased(beta: float, step: Tensor, dtype: torch.dtype) -> Tensor:
    """1 - (1 - β) / (1 - β^t), computed as 1 - (1 - β) / -expm1(t log1p(β - 1))."""
    b = _scalar(beta, dtype)
    return 1 - (1 - b) / -torch.expm1(step * torch.log1p(b - 1))


def _interpolate_(xs: list[Tensor], ys: list[Tensor], weights: list[Tensor]) -> None:
    """``x ← x (1 - a) + y a`` with each product and the sum rounded on its own."""
    kept = _ops.mul(xs, [1 - a for a in weights])
    _ops.add_scaled_(kept, _ops.mul(ys, weights), 1)
    _ops.copy_(xs, kept)


def _cautious(updates: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """Each update where its sign is its gradient's, zero elsewhere, scaled by its number of
    elements over the number kept: a count over each tensor, as heavyball makes it."""
    out = []
    for u, g in zip(updates, grads, strict=True):
        mask = g.signbit() ^ u.signbit()
        kept = u.masked_fill(mask, 0)
        kept.mul_(mask.numel() / (mask.numel() - mask.sum()).clamp(min=1))
        out.append(kept)
    return out
