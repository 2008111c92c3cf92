"""A step tried on stand-ins of its tensors before it writes anything, so that a step that
fails changes nothing."""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable
from itertools import chain
from typing import Any, Final, Literal, TypeAlias, cast

import torch
import torch.optim
from torch import Tensor

from polyak import _checks, _memo
from polyak._hyper import _IMMUTABLE_TYPES, _PLAIN_TENSORS, Hyper, MissingHyperparameter
from polyak._runner import _run
from polyak.strategies import StateLists, Strategy, choose

#: Up to this many elements, a parameter's state templates are made on a real CPU tensor.
_REAL_STAND_IN_NUMEL = 1 << 20


def _state_template(param: Tensor) -> Tensor:
    """A tensor of ``param``'s shape and dtype on which ``init_state`` shows the state it makes.

    A small parameter gets a real CPU tensor: ``zeros_like`` on the meta device runs torch's
    Python meta kernel, which imports ``torch.fx``'s symbolic shapes and sympy, 0.3-1 s in a
    process's first ``load_state_dict``. A large one gets a meta tensor, which allocates nothing.
    """
    if param.numel() <= _REAL_STAND_IN_NUMEL:
        return torch.empty(param.shape, dtype=param.dtype)
    return torch.empty_like(param, device="meta")


def _key_template(param: Tensor) -> Tensor:
    """A tensor on which ``init_state`` shows which keys it makes for ``param``: a large plain
    parameter's has its shape shrunk as the rehearsal shrinks it (see :func:`_shrinking`),
    which keeps its dimensions and so the keys, without the imports a meta tensor costs."""
    if _small(param) or type(param) not in _PLAIN_TENSORS:
        return _state_template(param)
    return _stand_in(param, _shrinking([param]))


def _layout(value: Any) -> Any:
    """What of ``value`` decides whether a step over it can fail: types, shapes, dtypes and
    devices of its tensors, and of its numbers whether they are zero (rules branch on that)."""
    kind = type(value)
    # The usual hyperparameters first, by exact type: this runs at every step.
    if kind is bool or kind is str or value is None:
        return value
    if kind is float or kind is int:
        return (kind, value == 0)
    if kind is dict:
        return tuple([(key, _layout(item)) for key, item in value.items()])
    if isinstance(value, Tensor):
        return (kind, value.shape, value.dtype, value.device, value.layout)
    if isinstance(value, dict):
        return tuple((key, _layout(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return (kind, *map(_layout, value))
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return (kind, value == 0)
    return kind


def _hyper_layout(values: dict[str, Any]) -> list[Any]:
    """:func:`_layout` of each hyperparameter, the usual types inline: this runs per step."""
    out: list[Any] = []
    for key, value in values.items():
        kind = type(value)
        if kind is float or kind is int:
            out.append((key, kind, value == 0))
        elif kind is bool or kind is str or value is None:
            out.append((key, value))
        else:
            out.append((key, _layout(value)))
    return out


_META = operator.attrgetter("shape", "dtype", "device")


_SPARSE = operator.attrgetter("is_sparse")


_PRESENT = functools.partial(operator.is_not, None)


def _tensors_layout(values: list[Any]) -> Any:
    """:func:`_layout` of a list of tensors and Nones, at C speed where all are tensors."""
    try:
        # The types say where the Nones are.
        return (tuple(map(type, values)), tuple(map(_META, filter(_PRESENT, values))))
    except AttributeError:  # a value that is not a tensor
        return _layout(values)


def _immutable(value: Any) -> bool:
    """Whether ``value`` cannot change while its object stays: a number, flag or string, or a
    tuple of them (a tensor may change in place)."""
    kind = type(value)
    return kind in _IMMUTABLE_TYPES or (
        kind is tuple and all(type(v) in _IMMUTABLE_TYPES for v in value)
    )


def _one_of_each_kind(
    params: list[Tensor], grads: list[Tensor], state: StateLists
) -> tuple[list[Tensor], list[Tensor], StateLists]:
    """The step's lists cut to one parameter of each kind: the same layouts of parameter,
    gradient and state values, and the same per-parameter counters. An update rule treats
    each parameter on its own (the loop strategy runs it on one at a time), so a step that
    fails for one parameter fails for every parameter of its kind, and a rehearsal on one of
    each raises what a rehearsal on all would."""
    columns = list(state.values())
    first: dict[Any, int] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        kind = (_layout(p), _layout(g), *[_state_kind(column[i]) for column in columns])
        first.setdefault(kind, i)
    if len(first) == len(params):
        return params, grads, state
    picked = list(first.values())
    return (
        [params[i] for i in picked],
        [grads[i] for i in picked],
        {key: [values[i] for i in picked] for key, values in state.items()},
    )


def _state_kind(value: Any) -> Any:
    """What of a state value tells its parameter's kind: its layout, and a counter's value,
    which rules branch on."""
    if type(value) is Tensor and value.dim() == 0 and not value.is_meta:
        return (_layout(value), value.item())
    return _layout(value)


#: How a parameter's tensors are stood in for: by real tensors of their own shapes
#: (:data:`OWN_SHAPES`), by real tensors of shapes whose dimension sizes a map makes small, or
#: by meta tensors (:data:`META`).
OWN_SHAPES: Final = "own shapes"
META: Final = "meta"
StandIn: TypeAlias = dict[int, int] | Literal["own shapes", "meta"]


def _unseen(tensors: list[Any]) -> contextlib.AbstractContextManager[Any]:
    """Where a rehearsal of a step over ``tensors`` runs unseen by the dispatch modes active,
    and the state templates that tell which keys a parameter's state needs are made.

    These are polyak's own checks, which torch's step does not make: a mode that watches
    a step (MemTracker, which files what the step allocates as optimizer state; FlopCounterMode;
    DebugMode) would count its stand-ins and their operations as the step's. Where every tensor
    is a plain one, the modes are set aside while it runs; their stand-ins are plain too, and
    nothing of them outlives it. Tensor subclasses (DTensor, fake tensors) dispatch through the
    modes' key, which must stay: they are rehearsed as they are.
    """
    if not torch._C._len_torch_dispatch_stack():
        return contextlib.nullcontext()
    if not all(type(t) in _PLAIN_TENSORS for t in tensors if isinstance(t, Tensor)):
        return contextlib.nullcontext()
    return torch._C._DisableTorchDispatch()


def _stand_in(t: Tensor, how: StandIn) -> Tensor:
    """A tensor like ``t`` to rehearse a step on; per-parameter counters, which the update
    reads as numbers, are copied. Tensors of small parameters are real ones of their shapes,
    as in :func:`_state_template`; those of large plain ones real ones of shapes shrunk by
    :func:`_shrinking`; anything else a meta tensor, which allocates nothing but whose Python
    kernels import torch's reference operations and sympy on first use (over a second)."""
    if t.dim() == 0 or (t.numel() == 1 and type(t) in _PLAIN_TENSORS):
        # Counters are plain (a DTensor parameter's too); a one-element DTensor is state of
        # its parameter's layout (Adafactor's factors of an n x 1 matrix), stood in for as
        # the parameter's other tensors are.
        return t.detach().clone()
    if how == OWN_SHAPES and _small(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if isinstance(how, dict) and type(t) in _PLAIN_TENSORS:
        return torch.empty([how[n] for n in t.shape], dtype=t.dtype, device=t.device)
    return torch.empty_like(t.detach(), device="meta")


def _small(t: Tensor) -> bool:
    """Whether a rehearsal stands in for ``t`` by a real tensor of its own shape."""
    return t.numel() <= _REAL_STAND_IN_NUMEL and type(t) in _PLAIN_TENSORS


def _shrinking(tensors: list[Any]) -> StandIn:
    """How to stand in for a large parameter's tensors (itself, its gradient, its state): by
    real tensors whose dimension sizes are mapped onto small ones, keeping 0 and 1 and the
    order of the others, so that every size that equals, exceeds or broadcasts against
    another still does, and each stand-in of more than one element still has more than one.
    Meta tensors where one of them is not a plain tensor."""
    sizes: set[int] = set()
    for t in tensors:
        if isinstance(t, Tensor):
            if type(t) not in _PLAIN_TENSORS:
                return META
            sizes.update(t.shape)
    larger = sorted(n for n in sizes if n > 1)
    return {0: 0, 1: 1, **{n: k + 2 for k, n in enumerate(larger)}}


def _copy(t: Tensor, how: StandIn) -> Tensor:
    return t.detach().clone()


def _stand_ins(
    lists: tuple[list[Tensor], list[Tensor], StateLists], make: Callable[[Tensor, StandIn], Tensor]
) -> tuple[list[Tensor], list[Tensor], StateLists]:
    """Stand-ins of a step's tensors. A large parameter's gradient and state are stood in for
    as the parameter is, so that state smaller than the parameter (Adafactor's row and column
    factors) keeps its relation to it."""
    params, grads, state = lists
    columns = list(state.values())
    hows: list[StandIn] = [
        OWN_SHAPES if _small(p) else _shrinking([p, g, *[column[i] for column in columns]])
        for i, (p, g) in enumerate(zip(params, grads, strict=True))
    ]
    return (
        [make(p, how) for p, how in zip(params, hows, strict=True)],
        [make(g, how) for g, how in zip(grads, hows, strict=True)],
        {
            key: [
                make(t, how) if isinstance(t, Tensor) else t
                for t, how in zip(values, hows, strict=True)
            ]
            for key, values in state.items()
        },
    )


def _refuse_not_a_tensor(key: str, value: Any, strategy: Strategy) -> None:
    """Raise what torch's step raises where a state tensor is something else (None, a number,
    a list): its foreach and fused paths fail to group it (TypeError), its per-tensor path to
    call the value's in-place methods (AttributeError)."""
    kind = type(value).__name__
    if strategy is Strategy.FOREACH:
        raise TypeError(
            f"_group_tensors_by_device_and_dtype(): incompatible function arguments: the "
            f"state's {key!r} is a {kind}, not a tensor"
        )
    raise AttributeError(f"the state's {key!r} is a {kind}, not a tensor")


#: Dtypes torch's foreach and fused steps take for any tensor beside a parameter on its device
#: (besides the parameter's own): float32/64 step counters, and bfloat16 state.
_ANY_PARAMETER = frozenset({torch.float32, torch.float64, torch.bfloat16})
#: Dtypes they take for a tensor on the CPU beside a parameter elsewhere: step counters.
_ON_THE_CPU = frozenset({torch.float32, torch.float64})


def _check_same_index(params: list[Tensor], lists: list[list[Any]]) -> None:
    """Raise torch's RuntimeError where torch's foreach and fused steps refuse to group a
    parameter's gradient or state (``_group_tensors_by_device_and_dtype``): a tensor of
    another device or dtype than its parameter's, but for those the rule lets through."""
    for i, p in enumerate(params):
        for values in lists:
            t = values[i]
            if not isinstance(t, Tensor) or (t.dtype is p.dtype and t.device == p.device):
                continue
            if t.device == p.device:
                if t.dtype in _ANY_PARAMETER:
                    continue
            elif t.device.type == "cpu" and t.dtype in _ON_THE_CPU:
                continue
            raise RuntimeError(_checks.SAME_INDEX)


def rehearse(
    opt: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    state: StateLists,
    hp: Hyper,
    entries: list[dict[str, Any]],
    hp_layout: list[Any],
) -> Strategy:
    """Raise, before the step writes anything, any error the step would raise; return the
    strategy that runs the step (:func:`polyak.strategies.choose`'s, which the layout
    decides).

    The update runs first on stand-ins (see :func:`_stand_in`: small real tensors of the
    same dtypes, and copies of per-parameter counters) of one parameter of each kind (see
    :func:`_one_of_each_kind`), once for each new layout of the group: a state
    tensor replaced or removed by hand, a flag changed. Where it fails, it runs once more
    on copies of the real tensors so that the error is the one the step itself raises,
    with its wording. Differentiable steps and sparse gradients are not rehearsed; their
    state entries are checked at every step.
    """
    rehearsed = not group.get("differentiable") and not any(map(_SPARSE, grads))
    kept = _memo.memo(opt, group)
    if rehearsed:
        # Gradients are in: autograd keeps them of their parameter's shape, dtype and
        # device, but ``.grad.data`` may be given anything.
        tensors = [*params, *grads, *chain.from_iterable(state.values())]
        layout = (hp_layout, _tensors_layout(tensors))
        done = kept.rehearsed
        if done is not None and done[0] == layout:
            return cast(Strategy, done[1])
    strategy = choose(group, params, grads, opt.foreach_by_default)
    # A parameter's state is all or nothing, as torch.optim reads it: what init_state
    # makes must be there (torch raises KeyError from its dict). What it makes for each
    # kind of parameter is kept while the hyperparameters' layout is the same object (see
    # :meth:`_hyper`): steps that are not rehearsed check at every step.
    last = kept.needed
    # By kind of parameter: each state key, and whether its value is a tensor.
    needed: dict[tuple[Any, ...], list[tuple[str, bool]]] = (
        last[1] if last is not None and last[0] is hp_layout else {}
    )
    kept.needed = (hp_layout, needed)
    for p, entry in zip(params, entries, strict=True):
        kind = (p.shape, p.dtype, p.device)
        if kind not in needed:
            try:
                with _unseen([p]):
                    made = opt.init_state(_key_template(p), hp)
                needed[kind] = [(key, isinstance(value, Tensor)) for key, value in made.items()]
            except MissingHyperparameter:
                # A key only a first step reads (Rprop's lr): a parameter with state steps
                # without it, as in torch.
                if not entry:
                    raise
                continue
        for key, tensor in needed[kind]:
            if key not in entry:
                raise KeyError(key)
            if tensor and key != "step" and not isinstance(entry[key], Tensor):
                # (A step count that is not a tensor fails as torch's, in the rule's own check.)
                _refuse_not_a_tensor(key, entry[key], strategy)
    if strategy is Strategy.FOREACH and rehearsed:
        _check_same_index(params, [grads, *state.values()])
    if not rehearsed:
        return strategy
    update = type(opt).update
    try:
        with torch.no_grad(), _unseen(tensors):
            kinds = _one_of_each_kind(params, grads, state)
            _run(strategy.run, update, *_stand_ins(kinds, _stand_in), hp)
    except Exception:
        with torch.no_grad(), _unseen(tensors):
            _run(strategy.run, update, *_stand_ins((params, grads, state), _copy), hp)
        raise
    kept.rehearsed = (layout, strategy)
    return strategy
