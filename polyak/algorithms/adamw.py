"""AdamW: Adam with decoupled weight decay."""

from __future__ import annotations

import torch
from torch import Tensor

from polyak.algorithms.adam import Adam
from polyak.optimizer import ParamsT


class AdamW(Adam, torch.optim.AdamW):
    r"""AdamW: Adam whose weight decay shrinks the parameters instead of entering the moments.

    For each parameter θ with gradient g at step t:

    .. math::

        θ_{t-1} ← (1 - γ λ) θ_{t-1}

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

        u_t ← max(u_{t-1}, v_t)

        θ_t ← θ_{t-1} - γ / (1 - β_1^t) · m_t / (√u_t / √(1 - β_2^t) + ε)

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps`` and λ = ``weight_decay``; the
    gradient is negated (−) when ``maximize``. The maximum u_t is kept with ``amsgrad``;
    without it, u_t = v_t.

    Note:
        As in torch.optim, the decay is scaled by the learning rate (γ λ), where Loshchilov
        and Hutter scale it by the schedule multiplier only.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-3).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.999)).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: decoupled decay λ, >= 0 (default: 1e-2).
        amsgrad: use the running maximum u_t of v_t (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: as in :class:`Adam` (default: None).
        capturable: as in :class:`Adam` (default: False).
        differentiable: as in :class:`Adam` (default: False).
        fused: as in :class:`Adam` (default: None).

    References:
        I. Loshchilov, F. Hutter. Decoupled Weight Decay Regularization. ICLR 2019.
        https://arxiv.org/abs/1711.05101
    """

    # As in torch.optim: checkpoints of torch <= 2.5, which lack the flag, and any that say
    # otherwise, load as AdamW.
    fixed = {"decoupled_weight_decay": True}  # noqa: RUF012 - read-only table

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )
