"""Rprop: resilient backpropagation, steps adapted from the signs of the gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class Rprop(Optimizer, torch.optim.Rprop):
    r"""Rprop: a per-coordinate step size that grows while the gradient keeps its sign.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1})

        δ_t ← min(max(η_t δ_{t-1}, Γ_{min}), Γ_{max})

        g_t ← [g_t g_{t-1} ≥ 0] · g_t

        θ_t ← θ_{t-1} - sign(g_t) δ_t

    where (η_{-}, η_{+}) = ``etas``, (Γ_{min}, Γ_{max}) = ``step_sizes`` and δ_0 = ``lr`` in
    every coordinate (both parts of a complex one); the gradient is negated (−) when
    ``maximize``. Coordinate by coordinate, the factor η_t is η_{+} where g_t g_{t-1} > 0,
    η_{-} where g_t g_{t-1} < 0 and 1 elsewhere, and [·] is 1 where its condition holds and 0
    elsewhere. The state keys are ``prev`` (g_{t-1}, zero at first) and ``step_size`` (δ).
    Complex parameters are updated as pairs of reals.

    Note:
        As in torch.optim, ``lr`` only fills the initial step sizes: changing it later (a
        scheduler) has no effect. A gradient whose sign flipped is stored as zero, so the next
        step neither grows nor shrinks that coordinate (the iRprop- variant). The sign test
        compares with η_{-} in the parameter's dtype, as torch does.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: initial step size δ_0, a float or a one-element tensor, >= 0
            (default: 1e-2).
        etas: (η_{-}, η_{+}), with 0 < η_{-} < 1 < η_{+}
            (default: (0.5, 1.2)).
        step_sizes: (Γ_{min}, Γ_{max}) (default: (1e-6, 50)).
        capturable: keep step counters on the device; accelerators only (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        differentiable: let autograd run through the step (default: False).

    References:
        M. Riedmiller, H. Braun. A Direct Adaptive Method for Faster Backpropagation Learning:
        The RPROP Algorithm. IEEE ICNN 1993. https://doi.org/10.1109/ICNN.1993.298623
    """

    state_keys = ("step", "prev", "step_size")
    #: Only a parameter's first step reads ``lr``.
    optional_keys = frozenset({"lr"})
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("prev", "step_size")
    unsigned_state = ("step_size",)
    backfill = {  # noqa: RUF012 - read-only table
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """Rprop's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_tensor_lr(group["lr"])
        _checks.check_at_least("learning rate", group["lr"])
        etas = group["etas"]
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")

    upgrade_state = _common.upgrade_step_state

    check_step = _common.dense_and_capturable("Rprop")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step and previous gradient, and step sizes filled with ``lr``."""
        lr = hp.lr
        fill = complex(lr, lr) if param.is_complex() else lr
        return {
            "step": _common.zero_step(param, hp.capturable),
            "prev": _common.zeros_like(param),
            "step_size": torch.full_like(param, fill),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Rprop step to ``params`` given their ``grads``."""
        eta_minus, eta_plus = hp.etas
        size_min, size_max = hp.step_sizes
        g = _ops.neg(grads) if hp.maximize else grads
        _ops.increment_(state["step"])  # type: ignore[arg-type]
        # Complex parameters are updated as pairs of reals.
        p, g = _ops.as_real(params), _ops.as_real(g)
        prev: list[Any] = _ops.as_real(state["prev"])  # type: ignore[arg-type]
        size: list[Any] = _ops.as_real(state["step_size"])  # type: ignore[arg-type]
        # A copy of the previous gradient under autograd, which keeps it while it changes.
        factor = _ops.mul_tensors(g, _ops.copy(prev) if hp.differentiable else prev)
        _ops.sign_(factor)
        # The sign of g_t g_{t-1} becomes the step size's factor: eta+, eta- or 1.
        _ops.masked_fill_(factor, _ops.compare(factor, "gt", 0), eta_plus)
        _ops.masked_fill_(factor, _ops.compare(factor, "lt", 0), eta_minus)
        _ops.masked_fill_(factor, _ops.compare(factor, "eq", 0), 1)
        _ops.mul_tensors_(size, factor)
        _ops.clamp_(size, size_min, size_max)
        # Where the sign flipped, the gradient counts as zero, now and as the next g_{t-1}.
        g = _ops.copy(g)
        _ops.masked_fill_(g, _ops.compare(factor, "eq", eta_minus), 0)
        _ops.addcmul_(p, _ops.sign(g), size, -1)
        _ops.copy_(prev, g)
