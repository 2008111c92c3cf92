"""List-of-tensor primitives that every update rule is written in.

Each primitive takes lists of tensors and runs in one of two modes. Per-tensor mode (inside
:func:`per_tensor`, used by the ``loop`` strategy) calls the plain tensor method on each
element, which computes exactly what torch.optim's per-tensor path computes. Otherwise each
primitive is one ``torch._foreach_*`` call over the whole list, which computes exactly what
torch.optim's foreach path computes. The two can differ in the last bit: a foreach op on
bfloat16 multiplies by a float scalar in float32, the tensor method first rounds the scalar.
This module is the only caller of ``torch._foreach_*``. A trailing underscore means the first
argument is changed in place.

A ``scale`` is a Python number or a 0-dim tensor. A tensor that requires grad (a hyperparameter
being differentiated through the step) is applied by multiplication instead of as ``alpha``,
which autograd cannot see through.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, TypeGuard

import torch
from torch import Tensor

#: A Python number or a 0-dim tensor. torch takes a tensor where it types a number (``alpha``).
Scale = Any

_PER_TENSOR = contextvars.ContextVar("polyak_per_tensor", default=False)


@contextlib.contextmanager
def per_tensor() -> Iterator[None]:
    """Run the primitives called inside one tensor at a time."""
    token = _PER_TENSOR.set(True)
    try:
        yield
    finally:
        _PER_TENSOR.reset(token)


def _traced(scale: Scale) -> TypeGuard[Tensor]:
    return isinstance(scale, Tensor) and scale.requires_grad


def clone(xs: list[Tensor]) -> list[Tensor]:
    """Detached copies of ``xs``."""
    return [x.detach().clone() for x in xs]


def neg(xs: list[Tensor]) -> list[Tensor]:
    """``-x`` for each x."""
    if _PER_TENSOR.get() or not xs:
        return [-x for x in xs]
    return list(torch._foreach_neg(xs))


def add_scaled(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> list[Tensor]:
    """``x + scale * y`` for each pair, as new tensors."""
    if _traced(scale):
        # ``y`` is cloned because the caller changes it in place later, and autograd keeps it.
        return [x.addcmul(y.clone(), scale) for x, y in zip(xs, ys, strict=True)]
    if _PER_TENSOR.get() or not xs:
        return [x.add(y, alpha=scale) for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_add(xs, ys, alpha=scale))


def add_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> None:
    """``x += scale * y`` for each pair."""
    if _traced(scale):
        for x, y in zip(xs, ys, strict=True):
            x.addcmul_(y, scale)
    elif _PER_TENSOR.get():
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=scale)
    elif xs:
        torch._foreach_add_(xs, ys, alpha=scale)


def sub_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> None:
    """``x -= scale * y`` for each pair."""
    if _traced(scale):
        for x, y in zip(xs, ys, strict=True):
            x.addcmul_(y, scale, value=-1)
    elif _PER_TENSOR.get():
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=-scale)
    elif xs:
        torch._foreach_add_(xs, ys, alpha=-scale)


def mul_(xs: list[Tensor], scale: Scale) -> None:
    """``x *= scale`` for each x."""
    if _PER_TENSOR.get():
        for x in xs:
            x.mul_(scale)
    elif xs:
        torch._foreach_mul_(xs, scale)


def div_(xs: list[Tensor], scale: Tensor) -> None:
    """``x /= scale`` for each x."""
    if _PER_TENSOR.get():
        for x in xs:
            x.div_(scale)
    elif xs:
        torch._foreach_div_(xs, scale)


def zero_(xs: list[Tensor]) -> None:
    """Set every element of each x to zero."""
    if _PER_TENSOR.get():
        for x in xs:
            x.zero_()
    elif xs:
        torch._foreach_zero_(xs)
