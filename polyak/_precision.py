"""How a group stores its state: ``state_dtype``, the one switch every elementwise optimizer
takes, and what a step does with state stored narrower than it computes.

A group whose ``state_dtype`` is set keeps its parameter-shaped state (Adam's moments, SGD's
momentum buffer) in that dtype, for all its state keys or, given a mapping, for the keys it
names. Each step then computes exactly as with state of the parameter's dtype and rounds what it
writes back to nearest even::

    s = state.to(param.dtype); <the update, on s>; state.copy_(s)

The flat kernel does this in registers; the reference paths do it with a widened copy of each
state tensor (see :func:`widen` and :func:`narrow`). Scalar state (step counters) is not
affected.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

#: The group key, and the constructor's keyword.
KEY = "state_dtype"

#: The dtypes state may be stored in.
STORAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check(value: Any, keys: tuple[str, ...], owner: str) -> None:
    """Raise, as a constructor does, for a ``state_dtype`` that is not None, a storage dtype, or
    a mapping from some of ``keys`` (the optimizer's parameter-shaped state) to storage
    dtypes."""
    if value is None:
        return
    if isinstance(value, torch.dtype):
        items: list[tuple[Any, Any]] = [("state_dtype", value)]
    elif isinstance(value, Mapping):
        unknown = [key for key in value if key not in keys]
        if unknown:
            raise ValueError(
                f"{owner} keeps no parameter-shaped state named {unknown[0]!r}: state_dtype "
                f"takes {', '.join(repr(k) for k in keys) or 'none'}"
            )
        items = [(f"state_dtype[{key!r}]", dtype) for key, dtype in value.items()]
    else:
        raise TypeError(
            f"state_dtype must be a torch.dtype or a mapping of state keys to dtypes, not "
            f"{type(value).__name__}"
        )
    for name, dtype in items:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"Invalid {name}: {dtype}; state is stored in "
                + ", ".join(str(d).replace("torch.", "") for d in STORAGE_DTYPES)
            )


def storage(group: Mapping[str, Any], key: str) -> torch.dtype | None:
    """The dtype ``group`` stores its state ``key`` in; None for the parameter's own."""
    value = group.get(KEY)
    if value is None or isinstance(value, torch.dtype):
        return value
    return value.get(key)  # type: ignore[no-any-return]


def store(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` as a group that stores its state in ``dtype`` keeps it (rounded to nearest)."""
    if dtype is None or not isinstance(value, Tensor) or value.dtype == dtype:
        return value
    if not value.is_floating_point() or value.dim() == 0:
        return value
    return value.to(dtype)


def convert_entry(entry: dict[str, Any], group: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """Store ``entry``'s parameter-shaped state (``keys``) in the group's dtypes, in place."""
    for key in keys:
        dtype = storage(group, key)
        if dtype is not None and key in entry:
            entry[key] = store(entry[key], dtype)


#: What :func:`widen` replaced: by position in the state lists, the stored tensor.
Widened = dict[tuple[str, int], Tensor]


def widen(state: dict[str, list[Any]], params: list[Tensor]) -> Widened:
    """Replace, in ``state``'s lists, each state tensor stored in another floating dtype than
    its parameter's by a copy in the parameter's dtype, which the update computes on; return
    the stored tensors, for :func:`narrow`."""
    stored: Widened = {}
    for key, values in state.items():
        for i, value in enumerate(values):
            if (
                isinstance(value, Tensor)
                and value.dtype != params[i].dtype
                and value.dim() > 0
                and value.is_floating_point()
                and params[i].is_floating_point()
            ):
                stored[(key, i)] = value
                values[i] = value.to(params[i].dtype)
    return stored


def narrow(state: dict[str, list[Any]], stored: Widened) -> None:
    """Write what the update computed on :func:`widen`'s copies back into the stored tensors
    (rounded to nearest even), and put those back in ``state``'s lists."""
    for (key, i), kept in stored.items():
        wide = state[key][i]
        if wide is not kept:
            kept.copy_(wide)
            state[key][i] = kept


def install(opt: Any, value: Any) -> None:
    """Give ``opt`` (just constructed) the ``state_dtype`` its constructor was called with:
    checked, as the default of its groups (a group's own value stays), and applied to state
    the constructor made (Adagrad's)."""
    keys: tuple[str, ...] = opt.param_shaped_state
    owner = type(opt).__name__
    check(value, keys, owner)
    for group in opt.param_groups:
        check(group.get(KEY), keys, owner)
    if value is not None:
        opt.defaults[KEY] = value
        for group in opt.param_groups:
            group.setdefault(KEY, value)
    for group in opt.param_groups:
        if group.get(KEY) is None:
            continue
        for p in group["params"]:
            entry = opt.state.get(p)
            if entry:
                convert_entry(entry, group, keys)


def taking_state_dtype(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (an optimizer's constructor) taking the keyword ``state_dtype`` besides its
    own arguments."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, state_dtype: Any = None, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        install(self, state_dtype)

    signature = inspect.signature(init)
    extra = inspect.Parameter(
        KEY, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="torch.dtype | None"
    )
    parameters = list(signature.parameters.values())
    tail = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*head, extra, *tail]
    )
    __init__.takes_state_dtype = True  # type: ignore[attr-defined]
    return __init__
