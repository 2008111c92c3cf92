"""Tracing an update rule into the flat kernel's programs.

The rule runs once, in per-tensor mode, on stand-ins for one parameter, its gradient and its
state. Each tensor method the list primitives call appends an instruction to a vector program
(run over every element); arithmetic on hyperparameters and on per-tensor scalar state (Adam's
step counter) appends to a scalar program (run once per tensor, in double precision, as Python
runs it in torch.optim). Branches on hyperparameters are recorded as guards: a program is reused
only while its guards hold.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from polyak import _ops

# Opcodes; keep in sync with _vm.cpp.
V_NEG, V_ADD, V_MUL, V_DIV, V_ADDS, V_LERP, V_ADDCMUL, V_ADDCDIV, V_SQRT, V_MAX, V_COPY, V_ADD1 = (
    range(12)
)
V_MULV, V_DIVV, V_ABS = range(12, 15)
S_CONST, S_ADD, S_SUB, S_MUL, S_DIV, S_POW, S_NEG, S_LOAD, S_STORE = range(9)

#: Vector registers the kernel binds to memory: the parameter, its gradient, then state.
PARAM, GRAD = 0, 1
MAX_VREGS = 24


class TraceError(Exception):
    """The rule does something the flat kernel cannot run; it takes another strategy."""


class MissingState(TraceError):
    """The rule reads state that the parameters do not have yet (before their first step)."""


@dataclass
class Program:
    """A traced update rule, ready for the kernel."""

    vcode: torch.Tensor
    scode: torch.Tensor
    n_sregs: int
    n_vregs: int
    stored: list[int]
    #: The branches taken while tracing: ``(slot, comparison, other, result)``.
    guards: list[tuple[int, str, Any, bool]]

    def holds(self, slots: list[float]) -> bool:
        """Whether the branches taken while tracing are taken with these hyperparameters."""
        return all(
            bool(_COMPARE[op](slots[slot], other)) == result
            for slot, op, other, result in self.guards
        )

    @property
    def checks(self) -> list[tuple[int, int, float, bool]] | None:
        """The guards as the kernel tests them, with the comparisons numbered as in
        :data:`GUARD_OPS`; None where one compares with something not a number."""
        if not all(_is_number(other) for _, _, other, _ in self.guards):
            return None
        return [(s, GUARD_OPS.index(op), float(o), r) for s, op, o, r in self.guards]


#: The comparisons a guard can make, numbered as the kernel numbers them.
GUARD_OPS = ("==", "!=", "<", "<=", ">", ">=", "bool")
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "bool": lambda v, _: bool(v),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _Tracer:
    n_vstate: int
    slots: list[float]
    vcode: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    scode: list[tuple[int, int, int, int]] = field(default_factory=list)
    guards: list[tuple[int, str, Any, bool]] = field(default_factory=list)
    stored: set[int] = field(default_factory=set)
    consts: dict[float, int] = field(default_factory=dict)
    n_sregs: int = 0
    n_vregs: int = 0

    def __post_init__(self) -> None:
        self.n_sregs = len(self.slots)
        self.n_vregs = 2 + self.n_vstate

    def sreg(self) -> int:
        self.n_sregs += 1
        return self.n_sregs - 1

    def vreg(self) -> int:
        if self.n_vregs >= MAX_VREGS:
            raise TraceError("the update rule needs too many registers")
        self.n_vregs += 1
        return self.n_vregs - 1

    def scalar(self, value: Any) -> Scalar:
        if isinstance(value, Scalar):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TraceError(f"unsupported scalar {value!r}")
        key = float(value)
        if key not in self.consts:
            reg = self.sreg()
            self.scode.append((S_CONST, reg, 0, _bits(key)))
            self.consts[key] = reg
        return Scalar(self, self.consts[key], key, None)

    def vop(self, op: int, dst: int, a: int = -1, b: int = -1, c: int = -1, s: Any = None) -> None:
        # Bound registers the rule writes are stored back: the parameter, its state, and the
        # gradient where the rule changes it in place (a fused step unscaling it).
        if dst < 2 + self.n_vstate:
            self.stored.add(dst)
        sreg = -1 if s is None else self.scalar(s).reg
        self.vcode.append((op, dst, a, b, c, sreg))


def _bits(value: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


class Scalar:
    """A number the scalar program computes; ``value`` is its value while tracing."""

    def __init__(self, tracer: _Tracer, reg: int, value: float, slot: int | None) -> None:
        self.tracer, self.reg, self.value, self.slot = tracer, reg, value, slot

    def _op(
        self, op: int, other: Any, fn: Callable[[float, float], float], swap: bool = False
    ) -> Scalar:
        other = self.tracer.scalar(other)
        a, b = (other, self) if swap else (self, other)
        reg = self.tracer.sreg()
        self.tracer.scode.append((op, reg, a.reg, b.reg))
        return Scalar(self.tracer, reg, fn(a.value, b.value), None)

    def __add__(self, o: Any) -> Scalar:
        return self._op(S_ADD, o, operator.add)

    def __radd__(self, o: Any) -> Scalar:
        return self._op(S_ADD, o, operator.add, swap=True)

    def __sub__(self, o: Any) -> Scalar:
        return self._op(S_SUB, o, operator.sub)

    def __rsub__(self, o: Any) -> Scalar:
        return self._op(S_SUB, o, operator.sub, swap=True)

    def __mul__(self, o: Any) -> Scalar:
        return self._op(S_MUL, o, operator.mul)

    def __rmul__(self, o: Any) -> Scalar:
        return self._op(S_MUL, o, operator.mul, swap=True)

    def __truediv__(self, o: Any) -> Scalar:
        return self._op(S_DIV, o, operator.truediv)

    def __rtruediv__(self, o: Any) -> Scalar:
        return self._op(S_DIV, o, operator.truediv, swap=True)

    def __pow__(self, o: Any) -> Scalar:
        return self._op(S_POW, o, operator.pow)

    def __rpow__(self, o: Any) -> Scalar:
        return self._op(S_POW, o, operator.pow, swap=True)

    def __neg__(self) -> Scalar:
        reg = self.tracer.sreg()
        self.tracer.scode.append((S_NEG, reg, self.reg, 0))
        return Scalar(self.tracer, reg, -self.value, None)

    def _guard(self, op: str, other: Any = 0.0) -> bool:
        if self.slot is None:
            raise TraceError("a branch on a computed scalar")
        result = bool(_COMPARE[op](self.value, other))
        self.tracer.guards.append((self.slot, op, other, result))
        return result

    def __eq__(self, o: object) -> bool:  # type: ignore[override]
        return self._guard("==", o)

    def __ne__(self, o: object) -> bool:  # type: ignore[override]
        return self._guard("!=", o)

    def __lt__(self, o: Any) -> bool:
        return self._guard("<", o)

    def __le__(self, o: Any) -> bool:
        return self._guard("<=", o)

    def __gt__(self, o: Any) -> bool:
        return self._guard(">", o)

    def __ge__(self, o: Any) -> bool:
        return self._guard(">=", o)

    def __bool__(self) -> bool:
        return self._guard("bool")

    __hash__ = None  # type: ignore[assignment]


class Vec:
    """One tensor's elements, held in a vector register."""

    is_sparse = False

    def __init__(self, tracer: _Tracer, reg: int) -> None:
        self.tracer, self.reg = tracer, reg

    def is_complex(self) -> bool:
        return False

    def _new(self, op: int, a: int = -1, b: int = -1, c: int = -1, s: Any = None) -> Vec:
        out = Vec(self.tracer, self.tracer.vreg())
        self.tracer.vop(op, out.reg, a, b, c, s)
        return out

    def _in_place(self, op: int, a: int = -1, b: int = -1, c: int = -1, s: Any = None) -> Vec:
        self.tracer.vop(op, self.reg, a, b, c, s)
        return self

    def __neg__(self) -> Vec:
        return self._new(V_NEG, self.reg)

    def detach(self) -> Vec:
        return self

    def clone(self) -> Vec:
        return self._new(V_COPY, self.reg)

    def _add(self, other: Any, alpha: Any, target: Callable[..., Vec]) -> Vec:
        if isinstance(other, Vec):
            if not isinstance(alpha, Scalar) and alpha == 1:
                return target(V_ADD1, self.reg, other.reg)
            return target(V_ADD, self.reg, other.reg, s=alpha)
        if not isinstance(alpha, Scalar) and alpha == 1:
            return target(V_ADDS, self.reg, s=other)
        raise TraceError("adding a scaled scalar")

    def add(self, other: Any, alpha: Any = 1) -> Vec:
        return self._add(other, alpha, self._new)

    def add_(self, other: Any, alpha: Any = 1) -> Vec:
        return self._add(other, alpha, self._in_place)

    def mul_(self, s: Any) -> Vec:
        if isinstance(s, Vec):
            return self._in_place(V_MULV, self.reg, s.reg)
        return self._in_place(V_MUL, self.reg, s=s)

    def div_(self, s: Any) -> Vec:
        if isinstance(s, Vec):
            return self._in_place(V_DIVV, self.reg, s.reg)
        return self._in_place(V_DIV, self.reg, s=s)

    def mul(self, s: Any) -> Vec:
        if isinstance(s, Vec):
            return self._new(V_MULV, self.reg, s.reg)
        return self._new(V_MUL, self.reg, s=s)

    __mul__ = mul

    def abs(self) -> Vec:
        return self._new(V_ABS, self.reg)

    def sqrt_(self) -> Vec:
        return self._in_place(V_SQRT, self.reg)

    def addcmul(self, t1: Vec, t2: Vec, value: Any = 1) -> Vec:
        return self._new(V_ADDCMUL, self.reg, t1.reg, t2.reg, s=value)

    def __truediv__(self, s: Any) -> Vec:
        return self._new(V_DIV, self.reg, s=s)

    def lerp_(self, end: Vec, weight: Any) -> Vec:
        return self._in_place(V_LERP, self.reg, end.reg, s=weight)

    def addcmul_(self, t1: Vec, t2: Vec, value: Any = 1) -> Vec:
        return self._in_place(V_ADDCMUL, self.reg, t1.reg, t2.reg, s=value)

    def addcdiv_(self, t1: Vec, t2: Vec, value: Any = 1) -> Vec:
        return self._in_place(V_ADDCDIV, self.reg, t1.reg, t2.reg, s=value)

    def sqrt(self) -> Vec:
        return self._new(V_SQRT, self.reg)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.maximum and isinstance(kwargs.get("out"), Vec):
            a, b = args
            return kwargs["out"]._in_place(V_MAX, a.reg, b.reg)
        raise TraceError(f"{func} is not supported by the flat kernel")


class ScalarState:
    """A 0-dim state tensor of one parameter (a step counter)."""

    def __init__(self, tracer: _Tracer, index: int) -> None:
        self.tracer, self.index = tracer, index

    def is_complex(self) -> bool:
        return False

    def _load(self) -> Scalar:
        reg = self.tracer.sreg()
        self.tracer.scode.append((S_LOAD, reg, self.index, 0))
        return Scalar(self.tracer, reg, 1.0, None)

    def __iadd__(self, other: Any) -> ScalarState:
        total = self._load() + other
        self.tracer.scode.append((S_STORE, 0, self.index, total.reg))
        return self

    def item(self) -> Scalar:
        return self._load()


class _Hyper:
    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def trace(
    update: Callable[..., None],
    hyper: dict[str, Any],
    vector_keys: list[str],
    scalar_keys: list[str],
) -> Program:
    """Trace ``update`` for one group configuration.

    Args:
        update: the algorithm's update rule.
        hyper: the group's hyperparameters; their numbers become the slots of :func:`split`.
        vector_keys: state keys holding param-shaped tensors, in the kernel's order.
        scalar_keys: state keys holding 0-dim tensors, in the kernel's order.
    """
    parts = split(hyper)
    if parts is None:
        raise TraceError("a hyperparameter the flat kernel cannot take")
    numbers = parts[0]
    tracer = _Tracer(len(vector_keys), numbers)
    index = iter(range(len(numbers)))

    def symbolic(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(symbolic(v) for v in value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            slot = next(index)
            return Scalar(tracer, slot, float(value), slot)
        return value

    hp = _Hyper({key: symbolic(value) for key, value in hyper.items()})
    state: dict[str, list[Any]] = {key: [Vec(tracer, 2 + k)] for k, key in enumerate(vector_keys)}
    state.update({key: [ScalarState(tracer, k)] for k, key in enumerate(scalar_keys)})
    try:
        with _ops.per_tensor(), torch.no_grad():
            update([Vec(tracer, PARAM)], [Vec(tracer, GRAD)], state, hp)
    except KeyError as error:
        raise MissingState(str(error)) from error
    except (AttributeError, TypeError) as error:
        raise TraceError(str(error)) from error
    vcode = torch.tensor(tracer.vcode, dtype=torch.int64).reshape(-1, 6)
    scode = torch.tensor(tracer.scode, dtype=torch.int64).reshape(-1, 4)
    return Program(
        vcode=vcode,
        scode=scode,
        n_sregs=tracer.n_sregs,
        n_vregs=tracer.n_vregs,
        stored=sorted(tracer.stored),
        guards=tracer.guards,
    )


def split(hyper: dict[str, Any]) -> tuple[list[float], tuple[Any, ...]] | None:
    """Split the hyperparameters into their numbers, flattened in order (a program's slots),
    and the rest, which selects among traced programs; None if a value can be neither."""
    numbers: list[float] = []

    def shape(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(shape(v) for v in value)
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            numbers.append(float(value))
            return float
        raise TypeError

    try:
        rest = tuple((key, shape(value)) for key, value in hyper.items())
    except TypeError:
        return None
    return numbers, rest
