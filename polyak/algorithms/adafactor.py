"""Adafactor: Adam-like steps with a second moment factored into row and column means."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


class Adafactor(Optimizer, torch.optim.Adafactor):
    r"""Adafactor: relative step sizes, and a second moment stored as row and column factors.

    For each parameter θ with gradient g at step t, and for a matrix (two or more dimensions;
    the last two are factored, the others are batch dimensions) with n rows and m columns:

    .. math::

        g_t ← ±∇f_t(θ_{t-1})

        β_t ← 1 - t^τ

        ρ_t ← min(γ, 1 / √t)

        α_t ← max(ε_2, RMS(θ_{t-1})) ρ_t

        θ_{t-1} ← (1 - γ λ) θ_{t-1}

        R_t ← β_t R_{t-1} + (1 - β_t) mean_{cols}(g_t^2)

        C_t ← β_t C_{t-1} + (1 - β_t) mean_{rows}(g_t^2)

        V_t ← R_t C_t / max(mean_{rows}(R_t), ε_1)

        U_t ← g_t / √max(V_t, ε_1^2)

        θ_t ← θ_{t-1} - α_t U_t / max(1, RMS(U_t) / d)

    where γ = ``lr``, τ = ``beta2_decay``, (ε_1, ε_2) = ``eps``, d = ``d`` and λ =
    ``weight_decay``; the gradient is negated (−) when ``maximize``. R_t (``row_var``, n × 1)
    and C_t (``col_var``, 1 × m) start at zero, their product R_t C_t is the n × m outer
    product, and RMS(x) = ‖x‖_2 / √numel(x). A vector (or a scalar) keeps the full second
    moment instead, V_t ← β_t V_{t-1} + (1 - β_t) g_t^2 (``variance``). With ``eps=(None,
    ε_2)``, ε_1 is the machine epsilon of the dtype of the group's first parameter with a
    gradient.

    Note:
        As in torch.optim, and unlike Shazeer and Stern (2018), ``lr`` caps the relative step
        size ρ_t and scales the decoupled weight decay; ε_1 bounds the factored estimate and the
        update from below instead of being added to the squared gradient; the factors hold
        means rather than sums of the squared gradient. Python numbers carry ρ_t, α_t and the
        clipping (a tensor ``lr`` makes them float32 tensors, as in torch.optim). Complex
        parameters and sparse gradients are refused. Row and column means, norms and the outer
        product run as torch operations, tensor by tensor; the elementwise steps run one
        operation at a time over all tensors. Distributed parameters (DTensor) are stepped
        sharded too (FSDP2's ``Shard(0)``, where torch's step fails): a norm or mean over a
        sharded dimension is reduced across the ranks before the step goes on.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-2).
        beta2_decay: τ, <= 0 (default: -0.8).
        eps: (ε_1, ε_2), ε_1 >= 0 or None, ε_2 >= 0 (default: (None, 1e-3)).
        d: clipping threshold, >= 1 (default: 1).
        weight_decay: λ, >= 0 (default: 0).
        foreach: run the update over all of a group's tensors per operation, in the order of
            torch.optim's foreach path; by default the order of its per-tensor path, which
            rounds the last step differently (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).

    References:
        N. Shazeer, M. Stern. Adafactor: Adaptive Learning Rates with Sublinear Memory Cost.
        ICML 2018. https://arxiv.org/abs/1804.04235
    """

    state_keys = ("step", "row_var", "col_var", "variance")
    step_tensors_message = "`state_steps` argument must contain a list of singleton tensors"
    param_shaped_state = ("variance",)
    backfill = {"foreach": None}  # noqa: RUF012 - read-only table
    elementwise = False
    foreach_by_default = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """Adafactor's checks of its numbers, in torch.optim's order and wording."""
        lr, eps = group["lr"], group["eps"]
        _checks.check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= group["beta2_decay"]:
            raise ValueError(f"beta2_decay should be <= 0 but is: {group['beta2_decay']}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= group["d"]:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {group['d']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"weight_decay should be >= 0 but is: {group['weight_decay']}")

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """Checkpoints of old torch versions kept the step as a Python number."""
        _common.upgrade_step(entry, param, False)

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Adafactor takes real parameters and dense gradients, checked in torch's order."""
        for p, g in zip(params, grads, strict=True):
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if g.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")

    def hyperparameters(self, group: Mapping[str, Any], params: list[Tensor]) -> Hyper:
        """``eps=(None, ε_2)`` takes ε_1 from the dtype of the first parameter with a gradient,
        for the whole group, as both of torch's paths do."""
        eps1, eps2 = group["eps"]
        if eps1 is None:
            group = {**group, "eps": (torch.finfo(params[0].dtype).eps, eps2)}
        return Hyper(group)

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step, and zero factors of a matrix (or a zero second moment of a vector)."""
        step = _common.zero_step(param, False)
        if param.dim() > 1:
            rows, cols = list(param.shape), list(param.shape)
            rows[-1], cols[-2] = 1, 1
            return {
                "step": step,
                "row_var": _factor(param, rows, param.dim() - 1),
                "col_var": _factor(param, cols, param.dim() - 2),
            }
        return {"step": step, "variance": _common.zeros_like(param)}

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Adafactor step to ``params`` given their ``grads``."""
        kinds = list(dict.fromkeys(p.dim() > 1 for p in params))
        if not hp.foreach or len(kinds) < 2:
            _update(params, grads, state, hp)
            return
        # torch's foreach path steps its matrices and its vectors one after the other (which
        # shows where they share a step counter): first the kind the first parameter is.
        for kind in kinds:
            idx = [i for i, p in enumerate(params) if (p.dim() > 1) == kind]
            _update(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                {key: [values[i] for i in idx] for key, values in state.items()},
                hp,
            )


def _factor(param: Tensor, shape: list[int], reduced: int) -> Tensor:
    """A zero factor of ``param``'s second moment: ``param``'s shape with its dimension
    ``reduced`` made 1 (``shape``).

    A distributed parameter's (DTensor) factor is placed as the parameter, but replicated
    along ``reduced`` where the parameter is sharded along it: the row factor of a parameter
    sharded by rows (FSDP2's ``Shard(0)``) keeps each rank's rows, so that the outer product of
    the factors, as large as the parameter, holds each rank's rows only. ``new_zeros`` would
    replicate the factor whole where its shape differs from the parameter's (the outer product
    then as large as the whole parameter on every rank), and where the shapes agree keep a
    sharding along a dimension of size 1, which DTensor cannot update in place from another
    placement. A replicated parameter's factors are replicated, as torch's are.
    """
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not isinstance(param, module.DTensor):
        return param.new_zeros(shape)
    placements = [module.Replicate() if p.is_shard(reduced) else p for p in param.placements]
    zeros: Tensor = module.zeros(
        shape, dtype=param.dtype, device_mesh=param.device_mesh, placements=placements
    )
    return zeros


def _update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
    """One Adafactor step, in the order of torch's per-tensor path or, with ``foreach``, of its
    foreach path."""
    steps: list[Any] = state["step"]
    eps1, eps2 = hp.eps
    lr = hp.lr
    # torch's foreach path scales the update and then adds it; its per-tensor path adds it
    # scaled, in one rounding. Only an explicit foreach=True takes the foreach path.
    foreach_order = bool(hp.foreach)
    g = _ops.neg(grads) if hp.maximize else grads
    _ops.increment_(steps)
    t = _ops.values(steps)
    news = [s**hp.beta2_decay for s in t]  # 1 - β_t, the weight of the new squared gradient
    # min and max of per-tensor numbers as Python's pick them: min(a, b) is b where b < a.
    rhos = [_ops.where(x < lr, x, lr) for x in (1 / (s**0.5) for s in t)]
    norms = _ops.measured(_ops.norms(params))
    rms = [n / (p.numel() ** 0.5) for n, p in zip(norms, params, strict=True)]
    alphas = [_ops.where(r > eps2, r, eps2) * rho for r, rho in zip(rms, rhos, strict=True)]
    if hp.weight_decay != 0:
        _ops.mul_(params, 1 - lr * hp.weight_decay)

    matrices = [i for i, p in enumerate(params) if p.dim() > 1]
    vectors = [i for i, p in enumerate(params) if p.dim() <= 1]
    estimates: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    if matrices:
        gm = [g[i] for i in matrices]
        row_vars: list[Any] = [state["row_var"][i] for i in matrices]
        col_vars: list[Any] = [state["col_var"][i] for i in matrices]
        weights = [news[i] for i in matrices]
        # The squared gradient's means over columns and rows, as torch computes them: the
        # square of the norm, over the count (torch.norm over a dimension is this function).
        for factors, dim in ((row_vars, -1), (col_vars, -2)):
            # Made whole where a distributed gradient is sharded along ``dim``.
            means = _ops.whole(_ops.norms_over(gm, dim))
            _ops.mul_tensors_(means, means)
            _ops.div_(means, [x.size(dim) for x in gm])
            _ops.lerp_(factors, means, weights)
        # The outer product of a row and a column factor: torch's matmul of an n x 1 by a 1 x m
        # matrix rounds each product once, as a broadcast multiplication does, which is faster
        # (several times so for the batched matmul of stacked factors). The factors are means
        # of squares, so no product is a zero of the other sign.
        products = [r * c for r, c in zip(row_vars, col_vars, strict=True)]
        floors = _ops.whole([r.mean(dim=-2, keepdim=True) for r in row_vars])
        _ops.clamp_min_(floors, eps1)
        _ops.div_tensors_(products, floors)
        _ops.clamp_min_(products, eps1 * eps1)
        for i, product in zip(matrices, products, strict=True):
            estimates[i] = product
    if vectors:
        gv = [g[i] for i in vectors]
        variances: list[Any] = [state["variance"][i] for i in vectors]
        _ops.lerp_(variances, _ops.mul_tensors(gv, gv), [news[i] for i in vectors])
        # A copy, floored at ε_1^2: the state itself keeps the running mean.
        for i, estimate in zip(vectors, _ops.clamp_min(variances, eps1 * eps1), strict=True):
            estimates[i] = estimate
    updates = estimates
    _ops.rsqrt_(updates)
    _ops.mul_tensors_(updates, g)
    updates = _ops.placed_like(updates, params)
    clipped = [
        _ops.where(x > 1.0, x, 1.0)
        for x in (
            n / ((u.numel() ** 0.5) * hp.d)
            for n, u in zip(_ops.measured(_ops.norms(updates)), updates, strict=True)
        )
    ]
    scales = [-a / c for a, c in zip(alphas, clipped, strict=True)]
    if not foreach_order:
        _ops.add_scaled_each_(params, updates, scales)
        return
    if any(isinstance(s, Tensor) for s in scales):
        # A tensor lr makes the scales 0-dim tensors, which torch's foreach path multiplies
        # by as tensors (in the update's dtype).
        _ops.mul_tensors_(updates, scales)
    else:
        _ops.mul_(updates, scales)
    _ops.add_scaled_(params, updates, 1)
