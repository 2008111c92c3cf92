"""RAdam: Adam with the variance of its adaptive step size rectified."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class RAdam(Optimizer, torch.optim.RAdam):
    r"""RAdam: Adam that takes momentum steps until its second moment is reliable.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

        ρ_t ← ρ_∞ - 2 t β_2^t / (1 - β_2^t)

        r_t ← (ρ_t - 4) (ρ_t - 2) ρ_∞ / ((ρ_∞ - 4) (ρ_∞ - 2) ρ_t)

        a_t ← √r_t · √(1 - β_2^t) / (√v_t + ε)

        θ_t ← θ_{t-1} - γ / (1 - β_1^t) · a_t m_t

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps``, λ = ``weight_decay`` and
    ρ_∞ = 2 / (1 - β_2) - 1; the gradient is negated (−) when ``maximize``. The adaptive
    factor a_t is as written when ρ_t > 5; otherwise a_t = 1 and the step is bias-corrected
    momentum alone. With ``decoupled_weight_decay`` (RAdamW), λ θ_{t-1} is left out of g_t
    and the parameters shrink first instead: θ_{t-1} ← (1 - γ λ) θ_{t-1}. Complex parameters
    are updated as pairs of reals.

    Note:
        As in torch.optim, ε is added to √v_t and the decoupled decay (RAdamW) is scaled by
        the learning rate. On a capturable step polyak computes the same numbers with the
        step read as a number.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-3).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.999)).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: λ, >= 0 (default: 0).
        decoupled_weight_decay: apply weight decay to the parameters directly, as AdamW
            does, instead of adding it to the gradient (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        capturable: keep step counters on the device; accelerators only (default: False).
        differentiable: let autograd run through the step (default: False).

    References:
        L. Liu, H. Jiang, P. He, W. Chen, X. Liu, J. Gao, J. Han. On the Variance of the
        Adaptive Learning Rate and Beyond. ICLR 2020. https://arxiv.org/abs/1908.03265
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq")
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("exp_avg", "exp_avg_sq")
    unsigned_state = ("exp_avg_sq",)
    backfill = {  # noqa: RUF012 - read-only table
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
        "capturable": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    check_hyperparameters = staticmethod(_checks.check_lr_eps_betas_decay)

    upgrade_state = _common.upgrade_step_state

    check_step = _common.dense_and_capturable(
        "RAdam", foreach=("params and state_steps must be", False)
    )

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero moments, as torch.optim creates them."""
        return {
            "step": _common.zero_step(param, hp.capturable),
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one RAdam step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        beta1, beta2 = hp.betas
        g = _ops.neg(grads) if hp.maximize else grads
        _ops.increment_(steps)
        # Complex parameters are updated as pairs of reals, decayed as such on both of torch's
        # paths.
        p, g = _ops.as_real(params), _ops.as_real(g)
        if hp.weight_decay != 0:
            if hp.decoupled_weight_decay:
                _ops.mul_(p, 1 - hp.lr * hp.weight_decay)
            else:
                g = _ops.add_scaled(g, p, hp.weight_decay)
        m: list[Any] = _ops.as_real(state["exp_avg"])  # type: ignore[arg-type]
        v: list[Any] = _ops.as_real(state["exp_avg_sq"])  # type: ignore[arg-type]
        _ops.lerp_(m, g, 1 - beta1)
        _ops.mul_(v, beta2)
        _ops.addcmul_(v, g, g, 1 - beta2)
        t = _ops.values(steps)
        rho_inf = 2 / (1 - beta2) - 1
        rho_ts = [rho_inf - 2 * s * (beta2**s) / (1 - beta2**s) for s in t]
        # Rectified where ρ_t > 5: a branch in Python, torch.where in a compiled step.
        rectified = [rho > 5 for rho in rho_ts]
        lr = hp.lr
        if _common.torch_foreach_path(hp, params, grads):
            rects = [
                _ops.where(r, lambda rho=rho: _rectification(rho, rho_inf), 0)
                for r, rho in zip(rectified, rho_ts, strict=True)
            ]
            # torch's foreach path folds both cases into one multiply-add: the step size
            # 1 / (-(sqrt(v) + eps) / c2) + c1 is -c1 before rectification (c2 = 0) and
            # -c2 / (sqrt(v) + eps) after it (c1 = 0).
            bc1s = [1 - beta1**s for s in t]
            c1 = [
                (lr * _ops.where(r > 0, 0, 1.0) / bc) * -1
                for r, bc in zip(rects, bc1s, strict=True)
            ]
            c2 = [
                ((1 - beta2**s) ** 0.5) * (lr * r / bc) * -1
                for s, r, bc in zip(t, rects, bc1s, strict=True)
            ]
            size = _ops.sqrt(v)
            _ops.add_(size, hp.eps)
            _ops.div_(size, c2)
            _ops.reciprocal_(size)
            _ops.add_(size, c1)
            _ops.addcmul_(p, m, size, 1)
            return
        # torch's per-tensor path branches on rectification, parameter by parameter: the
        # bias-corrected momentum, times the adaptive factor where rectified.
        d = _ops.mul(_ops.div(m, [1 - beta1**s for s in t]), lr)

        def adapted(idx: list[int]) -> list[Tensor]:
            root = _ops.sqrt([v[i] for i in idx])
            if hp.differentiable:
                # Out of place: autograd keeps the square root's result for its backward.
                root = _ops.add(root, hp.eps)
            else:
                _ops.add_(root, hp.eps)
            adaptive = _ops.rdiv([(1 - beta2 ** t[i]) ** 0.5 for i in idx], root)
            rects = [_rectification(rho_ts[i], rho_inf) for i in idx]
            return _ops.mul(_ops.mul_tensors([d[i] for i in idx], adaptive), rects)

        _ops.sub_scaled_(p, _ops.select(rectified, adapted, lambda idx: [d[i] for i in idx]), 1.0)


def _rectification(rho: Any, rho_inf: float) -> Any:
    """r_t of ρ_t (> 5), as torch computes it."""
    return ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
