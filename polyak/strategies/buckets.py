"""Grouping of a group's tensors into (device, dtype) buckets."""

from __future__ import annotations

from torch import Tensor


def by_device_and_dtype(params: list[Tensor]) -> list[list[int]]:
    """Indices of ``params`` split by (device, dtype), each bucket in the original order."""
    buckets: dict[tuple[object, object], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return list(buckets.values())
