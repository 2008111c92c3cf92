"""Adamax: Adam with the infinity norm in place of the second moment."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class Adamax(Optimizer, torch.optim.Adamax):
    r"""Adamax: Adam whose second moment is an exponentially weighted infinity norm.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        u_t ← max(β_2 u_{t-1}, |g_t| + ε)

        θ_t ← θ_{t-1} - γ / (1 - β_1^t) · m_t / u_t

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps`` and λ = ``weight_decay``; the
    gradient is negated (−) when ``maximize``. The maximum is taken coordinate by coordinate.
    Complex parameters are updated as pairs of reals.

    Note:
        As in torch.optim, ε is added to the gradient's magnitude inside the maximum, which
        keeps u_t > 0; the paper divides by u_t alone.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 2e-3).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.999)).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: L2 penalty λ, >= 0 (default: 0).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        differentiable: let autograd run through the step (default: False).
        capturable: keep step counters on the device so the step can be graph-captured;
            accelerators only (default: False).

    References:
        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization, section 7.1.
        ICLR 2015. https://arxiv.org/abs/1412.6980
    """

    state_keys = ("step", "exp_avg", "exp_inf")
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("exp_avg", "exp_inf")
    unsigned_state = ("exp_inf",)
    backfill = {  # noqa: RUF012 - read-only table
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    check_hyperparameters = staticmethod(_checks.check_lr_eps_betas_decay)

    upgrade_state = _common.upgrade_step_state

    check_step = _common.dense_and_capturable(
        "Adamax", foreach=("params and state_steps must be", False)
    )

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero moments, as torch.optim creates them."""
        return {
            "step": _common.zero_step(param, hp.capturable),
            "exp_avg": _common.zeros_like(param),
            "exp_inf": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Adamax step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        beta1, beta2 = hp.betas
        g = _ops.neg(grads) if hp.maximize else grads
        _ops.increment_(steps)
        # Complex parameters are updated as pairs of reals.
        foreach_order = _common.torch_foreach_path(hp, params, grads)
        p, g = _common.decay_as_real(params, g, hp.weight_decay, foreach_order)
        m: list[Any] = _ops.as_real(state["exp_avg"])  # type: ignore[arg-type]
        u: list[Any] = _ops.as_real(state["exp_inf"])  # type: ignore[arg-type]
        _ops.lerp_(m, g, 1 - beta1)
        _ops.mul_(u, beta2)
        g_abs = _ops.absolute(g)
        _ops.add_(g_abs, hp.eps)
        if hp.differentiable:
            _ops.amax_(u, g_abs)
        else:
            _ops.maximum_(u, g_abs)
        if hp.capturable:
            # The step stays a tensor, so the whole update can be graph-captured.
            neg_bc = [(beta1**t - 1) / hp.lr for t in steps]
            _ops.addcdiv_(p, m, [x * b for x, b in zip(u, neg_bc, strict=True)])
        elif foreach_order:
            # torch's foreach path reads a tensor lr as a number.
            lr = _common.number(hp.lr)
            _ops.addcdiv_(p, m, u, [(lr / (1 - beta1**t)) * -1 for t in _ops.values(steps)])
        else:
            # torch's per-tensor path divides a tensor lr as a float32 tensor.
            _ops.addcdiv_(p, m, u, [-(hp.lr / (1 - beta1**t)) for t in _ops.values(steps)])
