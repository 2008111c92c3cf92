"""RMSprop, with optional momentum and centering."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class RMSprop(Optimizer, torch.optim.RMSprop):
    r"""RMSprop: divide the gradient by a running root mean square of its recent values.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        v_t ← α v_{t-1} + (1 - α) g_t^2

        m_t ← α m_{t-1} + (1 - α) g_t

        s_t ← √(v_t - m_t^2) + ε

        b_t ← μ b_{t-1} + g_t / s_t

        θ_t ← θ_{t-1} - γ b_t

    where γ = ``lr``, α = ``alpha``, ε = ``eps``, μ = ``momentum`` and λ = ``weight_decay``;
    the gradient is negated (−) when ``maximize``. The running mean m_t of the gradient is
    kept with ``centered``; without it, m_t = 0 and s_t = √v_t + ε. With μ = 0 there is no
    buffer and b_t = g_t / s_t. Complex parameters are updated as pairs of reals.

    Note:
        As in torch.optim, ε is added outside the square root, and the averages v, m and the
        buffer b start at zero, so early steps are larger than those of a bias-corrected
        average.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-2).
        alpha: smoothing constant α, >= 0 (default: 0.99).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: L2 penalty λ, >= 0 (default: 0).
        momentum: momentum factor μ, >= 0 (default: 0).
        centered: divide by an estimate of the gradient's variance instead of its second
            moment (default: False).
        capturable: keep step counters on the device so the step can be graph-captured;
            accelerators only (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        differentiable: let autograd run through the step (default: False).

    References:
        G. Hinton, N. Srivastava, K. Swersky. Neural Networks for Machine Learning, lecture 6e,
        2012. https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf

        A. Graves. Generating Sequences With Recurrent Neural Networks, 2013 (centering).
        https://arxiv.org/abs/1308.0850
    """

    state_keys = ("step", "square_avg", "momentum_buffer", "grad_avg")
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("square_avg", "momentum_buffer", "grad_avg")
    unsigned_state = ("square_avg",)
    backfill = {  # noqa: RUF012 - read-only table
        "momentum": 0,
        "centered": False,
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """RMSprop's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_tensor_lr(group["lr"])
        _checks.check_at_least("learning rate", group["lr"])
        _checks.check_at_least("epsilon value", group["eps"])
        _checks.check_at_least("momentum value", group["momentum"])
        _checks.check_at_least("weight_decay value", group["weight_decay"])
        _checks.check_at_least("alpha value", group["alpha"])

    upgrade_state = _common.upgrade_step_state

    check_step = _common.dense_and_capturable("RMSprop")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero averages, as torch.optim creates them."""
        state = {
            "step": _common.zero_step(param, hp.capturable),
            "square_avg": _common.zeros_like(param),
        }
        if hp.momentum > 0:
            state["momentum_buffer"] = _common.zeros_like(param)
        if hp.centered:
            state["grad_avg"] = _common.zeros_like(param)
        return state

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one RMSprop step to ``params`` given their ``grads``."""
        g = _ops.neg(grads) if hp.maximize else grads
        _ops.increment_(state["step"])  # type: ignore[arg-type]
        # Complex parameters are updated as pairs of reals.
        foreach_order = _common.torch_foreach_path(hp, params, grads)
        p, g = _common.decay_as_real(params, g, hp.weight_decay, foreach_order)
        v: list[Any] = _ops.as_real(state["square_avg"])  # type: ignore[arg-type]
        _ops.mul_(v, hp.alpha)
        _ops.addcmul_(v, g, g, 1 - hp.alpha)
        if hp.centered:
            g_avg: list[Any] = _ops.as_real(state["grad_avg"])  # type: ignore[arg-type]
            _ops.lerp_(g_avg, g, 1 - hp.alpha)
            s = _ops.addcmul(v, g_avg, g_avg, -1)
            _ops.sqrt_(s)
        else:
            s = _ops.sqrt(v)
        if hp.differentiable:
            # Out of place: autograd keeps the square root's result for its backward.
            s = _ops.add(s, hp.eps)
        else:
            _ops.add_(s, hp.eps)
        # torch.optim passes lr where it takes a number: autograd does not differentiate it.
        lr = _ops.constant(hp.lr)
        if hp.momentum > 0:
            b: list[Any] = _ops.as_real(state["momentum_buffer"])  # type: ignore[arg-type]
            _ops.mul_(b, hp.momentum)
            _ops.addcdiv_(b, g, s)
            _ops.sub_scaled_(p, b, lr)
        else:
            _ops.addcdiv_(p, g, s, -lr)
