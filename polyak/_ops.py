"""List-of-tensor primitives that every update rule is written in.

Each primitive takes lists of tensors and runs in one of two modes. Per-tensor mode (inside
:func:`per_tensor`, used by the ``loop`` strategy) calls the plain tensor method on each
element, which computes exactly what torch.optim's per-tensor path computes. Otherwise each
primitive is one ``torch._foreach_*`` call over the whole list, which computes exactly what
torch.optim's foreach path computes. The two can differ in the last bit: a foreach op on
bfloat16 multiplies by a float scalar in float32, the tensor method first rounds the scalar.
A step that ``torch.compile`` traces runs in per-tensor mode, as torch's compiled CPU steps do.
This module is the only caller of ``torch._foreach_*``. A trailing underscore means the first
argument is changed in place.

A ``scale`` is a Python number or a 0-dim tensor. A tensor that requires grad (a hyperparameter
being differentiated through the step) is applied by multiplication instead of as ``alpha``,
which autograd cannot see through.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import Any, TypeGuard, cast

import torch
from torch import Tensor

#: A Python number or a 0-dim tensor. torch takes a tensor where it types a number (``alpha``).
Scale = Any

_PER_TENSOR = contextvars.ContextVar("polyak_per_tensor", default=False)


class per_tensor:
    """Run the primitives called inside one tensor at a time."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _PER_TENSOR.set(True)

    def __exit__(self, *exc: object) -> None:
        _PER_TENSOR.reset(self._token)


def _mode_for_dynamo() -> bool:
    """:data:`_one_at_a_time` while dynamo traces: inside :func:`per_tensor`, and in a step
    that ``torch.compile`` traces, as torch's compiled steps on the CPU do."""
    return _PER_TENSOR.get() or torch.compiler.is_compiling()


#: Whether the primitives run one tensor at a time (inside :func:`per_tensor`). Dynamo cannot
#: read a ContextVar: once it traces a step, :func:`trace_as_python` puts a Python function
#: here, which dynamo calls as Python and whose result it takes as a constant. Until then the
#: ContextVar's own method, which costs less per call.
_one_at_a_time = _PER_TENSOR.get


def trace_as_python() -> None:
    """Let dynamo trace the primitives (see :data:`_one_at_a_time`). Called when dynamo first
    traces a step: marking the function at import would import dynamo, which takes seconds."""
    global _one_at_a_time
    _one_at_a_time = torch.compiler.assume_constant_result(  # type: ignore[no-untyped-call]
        _mode_for_dynamo
    )


def _traced(scale: Scale) -> TypeGuard[Tensor]:
    return isinstance(scale, Tensor) and scale.requires_grad


def constant(scale: Scale) -> Scale:
    """``scale`` cut from autograd, as torch reads a tensor passed where it takes a number."""
    return scale.detach() if isinstance(scale, Tensor) else scale


def copy(xs: list[Tensor]) -> list[Tensor]:
    """Copies of ``xs`` that stay in the autograd graph."""
    return [x.clone() for x in xs]


def neg(xs: list[Tensor]) -> list[Tensor]:
    """``-x`` for each x."""
    if _one_at_a_time() or not xs:
        return [-x for x in xs]
    return list(torch._foreach_neg(xs))


def add_scaled(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> list[Tensor]:
    """``x + scale * y`` for each pair, as new tensors."""
    if _traced(scale):
        # ``y`` is cloned because the caller changes it in place later, and autograd keeps it.
        return [x.addcmul(y.clone(), scale) for x, y in zip(xs, ys, strict=True)]
    if _one_at_a_time() or not xs:
        return [x.add(y, alpha=scale) for x, y in zip(xs, ys, strict=True)]
    # torch.optim's foreach paths add into the first operand in place, so the sum keeps its
    # dtype where ``y`` is wider (a float64 momentum buffer of a float32 parameter).
    return [
        s if s.dtype == x.dtype else s.to(x.dtype)
        for s, x in zip(torch._foreach_add(xs, ys, alpha=scale), xs, strict=True)
    ]


def add_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> None:
    """``x += scale * y`` for each pair."""
    if _traced(scale):
        for x, y in zip(xs, ys, strict=True):
            x.addcmul_(y, scale)
    elif _one_at_a_time():
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=scale)
    elif xs:
        torch._foreach_add_(xs, ys, alpha=scale)


def add_scaled_each_(xs: list[Tensor], ys: list[Tensor], scales: list[Any]) -> None:
    """``x += scale * y`` for each pair, with one scale per pair.

    One call per tensor: the foreach op takes a single ``alpha``, and scaling ``y`` first would
    round twice.
    """
    for x, y, s in zip(xs, ys, scales, strict=True):
        x.add_(y, alpha=s)


def sub_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Scale) -> None:
    """``x -= scale * y`` for each pair."""
    if _traced(scale):
        for x, y in zip(xs, ys, strict=True):
            x.addcmul_(y, scale, value=-1)
    elif _one_at_a_time():
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=-scale)
    elif xs:
        torch._foreach_add_(xs, ys, alpha=-scale)


def mul_(xs: list[Tensor], scale: Scale) -> None:
    """``x *= scale`` for each x; ``scale`` is one or one per x.

    One tensor scale is passed to the foreach op as a tensor, as torch.optim passes it (a
    half-precision tensor is then multiplied as by a tensor, not by a number).
    """
    if _one_at_a_time():
        for x, s in _pairs(xs, scale):
            x.mul_(_operand(x, s))
    elif xs:
        torch._foreach_mul_(xs, scale if isinstance(scale, Tensor) else _numbers(scale))


def zero_(xs: list[Tensor]) -> None:
    """Set every element of each x to zero."""
    if _one_at_a_time():
        for x in xs:
            x.zero_()
    elif xs:
        torch._foreach_zero_(xs)


def _pairs(xs: list[Tensor], scales: Scale) -> Iterator[tuple[Tensor, Any]]:
    """Pair each x with its scale: one scale for all, or one per tensor."""
    if isinstance(scales, list):
        return zip(xs, scales, strict=True)
    return zip(xs, repeat(scales))


def _numbers(scales: Scale) -> Scale:
    """Scales as Python numbers, which foreach ops take: one, or a list of one per tensor.

    A 0-dim tensor passed where torch takes a number is read as that number.
    """
    if isinstance(scales, list):
        return [s.item() if isinstance(s, Tensor) else s for s in scales]
    return scales.item() if isinstance(scales, Tensor) else scales


#: Python numbers that per-tensor primitives pass to tensor methods as their second operand
#: (``x.mul_(s)``), as 0-dim tensors of the dtype they are for; None for a number seen once.
_OPERANDS: dict[tuple[Any, torch.dtype], Tensor | None] = {}
_ABSENT = object()


def _operand(x: Tensor, s: Scale) -> Scale:
    """``s`` as the second operand of a method of ``x`` (``x.mul_(s)``, ``x.add_(s)``).

    torch wraps a Python number into a float64 tensor and converts it to x's dtype at every
    such call: 1.6 us of a 2.7 us ``mul_`` of 4096 float32 numbers. A float32 or float64 CPU
    tensor is given, from the second time a step uses a number, a 0-dim tensor of its dtype
    holding the number, which makes the same operation with the same result (x and s rounded
    to x's dtype). Numbers that change at every step (bias corrections) are passed as they
    are, as are zeros (0.0 and -0.0 are equal keys) and NaNs, and everything while autograd
    records or dynamo traces, and for tensor subclasses.
    """
    kind = type(s)
    if not (kind is float or (kind is int and -_EXACT_INT <= s <= _EXACT_INT)) or not s or s != s:
        return s
    if type(x) is not Tensor and type(x) is not torch.nn.Parameter:
        return s  # a subclass, or the flat kernel's tracer, which records numbers
    dtype = x.dtype
    if not (dtype is torch.float32 or dtype is torch.float64) or not x.is_cpu:
        return s
    if torch.compiler.is_compiling():
        return s  # before the table is read: dynamo would guard the graph on it
    key = (s, dtype)
    held = _OPERANDS.get(key, _ABSENT)
    if held is None:
        if torch.is_grad_enabled():
            return s
        # Made unseen by dispatch modes: it outlives the step, and a mode that watches one
        # (MemTracker) would file it as the optimizer's state, which torch's step lacks.
        with torch._C._DisableTorchDispatch():
            held = _OPERANDS[key] = torch.tensor(s, dtype=dtype)
    elif held is _ABSENT:
        if len(_OPERANDS) >= _MOST_OPERANDS:
            _OPERANDS.clear()
        _OPERANDS[key] = None
        return s
    return held


#: Integers up to this size are exact in float32, as any operand is held.
_EXACT_INT = 1 << 24
#: The most numbers :data:`_OPERANDS` holds: steps use a few each.
_MOST_OPERANDS = 256


def as_real(xs: list[Tensor]) -> list[Tensor]:
    """Complex tensors as real views with a trailing dimension of 2; real ones unchanged (a
    list without complex tensors is returned as it is)."""
    for x in xs:
        if x.is_complex():
            return [torch.view_as_real(x) if x.is_complex() else x for x in xs]
    return xs


def as_complex(xs: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """Real views back as complex tensors where the tensor at the same place in ``like`` is
    complex; the others unchanged."""
    return [
        torch.view_as_complex(x) if y.is_complex() else x for x, y in zip(xs, like, strict=True)
    ]


def increment_(xs: list[Tensor]) -> None:
    """``x += 1`` for each x (step counters)."""
    if _one_at_a_time():
        for x in xs:
            x += _operand(x, 1)
    elif xs and xs[0].is_cpu:
        # torch.optim adds a CPU scalar tensor here; the sum is the same.
        torch._foreach_add_(xs, torch.tensor(1.0, device="cpu"), alpha=1.0)
    elif xs:
        torch._foreach_add_(xs, 1)


def values(xs: list[Tensor]) -> list[Any]:
    """The Python numbers held by 0-dim tensors, one per x; in a step that ``torch.compile``
    traces, the tensors themselves, so that the graph neither breaks at ``item()`` nor is
    specialised to the step count (torch.optim's ``_get_value``)."""
    if torch.compiler.is_compiling():
        return list(xs)
    return [x.item() for x in xs]


def measured(xs: list[Tensor]) -> list[Any]:
    """The Python numbers held by 0-dim real tensors of one device, one per x: computed
    values (norms) that a rule goes on with in Python.

    A meta tensor (a stand-in on which a step is rehearsed) holds no number and reads as 0. In
    a step that ``torch.compile`` traces, the tensors themselves, as :func:`values` gives them:
    the rule goes on in tensor arithmetic, choosing with :func:`where`, and the graph does not
    break at ``item()``.
    """
    if torch.compiler.is_compiling():
        return list(xs)
    if any(x.is_meta for x in xs):
        return [0.0 if x.is_meta else x.item() for x in xs]
    if len(xs) > 1 and not torch.is_grad_enabled() and all(map(_plain, xs)):
        # One copy and one conversion for the whole list: stacking widens at most, exactly.
        return torch.stack(xs).tolist()  # type: ignore[no-any-return]
    # One at a time: a tensor subclass has no ``tolist``; a distributed one is made whole.
    return [x.item() if _plain(x) else _whole(x).item() for x in xs]


def _plain(x: Tensor) -> bool:
    return type(x) is Tensor or type(x) is torch.nn.Parameter


def whole(xs: list[Tensor]) -> list[Tensor]:
    """Each x, a distributed tensor (DTensor) that holds a reduction not yet made across its
    shards (a ``Partial`` placement: a norm or mean over a sharded dimension) made whole
    (``Replicate``) on the dimensions of the mesh it is partial on; any other as it is.

    A rule reduces over a parameter's dimensions and goes on in place (Adafactor's factors):
    DTensor refuses in-place operations on a partial tensor, and reading a number from one
    makes the reduction first. Across one rank the reduction is the value itself, which is
    taken as it is: DTensor's own would round a norm's (its square, summed, and its root).
    """
    return [x if _plain(x) else _whole(x) for x in xs]


def placed_like(xs: list[Tensor], likes: list[Tensor]) -> list[Tensor]:
    """Each x, a distributed tensor placed unlike the distributed tensor at its place in
    ``likes``, redistributed to that one's placements; any other as it is.

    A rule that computes a parameter's update from tensors of other layouts (Adafactor's
    factors) may get it replicated where the parameter is sharded along a dimension smaller
    than the mesh, which DTensor cannot add in place: it is laid out as the parameter first,
    each rank keeping its own part (no communication).
    """
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return xs
    out = []
    for x, like in zip(xs, likes, strict=True):
        if (
            isinstance(x, module.DTensor)
            and isinstance(like, module.DTensor)
            and x.placements != like.placements
        ):
            x = x.redistribute(like.device_mesh, like.placements)
        out.append(x)
    return out


def _whole(x: Tensor) -> Tensor:
    module = sys.modules.get("torch.distributed.tensor")
    dtensor: Any = x
    if module is None or not isinstance(dtensor, module.DTensor):
        return x  # no DTensor exists where the module was never loaded
    placements = dtensor.placements
    if not any(p.is_partial() for p in placements):
        return x
    mesh = dtensor.device_mesh
    made = [module.Replicate() if p.is_partial() else p for p in placements]
    if x.is_meta or all(mesh.size(i) == 1 for i, p in enumerate(placements) if p.is_partial()):
        # Across one rank (or on a stand-in, which holds nothing) the value is the reduction.
        made_whole = module.DTensor.from_local(
            dtensor.to_local(), mesh, made, run_check=False, shape=x.shape, stride=x.stride()
        )
        return cast(Tensor, made_whole)
    return cast(Tensor, dtensor.redistribute(mesh, made))


def _traced_condition(condition: Any) -> TypeGuard[Tensor]:
    """Whether a per-tensor condition is a tensor of a step that ``torch.compile`` traces,
    which :func:`where` and :func:`select` decide with ``torch.where``."""
    return isinstance(condition, Tensor) and torch.compiler.is_compiling()


def _made(value: Any) -> Any:
    return value() if callable(value) else value


def where(condition: Any, then: Any, otherwise: Any) -> Any:
    """``then`` where ``condition`` holds, else ``otherwise``: a rule's choice on a number it
    computes per tensor (RAdam's ``rho_t > 5``; ``max(a, b)`` is ``where(b > a, b, a)``).

    ``then`` and ``otherwise`` are numbers or tensors, or functions of no arguments that make
    them. A Python condition (or the flat kernel's trace, which branches on it) makes only the
    one it picks, with the roundings of torch's per-tensor paths. In a step that
    ``torch.compile`` traces the condition is a 0-dim tensor (see :func:`values`): both are
    made and ``torch.where`` picks, as torch's capturable steps do, so that the graph neither
    breaks at the condition nor is specialised to it.
    """
    if _traced_condition(condition):
        return torch.where(condition, _made(then), _made(otherwise))
    return _made(then) if condition else _made(otherwise)


def select(
    conditions: list[Any],
    then: Callable[[list[int]], list[Tensor]],
    otherwise: Callable[[list[int]], list[Tensor]],
) -> list[Tensor]:
    """For each position i, ``then``'s tensor where ``conditions[i]`` holds, else
    ``otherwise``'s: a rule's choice of computation on a number it computes per tensor.

    ``then`` and ``otherwise`` take the positions they make tensors for and return one tensor
    for each. With Python conditions each runs once, on the positions it is chosen for, if
    any, so that every tensor is computed as torch's per-tensor path computes it. In a step
    that ``torch.compile`` traces, where the conditions are 0-dim tensors, both run on every
    position and ``torch.where`` picks elementwise, as torch's capturable steps do.
    """
    if any(_traced_condition(c) for c in conditions):
        everywhere = list(range(len(conditions)))
        return [
            where(c, a, b)
            for c, a, b in zip(conditions, then(everywhere), otherwise(everywhere), strict=True)
        ]
    chosen: list[int] = []
    others: list[int] = []
    for i, c in enumerate(conditions):
        (chosen if c else others).append(i)
    out: list[Tensor] = [None] * len(conditions)  # type: ignore[list-item]
    for idx, make in ((chosen, then), (others, otherwise)):
        if idx:
            for i, x in zip(idx, make(idx), strict=True):
                out[i] = x
    return out


def lerp_(xs: list[Tensor], ys: list[Tensor], weight: Scale) -> None:
    """``x += weight * (y - x)`` for each pair; ``weight`` is one or one per x."""
    if _one_at_a_time():
        for (x, w), y in zip(_pairs(xs, weight), ys, strict=True):
            x.lerp_(y, w)
    elif xs:
        torch._foreach_lerp_(xs, ys, _numbers(weight))


def addcmul_(xs: list[Tensor], ys: list[Tensor], zs: list[Tensor], value: Scale) -> None:
    """``x += value * y * z`` for each triple."""
    if _one_at_a_time():
        for x, y, z in zip(xs, ys, zs, strict=True):
            x.addcmul_(y, z, value=value)
    elif xs:
        torch._foreach_addcmul_(xs, ys, zs, _numbers(value))


def addcdiv_(xs: list[Tensor], ys: list[Tensor], zs: list[Tensor], value: Scale = 1) -> None:
    """``x += value * y / z`` for each triple; ``value`` is one number or one per tensor."""
    if _one_at_a_time():
        for (x, v), y, z in zip(_pairs(xs, value), ys, zs, strict=True):
            x.addcdiv_(y, z, value=v)
    elif xs:
        torch._foreach_addcdiv_(xs, ys, zs, _numbers(value))


def sqrt(xs: list[Tensor]) -> list[Tensor]:
    """``sqrt(x)`` for each x, as new tensors."""
    if _one_at_a_time() or not xs:
        return [x.sqrt() for x in xs]
    return list(torch._foreach_sqrt(xs))


def div(xs: list[Tensor], scales: Scale) -> list[Tensor]:
    """``x / scale`` for each x, as new tensors; ``scales`` is one or one per x."""
    if _one_at_a_time() or not xs:
        return [x / _operand(x, s) for x, s in _pairs(xs, scales)]
    return list(torch._foreach_div(xs, _numbers(scales)))


def div_(xs: list[Tensor], scales: Scale) -> None:
    """``x /= scale`` for each x; ``scales`` is one number or tensor, or one per x."""
    if _one_at_a_time():
        for x, s in _pairs(xs, scales):
            x.div_(_operand(x, s))
    elif xs:
        torch._foreach_div_(xs, _numbers(scales))


def add_(xs: list[Tensor], scales: Scale) -> None:
    """``x += scale`` for each x; ``scales`` is one number or tensor, or one per x."""
    if _one_at_a_time():
        for x, s in _pairs(xs, scales):
            x.add_(_operand(x, s))
    elif xs:
        torch._foreach_add_(xs, _numbers(scales))


def maximum_(xs: list[Tensor], ys: list[Tensor]) -> None:
    """``x = max(x, y)`` elementwise for each pair, NaN-propagating."""
    if _one_at_a_time():
        for x, y in zip(xs, ys, strict=True):
            if torch.is_grad_enabled():
                # Autograd takes no ``out=``; torch.optim's differentiable step copies too.
                x.copy_(torch.maximum(x.clone(), y))
            else:
                torch.maximum(x, y, out=x)
    elif xs:
        torch._foreach_maximum_(xs, ys)


def addcmul(xs: list[Tensor], ys: list[Tensor], zs: list[Tensor], value: Scale) -> list[Tensor]:
    """``x + value * y * z`` for each triple, as new tensors."""
    if _one_at_a_time() or not xs:
        return [x.addcmul(y, z, value=value) for x, y, z in zip(xs, ys, zs, strict=True)]
    return list(torch._foreach_addcmul(xs, ys, zs, _numbers(value)))


def sqrt_(xs: list[Tensor]) -> None:
    """``x = sqrt(x)`` for each x."""
    if _one_at_a_time():
        for x in xs:
            x.sqrt_()
    elif xs:
        torch._foreach_sqrt_(xs)


def add(xs: list[Tensor], scales: Scale) -> list[Tensor]:
    """``x + scale`` for each x, as new tensors; ``scales`` is one or one per x."""
    if _one_at_a_time() or not xs:
        return [x.add(_operand(x, s)) for x, s in _pairs(xs, scales)]
    return list(torch._foreach_add(xs, _numbers(scales)))


def mul(xs: list[Tensor], scales: Scale) -> list[Tensor]:
    """``x * scale`` for each x, as new tensors; ``scales`` is one or one per x."""
    if _one_at_a_time() or not xs:
        return [x * _operand(x, s) for x, s in _pairs(xs, scales)]
    return list(torch._foreach_mul(xs, _numbers(scales)))


def absolute(xs: list[Tensor]) -> list[Tensor]:
    """``|x|`` for each x, as new tensors."""
    if _one_at_a_time() or not xs:
        return [x.abs() for x in xs]
    return list(torch._foreach_abs(xs))


def amax_(xs: list[Tensor], ys: list[Tensor]) -> None:
    """``x = max(x, y)`` elementwise for each pair, differentiated as ``torch.amax`` is (a tie
    shares the gradient), for steps that autograd runs through."""
    for x, y in zip(xs, ys, strict=True):
        x.copy_(torch.amax(torch.stack([x, y]), 0))


def mul_tensors_(xs: list[Tensor], ys: list[Tensor]) -> None:
    """``x *= y`` elementwise for each pair."""
    if _one_at_a_time():
        for x, y in zip(xs, ys, strict=True):
            x.mul_(y)
    elif xs:
        torch._foreach_mul_(xs, ys)


def div_tensors_(xs: list[Tensor], ys: list[Tensor]) -> None:
    """``x /= y`` elementwise for each pair."""
    if _one_at_a_time():
        for x, y in zip(xs, ys, strict=True):
            x.div_(y)
    elif xs:
        torch._foreach_div_(xs, ys)


def mul_tensors(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """``x * y`` elementwise for each pair, as new tensors."""
    if _one_at_a_time() or not xs:
        return [x * y for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_mul(xs, ys))


def rdiv(scales: Scale, xs: list[Tensor]) -> list[Tensor]:
    """``scale / x`` for each x, as new tensors, computed as torch computes it: the reciprocal
    of x times the scale."""
    if _one_at_a_time() or not xs:
        return [s / x for x, s in _pairs(xs, scales)]
    out = list(torch._foreach_reciprocal(xs))
    torch._foreach_mul_(out, _numbers(scales))
    return out


def norms(xs: list[Tensor]) -> list[Tensor]:
    """The 2-norm of each x over all its elements, as 0-dim tensors of its dtype.

    The foreach norm runs the per-tensor kernel on the CPU only (accelerators reduce in
    another order), so elsewhere each norm is its own call, as on both of torch.optim's paths
    (``x.norm(2)`` is ``vector_norm``, through a Python wrapper).
    """
    if _one_at_a_time() or not xs or not all(x.is_cpu for x in xs):
        return [torch.linalg.vector_norm(x) for x in xs]
    return list(torch._foreach_norm(xs))


def norms_over(xs: list[Tensor], dim: int) -> list[Tensor]:
    """The 2-norm of each x over dimension ``dim``, kept with size 1, bit for bit as
    ``torch.linalg.vector_norm(x, dim=dim, keepdim=True)`` computes it.

    Over a dimension that is not the innermost in memory, torch's CPU kernel reduces one
    output element at a time: from 0, it adds each square in the dimension's order, rounding
    every product and sum (in float32, for float32), then takes a correctly rounded square
    root. Its strided reads cost 3.6 ms
    over the rows of a 1024 x 1024 float32 matrix, and 74 ms over those of a 512 x 512 x 3 x 3
    convolution (about 90 ns per output element). :func:`_norms_across_rows` makes the same
    roundings in the same order in a fraction of that time (0.25 and 5 ms), where the
    conditions of :func:`_sums_rows_in_order` hold.
    """
    return [
        _norms_across_rows(x)
        if _sums_rows_in_order(x, dim)
        else torch.linalg.vector_norm(x, dim=dim, keepdim=True)
        for x in xs
    ]


#: torch's grain size: a reduction over at least this many elements into one output element
#: is split between threads, which changes its order.
_GRAIN_SIZE = 32768
#: Fewer outputs than this cost less through torch's own kernel.
_FEW_OUTPUTS = 128


def _sums_rows_in_order(x: Tensor, dim: int) -> bool:
    """Whether :func:`_norms_across_rows` computes torch's norm of ``x`` over ``dim``, and
    faster: a float32 CPU tensor reduced over its next-to-last dimension, which torch sums
    element after element (its innermost dimension, of stride one, is reduced in vector lanes
    instead), over fewer elements than its grain size, into many outputs. float64 is left out
    for its square root, which no elementwise torch operation rounds correctly."""
    if dim != -2 or type(x) not in (Tensor, torch.nn.Parameter):
        return False
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() < 2 or torch.compiler.is_compiling():
        return False
    rows = x.size(-2)
    return x.stride(-2) != 1 and 1 < rows < _GRAIN_SIZE and x.numel() >= _FEW_OUTPUTS * rows


def _norms_across_rows(x: Tensor) -> Tensor:
    """The 2-norm of float32 ``x`` over its next-to-last dimension, as torch's CPU kernel
    computes it (see :func:`norms_over`).

    ``index_add_`` of the rows of x^2 into a row of zeros adds them in the order of its index,
    as torch documents it, each as one elementwise ``add_`` over a whole row; x^2 is made for a
    block of rows at a time, to bound the temporary. The square root is taken in float64 and
    rounded to float32: torch's elementwise float32 ``sqrt`` (MKL's) is not correctly rounded.
    A float64 root within one of its units of the exact one rounds to the correctly rounded
    float32 root: the exact root of a float32 number is never a midpoint between float32
    numbers, and lies at least 2^-51 of it away from one, relative.
    """
    rows = x.size(-2)
    # A leading dimension, so that the rows' dimension is neither the first nor the last:
    # index_add_ hands those to scatter_add_, whose order is not documented.
    x = x.unsqueeze(0)
    acc = x.new_zeros((*x.shape[:-2], 1, x.size(-1)))
    dim = x.dim() - 2
    block = max(1, _BLOCK_NUMEL * rows // x.numel())
    for start in range(0, rows, block):
        part = x.narrow(dim, start, min(block, rows - start))
        acc.index_add_(dim, torch.zeros(part.size(dim), dtype=torch.long), part * part)
    return acc.squeeze(0).double().sqrt_().float()


#: The most elements of x^2 that :func:`_norms_across_rows` holds at once.
_BLOCK_NUMEL = 1 << 20


def lerp(xs: list[Tensor], ys: list[Tensor], weight: Scale) -> list[Tensor]:
    """``x + weight * (y - x)`` for each pair, as new tensors."""
    if _one_at_a_time() or not xs:
        return [x.lerp(y, weight) for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_lerp(xs, ys, _numbers(weight)))


def clamp_min(xs: list[Tensor], low: Scale) -> list[Tensor]:
    """``max(x, low)`` for each x, as new tensors (NaN stays NaN)."""
    if _one_at_a_time() or not xs:
        return [torch.clamp_min(x, low) for x in xs]
    return list(torch._foreach_clamp_min(xs, _numbers(low)))


def clamp_min_(xs: list[Tensor], low: Scale) -> None:
    """``x = max(x, low)`` for each x (NaN stays NaN)."""
    if _one_at_a_time():
        for x in xs:
            x.clamp_(min=low)
    elif xs:
        torch._foreach_clamp_min_(xs, _numbers(low))


def rsqrt_(xs: list[Tensor]) -> None:
    """``x = 1 / sqrt(x)`` for each x."""
    if _one_at_a_time():
        for x in xs:
            x.rsqrt_()
    elif xs:
        torch._foreach_rsqrt_(xs)


def reciprocal_(xs: list[Tensor]) -> None:
    """``x = 1 / x`` for each x."""
    if _one_at_a_time():
        for x in xs:
            x.reciprocal_()
    elif xs:
        torch._foreach_reciprocal_(xs)


def sub(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """``x - y`` for each pair, as new tensors."""
    if _one_at_a_time() or not xs:
        return [x.sub(y) for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_sub(xs, ys))


def copy_(xs: list[Tensor], ys: list[Tensor]) -> None:
    """``x = y`` elementwise for each pair, in place."""
    if _one_at_a_time():
        for x, y in zip(xs, ys, strict=True):
            x.copy_(y)
    elif xs:
        torch._foreach_copy_(xs, ys)


def assign_(xs: list[Tensor], values: list[Any]) -> None:
    """Set each 0-dim x to its value: a number, taken as ``torch.as_tensor`` takes it (in the
    default dtype), or a 0-dim tensor. Anything else (a number the flat strategy's trace
    stands in for) is handed to ``x.copy_``, which takes it as ``torch.as_tensor`` would."""
    news = [
        torch.as_tensor(v, device=x.device) if isinstance(v, (int, float, Tensor)) else v
        for x, v in zip(xs, values, strict=True)
    ]
    copy_(xs, news)


def sign(xs: list[Tensor]) -> list[Tensor]:
    """``sign(x)`` (-1, 0 or 1) for each x, as new tensors."""
    if _one_at_a_time() or not xs:
        return [x.sign() for x in xs]
    return list(torch._foreach_sign(xs))


def sign_(xs: list[Tensor]) -> None:
    """``x = sign(x)`` for each x."""
    if _one_at_a_time():
        for x in xs:
            x.sign_()
    elif xs:
        torch._foreach_sign_(xs)


def compare(xs: list[Tensor], op: str, value: Scale) -> list[Tensor]:
    """Boolean masks ``x <op> value`` for each x; ``op`` is one of ``gt``, ``lt``, ``eq``."""
    return [getattr(x, op)(value) for x in xs]


def masked_fill_(xs: list[Tensor], masks: list[Tensor], value: Scale) -> None:
    """Set the elements of each x where its mask is True to ``value``."""
    for x, mask in zip(xs, masks, strict=True):
        x.masked_fill_(mask, value)


def clamp_(xs: list[Tensor], low: Scale, high: Scale) -> None:
    """``x = min(max(x, low), high)`` for each x."""
    for x in xs:
        x.clamp_(low, high)
