"""Adam, with optional AMSGrad and decoupled (AdamW) weight decay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


def _scalar_dtype(fused: bool | None) -> torch.dtype:
    # Step counters are float32, or float64 under a float64 default dtype, as in torch.optim.
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Adam(Optimizer, torch.optim.Adam):
    r"""Adam: adaptive moment estimation.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

        u_t ← max(u_{t-1}, v_t)

        θ_t ← θ_{t-1} - γ / (1 - β_1^t) · m_t / (√u_t / √(1 - β_2^t) + ε)

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps`` and λ = ``weight_decay``; the
    gradient is negated (−) when ``maximize``. The maximum u_t is kept with ``amsgrad``;
    without it, u_t = v_t. With ``decoupled_weight_decay`` (AdamW), λ θ_{t-1} is left out of
    g_t and the parameters shrink first instead: θ_{t-1} ← (1 - γ λ) θ_{t-1}. Complex
    parameters are updated as pairs of reals.

    Note:
        As in torch.optim, ε is added after dividing √u_t by √(1 - β_2^t) (the paper adds ε
        to the bias-corrected root), and the bias corrections fold into the step size. The
        moments start at zero.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-3).
        betas: (β_1, β_2), each in [0, 1), both floats or both tensors
            (default: (0.9, 0.999)).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: λ, >= 0 (default: 0).
        amsgrad: use the running maximum u_t of v_t (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        capturable: keep step counters on the device so the step can be graph-captured;
            accelerators only (default: False).
        differentiable: let autograd run through the step (default: False).
        fused: take the fused path, which also unscales gradients for ``GradScaler``;
            floating-point parameters only (default: None).
        decoupled_weight_decay: apply weight decay to the parameters directly, as AdamW
            does, instead of adding it to the gradient (default: False).

    References:
        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
        https://arxiv.org/abs/1412.6980

        S. J. Reddi, S. Kale, S. Kumar. On the Convergence of Adam and Beyond. ICLR 2018.
        https://openreview.net/forum?id=ryQu7f-RZ
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    unsigned_state = ("exp_avg_sq", "max_exp_avg_sq")
    backfill = {  # noqa: RUF012 - read-only table
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
        "fused": None,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        self.check_hyperparameters(defaults)
        defaults["betas"] = tuple(
            b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas
        )
        super().__init__(params, defaults)
        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            self._step_supports_amp_scaling = True
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """Adam's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_adam(
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
            group["foreach"],
            group["capturable"],
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for p in group["params"]:
                entry = self.state.get(p)
                if entry:
                    self.upgrade_state(entry, group, p)

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """Checkpoints of old torch versions kept the step as a Python number.

        Raises:
            ValueError: a step no training makes (see :func:`polyak._checks.check_state_step`);
                torch.optim loads it and fails in ``step()``.
        """
        step = entry.get("step")
        if step is not None:
            _checks.check_state_step(step)
        if step is not None and not torch.is_tensor(step):
            on_device = group["capturable"] or group["fused"]
            entry["step"] = torch.tensor(
                float(step),
                dtype=_scalar_dtype(group["fused"]),
                device=param.device if on_device else None,
            )

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Adam takes dense gradients; tensor ``lr`` needs ``capturable`` under ``foreach``."""
        for p, g in zip(params, grads, strict=True):
            if g.is_sparse:
                raise RuntimeError(
                    "Adam does not support sparse gradients, please consider SparseAdam instead"
                )
            if group["fused"] and not self.state.get(p):
                _checks.check_fused_param(p)
        if group["foreach"] and isinstance(group["lr"], Tensor) and not group["capturable"]:
            raise RuntimeError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        if group["foreach"] and not group["capturable"]:
            # Tensor betas set on a group after construction, which refuses them here.
            for name, beta in zip(("beta1", "beta2"), group["betas"], strict=False):
                if isinstance(beta, Tensor):
                    raise ValueError(
                        f"{name} as a Tensor is not supported for capturable=False and foreach=True"
                    )
        _common.check_capturable(
            self.state, group, params, grads, foreach=("params and state_steps must be", False)
        )
        if group["differentiable"]:
            for p in params:
                entry = self.state.get(p)
                if entry and entry["step"].requires_grad:
                    raise RuntimeError(
                        "`requires_grad` is not supported for `step` in differentiable mode"
                    )

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """Zero moments and a zero step counter, as torch.optim creates them."""
        if hp.capturable or hp.fused:
            step = torch.zeros((), dtype=_scalar_dtype(hp.fused), device=param.device)
        else:
            step = torch.tensor(0.0, dtype=_scalar_dtype(False), device="cpu")
        state = {
            "step": step,
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }
        if hp.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Adam step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        beta1, beta2 = hp.betas
        g = _ops.neg(grads) if hp.maximize else grads
        _ops.increment_(steps)
        if hp.weight_decay != 0:
            if hp.decoupled_weight_decay:
                _ops.mul_(params, 1 - hp.lr * hp.weight_decay)
            else:
                g = _ops.add_scaled(g, params, hp.weight_decay)
        # Complex parameters are updated as pairs of reals.
        p, g = _ops.as_real(params), _ops.as_real(g)
        m: list[Any] = _ops.as_real(state["exp_avg"])  # type: ignore[arg-type]
        v: list[Any] = _ops.as_real(state["exp_avg_sq"])  # type: ignore[arg-type]
        if isinstance(beta1, Tensor):
            # torch.optim rounds a tensor beta1 to each parameter's dtype before using it.
            _ops.lerp_(m, g, [1 - beta1.to(x.dtype) for x in m])
        else:
            _ops.lerp_(m, g, 1 - beta1)
        _ops.mul_(v, beta2)
        _ops.addcmul_(v, g, g, 1 - beta2)
        if hp.amsgrad:
            v_max: list[Any] = _ops.as_real(state["max_exp_avg_sq"])  # type: ignore[arg-type]
            _ops.maximum_(v_max, v)
            v = v_max
        if (hp.capturable and not hp.fused) or hp.differentiable:
            # The step stays a tensor, so the whole update is traceable (graphs, autograd).
            # torch's fused kernels read the step as a number whether or not ``capturable``.
            bc1 = [1 - beta1**t for t in steps]
            bc2_sqrt = [(1 - beta2**t).sqrt() for t in steps]
            neg_step_size = [(hp.lr / b).neg() for b in bc1]
            denom = _ops.div(
                _ops.sqrt(v), [b * s for b, s in zip(bc2_sqrt, neg_step_size, strict=True)]
            )
            _ops.add_(denom, [hp.eps / s for s in neg_step_size])
            # A copy, since autograd keeps m_t and the next step changes it in place.
            _ops.addcdiv_(p, _ops.copy(m), denom)
        else:
            t = _ops.values(steps)
            bc1 = [1 - beta1**s for s in t]
            bc2_sqrt = [(1 - beta2**s) ** 0.5 for s in t]
            # In place: this branch never runs under autograd, and a second list of
            # parameter-sized temporaries would double the step's extra memory.
            denom = _ops.sqrt(v)
            _ops.div_(denom, bc2_sqrt)
            _ops.add_(denom, hp.eps)
            _ops.addcdiv_(p, m, denom, [-(hp.lr / b) for b in bc1])
