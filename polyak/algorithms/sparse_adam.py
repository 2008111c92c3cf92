"""SparseAdam: Adam for sparse gradients, updating only the entries they hold."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class SparseAdam(Optimizer, torch.optim.SparseAdam):
    r"""SparseAdam: Adam restricted to the entries present in each sparse gradient.

    For each parameter θ with sparse gradient g at step t, on the set S of entries g holds
    (the others are left as they are):

    .. math::

        g_t ← ±∇f_t(θ_{t-1})

        m_t[S] ← β_1 m_{t-1}[S] + (1 - β_1) g_t[S]

        v_t[S] ← β_2 v_{t-1}[S] + (1 - β_2) g_t[S]^2

        θ_t[S] ← θ_{t-1}[S] - γ √(1 - β_2^t) / (1 - β_1^t) · m_t[S] / (√(v_t[S]) + ε)

    where γ = ``lr``, (β_1, β_2) = ``betas`` and ε = ``eps``; the gradient is negated (−)
    when ``maximize``. The step t counts every step with a gradient, including those whose
    gradient holds no entry.

    Note:
        As in torch.optim, the entries a gradient holds are taken as its nonzero ones without
        checking their values, the step count is a Python int, and parameters must be dense,
        real tensors with sparse gradients (``nn.Embedding(sparse=True)``).

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, > 0 (default: 1e-3).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.999)).
        eps: ε, > 0 (default: 1e-8).
        maximize: maximize the objective instead of minimizing it (default: False).

    References:
        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
        https://arxiv.org/abs/1412.6980
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq")
    #: torch's step reads ``maximize`` with a default.
    optional_keys = frozenset({"maximize"})
    param_shaped_state = ("exp_avg", "exp_avg_sq")
    backfill = {"maximize": False}  # noqa: RUF012 - read-only table
    eager_under_compile = True  # dynamo traces no sparse tensor

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)
        sparse, complex_ = [], []
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.is_sparse:
                    sparse.append([i, j])
                if p.is_complex():
                    complex_.append([i, j])
        if sparse:
            raise ValueError(
                f"Sparse params at indices {sparse}: SparseAdam requires dense parameter tensors"
            )
        if complex_:
            raise ValueError(
                f"Complex params at indices {complex_}: "
                "SparseAdam does not support complex parameters"
            )

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """SparseAdam's checks of its numbers, in torch.optim's order and wording."""
        _checks.check_tensor_lr(group["lr"])
        if not 0.0 < group["lr"]:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not 0.0 < group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        _checks.check_betas(group["betas"])

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """SparseAdam takes sparse gradients only."""
        if not all(g.is_sparse for g in grads):
            raise RuntimeError(
                "SparseAdam does not support dense gradients, please consider Adam instead"
            )

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Any]:
        """A zero step count (a Python int, as in torch.optim) and zero moments."""
        return {
            "step": 0,
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one SparseAdam step to ``params`` given their sparse ``grads``."""
        steps: list[Any] = state["step"]
        beta1, beta2 = hp.betas
        for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
            steps[i] += 1
            _sparse_step_(
                param,
                -grad if hp.maximize else grad,
                state["exp_avg"][i],  # type: ignore[arg-type]
                state["exp_avg_sq"][i],  # type: ignore[arg-type]
                steps[i],
                hp,
                beta1,
                beta2,
            )


def _sparse_step_(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    step: int,
    hp: Hyper,
    beta1: float,
    beta2: float,
) -> None:
    """One parameter's update on the entries of its gradient, as torch.optim computes it."""
    # Coalesced, since the update is not linear in the gradient: indices must be unique.
    grad = grad.coalesce()
    indices, values = grad._indices(), grad._values()
    if values.numel() == 0:
        return
    size = grad.size()

    def sparse(update: Tensor) -> Tensor:
        if indices.dim() == 0 or update.dim() == 0:
            return grad.new().resize_as_(grad)
        return grad.new(indices, update, size)

    # The moments at the gradient's entries, in its order: what sparse_mask(grad)._values()
    # reads, read through the indices, at a fraction of its cost.
    where = indices.unbind(0)
    m_old = _at(m, where)
    m_delta = values.sub(m_old).mul_(1 - beta1)
    m.add_(sparse(m_delta))
    v_old = _at(v, where)
    v_delta = values.pow(2).sub_(v_old).mul_(1 - beta2)
    v.add_(sparse(v_delta))
    numer = m_delta.add_(m_old)
    denom = v_delta.add_(v_old).sqrt_().add_(hp.eps)
    step_size = hp.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    param.add_(sparse(-step_size * numer.div_(denom)))


def _at(t: Tensor, where: tuple[Tensor, ...]) -> Tensor:
    """A copy of the entries of ``t`` at the indices ``where``, one index tensor per sparse
    dimension, stacked along a new first dimension."""
    if len(where) == 1:
        return t.index_select(0, where[0])
    if not where:
        # No sparse dimension: the one entry is the whole tensor.
        return t.unsqueeze(0).clone()
    return t[where]
