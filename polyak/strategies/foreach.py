"""The ``foreach`` strategy: the update runs once per (device, dtype) bucket."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from polyak.strategies.buckets import by_device_and_dtype, run_on


def run(
    update: Any,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor | None]],
    hp: Any,
) -> None:
    """Call ``update`` once per bucket, writing back any state it creates."""
    buckets = by_device_and_dtype(params)
    if len(buckets) == 1:
        update(params, grads, state, hp)
        return
    for idx in buckets:
        run_on(update, idx, params, grads, state, hp)
