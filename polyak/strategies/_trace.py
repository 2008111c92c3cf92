"""Tracing an update rule into the flat kernel's programs.

The rule runs in per-tensor mode on stand-ins for one parameter, its gradient and its state.
Each tensor method the list primitives call appends an instruction to a vector program (run
over every element); arithmetic on hyperparameters and on per-tensor scalar state (Adam's step
counter) appends to a scalar program (run once per tensor, in double precision, as Python runs
it in torch.optim). Branches on hyperparameters are recorded as guards: a program is reused only
while its guards hold.

Branches on numbers computed per tensor (RAdam's ``rho_t > 5``, ASGD's ``mu != 1``, Python's
``max(1, step - t0)``) cannot be decided while tracing. The scalar program computes each such
condition, and the rule is traced once more for each outcome; the two traces share everything
up to the branch and are merged into one program that runs both continuations and keeps, per
tensor, the one the condition picks: a select of the memory-bound registers in the vector
program, and of the stored state values in the scalar program. Both continuations compute with
the roundings each computes on its own, so the kept one has torch's bits.
"""

from __future__ import annotations

import math
import operator
import struct
from collections import defaultdict
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
V_SIGN, V_RECIP = 15, 16
#: Comparisons of ``a`` with ``b`` (or, without ``b``, with the scalar): a mask register.
V_LT, V_LE, V_GT, V_GE, V_EQ, V_NE = range(17, 23)
#: ``d = c ? b : a`` with ``c`` a mask (``b`` or the scalar); ``d = s ? b : a`` with ``s`` a
#: per-tensor condition of the scalar program; ``d = s``.
V_SELECT, V_SELS, V_FILL = 23, 24, 25
#: The forms of torch's fused kernels (see :func:`fused_form`): ``d = a * s + b * c``, rounded
#: as their vector body rounds it and, past ``tail``, as their scalar tail does; and maximum,
#: which their scalar tail takes as ``std::max``.
V_MULADD, V_MAXF = 26, 27
S_CONST, S_ADD, S_SUB, S_MUL, S_DIV, S_POW, S_NEG, S_LOAD, S_STORE = range(9)
#: ``d = a`` rounded to float32; ``d = a`` rounded to the dtype of scalar state ``b``.
S_F32, S_ROUND = 9, 10
#: Comparisons, 1 or 0.
S_LT, S_LE, S_GT, S_GE, S_EQ, S_NE = range(11, 17)
#: ``d = a``; ``d = d ? a : b``.
S_COPY, S_SELECT = 17, 18

V_COMPARISONS = {"<": V_LT, "<=": V_LE, ">": V_GT, ">=": V_GE, "==": V_EQ, "!=": V_NE}
_S_COMPARISONS = {"<": S_LT, "<=": S_LE, ">": S_GT, ">=": S_GE, "==": S_EQ, "!=": S_NE}
_S_UNARY = (S_NEG, S_F32, S_COPY)

#: Vector registers the kernel binds to memory: the parameter, its gradient, then state.
PARAM, GRAD = 0, 1
MAX_VREGS = 24
#: Branches on computed numbers one traced path may take (each doubles the traces).
MAX_BRANCHES = 4


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
            bool(_COMPARE[op](slots[slot], slots[o.slot] if isinstance(o, Slot) else o)) == result
            for slot, op, o, result in self.guards
        )

    @property
    def checks(self) -> list[tuple[int, int, float, bool]] | None:
        """The guards as the kernel tests them, with the comparisons numbered as in
        :data:`GUARD_OPS` (plus ``len(GUARD_OPS)`` where they compare with another slot, whose
        index is the number); None where one compares with something not a number."""
        checks = []
        for slot, op, other, result in self.guards:
            if isinstance(other, Slot):
                checks.append(
                    (slot, GUARD_OPS.index(op) + len(GUARD_OPS), float(other.slot), result)
                )
            elif _is_number(other):
                checks.append((slot, GUARD_OPS.index(op), float(other), result))
            else:
                return None
        return checks


@dataclass(frozen=True)
class Slot:
    """A guard's other side where it is another hyperparameter (``lo != lo``, a NaN test)."""

    slot: int


#: The comparisons a guard can make, numbered as the kernel numbers them.
GUARD_OPS = ("==", "!=", "<", "<=", ">", ">=", "bool")
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
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
class _Code:
    """A straight-line traced program, before it is packed for the kernel."""

    vcode: list[tuple[int, ...]]
    scode: list[tuple[int, ...]]
    n_vregs: int
    n_sregs: int
    #: The vector registers holding masks (comparison results), which arithmetic never reads.
    masks: set[int]
    guards: list[tuple[int, str, Any, bool]]


@dataclass(frozen=True)
class _ForkPoint:
    """Where a trace reached a branch on a computed number: the register holding the
    condition, and the lengths of the code and register files before the branch."""

    cond: int
    n_vcode: int
    n_scode: int
    n_vregs: int
    n_sregs: int


class _Fork(Exception):
    """Raised at a branch the trace has no decision for: it is traced both ways."""

    def __init__(self, at: _ForkPoint) -> None:
        super().__init__("branch")
        self.at = at


@dataclass
class _Tracer:
    n_vstate: int
    slots: list[float]
    #: The outcomes of the branches on computed numbers, in the order the rule takes them.
    decisions: list[bool] = field(default_factory=list)
    vcode: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    scode: list[tuple[int, int, int, int]] = field(default_factory=list)
    guards: list[tuple[int, str, Any, bool]] = field(default_factory=list)
    consts: dict[float, int] = field(default_factory=dict)
    masks: set[int] = field(default_factory=set)
    #: The branches decided so far: (comparison, register, register) -> outcome.
    conditions: dict[tuple[str, int, int], bool] = field(default_factory=dict)
    n_sregs: int = 0
    n_vregs: int = 0

    def __post_init__(self) -> None:
        self.n_sregs = len(self.slots)
        self.n_vregs = 2 + self.n_vstate

    def sreg(self) -> int:
        self.n_sregs += 1
        return self.n_sregs - 1

    def vreg(self, mask: bool = False) -> int:
        self.n_vregs += 1
        if mask:
            self.masks.add(self.n_vregs - 1)
        return self.n_vregs - 1

    def sop(self, op: int, a: int = 0, b: int = 0) -> int:
        """Append a scalar instruction writing a new register; return the register."""
        reg = self.sreg()
        self.scode.append((op, reg, a, b))
        return reg

    def scalar(self, value: Any) -> Scalar:
        if isinstance(value, Scalar):
            return value
        if isinstance(value, ScalarState):
            return value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TraceError(f"unsupported scalar {value!r}")
        key = float(value)
        if key not in self.consts:
            reg = self.sreg()
            self.scode.append((S_CONST, reg, 0, _bits(key)))
            self.consts[key] = reg
        return Scalar(self, self.consts[key], key, None, known=True)

    def vop(self, op: int, dst: int, a: int = -1, b: int = -1, c: int = -1, s: Any = None) -> None:
        # A rule may write its gradient in place (a fused step unscaling it): the kernel
        # stores it back like the parameter and the state.
        if a in self.masks or b in self.masks or (c in self.masks) != (op == V_SELECT):
            raise TraceError("a mask used as numbers, or numbers as a mask")
        sreg = -1 if s is None else self.scalar(s).reg
        self.vcode.append((op, dst, a, b, c, sreg))

    def branch(self, op: str, a: Scalar, other: Any) -> bool:
        """The outcome of ``a <op> other`` on this traced path, where the kernel computes it
        per tensor: a new branch stops the trace, to be traced both ways."""
        b = self.scalar(other)
        if a.known and b.known:
            return bool(_COMPARE[op](a.value, b.value))
        key = (op, a.reg, b.reg)
        if key in self.conditions:
            return self.conditions[key]
        cond = self.sop(_S_COMPARISONS[op], a.reg, b.reg)
        n = len(self.conditions)
        if n >= len(self.decisions):
            at = _ForkPoint(cond, len(self.vcode), len(self.scode), self.n_vregs, self.n_sregs)
            raise _Fork(at)
        self.conditions[key] = self.decisions[n]
        return self.decisions[n]

    def code(self) -> _Code:
        return _Code(
            list(self.vcode),
            list(self.scode),
            self.n_vregs,
            self.n_sregs,
            set(self.masks),
            list(self.guards),
        )


def _bits(value: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def _value(fn: Callable[[Any, Any], Any], a: Any, b: Any) -> float:
    """``fn(a, b)`` as the trace's value: NaN where Python would raise or leave the reals (a
    continuation the kernel computes but does not keep may divide by zero)."""
    try:
        value = fn(a, b)
    except (ArithmeticError, ValueError, TypeError):
        return math.nan
    return float(value) if isinstance(value, (int, float)) else math.nan


class Scalar:
    """A number the scalar program computes; ``value`` is its value while tracing, ``slot``
    the hyperparameter it is (None for computed numbers), ``known`` whether it is a constant."""

    def __init__(
        self, tracer: _Tracer, reg: int, value: float, slot: int | None, known: bool = False
    ) -> None:
        self.tracer, self.reg, self.value, self.slot, self.known = tracer, reg, value, slot, known

    def _op(
        self, op: int, other: Any, fn: Callable[[float, float], float], swap: bool = False
    ) -> Any:
        if isinstance(other, Vec):
            return NotImplemented  # the vector's reflected method
        other = self.tracer.scalar(other)
        a, b = (other, self) if swap else (self, other)
        reg = self.tracer.sop(op, a.reg, b.reg)
        return Scalar(self.tracer, reg, _value(fn, a.value, b.value), None)

    def __add__(self, o: Any) -> Any:
        return self._op(S_ADD, o, operator.add)

    def __radd__(self, o: Any) -> Any:
        return self._op(S_ADD, o, operator.add, swap=True)

    def __sub__(self, o: Any) -> Any:
        return self._op(S_SUB, o, operator.sub)

    def __rsub__(self, o: Any) -> Any:
        return self._op(S_SUB, o, operator.sub, swap=True)

    def __mul__(self, o: Any) -> Any:
        return self._op(S_MUL, o, operator.mul)

    def __rmul__(self, o: Any) -> Any:
        return self._op(S_MUL, o, operator.mul, swap=True)

    def __truediv__(self, o: Any) -> Any:
        return self._op(S_DIV, o, operator.truediv)

    def __rtruediv__(self, o: Any) -> Any:
        return self._op(S_DIV, o, operator.truediv, swap=True)

    def __pow__(self, o: Any) -> Any:
        return self._op(S_POW, o, operator.pow)

    def __rpow__(self, o: Any) -> Any:
        return self._op(S_POW, o, operator.pow, swap=True)

    def __neg__(self) -> Scalar:
        reg = self.tracer.sop(S_NEG, self.reg)
        return Scalar(self.tracer, reg, -self.value, None)

    def _compare(self, op: str, other: Any) -> bool:
        if isinstance(other, Scalar) and other.known:
            other = other.value
        if self.known:
            if isinstance(other, Scalar):
                return other._compare(_FLIPPED[op], self.value)
            if _is_number(other):
                return bool(_COMPARE[op](self.value, other))
        if self.slot is not None and not isinstance(other, ScalarState):
            # Hyperparameters and constants only: the outcome selects the program.
            if isinstance(other, Scalar) and other.slot is not None:
                result = bool(_COMPARE[op](self.value, other.value))
                self.tracer.guards.append((self.slot, op, Slot(other.slot), result))
                return result
            if not isinstance(other, Scalar):
                result = bool(_COMPARE[op](self.value, other))
                self.tracer.guards.append((self.slot, op, other, result))
                return result
        if not isinstance(other, (Scalar, ScalarState)) and not _is_number(other):
            raise TraceError(f"a computed number compared with {other!r}")
        return self.tracer.branch(op, self, other)

    def __eq__(self, o: object) -> bool:  # type: ignore[override]
        return self._compare("==", o)

    def __ne__(self, o: object) -> bool:  # type: ignore[override]
        return self._compare("!=", o)

    def __lt__(self, o: Any) -> bool:
        return self._compare("<", o)

    def __le__(self, o: Any) -> bool:
        return self._compare("<=", o)

    def __gt__(self, o: Any) -> bool:
        return self._compare(">", o)

    def __ge__(self, o: Any) -> bool:
        return self._compare(">=", o)

    def __bool__(self) -> bool:
        if self.slot is not None:
            return self._compare("bool", 0.0)
        return self.tracer.branch("!=", self, 0.0)

    __hash__ = None  # type: ignore[assignment]


def _comparison(op: str) -> Callable[[Vec, Any], Vec]:
    """A comparison method of :class:`Vec` (``x.gt(y)``, ``x > y``), yielding a mask."""

    def compare(self: Vec, other: Any) -> Vec:
        return self._compare(op, other)

    return compare


class Vec:
    """One tensor's elements, held in a vector register (numbers, or a mask where ``mask``)."""

    is_sparse = False

    def __init__(self, tracer: _Tracer, reg: int, mask: bool = False) -> None:
        self.tracer, self.reg, self.mask = tracer, reg, mask

    def is_complex(self) -> bool:
        return False

    def _new(
        self, op: int, a: int = -1, b: int = -1, c: int = -1, s: Any = None, mask: bool = False
    ) -> Vec:
        out = Vec(self.tracer, self.tracer.vreg(mask), mask)
        self.tracer.vop(op, out.reg, a, b, c, s)
        return out

    def _in_place(self, op: int, a: int = -1, b: int = -1, c: int = -1, s: Any = None) -> Vec:
        if self.mask:
            raise TraceError("a mask changed in place")
        self.tracer.vop(op, self.reg, a, b, c, s)
        return self

    def __neg__(self) -> Vec:
        return self._new(V_NEG, self.reg)

    def detach(self) -> Vec:
        return self

    def clone(self, memory_format: Any = None) -> Vec:
        return self._new(V_COPY, self.reg)

    def copy_(self, src: Vec) -> Vec:
        return self._in_place(V_COPY, src.reg)

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

    def sub(self, other: Any, alpha: Any = 1) -> Vec:
        # torch subtracts by adding with -alpha: one fused multiply-add, as ``add``.
        if not isinstance(other, Vec):
            raise TraceError("subtracting a scalar")
        return self._new(V_ADD, self.reg, other.reg, s=-alpha)

    __sub__ = sub

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
    __rmul__ = mul

    def abs(self) -> Vec:
        return self._new(V_ABS, self.reg)

    def sign(self) -> Vec:
        return self._new(V_SIGN, self.reg)

    def sign_(self) -> Vec:
        return self._in_place(V_SIGN, self.reg)

    def reciprocal(self) -> Vec:
        return self._new(V_RECIP, self.reg)

    def reciprocal_(self) -> Vec:
        return self._in_place(V_RECIP, self.reg)

    def sqrt_(self) -> Vec:
        return self._in_place(V_SQRT, self.reg)

    def addcmul(self, t1: Vec, t2: Vec, value: Any = 1) -> Vec:
        return self._new(V_ADDCMUL, self.reg, t1.reg, t2.reg, s=value)

    def __truediv__(self, s: Any) -> Vec:
        return self._new(V_DIV, self.reg, s=s)

    def __rtruediv__(self, s: Any) -> Vec:
        # As torch's ``number / tensor``: the reciprocal, times the number.
        out = self.reciprocal()
        return out._in_place(V_MUL, out.reg, s=s)

    def lerp_(self, end: Vec, weight: Any) -> Vec:
        return self._in_place(V_LERP, self.reg, end.reg, s=weight)

    def addcmul_(self, t1: Vec, t2: Vec, value: Any = 1) -> Vec:
        return self._in_place(V_ADDCMUL, self.reg, t1.reg, t2.reg, s=value)

    def addcdiv_(self, t1: Vec, t2: Vec, value: Any = 1) -> Vec:
        return self._in_place(V_ADDCDIV, self.reg, t1.reg, t2.reg, s=value)

    def sqrt(self) -> Vec:
        return self._new(V_SQRT, self.reg)

    def _compare(self, op: str, other: Any) -> Vec:
        if isinstance(other, Vec):
            return self._new(V_COMPARISONS[op], self.reg, other.reg, mask=True)
        return self._new(V_COMPARISONS[op], self.reg, s=other, mask=True)

    lt = __lt__ = _comparison("<")
    le = __le__ = _comparison("<=")
    gt = __gt__ = _comparison(">")
    ge = __ge__ = _comparison(">=")
    eq = __eq__ = _comparison("==")  # type: ignore[assignment]
    ne = __ne__ = _comparison("!=")  # type: ignore[assignment]
    __hash__ = object.__hash__

    def masked_fill_(self, mask: Vec, value: Any) -> Vec:
        if isinstance(value, Vec):
            return self._in_place(V_SELECT, self.reg, value.reg, mask.reg)
        return self._in_place(V_SELECT, self.reg, c=mask.reg, s=value)

    def masked_fill(self, mask: Vec, value: Any) -> Vec:
        return self.clone().masked_fill_(mask, value)

    def where(self, condition: Vec, other: Any) -> Vec:
        """``condition ? self : other``, as ``torch.where(condition, self, other)``."""
        fallback = other if isinstance(other, Vec) else self._new(V_FILL, s=other)
        return fallback.masked_fill(condition, self)

    def fill_(self, value: Any) -> Vec:
        return self._in_place(V_FILL, s=value)

    def clamp_(self, min: Any = None, max: Any = None) -> Vec:
        if min is None or max is None:
            raise TraceError("a clamp on one side")
        low, high = self.tracer.scalar(min), self.tracer.scalar(max)
        # As torch: NaN everywhere where a bound is NaN; else max(x, low), then min(., high),
        # each keeping x where the comparison is false (so a NaN element stays).
        if low != low or high != high:
            return self.fill_(math.nan)
        self.masked_fill_(self.lt(low), low)
        return self.masked_fill_(self.gt(high), high)

    def clamp(self, min: Any = None, max: Any = None) -> Vec:
        return self.clone().clamp_(min, max)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.maximum and isinstance(kwargs.get("out"), Vec):
            a, b = args
            return kwargs["out"]._in_place(V_MAX, a.reg, b.reg)
        if func is torch.where and len(args) == 3 and not kwargs:
            condition, x, y = args
            if isinstance(x, Vec):
                return x.where(condition, y)
            if isinstance(y, Vec):
                return y.masked_fill(condition, x)
        raise TraceError(f"{func} is not supported by the flat kernel")


class ScalarState:
    """A 0-dim state tensor of one parameter (a step counter, NAdam's ``mu_product``), in
    float32 or float64 as the tensor holds it."""

    device = torch.device("cpu")

    def __init__(self, tracer: _Tracer, index: int) -> None:
        self.tracer, self.index = tracer, index

    def is_complex(self) -> bool:
        return False

    def _load(self) -> Scalar:
        return Scalar(self.tracer, self.tracer.sop(S_LOAD, self.index), 1.0, None)

    def _store(self, value: Scalar) -> None:
        self.tracer.scode.append((S_STORE, 0, self.index, value.reg))

    def __iadd__(self, other: Any) -> ScalarState:
        self._store(self._load() + other)
        return self

    def mul_(self, other: Any) -> ScalarState:
        # A number is taken in the tensor's dtype, and the product rounded to it.
        factor = self.tracer.scalar(other)
        rounded = Scalar(self.tracer, self.tracer.sop(S_ROUND, factor.reg, self.index), 1.0, None)
        self._store(self._load() * rounded)
        return self

    __imul__ = mul_

    def copy_(self, value: Any) -> ScalarState:
        """Set the value: a 0-dim tensor, or a number taken as ``torch.as_tensor`` takes it (in
        the default dtype) and then converted, as ``copy_`` converts, to the tensor's dtype."""
        default = torch.get_default_dtype()
        if isinstance(value, torch.Tensor):
            number, op = self.tracer.scalar(value.item()), S_COPY
        elif default in (torch.float32, torch.float64):
            number = self.tracer.scalar(value)
            op = S_F32 if default == torch.float32 else S_COPY
        else:
            raise TraceError(f"numbers become {default} tensors")
        # A register of its own: the store rounds it in place, and ``value`` lives on.
        self._store(Scalar(self.tracer, self.tracer.sop(op, number.reg), 1.0, None))
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
    n_bound = 2 + len(vector_keys)

    def run(decisions: list[bool]) -> _Code:
        tracer = _Tracer(len(vector_keys), numbers, decisions)
        index = iter(range(len(numbers)))

        def symbolic(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(symbolic(v) for v in value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                slot = next(index)
                return Scalar(tracer, slot, float(value), slot)
            return value

        hp = _Hyper({key: symbolic(value) for key, value in hyper.items()})
        state: dict[str, list[Any]] = {
            key: [Vec(tracer, 2 + k)] for k, key in enumerate(vector_keys)
        }
        state.update({key: [ScalarState(tracer, k)] for k, key in enumerate(scalar_keys)})
        try:
            with _ops.per_tensor(), torch.no_grad():
                update([Vec(tracer, PARAM)], [Vec(tracer, GRAD)], state, hp)
        except KeyError as error:
            raise MissingState(str(error)) from error
        except (AttributeError, TypeError) as error:
            raise TraceError(str(error)) from error
        return tracer.code()

    code = _explore(run, [], n_bound)
    code = _compact(_prune(_number_values(code, n_bound), n_bound), n_bound, len(numbers))
    if code.n_vregs > MAX_VREGS:
        raise TraceError("the update rule needs too many registers")
    return Program(
        vcode=torch.tensor(code.vcode, dtype=torch.int64).reshape(-1, 6),
        scode=torch.tensor(code.scode, dtype=torch.int64).reshape(-1, 4),
        n_sregs=code.n_sregs,
        n_vregs=code.n_vregs,
        stored=sorted({ins[1] for ins in code.vcode if ins[1] < n_bound}),
        guards=code.guards,
    )


def fused_form(program: Program) -> Program:
    """``program`` as torch's fused CPU kernels (``fused=True``) round it.

    Their vector body rounds as torch's per-tensor kernels do, but their scalar tail, the last
    ``numel % width`` elements of each tensor, is plain C++ that the compiler contracts on its
    own: ``x = x * s1; x = x + y * s2`` there becomes ``fma(x, s1, y * s2)``, the first product
    fused where the body fuses the second; and ``maximum`` there is ``std::max``, which keeps
    its first operand where the other is NaN. A multiply by a number whose result is only
    added to by the next instruction that touches it becomes one :data:`V_MULADD` (the added
    product's number spread over a register of its own where it is a number), and each
    maximum a :data:`V_MAXF`; the kernel rounds each as the body or as the tail by where the
    element lies.
    """
    vcode = [tuple(int(x) for x in row) for row in program.vcode.tolist()]
    n_vregs = program.n_vregs
    out: list[tuple[int, ...]] = []
    k = 0
    while k < len(vcode):
        ins = vcode[k]
        if ins[0] == V_MAX:
            out.append((V_MAXF, *ins[1:]))
            k += 1
            continue
        fused = _mul_then_add(vcode, k, program.stored)
        if fused is None or n_vregs >= MAX_VREGS:
            out.append(ins)
            k += 1
            continue
        later, between = fused
        _, _, a, _, _, s1 = ins
        op2, d2, _, b2, c2, s2 = vcode[later]
        spare = n_vregs
        n_vregs += 1
        out.extend(between)
        if op2 == V_ADD:  # d1 + b2 * s2
            out.append((V_FILL, spare, -1, -1, -1, s2))
            out.append((V_MULADD, d2, a, b2, spare, s1))
        else:  # V_ADDCMUL: d1 + (s2 * b2) * c2
            out.append((V_MUL, spare, b2, -1, -1, s2))
            out.append((V_MULADD, d2, a, spare, c2, s1))
        k = later + 1
    return Program(
        vcode=torch.tensor(out, dtype=torch.int64).reshape(-1, 6),
        scode=program.scode,
        n_sregs=program.n_sregs,
        n_vregs=n_vregs,
        stored=program.stored,
        guards=program.guards,
    )


def _mul_then_add(
    vcode: list[tuple[int, ...]], k: int, stored: list[int]
) -> tuple[int, list[tuple[int, ...]]] | None:
    """Where ``vcode[k]`` multiplies by a number a value that the next instruction touching
    its result adds a product to (``V_ADD`` or ``V_ADDCMUL``, which read nothing else of it),
    that instruction's index and the instructions in between (which neither read nor write
    the product or its operand); else None. A product kept in memory (its register stored,
    unless the addition writes it again) is left as it is."""
    op, d1, a1, _, _, _ = vcode[k]
    if op != V_MUL:
        return None
    between: list[tuple[int, ...]] = []
    for later in range(k + 1, len(vcode)):
        ins = vcode[later]
        reads = [r for r in ins[2:5] if r >= 0]
        if d1 in reads or ins[1] == d1:
            if ins[0] not in (V_ADD, V_ADDCMUL) or ins[2] != d1 or d1 in ins[3:5]:
                return None
            if ins[1] != d1:
                if d1 in stored:
                    return None
                # The product is read again after the addition, before anything replaces it:
                # it must stay.
                for rest in vcode[later + 1 :]:
                    if d1 in rest[2:5]:
                        return None
                    if rest[1] == d1:
                        break
            return later, between
        if ins[1] == a1:
            return None
        between.append(ins)
    return None


def _explore(run: Callable[[list[bool]], _Code], decisions: list[bool], n_bound: int) -> _Code:
    """The rule traced with ``decisions`` for its first branches on computed numbers, and both
    ways at each later one, merged into one program."""
    try:
        return run(decisions)
    except _Fork as fork:
        if len(decisions) >= MAX_BRANCHES:
            raise TraceError("the update rule branches too often") from None
        taken = _explore(run, [*decisions, True], n_bound)
        other = _explore(run, [*decisions, False], n_bound)
        return _merge(fork.at, taken, other, n_bound)


def _merge(at: _ForkPoint, taken: _Code, other: _Code, n_bound: int) -> _Code:
    """One program running both continuations of a branch (traced as ``taken`` and
    ``other``, which share their code up to ``at``), keeping per tensor the one ``at.cond``
    picks.

    Each continuation is renumbered into registers of its own: what it writes into a register
    that existed before the branch goes to a new register, and its state stores become
    rounded values in registers (a later load in the same continuation reads them). After
    both, a select writes each memory-bound register and a store each state value that either
    continuation wrote.
    """
    vcode = list(taken.vcode[: at.n_vcode])
    scode = list(taken.scode[: at.n_scode])
    masks = {r for r in taken.masks if r < at.n_vregs}
    counts = [at.n_vregs, at.n_sregs]

    def fresh(kind: int) -> int:
        counts[kind] += 1
        return counts[kind] - 1

    def place(code: _Code) -> tuple[dict[int, int], dict[int, int]]:
        vmap: dict[int, int] = {}
        smap: dict[int, int] = {}
        stores: dict[int, int] = {}

        def s(r: int) -> int:
            return smap.get(r, r)

        defined: set[int] = set()

        def define(r: int) -> int:
            if r not in defined:
                smap[r] = fresh(1)
                defined.add(r)
            return smap[r]

        for op, d, a, b in code.scode[at.n_scode :]:
            if op == S_LOAD and a in stores:
                smap[d] = stores[a]
                defined.add(d)
            elif op == S_STORE:
                reg = fresh(1)
                scode.append((S_ROUND, reg, s(b), a))
                smap[b] = stores[a] = reg
                defined.add(b)
            elif op == S_SELECT:
                cond, x, y = s(d), s(a), s(b)
                if d not in defined:
                    scode.append((S_COPY, define(d), cond, 0))
                scode.append((S_SELECT, smap[d], x, y))
            elif op in (S_CONST, S_LOAD):
                scode.append((op, define(d), a, b))
            elif op == S_ROUND:
                x = s(a)
                scode.append((op, define(d), x, b))
            elif op in _S_UNARY:
                x = s(a)
                scode.append((op, define(d), x, 0))
            else:
                x, y = s(a), s(b)
                scode.append((op, define(d), x, y))
        for op, d, a, b, c, sr in code.vcode[at.n_vcode :]:
            srcs = [vmap.get(r, r) for r in (a, b, c)]
            if d not in vmap:
                vmap[d] = fresh(0)
                if d in code.masks:
                    masks.add(vmap[d])
            vcode.append((op, vmap[d], *srcs, s(sr) if sr >= 0 else -1))
        return vmap, stores

    vmap_t, stores_t = place(taken)
    vmap_f, stores_f = place(other)
    for r in sorted(r for r in vmap_t.keys() | vmap_f.keys() if r < n_bound):
        vcode.append((V_SELS, r, vmap_f.get(r, r), vmap_t.get(r, r), -1, at.cond))
    for key in sorted(stores_t.keys() | stores_f.keys()):
        x, y = (
            stores[key] if key in stores else _load(scode, fresh(1), key)
            for stores in (stores_t, stores_f)
        )
        reg = fresh(1)
        scode += [(S_COPY, reg, at.cond, 0), (S_SELECT, reg, x, y), (S_STORE, 0, key, reg)]
    guards = taken.guards + [g for g in other.guards if g not in taken.guards]
    return _Code(vcode, scode, counts[0], counts[1], masks, guards)


def _load(scode: list[tuple[int, ...]], reg: int, key: int) -> int:
    scode.append((S_LOAD, reg, key, 0))
    return reg


def _number_values(code: _Code, n_bound: int) -> _Code:
    """The program with each value computed once: an instruction that repeats an earlier one
    on the same operands (as the two continuations of a branch do) reads the earlier result.
    Registers written more than once (stores round their register in place; selects; vector
    registers updated in place) are left as they are."""
    writes: dict[int, int] = defaultdict(int)
    for op, d, _, b in code.scode:
        writes[b if op == S_STORE else d] += 1
    alias: dict[int, int] = {}
    seen: dict[tuple[int, ...], int] = {}
    epoch: dict[int, int] = defaultdict(int)  # stores so far, per state key
    scode: list[tuple[int, ...]] = []

    def r(x: int) -> int:
        return alias.get(x, x)

    for op, d, a, b in code.scode:
        if op == S_STORE:
            epoch[a] += 1
            scode.append((op, d, a, r(b)))
            continue
        if op == S_CONST:
            ins = (op, d, a, b)
        elif op == S_LOAD:
            ins = (op, d, a, epoch[a])
        elif op == S_ROUND:
            ins = (op, d, r(a), b)
        elif op in _S_UNARY:
            ins = (op, d, r(a), 0)
        else:
            ins = (op, d, r(a), r(b))
        if op == S_SELECT and ins[2] == ins[3]:
            ins = (S_COPY, d, ins[2], 0)  # both continuations computed the same value
        key = (ins[0], *ins[2:])
        if writes[d] == 1 and op != S_SELECT:
            if key in seen:
                alias[d] = seen[key]
                continue
            seen[key] = d
        scode.append(ins if op != S_LOAD else (op, d, a, 0))
    # The same for the vector program, where a register written once repeats an earlier one
    # that is written once: what a source holds is told apart by how often it was written.
    vwrites: dict[int, int] = defaultdict(int)
    for vins in code.vcode:
        vwrites[vins[1]] += 1
    valias: dict[int, int] = {}
    vseen: dict[tuple[Any, ...], int] = {}
    version: dict[int, int] = defaultdict(int)
    vcode: list[tuple[int, ...]] = []
    for op, d, *sources, sr in code.vcode:
        a, b, c = (valias.get(x, x) for x in sources)
        vkey = (op, a, version[a], b, version[b], c, version[c], r(sr) if sr >= 0 else -1)
        single = d >= n_bound and vwrites[d] == 1
        if single and vkey in vseen:
            valias[d] = vseen[vkey]
            continue
        vcode.append((op, d, a, b, c, vkey[-1]))
        version[d] += 1
        if single:
            vseen[vkey] = d
    return _Code(vcode, scode, code.n_vregs, code.n_sregs, code.masks, code.guards)


def _prune(code: _Code, n_bound: int) -> _Code:
    """The program without the instructions whose results nothing reads: what the memory-bound
    registers and the state stores need is kept."""
    vcode: list[tuple[int, ...]] = []
    live = set()
    for ins in reversed(code.vcode):
        d, a, b, c = ins[1:5]
        if d >= n_bound and d not in live:
            continue
        vcode.append(ins)
        live.discard(d)
        live.update(r for r in (a, b, c) if r >= 0)
    vcode.reverse()
    scode: list[tuple[int, ...]] = []
    slive = {ins[5] for ins in vcode if ins[5] >= 0}
    for ins in reversed(code.scode):
        op, d, a, b = ins
        if op == S_STORE:
            slive.add(b)
        elif op == S_SELECT:
            if d not in slive:
                continue
            slive.update((a, b))
        else:
            if d not in slive:
                continue
            slive.discard(d)
            if op in _S_UNARY or op == S_ROUND:
                slive.add(a)
            elif op not in (S_CONST, S_LOAD):
                slive.update((a, b))
        scode.append(ins)
    scode.reverse()
    return _Code(vcode, scode, code.n_vregs, code.n_sregs, code.masks, code.guards)


def _compact(code: _Code, n_bound: int, n_slots: int) -> _Code:
    """The program with its temporary vector registers reused once their values are dead,
    masks and numbers apart (the generated code types them apart), and its scalar registers
    numbered densely after the ``n_slots`` hyperparameters (each tensor's register file is
    that long)."""
    numbered: dict[int, int] = {r: r for r in range(n_slots)}

    def number(r: int) -> int:
        return numbered.setdefault(r, len(numbered))

    scode: list[tuple[int, ...]] = []
    for op, d, a, b in code.scode:
        if op == S_STORE:
            scode.append((op, d, a, number(b)))
        elif op in (S_CONST, S_LOAD):
            scode.append((op, number(d), a, b))
        elif op in _S_UNARY or op == S_ROUND:
            scode.append((op, number(d), number(a), b))
        else:
            scode.append((op, number(d), number(a), number(b)))
    last: dict[int, int] = {}
    for k, ins in enumerate(code.vcode):
        for r in ins[1:5]:
            if r >= n_bound:
                last[r] = k
    assigned: dict[int, int] = {}
    free: dict[bool, list[int]] = {False: [], True: []}
    masks: set[int] = set()
    n_vregs = n_bound
    vcode: list[tuple[int, ...]] = []
    for k, (op, d, a, b, c, s) in enumerate(code.vcode):
        if d >= n_bound and d not in assigned:
            mask = d in code.masks
            if free[mask]:
                assigned[d] = min(free[mask])
                free[mask].remove(assigned[d])
            else:
                assigned[d] = n_vregs
                n_vregs += 1
            if mask:
                masks.add(assigned[d])
        vcode.append((op, *(assigned.get(r, r) for r in (d, a, b, c)), numbered.get(s, s)))
        for r in {d, a, b, c}:
            if r >= n_bound and last[r] == k:
                free[r in code.masks].append(assigned[r])
    return _Code(vcode, scode, n_vregs, len(numbered), masks, code.guards)


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
