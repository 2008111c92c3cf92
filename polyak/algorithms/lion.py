"""Lion: the sign of an interpolated momentum as the step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class LionArgumentError(ValueError, AssertionError):
    """A constructor argument Lion refuses: a ValueError, as bitsandbytes' Lion raises, and an
    AssertionError, as lion-pytorch's (whose checks are assertions) raises."""


class Lion(Optimizer):
    """Lion: evolved sign momentum.

    For each parameter θ with gradient g at step t:

    .. math::

        θ_{t-1} ← (1 - γ λ) θ_{t-1}

        u_t ← sign(β_1 m_{t-1} + (1 - β_1) g_t)

        θ_t ← θ_{t-1} - γ u_t

        m_t ← β_2 m_{t-1} + (1 - β_2) g_t

    where γ = ``lr``, (β_1, β_2) = ``betas`` and λ = ``weight_decay``; with
    ``decoupled_weight_decay``, λ is ``weight_decay`` divided by the learning rate given to the
    constructor, γ_0, so that the decay per step is γ / γ_0 · ``weight_decay``. The momentum m
    (state key ``exp_avg``) starts at zero.

    Note:
        This is lion-pytorch 0.2.5's ``Lion``, bit for bit, and bitsandbytes 0.50's
        ``Lion(optim_bits=32)``, which computes the same numbers (its state key is ``state1``
        and it keeps a step count). Where they differ, in the checks of their arguments, the
        union is taken: ``lr`` must be > 0 and each beta in [0, 1], and the error raised is
        both a ValueError (bitsandbytes) and an AssertionError (lion-pytorch). As in
        lion-pytorch, γ_0 and ``decoupled_weight_decay`` belong to the optimizer: they are kept
        in every group and a loaded checkpoint does not change them. ``use_triton`` is taken
        and has no effect: polyak chooses how the step runs. Complex parameters are refused,
        since the sign of a complex number is not that of its parts.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, > 0 (default: 1e-4).
        betas: (β_1, β_2), each in [0, 1] (default: (0.9, 0.99)).
        weight_decay: decoupled decay λ (default: 0).
        use_triton: accepted for compatibility; no effect (default: False).
        decoupled_weight_decay: divide λ by the constructor's learning rate (default: False).

    References:
        X. Chen, C. Liang, D. Huang, E. Real, K. Wang, Y. Liu, H. Pham, X. Dong, T. Luong,
        C.-J. Hsieh, Y. Lu, Q. V. Le. Symbolic Discovery of Optimization Algorithms.
        NeurIPS 2023. https://arxiv.org/abs/2302.06675
    """

    state_keys = ("exp_avg",)
    param_shaped_state = ("exp_avg",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "init_lr": lr,
        }
        self.check_hyperparameters(defaults)
        # The optimizer's own settings, as lion-pytorch keeps them: not a checkpoint's.
        self.fixed = {"decoupled_weight_decay": decoupled_weight_decay, "init_lr": lr}  # type: ignore[misc]
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """lr > 0 and betas in [0, 1], as lion-pytorch asserts."""
        lr = group["lr"]
        if not lr > 0.0:
            raise LionArgumentError(f"Invalid learning rate: {lr} (expected > 0)")
        for i, beta in enumerate(group["betas"]):
            if not 0.0 <= beta <= 1.0:
                raise LionArgumentError(
                    f"Invalid beta parameter at index {i}: {beta} (expected in [0, 1])"
                )
        _checks.check_tensor_lr(lr)

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Lion takes dense, real gradients."""
        _common.check_dense("Lion", grads)
        if any(p.is_complex() for p in params):
            raise RuntimeError("Lion does not support complex parameters")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero momentum."""
        return {"exp_avg": _common.zeros_like(param)}

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Lion step to ``params`` given their ``grads``."""
        beta1, beta2 = hp.betas
        m: list[Any] = state["exp_avg"]
        decay = hp.weight_decay
        if decay != 0:
            if hp.decoupled_weight_decay:
                decay = decay / hp.init_lr
            _ops.mul_(params, 1 - hp.lr * decay)
        # The interpolation is made in a new tensor: m keeps β_1's counterpart until its own
        # update below, with β_2.
        u = _ops.mul(m, beta1)
        _ops.add_scaled_(u, grads, 1 - beta1)
        _ops.sign_(u)
        _ops.add_scaled_(params, u, -hp.lr)
        _ops.mul_(m, beta2)
        _ops.add_scaled_(m, grads, 1 - beta2)
