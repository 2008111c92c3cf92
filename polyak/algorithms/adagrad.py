"""Adagrad: per-coordinate step sizes from the sum of squared gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class Adagrad(Optimizer, torch.optim.Adagrad):
    r"""Adagrad: scale each coordinate's step by the root of its accumulated squared gradients.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        γ_t ← γ / (1 + (t - 1) η)

        s_t ← s_{t-1} + g_t^2

        θ_t ← θ_{t-1} - γ_t g_t / (√s_t + ε)

    where γ = ``lr``, η = ``lr_decay``, λ = ``weight_decay``, ε = ``eps`` and s_0 =
    ``initial_accumulator_value`` in every coordinate (both parts of a complex one); the
    gradient is negated (−) when ``maximize``. Complex parameters are updated as pairs of
    reals. With sparse gradients only the coordinates present in the gradient change.

    Note:
        As in torch.optim, the state of every parameter given to the constructor is created
        there, with the constructor's ``initial_accumulator_value``; parameters added later
        get theirs at their first step, with the same value. ε is added outside the square
        root.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-2).
        lr_decay: learning rate decay η, >= 0 (default: 0).
        weight_decay: L2 penalty λ, >= 0 (default: 0).
        initial_accumulator_value: s_0, >= 0 (default: 0).
        eps: ε, >= 0 (default: 1e-10).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        differentiable: let autograd run through the step (default: False).
        fused: take the fused path, which also unscales gradients for ``GradScaler``;
            floating-point dense parameters only (default: None).

    References:
        J. Duchi, E. Hazan, Y. Singer. Adaptive Subgradient Methods for Online Learning and
        Stochastic Optimization. JMLR 12, 2011. https://jmlr.org/papers/v12/duchi11a.html
    """

    state_keys = ("step", "sum")
    #: Only the constructor reads ``initial_accumulator_value``.
    optional_keys = frozenset({"initial_accumulator_value"})
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("sum",)
    unsigned_state = ("sum",)
    backfill = {  # noqa: RUF012 - read-only table
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "fused": None,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)
        _checks.check_strategy_flags(foreach, fused, differentiable)
        if fused:
            self._step_supports_amp_scaling = True
        # torch.optim creates the state of the constructor's parameters here.
        for group in self.param_groups:
            hp = Hyper(group)
            for p in group["params"]:
                self.state[p] = self.init_state(p, hp)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """Adagrad's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_tensor_lr(group["lr"])
        _checks.check_at_least("learning rate", group["lr"])
        _checks.check_at_least("lr_decay value", group["lr_decay"])
        _checks.check_at_least("weight_decay value", group["weight_decay"])
        value = group["initial_accumulator_value"]
        _checks.check_at_least("initial_accumulator_value value", value)
        _checks.check_at_least("epsilon value", group["eps"])

    def share_memory(self) -> None:
        """Move each parameter's ``sum`` into shared memory, for multiprocess training."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """Checkpoints of old torch versions kept the step as a Python number."""
        _common.upgrade_step(entry, param, False)
        if group["fused"] and torch.is_tensor(entry.get("step")):
            entry["step"] = entry["step"].to(dtype=torch.float32, device=param.device)

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Sparse gradients take neither weight decay nor ``fused``."""
        if group["fused"]:
            for p in params:
                _checks.check_fused_param(p)
        if any(g.is_sparse for g in grads):
            if group["weight_decay"] != 0:
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")
            if group["fused"]:
                raise RuntimeError("`fused` does not support sparse grad or complex param")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step and the accumulator filled with the constructor's initial value."""
        if hp.fused:
            step = torch.zeros((), dtype=torch.float32, device=param.device)
        else:
            step = _common.zero_step(param, False)
        value = self.defaults["initial_accumulator_value"]
        fill = complex(value, value) if param.is_complex() else value
        return {"step": step, "sum": torch.full_like(param, fill)}

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Adagrad step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        sums: list[Any] = state["sum"]
        _ops.increment_(steps)
        # torch.optim computes the decayed rate in Python, or in float32 for a tensor lr.
        lrs = [hp.lr / (1 + (t - 1) * hp.lr_decay) for t in _ops.values(steps)]
        if any(g.is_sparse for g in grads):
            for param, grad, total, lr in zip(params, grads, sums, lrs, strict=True):
                _sparse_step_(param, -grad if hp.maximize else grad, total, lr, hp.eps)
            return
        g = _ops.neg(grads) if hp.maximize else grads
        # torch's fused kernel rounds in its own order, which neither path copies; the
        # per-tensor order needs no temporary for the scaled gradient.
        foreach_order = not hp.fused and _common.torch_foreach_path(hp, params, grads)
        # Complex parameters are updated as pairs of reals.
        p, g = _common.decay_as_real(params, g, hp.weight_decay, foreach_order)
        s = _ops.as_real(sums)
        _ops.addcmul_(s, g, g, 1)
        std = _ops.sqrt(s)
        if hp.differentiable:
            # Out of place: autograd keeps the square root's result for its backward.
            std = _ops.add(std, hp.eps)
        else:
            _ops.add_(std, hp.eps)
        neg_lrs = [-lr for lr in lrs]
        if foreach_order:
            # torch's foreach path scales the gradient before dividing, in place where the
            # gradient is already a copy (which rounds half precision differently).
            if hp.weight_decay != 0 or hp.maximize:
                _ops.mul_(g, neg_lrs)
            else:
                g = _ops.mul(g, neg_lrs)
            _ops.addcdiv_(p, g, std)
        else:
            _ops.addcdiv_(p, g, std, neg_lrs)


def _sparse_step_(param: Tensor, grad: Tensor, total: Tensor, lr: Any, eps: float) -> None:
    """The update of the coordinates present in a sparse gradient, one tensor at a time."""
    # Coalesced, since the update is not linear in the gradient: indices must be unique.
    grad = grad.coalesce()
    indices, values = grad._indices(), grad._values()
    size = grad.size()
    total.add_(torch.sparse_coo_tensor(indices, values.pow(2), size))
    std = total.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.add_(torch.sparse_coo_tensor(indices, values / std, size), alpha=-lr)
