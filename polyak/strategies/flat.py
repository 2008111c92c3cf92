"""The ``flat`` strategy: a whole parameter group in one pass over memory, in compiled code.

The group's update rule is traced into a program (see ``_trace.py``) that the kernel runs over
every element of every tensor, reading the parameter, its gradient and its state once and
writing the parameter and state once. The kernel keeps the group's tensors between steps, so a
step costs one call from Python whatever the number of tensors.

A step runs here when the group's parameters are dense CPU tensors of one floating dtype, its
hyperparameters are numbers and flags, and every parameter with a gradient already has its
state; anything else (a parameter's first step, a sparse or non-contiguous gradient, a tensor
hyperparameter, a changed dtype) runs the reference path for that step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from polyak.strategies import _native, _trace

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_NOT_HYPER = ("params", "param_names")

#: Traced programs, by (update rule, state layout, hyperparameter structure).
_programs: dict[tuple[Any, ...], list[_trace.Program] | None] = {}


@dataclass
class _Entry:
    params: tuple[Tensor, ...] = field(repr=False)
    state: Any = field(repr=False)
    version: int
    plan: Any
    vector_keys: list[str] = field(default_factory=list)
    scalar_keys: list[str] = field(default_factory=list)
    #: The hyperparameter values of the last step, with its program and numbers.
    last: tuple[tuple[Any, ...], _trace.Program, Tensor] | None = field(default=None, repr=False)

    def fresh(self, group: dict[str, Any], optimizer: Any) -> bool:
        # The parameters are compared one by one (at C speed): a parameter replaced in the
        # group's list, as model surgery does, must be the one that is updated.
        return (
            self.state is optimizer.state
            and self.version == optimizer._state_version
            and len(self.params) == len(group["params"])
            and all(map(operator.is_, self.params, group["params"]))
        )


def _same(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are the same numbers and flags (tensors never are)."""
    if isinstance(a, tuple):
        return (
            isinstance(b, tuple)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and not isinstance(a, Tensor) and bool(a == b)


def eligible(group: dict[str, Any]) -> bool:
    """Whether a group's flags let it run flat: by default, or with ``fused=True``."""
    if group.get("differentiable") or group.get("capturable"):
        return False
    if group.get("fused"):
        return True
    return group.get("foreach") is None and group.get("fused") is None


def _build(optimizer: Any, group: dict[str, Any]) -> _Entry:
    params: list[Tensor] = group["params"]
    entry = _Entry(tuple(params), optimizer.state, optimizer._state_version, None)
    if not params or _native.load() is None:
        return entry
    if len({id(p) for p in params}) != len(params):
        # A parameter listed twice is updated twice in turn on the reference path; the kernel
        # would update both copies at once.
        return entry
    dtype = params[0].dtype
    allowed = _FLOATS + _HALVES if group.get("fused") else _FLOATS
    if dtype not in allowed or any(
        p.dtype != dtype or not p.is_cpu or type(p) not in (Tensor, torch.nn.Parameter)
        for p in params
    ):
        return entry
    vector_keys: list[str] = []
    scalar_keys: list[str] = []
    for key in type(optimizer).state_keys:
        found = [s[key] for p in params if (s := optimizer.state.get(p)) and key in s]
        if not found:
            continue
        if not all(isinstance(t, Tensor) for t in found):
            return entry
        (scalar_keys if found[0].dim() == 0 else vector_keys).append(key)
    empty = torch.empty(0, dtype=dtype)

    def column(key: str) -> list[Tensor]:
        return [
            s[key] if (s := optimizer.state.get(p)) and isinstance(s.get(key), Tensor) else empty
            for p in params
        ]

    entry.vector_keys, entry.scalar_keys = vector_keys, scalar_keys
    entry.plan = _native.load().Plan(
        list(params), [column(k) for k in vector_keys], [column(k) for k in scalar_keys]
    )
    return entry


def _program(
    optimizer: Any, entry: _Entry, hyper: dict[str, Any], numbers: list[float]
) -> _trace.Program | None:
    update = type(optimizer).update
    key = (update, tuple(entry.vector_keys), tuple(entry.scalar_keys), _trace.structure(hyper))
    traced = _programs.setdefault(key, [])
    if traced is None:
        return None
    for program in traced:
        if program.holds(numbers):
            return program
    try:
        program = _trace.trace(update, hyper, entry.vector_keys, entry.scalar_keys)
    except _trace.MissingState:
        return None  # the reference path creates the state this step
    except _trace.TraceError:
        _programs[key] = None
        return None
    traced.append(program)
    return program


def step(optimizer: Any, group: dict[str, Any]) -> bool:
    """Run one step of ``group`` flat; False where this step must take another strategy."""
    cache: dict[int, _Entry] = optimizer.__dict__.setdefault("_flat_entries", {})
    entry = cache.get(id(group))
    if entry is None or not entry.fresh(group, optimizer):
        entry = cache[id(group)] = _build(optimizer, group)
    if entry.plan is None:
        return False
    values = tuple(v for k, v in group.items() if k not in _NOT_HYPER)
    if entry.last is not None and _same(entry.last[0], values):
        program, numbers = entry.last[1], entry.last[2]
    else:
        hyper = {k: v for k, v in group.items() if k not in _NOT_HYPER}
        slots = _trace.slots(hyper)
        found = None if slots is None else _program(optimizer, entry, hyper, slots)
        if slots is None or found is None:
            return False
        program, numbers = found, torch.tensor(slots, dtype=torch.float64)
        entry.last = (values, program, numbers)
    done = entry.plan.step(
        program.vcode,
        program.scode,
        numbers,
        program.n_sregs,
        program.n_vregs,
        program.stored,
    )
    if done != 0:
        # This step cannot run flat; look at the group afresh next time.
        del cache[id(group)]
        return False
    return True
