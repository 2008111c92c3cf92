"""Tracing an update rule into the kernel's programs (see ``_program.py``).

The rule runs in per-tensor mode on stand-ins for one parameter, its gradient and its state.
Each tensor method the list primitives call appends an instruction to a vector program (run
over every element); arithmetic on hyperparameters and on per-tensor scalar state (Adam's step
counter) appends to a scalar program (run once per tensor, in double precision, as Python runs
it in torch.optim). Branches on hyperparameters are recorded as guards: a program is reused only
while its guards hold.

Branches on numbers computed per tensor (RAdam's ``rho_t > 5``, ASGD's ``mu != 1``, Python's
``max(1, step - t0)``) cannot be decided while tracing. The scalar program computes each such
condition, and the rule is traced once more for each outcome; the two traces share everything
up to the branch and are merged (``_program.merge``) into one program that runs both
continuations and keeps, per tensor, the one the condition picks: a select of the memory-bound
registers in the vector program, and of the stored state values in the scalar program. Both
continuations compute with the roundings each computes on its own, so the kept one has torch's
bits.

The tracer, its stand-ins (:class:`Scalar`, :class:`Vec`, :class:`ScalarState`) and
:func:`trace` refer to one another, and stay in one module.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from polyak import _ops
from polyak.strategies.flat._program import (
    COMPARE,
    GRAD,
    MAX_VREGS,
    PARAM,
    S_ADD,
    S_COMPARISONS,
    S_CONST,
    S_COPY,
    S_DIV,
    S_F32,
    S_LOAD,
    S_MUL,
    S_NEG,
    S_POW,
    S_ROUND,
    S_STORE,
    S_SUB,
    V_ABS,
    V_ADD,
    V_ADD1,
    V_ADDCDIV,
    V_ADDCMUL,
    V_ADDS,
    V_COMPARISONS,
    V_COPY,
    V_DIV,
    V_DIVV,
    V_FILL,
    V_LERP,
    V_MAX,
    V_MUL,
    V_MULV,
    V_NEG,
    V_RECIP,
    V_SELECT,
    V_SIGN,
    V_SQRT,
    Code,
    ForkPoint,
    Program,
    Slot,
    is_number,
    merge,
    optimize,
    split,
)

#: Branches on computed numbers one traced path may take (each doubles the traces).
MAX_BRANCHES = 4


class TraceError(Exception):
    """The rule does something the flat kernel cannot run; it takes another strategy."""


class MissingState(TraceError):
    """The rule reads state that the parameters do not have yet (before their first step)."""


_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


class _Fork(Exception):
    """Raised at a branch the trace has no decision for: it is traced both ways."""

    def __init__(self, at: ForkPoint) -> None:
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
        # Masks are booleans in the generated code: only a select reads one, as its condition.
        if a in self.masks or b in self.masks or (c in self.masks) != (op == V_SELECT):
            raise TraceError("a mask used as numbers, or numbers as a mask")
        sreg = -1 if s is None else self.scalar(s).reg
        self.vcode.append((op, dst, a, b, c, sreg))

    def branch(self, op: str, a: Scalar, other: Any) -> bool:
        """The outcome of ``a <op> other`` on this traced path, where the kernel computes it
        per tensor: a new branch stops the trace, to be traced both ways."""
        b = self.scalar(other)
        if a.known and b.known:
            return bool(COMPARE[op](a.value, b.value))
        key = (op, a.reg, b.reg)
        if key in self.conditions:
            return self.conditions[key]
        cond = self.sop(S_COMPARISONS[op], a.reg, b.reg)
        n = len(self.conditions)
        if n >= len(self.decisions):
            at = ForkPoint(cond, len(self.vcode), len(self.scode), self.n_vregs, self.n_sregs)
            raise _Fork(at)
        self.conditions[key] = self.decisions[n]
        return self.decisions[n]

    def code(self) -> Code:
        return Code(
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
            if is_number(other):
                return bool(COMPARE[op](self.value, other))
        if self.slot is not None and not isinstance(other, ScalarState):
            # Hyperparameters and constants only: the outcome selects the program.
            if isinstance(other, Scalar) and other.slot is not None:
                result = bool(COMPARE[op](self.value, other.value))
                self.tracer.guards.append((self.slot, op, Slot(other.slot), result))
                return result
            if not isinstance(other, Scalar):
                result = bool(COMPARE[op](self.value, other))
                self.tracer.guards.append((self.slot, op, other, result))
                return result
        if not isinstance(other, (Scalar, ScalarState)) and not is_number(other):
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

    def run(decisions: list[bool]) -> Code:
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
    code = optimize(code, n_bound, len(numbers))
    if code.n_vregs > MAX_VREGS:
        raise TraceError("the update rule needs too many registers")
    return Program(
        vcode=torch.tensor(code.vcode, dtype=torch.int64).reshape(-1, 6),
        scode=torch.tensor(code.scode, dtype=torch.int64).reshape(-1, 4),
        n_sregs=code.n_sregs,
        n_vregs=code.n_vregs,
        # The bound registers written: the parameter and state, and the gradient where the rule
        # writes it in place (a fused step unscaling it); the kernel stores each back.
        stored=sorted({ins[1] for ins in code.vcode if ins[1] < n_bound}),
        guards=code.guards,
    )


def _explore(run: Callable[[list[bool]], Code], decisions: list[bool], n_bound: int) -> Code:
    """The rule traced with ``decisions`` for its first branches on computed numbers, and both
    ways at each later one, merged into one program."""
    try:
        return run(decisions)
    except _Fork as fork:
        if len(decisions) >= MAX_BRANCHES:
            raise TraceError("the update rule branches too often") from None
        taken = _explore(run, [*decisions, True], n_bound)
        other = _explore(run, [*decisions, False], n_bound)
        return merge(fork.at, taken, other, n_bound)
