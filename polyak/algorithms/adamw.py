"""AdamW: Adam with decoupled weight decay."""

from __future__ import annotations

from torch import Tensor

from polyak.algorithms.adam import Adam
from polyak.optimizer import ParamsT


class AdamW(Adam):
    r"""AdamW: Adam whose weight decay shrinks the parameters instead of entering the moments.

    For each parameter :math:`\theta` with gradient :math:`g` at step :math:`t`:

    .. math::

        \theta_{t-1} &\leftarrow (1 - \gamma\lambda)\,\theta_{t-1} \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \ \text{(amsgrad)} \quad\text{or}\quad v_t \\
        \theta_t &\leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    where :math:`\gamma` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` =
    ``eps`` and :math:`\lambda` = ``weight_decay``.

    Note:
        As in torch.optim, the decay is scaled by the learning rate (:math:`\gamma\lambda`),
        where Loshchilov and Hutter scale it by the schedule multiplier only.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate :math:`\gamma`, a float or a one-element tensor, >= 0 (default: 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1) (default: (0.9, 0.999)).
        eps: :math:`\epsilon`, >= 0 (default: 1e-8).
        weight_decay: decoupled decay :math:`\lambda`, >= 0 (default: 1e-2).
        amsgrad: use the running maximum of :math:`v_t` (default: False).
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
