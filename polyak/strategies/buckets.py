"""Grouping of a group's tensors into (device, dtype) buckets, and running an update on one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import Tensor


def by_device_and_dtype(params: list[Tensor]) -> list[list[int]]:
    """Indices of ``params`` split by (device, dtype), each bucket in the original order."""
    buckets: dict[tuple[object, object], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return list(buckets.values())


def run_on(
    update: Any,
    idx: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor | None]],
    hp: Any,
    mode: Callable[
        [list[Tensor], list[Tensor], dict[str, list[Tensor | None]]],
        contextlib.AbstractContextManager[Any],
    ] = lambda params, grads, state: contextlib.nullcontext(),
) -> None:
    """Call ``update`` on the parameters at ``idx``, inside ``mode(params, grads, state)``, and
    write back into ``state`` what it creates."""
    own = {key: [values[i] for i in idx] for key, values in state.items()}
    some_params, some_grads = [params[i] for i in idx], [grads[i] for i in idx]
    with mode(some_params, some_grads, own):
        update(some_params, some_grads, own, hp)
    for key, values in own.items():
        for i, value in zip(idx, values, strict=True):
            state[key][i] = value
