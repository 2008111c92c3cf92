"""ASGD: stochastic gradient descent with a running average of the iterates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class ASGD(Optimizer, torch.optim.ASGD):
    r"""ASGD: SGD with decaying steps whose iterates are averaged (Polyak–Ruppert averaging).

    For each parameter θ with gradient g at step t:

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        θ_t ← (1 - κ η_{t-1}) θ_{t-1} - η_{t-1} g_t

        a_t ← a_{t-1} + μ_{t-1} (θ_t - a_{t-1})

        η_t ← γ / (1 + κ γ t)^α

        μ_t ← 1 / max(1, t - t_0)

    where γ = ``lr``, κ = ``lambd``, α = ``alpha``, t_0 = ``t0`` and λ = ``weight_decay``,
    with η_0 = γ and μ_0 = 1; the gradient is negated (−) when ``maximize``. The state keys
    are ``eta``, ``mu`` and ``ax`` (the average a), all kept on the parameter's device with
    the ``step``. The optimizer steps θ; the average a is state. Complex parameters are
    updated as pairs of reals.

    Note:
        As in torch.optim, averaging starts after t_0 steps (before it a_t = θ_t), and η and
        μ are stored in float32 (or the default dtype).

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-2).
        lambd: decay term κ (default: 1e-4).
        alpha: power α of the step-size decay (default: 0.75).
        t0: step t_0 at which averaging starts (default: 1e6).
        weight_decay: L2 penalty λ, >= 0 (default: 0).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        differentiable: let autograd run through the step (default: False).
        capturable: keep the step on the device; accelerators only (default: False).

    References:
        B. T. Polyak, A. B. Juditsky. Acceleration of Stochastic Approximation by Averaging.
        SIAM Journal on Control and Optimization 30(4), 1992. https://doi.org/10.1137/0330046
    """

    state_keys = ("step", "eta", "mu", "ax")
    param_shaped_state = ("ax",)
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
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """ASGD's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_tensor_lr(group["lr"])
        _checks.check_at_least("learning rate", group["lr"])
        _checks.check_at_least("weight_decay value", group["weight_decay"])

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """Checkpoints of old torch versions kept the step, ``eta`` and ``mu`` as numbers."""
        _common.upgrade_step(entry, param, True)
        for key in ("eta", "mu"):
            value = entry.get(key)
            # None is made a tensor too, and raises torch's TypeError, as torch's loading does.
            if key in entry and not torch.is_tensor(value):
                entry[key] = torch.tensor(value, dtype=_common.scalar_dtype(), device=param.device)

    check_step = _common.dense_and_capturable(
        "ASGD",
        loop=("params, mus, etas, and state_steps must be", True),
        foreach=("params, mus, etas, and state_steps must be", False),
    )

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step, ``eta`` = lr, ``mu`` = 1 and a zero average, on the parameter's
        device, as torch.optim creates them."""
        dtype = _common.scalar_dtype()
        return {
            "step": torch.zeros((), dtype=dtype, device=param.device),
            "eta": torch.as_tensor(hp.lr, dtype=dtype, device=param.device).clone().detach(),
            "mu": torch.ones((), dtype=dtype, device=param.device),
            "ax": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one ASGD step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        etas: list[Any] = state["eta"]
        mus: list[Any] = state["mu"]
        g = _ops.neg(grads) if hp.maximize else grads
        # Complex parameters are updated as pairs of reals, decayed as such on both of torch's
        # paths.
        p, g = _ops.as_real(params), _ops.as_real(g)
        ax: list[Any] = _ops.as_real(state["ax"])  # type: ignore[arg-type]
        _ops.increment_(steps)
        if hp.weight_decay != 0:
            g = _ops.add_scaled(g, p, hp.weight_decay)
        lr, kappa = hp.lr, hp.lambd
        if _common.torch_foreach_path(hp, params, grads):
            # torch's foreach path folds the decay into the gradient, multiplies by the eta
            # tensors, always averages, and computes the new eta from the float32 step tensor.
            if hp.weight_decay != 0:
                _ops.add_scaled_(g, p, kappa)
            else:
                g = _ops.add_scaled(g, p, kappa)
            _ops.addcmul_(p, g, etas, -1)
            _ops.addcmul_(ax, _ops.sub(p, ax), mus, 1)
            new_etas = [lr / ((1 + kappa * lr * s) ** hp.alpha) for s in steps]
        else:
            eta_values = _ops.values(etas)
            _ops.mul_(p, [1 - kappa * eta for eta in eta_values])
            _ops.add_scaled_each_(p, g, [-eta for eta in eta_values])

            # Averaging starts when mu leaves 1; before, the average is the iterate itself.
            def averaged(idx: list[int]) -> list[Tensor]:
                ax_i = [ax[i] for i in idx]
                diff = _ops.sub([p[i] for i in idx], ax_i)
                _ops.mul_tensors_(diff, [mus[i] for i in idx])
                return _ops.add_scaled(ax_i, diff, 1)

            averaging = [mu != 1 for mu in _ops.values(mus)]
            _ops.copy_(ax, _ops.select(averaging, averaged, lambda idx: [p[i] for i in idx]))
            new_etas = [lr / ((1 + kappa * lr * s) ** hp.alpha) for s in _ops.values(steps)]
        _ops.assign_(etas, new_etas)
        # 1 / max(1, t - t_0), as Python's max picks.
        _ops.assign_(
            mus,
            [1 / _ops.where(s - hp.t0 > 1, s - hp.t0, 1) for s in _ops.values(steps)],
        )
