"""Stochastic gradient descent with momentum, weight decay and Nesterov momentum."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class SGD(Optimizer, torch.optim.SGD):
    r"""Stochastic gradient descent, optionally with heavy-ball or Nesterov momentum.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        b_t ← μ b_{t-1} + (1 - τ) g_t

        d_t ← g_t + μ b_t

        θ_t ← θ_{t-1} - γ d_t

    where γ = ``lr``, μ = ``momentum``, τ = ``dampening``, λ = ``weight_decay``, and the
    gradient is negated (−) when ``maximize``. The step direction d_t is as written with
    ``nesterov``; without it, d_t = b_t. With μ = 0 there is no buffer and d_t = g_t.

    Note:
        As in torch.optim, and unlike Polyak (1964) and Sutskever et al. (2013), the momentum
        buffer starts as the first gradient, b_1 = g_1, undamped; ``lr`` multiplies the
        buffer rather than entering it, so changing ``lr`` mid-training does not rescale the
        velocity.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0
            (default: 1e-3).
        momentum: momentum factor μ, >= 0 (default: 0).
        dampening: dampening τ of the momentum (default: 0).
        weight_decay: L2 penalty λ, >= 0 (default: 0).
        nesterov: use Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``
            (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        differentiable: let autograd run through the step, e.g. to differentiate with respect
            to ``lr`` (default: False).
        fused: take the fused path, which also unscales gradients inside the step for
            ``torch.amp.GradScaler``; float parameters only (default: None).

    References:
        B. T. Polyak. Some methods of speeding up the convergence of iteration methods. USSR
        Computational Mathematics and Mathematical Physics, 1964.
        https://doi.org/10.1016/0041-5553(64)90137-5

        I. Sutskever, J. Martens, G. Dahl, G. Hinton. On the importance of initialization and
        momentum in deep learning. ICML 2013. https://proceedings.mlr.press/v28/sutskever13.html
    """

    state_keys = ("momentum_buffer",)
    #: torch's step reads ``differentiable`` with a default.
    optional_keys = frozenset({"differentiable"})
    param_shaped_state = ("momentum_buffer",)
    backfill = {  # noqa: RUF012 - read-only table
        "nesterov": False,
        "maximize": False,
        "foreach": None,
        "differentiable": False,
        "fused": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)
        _checks.check_strategy_flags(foreach, fused, differentiable)
        if fused:
            self._step_supports_amp_scaling = True

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """SGD's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_lr(group["lr"])
        _checks.check_nonnegative("momentum", group["momentum"])
        _checks.check_nonnegative("weight_decay", group["weight_decay"])
        _checks.check_nesterov(group["nesterov"], group["momentum"], group["dampening"])

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """A fused step with momentum starts the buffers only where no parameter stepped has
        one: where some have one and others none (a buffer removed by hand), torch's fused
        kernel is handed None for the others and raises its TypeError, which this raises
        before anything changes."""
        super().check_step(group, params, grads)
        if not group.get("fused") or group["momentum"] == 0:
            return
        bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        if all(b is None for b in bufs) or all(b is not None for b in bufs):
            return
        # torch hands its kernel the buffers of each (device, dtype) of the parameters in
        # turn; its message counts within the first such bucket that holds a None.
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor | None]] = {}
        for p, b in zip(params, bufs, strict=True):
            buckets.setdefault((p.device, p.dtype), []).append(b)
        for bucket in buckets.values():
            for j, b in enumerate(bucket):
                if b is None:
                    raise TypeError(
                        f"expected Tensor as element {j} in argument 2, but got NoneType"
                    )

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one SGD step to ``params`` given their ``grads``."""
        g = _ops.neg(grads) if hp.maximize else grads
        if hp.weight_decay != 0:
            g = _ops.add_scaled(g, params, hp.weight_decay)
        if hp.momentum != 0:
            bufs = state["momentum_buffer"]
            old = [i for i, b in enumerate(bufs) if b is not None]
            # The first step sets b_1 = g_1 (no dampening), as torch.optim does.
            for i in range(len(bufs)):
                if bufs[i] is None:
                    bufs[i] = g[i].detach().clone()
            if old:
                b_old = [cast(Tensor, bufs[i]) for i in old]
                _ops.mul_(b_old, hp.momentum)
                _ops.add_scaled_(b_old, [g[i] for i in old], 1 - hp.dampening)
            b = [buf for buf in bufs if buf is not None]
            g = _ops.add_scaled(g, b, hp.momentum) if hp.nesterov else b
        _ops.sub_scaled_(params, g, hp.lr)
