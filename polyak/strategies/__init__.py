"""Execution strategies: how an update rule written over lists of tensors is run.

The update rule is written once. A strategy decides how it runs:

- ``flat`` (the package ``flat/``) traces it into a program that a compiled kernel runs over
  the whole group in one pass; it takes the default and ``fused=True`` steps wherever it can,
  with torch's per-tensor numbers on the default path.
- ``loop`` calls it with primitives that run one tensor at a time, which computes exactly what
  torch.optim's per-tensor path computes (``foreach=False``, and the fallback).
- ``foreach`` calls it once per (device, dtype) bucket, so each primitive is one
  ``torch._foreach_*`` call over the bucket (``foreach=True``).

:func:`flat.eligible` and :func:`choose` are the places the choice is made. Where ``flat`` does
not take a step, it runs the *reference path*: ``loop`` or ``foreach``, as :func:`choose` picks,
which compute torch.optim's numbers by torch's own operations.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from polyak.strategies import foreach, loop

#: The state lists an update rule reads and writes: one list per state key, one entry per param.
StateLists = dict[str, list[Tensor | None]]
#: ``update(params, grads, state, hp)``: an algorithm's update rule.
Update = Callable[[list[Tensor], list[Tensor], StateLists, Any], None]

_FOREACH_DEVICES = ("cuda", "xpu", "mtia")


class Strategy(str, enum.Enum):
    """How a parameter group's update is executed."""

    LOOP = "loop"
    FOREACH = "foreach"

    def run(
        self, update: Update, params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Any
    ) -> None:
        """Run ``update`` over ``params`` in this strategy's list shapes."""
        runner = loop.run if self is Strategy.LOOP else foreach.run
        runner(update, params, grads, state, hp)


def _foreach_capable(params: list[Tensor]) -> bool:
    # torch.optim picks its foreach path by default only where its kernels are fast (accelerators)
    # and only for plain tensors: subclasses may not implement the foreach ops.
    return all(
        type(p) in (Tensor, torch.nn.Parameter) and p.device.type in _FOREACH_DEVICES
        for p in params
    )


def choose(
    group: Mapping[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    foreach_by_default: bool = True,
) -> Strategy:
    """Pick the strategy for a step of one group that the flat kernel does not take.

    Differentiable steps and sparse gradients always run ``loop``: it is the one strategy that
    autograd and sparse tensors support everywhere. Otherwise an explicit ``foreach``/``fused``
    flag is honoured, and with neither set the choice is torch.optim's default: ``foreach`` on
    accelerators, unless the optimizer's torch twin keeps its per-tensor path by default
    (``foreach_by_default`` False: Adafactor, Muon).
    """
    if group.get("differentiable", False) or any(g.is_sparse for g in grads):
        return Strategy.LOOP
    foreach_flag, fused_flag = group.get("foreach"), group.get("fused")
    if fused_flag:
        return Strategy.FOREACH
    if foreach_flag is None and fused_flag is None:
        capable = foreach_by_default and _foreach_capable(params)
        return Strategy.FOREACH if capable else Strategy.LOOP
    return Strategy.FOREACH if foreach_flag else Strategy.LOOP


__all__ = ["StateLists", "Strategy", "Update", "choose"]
