"""StableAdamW: AdamW whose learning rate is cut, tensor by tensor, by the RMS of its update."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateDict, StateLists

# The base class's step without its hooks: StableAdamW's wraps it, and the hooks fire once,
# around the whole.
_base_step: Callable[..., Any] = Optimizer.step.__wrapped__  # type: ignore[attr-defined]

_HALVES = (torch.float16, torch.bfloat16)


class StableAdamW(Optimizer):
    """StableAdamW: AdamW with debiased betas and update clipping, the step size of each tensor
    divided by the root mean square of its normalized gradient where that exceeds 1.

    For each parameter θ with gradient g at step t:

    .. math::

        β̂_i ← β_i (1 - β_i^{t-1}) / (1 - β_i^t),  i = 1, 2

        m_t ← β̂_1 m_{t-1} + (1 - β̂_1) g_t

        v_t ← β̂_2 v_{t-1} + (1 - β̂_2) g_t^2

        γ_t ← γ / max(1, √mean(g_t^2 / max(v_t, ε^2)))

        θ_{t-1} ← (1 - γ_t λ) θ_{t-1}

        θ_t ← θ_{t-1} - γ_t m_t / (√v_t + ε)

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps`` and λ = ``weight_decay``, and the
    mean is over the elements of one tensor. With ``decouple_lr``, the decay is fully
    decoupled from the learning rate: θ_{t-1} ← (1 - γ_t / γ_max · λ) θ_{t-1}, γ_max =
    ``max_lr`` (``lr`` where None). The debiased betas make m and v bias-corrected averages
    (β̂ = 0 at the first step).

    Note:
        This is torch-optimi 0.3.3's ``StableAdamW``, bit for bit, on its for-loop path (its default
        on the CPU) and its foreach path, which compute the same numbers. Its state keys and group
        entries are optimi's (``eps_sq``, ε^2 in the parameter's dtype; the group's ``step`` count,
        an int32 tensor, and ``setup``), and a state_dict written here holds optimi's ``kahan_comp``
        entry (None for parameters of 32 or 64 bits), so checkpoints interchange. ``kahan_sum``
        (None: on for parameters of 16 bits, as in optimi) runs the update in float32 and adds it
        with a compensation buffer, as polyak's ``kahan_sum`` does for every elementwise optimizer,
        within rounding of optimi's 16-bit arithmetic. ``triton`` is taken and has no effect: polyak
        chooses how the step runs. ``gradient_release`` (a step inside the backward pass) is
        refused. optimi's foreach path squares the gradient in ``.grad`` itself; polyak leaves
        ``.grad`` as it is. The RMS is a reduction over each tensor, so the step does not run on the
        flat kernel. Complex parameters, sparse gradients and torch.distributed's functional
        optimizers (which would step the update rule without the group's count) are refused.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, >= 0 (required).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.99)).
        weight_decay: λ, >= 0 (default: 1e-2).
        eps: ε, >= 0 (default: 1e-6).
        decouple_lr: decay by λ γ_t / γ_max rather than γ_t λ (default: False).
        max_lr: γ_max, >= 0, or None for ``lr`` (default: None).
        kahan_sum: compensate the updates of 16-bit parameters; None turns it on for them
            (default: None).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        triton: accepted for compatibility; no effect (default: None).
        gradient_release: False only (default: False).

    References:
        M. Wortsman, T. Dettmers, L. Zettlemoyer, A. Morcos, A. Farhadi, L. Schmidt. Stable
        and Low-Precision Training for Large-Scale Vision-Language Models. NeurIPS 2023.
        https://arxiv.org/abs/2304.13013
    """

    state_keys = ("exp_avg", "exp_avg_sq", "eps_sq")
    param_shaped_state = ("exp_avg", "exp_avg_sq")
    unsigned_state = ("exp_avg_sq",)
    elementwise = False

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-2,
        eps: float = 1e-6,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        kahan_sum: bool | None = None,
        foreach: bool | None = None,
        triton: bool | None = None,
        gradient_release: bool = False,
    ) -> None:
        if decouple_lr and max_lr is None and isinstance(lr, (int, float)) and lr >= 0.0:
            max_lr = lr
        defaults: dict[str, Any] = {
            "lr": lr,
            "beta1": betas[0],
            "beta2": betas[1],
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple_lr": decouple_lr,
            "max_lr": max_lr,
            "kahan_sum": kahan_sum,
            "foreach": foreach,
            "triton": triton,
            "gradient_release": gradient_release,
            "setup": False,
        }
        self.check_hyperparameters(defaults)
        if gradient_release:
            raise ValueError(
                "Invalid gradient_release value: True (expected False: polyak's StableAdamW "
                "does not step inside the backward pass)"
            )
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(_with_kahan_comps)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """optimi's checks, in its order and wording."""
        beta1, beta2 = group["beta1"], group["beta2"]
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1 parameter: betas[0]={beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2 parameter: betas[1]={beta2}")
        eps = group["eps"]
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon: eps={eps}")
        _checks.check_tensor_lr(group["lr"])
        if not 0.0 <= group["lr"]:
            raise ValueError(f"Invalid learning rate: lr={group['lr']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight decay: weight_decay={group['weight_decay']}")
        max_lr = group["max_lr"]
        if max_lr is not None and not 0.0 <= max_lr:
            raise ValueError(f"Invalid maximum learning rate: max_lr={max_lr}")

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """StableAdamW takes dense, real gradients, stepped by :meth:`step`, which counts the
        group's steps (torch.distributed's functional optimizers step the update rule alone)."""
        if not self.__dict__.get("_in_step"):
            raise RuntimeError("StableAdamW steps through its step() only, which counts its steps")
        _common.check_dense("StableAdamW", grads)
        if any(p.is_complex() for p in params):
            raise RuntimeError("StableAdamW does not support complex parameters")

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """optimi's ``kahan_comp`` of None (no compensation) is no state here."""
        if "kahan_comp" in entry and entry["kahan_comp"] is None:
            del entry["kahan_comp"]

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """Zero moments and ε^2 in the parameter's dtype, as optimi creates them."""
        return {
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
            "eps_sq": torch.tensor(hp.eps**2, dtype=param.dtype, device=param.device),
        }

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step over every group, counting it in each group's
        ``step``, as optimi does.

        Args:
            closure: re-evaluates the model and returns the loss; it runs with autograd
                enabled, before the update, and its loss is returned.
        """
        kept = [
            {key: group[key] for key in ("setup", "triton", "kahan_sum") if key in group}
            | {"step": group.get("step")}
            for group in self.param_groups
        ]
        for group in self.param_groups:
            if not group["setup"]:
                group["setup"] = True
                group["step"] = torch.tensor(0, dtype=torch.int32)
                if group["triton"] is None and group["foreach"] is None:
                    # optimi's choice where it has no Triton kernel to run (the CPU).
                    group["triton"] = False
            if group["kahan_sum"] is None and any(
                p.grad is not None and p.dtype in _HALVES for p in group["params"]
            ):
                group["kahan_sum"] = True
            group["step"] = group["step"] + 1
        self.__dict__["_in_step"] = True
        try:
            return _base_step(self, closure)
        except BaseException:
            # A step that fails changes nothing, its count included.
            for group, values in zip(self.param_groups, kept, strict=True):
                group.update(values)
                if values["step"] is None:
                    del group["step"]
            raise
        finally:
            self.__dict__["_in_step"] = False

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one StableAdamW step to ``params`` given their ``grads``."""
        t = int(hp.step)
        beta1_hat, beta2_hat = _debiased(hp.beta1, t), _debiased(hp.beta2, t)
        m: list[Any] = state["exp_avg"]
        v: list[Any] = state["exp_avg_sq"]
        eps_sq: list[Any] = state["eps_sq"]
        _ops.lerp_(m, grads, 1 - beta1_hat)
        _ops.mul_(v, beta2_hat)
        _ops.addcmul_(v, grads, grads, 1 - beta2_hat)
        # The RMS of each tensor's normalized gradient, its mean as torch reduces it.
        floors = _ops.copy(v)
        _ops.maximum_(floors, eps_sq)
        ratios = _ops.mul_tensors(grads, grads)
        _ops.div_tensors_(ratios, floors)
        rms = _ops.measured([r.mean().sqrt() for r in ratios])
        lrs = [hp.lr / _ops.where(r > 1, r, 1) for r in rms]
        if hp.weight_decay != 0:
            if hp.decouple_lr:
                _ops.mul_(params, [1 - (lr / hp.max_lr) * hp.weight_decay for lr in lrs])
            else:
                _ops.mul_(params, [1 - lr * hp.weight_decay for lr in lrs])
        denom = _ops.sqrt(v)
        _ops.add_(denom, hp.eps)
        _ops.addcdiv_(params, m, denom, [-lr for lr in lrs])


def _debiased(beta: float, step: int) -> float:
    """β̂ at ``step``, as optimi computes it: (β^t - β) / (β^t - 1)."""
    return (beta**step - beta) / (beta**step - 1)


def _with_kahan_comps(optimizer: Any, state_dict: StateDict) -> None:
    """A ``state_dict`` post hook: optimi's ``kahan_comp`` entry, None where a parameter keeps
    no compensation."""
    state = state_dict["state"]
    for i, entry in state.items():
        if isinstance(entry, dict) and "exp_avg" in entry and "kahan_comp" not in entry:
            state[i] = {**entry, "kahan_comp": None}
