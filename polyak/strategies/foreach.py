"""The ``foreach`` strategy: the update runs once per (device, dtype) bucket."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from polyak.strategies.buckets import by_device_and_dtype


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
        own = {key: [values[i] for i in idx] for key, values in state.items()}
        update([params[i] for i in idx], [grads[i] for i in idx], own, hp)
        for key, values in own.items():
            for i, value in zip(idx, values, strict=True):
                state[key][i] = value
