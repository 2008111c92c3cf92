"""The ``loop`` strategy: the update runs once per parameter, on one-element lists."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from polyak import _ops


def run(
    update: Any,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor | None]],
    hp: Any,
) -> None:
    """Call ``update`` for each parameter alone, writing back any state it creates."""
    with _ops.per_tensor():
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            own = {key: [values[i]] for key, values in state.items()}
            update([p], [g], own, hp)
            for key, values in own.items():
                state[key][i] = values[0]
