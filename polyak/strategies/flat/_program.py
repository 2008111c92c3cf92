"""The programs the tracer makes, and the passes that finish them for the kernel.

A program is two lists of instructions over registers: a vector program, run over every element
of every tensor of a group (``(op, dst, a, b, c, sreg)``; registers 0 and 1 are bound to the
parameter and its gradient, the next ones to the state), and a scalar program, run once per
tensor in double precision (``(op, dst, a, b)``). Its guards say for which hyperparameters it
was traced. The opcodes are numbered here and nowhere else in Python: kernel.cpp's ``VOp`` and
``SOp`` enums number them alike (``tests/test_native.py`` compares the two), and ``_codegen.py``'s
table of statements is keyed by these names.

After tracing (``_trace.py``), the passes here merge the two continuations of a branch on a
per-tensor number (:func:`merge`), compute each value once, drop what nothing reads and reuse
registers (:func:`optimize`); :func:`fused_form` rewrites a program as torch's fused kernels
round it.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Opcodes (see the module's docstring).
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
S_COMPARISONS = {"<": S_LT, "<=": S_LE, ">": S_GT, ">=": S_GE, "==": S_EQ, "!=": S_NE}
_S_UNARY = (S_NEG, S_F32, S_COPY)

#: Vector registers the kernel binds to memory: the parameter, its gradient, then state.
PARAM, GRAD = 0, 1
#: Vector registers a program may use (kernel.cpp's ``kMaxRegs``).
MAX_VREGS = 24


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
            bool(COMPARE[op](slots[slot], slots[o.slot] if isinstance(o, Slot) else o)) == result
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
            elif is_number(other):
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
COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "bool": lambda v, _: bool(v),
}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Code:
    """A straight-line traced program, before it is packed for the kernel."""

    vcode: list[tuple[int, ...]]
    scode: list[tuple[int, ...]]
    n_vregs: int
    n_sregs: int
    #: The vector registers holding masks (comparison results), which arithmetic never reads.
    masks: set[int]
    guards: list[tuple[int, str, Any, bool]]


@dataclass(frozen=True)
class ForkPoint:
    """Where a trace reached a branch on a computed number: the register holding the
    condition, and the lengths of the code and register files before the branch."""

    cond: int
    n_vcode: int
    n_scode: int
    n_vregs: int
    n_sregs: int


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


def merge(at: ForkPoint, taken: Code, other: Code, n_bound: int) -> Code:
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

    def place(code: Code) -> tuple[dict[int, int], dict[int, int]]:
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
    return Code(vcode, scode, counts[0], counts[1], masks, guards)


def _load(scode: list[tuple[int, ...]], reg: int, key: int) -> int:
    scode.append((S_LOAD, reg, key, 0))
    return reg


def _number_values(code: Code, n_bound: int) -> Code:
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
    return Code(vcode, scode, code.n_vregs, code.n_sregs, code.masks, code.guards)


def _prune(code: Code, n_bound: int) -> Code:
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
    return Code(vcode, scode, code.n_vregs, code.n_sregs, code.masks, code.guards)


def _compact(code: Code, n_bound: int, n_slots: int) -> Code:
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
    return Code(vcode, scode, n_vregs, len(numbered), masks, code.guards)


def optimize(code: Code, n_bound: int, n_slots: int) -> Code:
    """The passes after tracing: each value computed once, what nothing reads dropped, and the
    registers numbered for the kernel."""
    return _compact(_prune(_number_values(code, n_bound), n_bound), n_bound, n_slots)


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
