"""Adadelta: step sizes from running averages of squared gradients and squared updates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class Adadelta(Optimizer, torch.optim.Adadelta):
    r"""Adadelta: an update in the units of the parameter, from two running averages.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        v_t ← ρ v_{t-1} + (1 - ρ) g_t^2

        Δ_t ← √(u_{t-1} + ε) / √(v_t + ε) · g_t

        u_t ← ρ u_{t-1} + (1 - ρ) Δ_t^2

        θ_t ← θ_{t-1} - γ Δ_t

    where γ = ``lr``, ρ = ``rho``, ε = ``eps`` and λ = ``weight_decay``; the gradient is
    negated (−) when ``maximize``. The state keys are ``square_avg`` (v) and ``acc_delta``
    (u). Complex parameters are updated as pairs of reals.

    Note:
        The paper has no learning rate (γ = 1, the default here); as in torch.optim it scales
        the update, and both averages start at zero.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1.0).
        rho: averaging coefficient ρ, in [0, 1] (default: 0.9).
        eps: ε, >= 0 (default: 1e-6).
        weight_decay: L2 penalty λ, >= 0 (default: 0).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        capturable: keep step counters on the device so the step can be graph-captured;
            accelerators only (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).
        differentiable: let autograd run through the step (default: False).

    References:
        M. D. Zeiler. ADADELTA: An Adaptive Learning Rate Method, 2012.
        https://arxiv.org/abs/1212.5701
    """

    state_keys = ("step", "square_avg", "acc_delta")
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("square_avg", "acc_delta")
    unsigned_state = ("square_avg", "acc_delta")
    backfill = {  # noqa: RUF012 - read-only table
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """Adadelta's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_tensor_lr(group["lr"])
        _checks.check_at_least("learning rate", group["lr"])
        _checks.check_between("rho value", group["rho"], 0.0, 1.0)
        _checks.check_at_least("epsilon value", group["eps"])
        _checks.check_at_least("weight_decay value", group["weight_decay"])

    upgrade_state = _common.upgrade_step_state

    check_step = _common.dense_and_capturable(
        "Adadelta",
        loop=("params and state_steps must be", False),
        foreach=("params and state_steps must be", False),
    )

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero averages, as torch.optim creates them."""
        return {
            "step": _common.zero_step(param, hp.capturable),
            "square_avg": _common.zeros_like(param),
            "acc_delta": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Adadelta step to ``params`` given their ``grads``."""
        _ops.increment_(state["step"])  # type: ignore[arg-type]
        g = _ops.neg(grads) if hp.maximize else grads
        # Complex parameters are updated as pairs of reals.
        foreach_order = _common.torch_foreach_path(hp, params, grads)
        p, g = _common.decay_as_real(params, g, hp.weight_decay, foreach_order)
        v: list[Any] = _ops.as_real(state["square_avg"])  # type: ignore[arg-type]
        u: list[Any] = _ops.as_real(state["acc_delta"])  # type: ignore[arg-type]
        _ops.mul_(v, hp.rho)
        _ops.addcmul_(v, g, g, 1 - hp.rho)
        std = _ops.add(v, hp.eps)
        _ops.sqrt_(std)
        delta = _ops.add(u, hp.eps)
        _ops.sqrt_(delta)
        if hp.differentiable:
            # A copy: autograd keeps the square root's result for its backward.
            delta = _ops.copy(delta)
        _ops.div_tensors_(delta, std)
        _ops.mul_tensors_(delta, g)
        _ops.mul_(u, hp.rho)
        _ops.addcmul_(u, delta, delta, 1 - hp.rho)
        # torch.optim passes lr where it takes a number: autograd does not differentiate it.
        lr = _ops.constant(hp.lr)
        if foreach_order:
            _ops.sub_scaled_(p, delta, lr)
        else:
            # torch's per-tensor path adds to the complex parameter, which rounds differently.
            _ops.sub_scaled_(params, _ops.as_complex(delta, params), lr)
