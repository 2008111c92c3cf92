"""A group's hyperparameters as a step reads them, and the marker of required ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.optim
from torch import Tensor


class _Required:
    """Marks a hyperparameter that every group must give: ``defaults={"lr": required}``."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _Required()


def _resolve(value: Any, as_number: bool) -> Any:
    if isinstance(value, tuple):
        return tuple(_resolve(v, as_number) for v in value)
    if isinstance(value, Tensor):
        if as_number:
            return value.item()
        if value.dim() != 0:
            return value.squeeze()
    return value


#: Python numbers, which state may hold (SparseAdam's step count).
_NUMBERS = frozenset({int, float})


#: Hyperparameter types taken as they are (tested first, by exact type: this runs per step).
_IMMUTABLE_TYPES = frozenset({float, int, bool, str, type(None)})


#: Tensors of torch's own types (no subclass): their ``.grad`` setter is torch's, which the
#: kernel can clear in one call, and a step is rehearsed on real stand-ins of them.
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


class MissingHyperparameter(KeyError, AttributeError):
    """A hyperparameter an update reads and its group lacks: torch's step raises KeyError from
    ``group[key]``; it is also an AttributeError, as reading a missing attribute raises."""


def missing_key(
    defaults: Mapping[str, Any], group: Mapping[str, Any], optional: frozenset[str]
) -> str | None:
    """The first key of ``defaults`` that ``group`` lacks, bar ``optional``; None if none."""
    for key in defaults:
        if key not in group and key not in optional:
            return key
    return None


class Hyper:
    """A group's hyperparameters, frozen, as the update rule reads them: ``hp.lr``.

    One-element tensors are squeezed to 0-dim, as torch.optim does for a tensor ``lr``, or,
    with ``as_numbers`` (fused steps, whose kernels take numbers), read as Python numbers.
    """

    def __init__(self, group: Mapping[str, Any], as_numbers: bool = False) -> None:
        values = self.__dict__
        for key, value in group.items():
            if type(value) in _IMMUTABLE_TYPES:
                values[key] = value
            elif key not in ("params", "param_names"):
                values[key] = _resolve(value, as_numbers)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the group lacks.
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingHyperparameter(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("hyperparameters are read-only inside a step")

    def __repr__(self) -> str:
        return f"Hyper({self.__dict__})"
