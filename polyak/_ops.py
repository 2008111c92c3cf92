"""List-of-tensor primitives that every update rule is written in.

Each primitive takes lists of tensors. A singleton list runs the plain tensor method, so the loop
strategy computes exactly what torch.optim's per-tensor path computes; a longer list runs one
``torch._foreach_*`` call over the whole list. This module is the only caller of
``torch._foreach_*``. A trailing underscore means the first argument is changed in place.

A ``scale`` is a Python number or a 0-dim tensor. A tensor that requires grad (a hyperparameter
being differentiated through the step) is applied by multiplication instead of as ``alpha``,
which autograd cannot see through.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch
from torch import Tensor

#: A Python number or a 0-dim tensor. torch takes a tensor where it types a number (``alpha``).
Scale = Any


def _traced(scale: Scale) -> TypeGuard[Tensor]:
    return isinstance(scale, Tensor) and scale.requires_grad


def clone(xs: list[Tensor]) -> list[Tensor]:
    """Detached copies of ``xs``."""
    return [x.detach().clone() for x in xs]


def neg(xs: list[Tensor]) -> list[Tensor]:
    """``-x`` for each x."""
    if len(xs) == 1:
        return [-xs[0]]
    return list(torch._foreach_neg(xs))


def add_scaled(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> list[Tensor]:
    """``x + scale * y`` for each pair, as new tensors."""
    if _traced(scale):
        # ``y`` is cloned because the caller changes it in place later, and autograd keeps it.
        return [x.addcmul(y.clone(), scale) for x, y in zip(xs, ys, strict=True)]
    if len(xs) == 1:
        return [xs[0].add(ys[0], alpha=scale)]
    return list(torch._foreach_add(xs, ys, alpha=scale))


def add_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> None:
    """``x += scale * y`` for each pair."""
    if _traced(scale):
        for x, y in zip(xs, ys, strict=True):
            x.addcmul_(y, scale)
    elif len(xs) == 1:
        xs[0].add_(ys[0], alpha=scale)
    elif xs:
        torch._foreach_add_(xs, ys, alpha=scale)


def sub_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> None:
    """``x -= scale * y`` for each pair."""
    if _traced(scale):
        for x, y in zip(xs, ys, strict=True):
            x.addcmul_(y, scale, value=-1)
    elif len(xs) == 1:
        xs[0].add_(ys[0], alpha=-scale)
    elif xs:
        torch._foreach_add_(xs, ys, alpha=-scale)


def mul_(xs: list[Tensor], scale: Scale) -> None:
    """``x *= scale`` for each x."""
    if len(xs) == 1:
        xs[0].mul_(scale)
    elif xs:
        torch._foreach_mul_(xs, scale)


def div(xs: list[Tensor], scale: Tensor) -> list[Tensor]:
    """``x / scale`` for each x, as new tensors."""
    if len(xs) == 1:
        return [xs[0] / scale]
    return list(torch._foreach_div(xs, scale))


def zero_(xs: list[Tensor]) -> None:
    """Set every element of each x to zero."""
    if len(xs) == 1:
        xs[0].zero_()
    elif xs:
        torch._foreach_zero_(xs)
