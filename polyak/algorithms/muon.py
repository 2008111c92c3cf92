"""Muon: momentum orthogonalized by a Newton–Schulz iteration, for 2-D parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists

#: The quintic Newton–Schulz coefficients (a, b, c) of Jordan et al. (2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class Muon(Optimizer, torch.optim.Muon):
    r"""Muon: SGD with Nesterov momentum whose step is the momentum made orthogonal.

    For each 2-D parameter θ (A rows, B columns) with gradient g at step t:

    .. math::

        b_t ← μ b_{t-1} + (1 - μ) g_t

        d_t ← (1 - μ) g_t + μ b_t

        O_t ← NS^{(a,b,c)}_k(d_t)

        θ_t ← (1 - γ λ) θ_{t-1} - γ s(A, B) O_t

    where γ = ``lr``, μ = ``momentum``, λ = ``weight_decay``, (a, b, c) = ``ns_coefficients``
    and k = ``ns_steps``, with b_0 = 0 (``momentum_buffer``). The direction d_t is as written
    with ``nesterov``; without it, d_t = b_t. NS^{(a,b,c)}_k runs in bfloat16: with X_0 =
    d_t / max(‖d_t‖_F, ε) (transposed first when A > B, and back at the end), where ε =
    ``eps``, each of its k steps is

    .. math::

        M ← X X^⊤

        X ← a X + (b M + c M^2) X

    which drives the singular values of X towards 1. The learning rate is scaled by s(A, B) =
    √max(1, A / B) for ``adjust_lr_fn`` None or ``"original"``, and by 0.2 √max(A, B) for
    ``"match_rms_adamw"``.

    Note:
        As in torch.optim, the momentum is an exponential average (a ``lerp``) rather than a
        sum, the weight decay is decoupled and scaled by the unadjusted ``lr``, there is no
        step counter, and only 2-D real dense parameters are taken: biases, embeddings and
        other parameters belong to another optimizer. The matrix products run as torch's
        bfloat16 matrix multiplications, one parameter at a time; the elementwise steps run
        one operation at a time over all tensors.

    Args:
        params: the 2-D parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-3).
        weight_decay: λ, >= 0 (default: 0.1).
        momentum: μ, >= 0 (default: 0.95).
        nesterov: use Nesterov momentum (default: True).
        ns_coefficients: (a, b, c) (default: (3.4445, -4.7750, 2.0315)).
        eps: ε (default: 1e-7).
        ns_steps: k, < 100 (default: 5).
        adjust_lr_fn: None, ``"original"`` or ``"match_rms_adamw"`` (default: None).

    References:
        K. Jordan, Y. Jin, V. Boza, J. You, F. Cesista, L. Newhouse, J. Bernstein. Muon: An
        optimizer for hidden layers in neural networks. 2024.
        https://kellerjordan.github.io/posts/muon/

        J. Liu et al. Muon is Scalable for LLM Training. 2025. https://arxiv.org/abs/2502.16982
    """

    state_keys = ("momentum_buffer",)
    param_shaped_state = ("momentum_buffer",)
    optional_strings = ("adjust_lr_fn",)
    elementwise = False
    foreach_by_default = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter with "
                        f"size: {p.size()}"
                    )

    @staticmethod
    def check_loaded_group(group: Mapping[str, Any]) -> None:
        """A loaded ``ns_steps`` is a whole number below 100: torch's step fails on any other
        (a float or a tensor in ``range``, 100 or more by its own check). A negative one runs
        no iteration, in torch as here."""
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps >= 100:
            raise ValueError(f"Invalid ns_steps: {steps!r} (expected an int below 100)")

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """Muon's checks of its numbers, in torch.optim's order and wording."""
        lr = group["lr"]
        _checks.check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
        adjust = group["adjust_lr_fn"]
        if adjust is not None and adjust not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust} is not supported")

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Muon takes real 2-D parameters with dense gradients, and fewer than 100
        Newton–Schulz steps of three coefficients, checked in torch's order."""
        for p, g in zip(params, grads, strict=True):
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if g.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
        for g in grads:
            if g.ndim != 2:
                raise ValueError("Param gradient must be a 2D matrix")
            if group["ns_steps"] >= 100:
                raise ValueError(
                    "Number of steps must be less than 100 for computational efficiency"
                )
            if len(group["ns_coefficients"]) != 3:
                raise ValueError("Coefficients must be a tuple of exactly 3 values")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero momentum buffer; Muon keeps no step counter."""
        return {"momentum_buffer": _common.zeros_like(param)}

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one Muon step to ``params`` given their ``grads``."""
        bufs: list[Any] = state["momentum_buffer"]
        _ops.lerp_(bufs, grads, 1 - hp.momentum)
        directions = _ops.lerp(grads, bufs, hp.momentum) if hp.nesterov else bufs
        steps = [_orthogonalize(d, hp.ns_coefficients, hp.ns_steps, hp.eps) for d in directions]
        lrs = [-_adjusted_lr(hp.lr, hp.adjust_lr_fn, p.shape) for p in params]
        _ops.mul_(params, 1 - hp.lr * hp.weight_decay)
        _ops.add_scaled_each_(params, steps, lrs)


def _orthogonalize(
    x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    """k Newton–Schulz steps on ``x`` in bfloat16, with torch's operations and their order.

    ``x`` already bfloat16 is normalized in place, as in torch.optim.

    Raises:
        ValueError: ``x`` is not a matrix (a momentum buffer given another shape by hand, which
            broadcasts in the momentum update), with torch's message.
    """
    if x.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    out = x.bfloat16()
    if tall:
        out = out.T
    # A Frobenius norm of at most 1 bounds the spectral norm by 1.
    out.div_(out.norm().clamp(min=eps))
    for _ in range(steps):
        gram = out @ out.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        out = torch.addmm(out, poly, out, beta=a)
    return out.T if tall else out


def _adjusted_lr(lr: Any, adjust_lr_fn: str | None, shape: torch.Size) -> Any:
    """``lr`` scaled for a matrix of ``shape``, so that updates have a comparable RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio
