"""NAdam: Adam with Nesterov momentum and a momentum schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class NAdam(Optimizer, torch.optim.NAdam):
    r"""NAdam: Adam whose first moment looks one step ahead, as Nesterov momentum does.

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        μ_t ← β_1 (1 - 0.96^{t ψ} / 2)

        Π_t ← Π_{t-1} μ_t

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

        d_t ← √v_t / √(1 - β_2^t) + ε

        n_t ← (1 - μ_t) / (1 - Π_t) · g_t + μ_{t+1} / (1 - Π_t μ_{t+1}) · m_t

        θ_t ← θ_{t-1} - γ n_t / d_t

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps``, λ = ``weight_decay`` and ψ =
    ``momentum_decay``, with Π_0 = 1 and μ_{t+1} given by μ_t's formula at step t + 1; the
    gradient is negated (−) when ``maximize``. With ``decoupled_weight_decay`` (NAdamW),
    λ θ_{t-1} is left out of g_t and the parameters shrink first instead:
    θ_{t-1} ← (1 - γ λ) θ_{t-1}. Π_t is the state ``mu_product``, kept as a float32 (or
    default-dtype) tensor and multiplied in that precision, as in torch.optim. Complex
    parameters are updated as pairs of reals.

    Note:
        As in torch.optim, ε is added to the bias-corrected root, and the decoupled decay
        (NAdamW) is scaled by the learning rate.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 2e-3).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.999)).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: λ, >= 0 (default: 0).
        momentum_decay: ψ, >= 0 (default: 4e-3).
        decoupled_weight_decay: apply weight decay to the parameters directly, as AdamW
            does, instead of adding it to the gradient (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        capturable: keep step counters on the device so the step can be graph-captured;
            accelerators only (default: False).
        differentiable: let autograd run through the step (default: False).

    References:
        T. Dozat. Incorporating Nesterov Momentum into Adam. ICLR 2016 workshop.
        https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ
    """

    state_keys = ("step", "mu_product", "exp_avg", "exp_avg_sq")
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("exp_avg", "exp_avg_sq")
    unsigned_state = ("exp_avg_sq",)
    backfill = {  # noqa: RUF012 - read-only table
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """NAdam's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_lr_eps_betas_decay(group)
        _checks.check_at_least("momentum_decay value", group["momentum_decay"])

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """Checkpoints of old torch versions kept the step and ``mu_product`` as numbers."""
        _common.upgrade_step(entry, param, group["capturable"])
        mu_product = entry.get("mu_product")
        # None is made a tensor too, and raises torch's TypeError, as torch's loading does.
        if "mu_product" in entry and not torch.is_tensor(mu_product):
            device = param.device if group["capturable"] else None
            entry["mu_product"] = torch.tensor(
                mu_product, dtype=_common.scalar_dtype(), device=device
            )

    check_step = _common.dense_and_capturable(
        "NAdam",
        loop=("params, mu_products and state_steps must be", True),
        foreach=("params, mu_products, and state_steps must be", False),
    )

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step, a unit ``mu_product`` and zero moments, as torch.optim creates them."""
        device = param.device if hp.capturable else None
        return {
            "step": _common.zero_step(param, hp.capturable),
            "mu_product": torch.ones((), dtype=_common.scalar_dtype(), device=device),
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one NAdam step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        mu_products: list[Any] = state["mu_product"]
        beta1, beta2 = hp.betas
        psi = hp.momentum_decay
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
        # A capturable step keeps the step a tensor; the others read it as a number.
        t = steps if hp.capturable else _ops.values(steps)
        mus = [beta1 * (1.0 - 0.5 * (0.96 ** (s * psi))) for s in t]
        mu_nexts = [beta1 * (1.0 - 0.5 * (0.96 ** ((s + 1) * psi))) for s in t]
        # In the state's own precision (float32), as torch.optim multiplies it.
        _ops.mul_(mu_products, mus)
        m: list[Any] = _ops.as_real(state["exp_avg"])  # type: ignore[arg-type]
        v: list[Any] = _ops.as_real(state["exp_avg_sq"])  # type: ignore[arg-type]
        _ops.lerp_(m, g, 1 - beta1)
        _ops.mul_(v, beta2)
        _ops.addcmul_(v, g, g, 1 - beta2)
        if hp.differentiable or hp.capturable:
            # Tensor arithmetic on the state throughout, which autograd and graphs follow.
            denom = _ops.sqrt(_ops.div(v, [1 - beta2**s for s in t]))
            denom = _ops.add(denom, hp.eps)
            lr = hp.lr
            pi_nexts = [pi * mn for pi, mn in zip(mu_products, mu_nexts, strict=True)]
            scaled_g = _ops.mul(
                g, [-lr * (1.0 - mu) / (1.0 - pi) for mu, pi in zip(mus, mu_products, strict=True)]
            )
            scaled_m = _ops.mul(
                m, [-lr * mn / (1.0 - pn) for mn, pn in zip(mu_nexts, pi_nexts, strict=True)]
            )
            _ops.addcdiv_(p, scaled_g, denom)
            _ops.addcdiv_(p, scaled_m, denom)
            return
        pis = _ops.values(mu_products)
        if _common.torch_foreach_path(hp, params, grads):
            # torch's foreach path takes the root before the bias correction, and reads a
            # tensor lr as a number.
            lr = _common.number(hp.lr)
            denom = _ops.sqrt(v)
            _ops.div_(denom, [(1 - beta2**s) ** 0.5 for s in t])
            _ops.add_(denom, hp.eps)
            step_g = [(lr * (1.0 - mu) / (1.0 - pi)) * -1 for mu, pi in zip(mus, pis, strict=True)]
            step_m = [
                (lr * mn / (1.0 - pi * mn)) * -1 for mn, pi in zip(mu_nexts, pis, strict=True)
            ]
        else:
            # torch's per-tensor path computes with a tensor lr as a float32 tensor.
            lr = hp.lr
            denom = _ops.sqrt(_ops.div(v, [1 - beta2**s for s in t]))
            _ops.add_(denom, hp.eps)
            step_g = [-lr * (1.0 - mu) / (1.0 - pi) for mu, pi in zip(mus, pis, strict=True)]
            step_m = [(-lr * mn) / (1.0 - pi * mn) for mn, pi in zip(mu_nexts, pis, strict=True)]
        _ops.addcdiv_(p, g, denom, step_g)
        _ops.addcdiv_(p, m, denom, step_m)
