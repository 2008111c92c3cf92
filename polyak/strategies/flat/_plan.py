"""A group's plan in the kernel: made from the group, and loaded with the program for its
hyperparameters.

The kernel's ``Plan`` holds a group's tensors between steps and checks, at every step, that they
still fit it. Here it is made (:func:`make`): or, where the group cannot run flat, an entry
that says why; a group of several dtypes or devices gets one plan per (device, dtype) bucket.
Parameters that are distributed tensors (DTensor) are run through the local data each holds.
:func:`load` gives a plan the program traced for the group's update rule and hyperparameters,
with its compiled form where it is built, and the numbers of the hyperparameters.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from polyak import _ops, _precision, _quant
from polyak._state import OptimizerState
from polyak.strategies.flat import _compiled, _dispatch, _kernel, _program, _trace

FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
#: Group keys that are not the update's hyperparameters (how state is stored is read off the
#: state tensors themselves).
_NOT_HYPER = ("params", "param_names", "state_dtype")

#: Traced programs, by (update rule, state layout, hyperparameter structure).
_programs: dict[tuple[Any, ...], list[_program.Program] | None] = {}


@dataclass
class Entry:
    """What the strategy knows of one group: the kernel's plan for it, or why it has none."""

    plan: Any
    vector_keys: list[str] = field(default_factory=list)
    scalar_keys: list[str] = field(default_factory=list)
    #: The program loaded into the plan, with the hyperparameters' structure it was made for.
    loaded: tuple[tuple[Any, ...], _program.Program] | None = field(default=None, repr=False)
    #: Without a plan: what the group held when it was found unfit, to see when it changes.
    params: tuple[Tensor, ...] = field(default=(), repr=False)
    state: Any = field(default=None, repr=False)
    version: int = -1
    #: The kernel module when the entry was made: one built meanwhile makes it stale.
    kernel: Any = field(default=None, repr=False)
    #: For parameters that are distributed tensors: the local data the plan updates.
    local: list[Tensor] | None = field(default=None, repr=False)
    #: How torch's kernels round the group's dtype, which the plan and its programs follow.
    rounding: _dispatch.Rounding | None = field(default=None, repr=False)
    #: The dtype each of ``vector_keys`` is stored in (see :func:`storage_dtypes`; uint8 for
    #: 8-bit codes), and for each key stored in 8 bits, whether its map is signed.
    state_dtypes: tuple[torch.dtype, ...] = ()
    signed: tuple[bool, ...] = ()
    #: Without a plan, or after a step the plan could not run: why, in words.
    reason: str = ""
    #: The slot of the loaded program's compiled form (its ``ready`` says whether steps run it).
    compiled: Any = field(default=None, repr=False)
    #: For a group of several dtypes: each dtype's parameters, in the group's order, with the
    #: cache of the entry that runs them (under key 0).
    buckets: list[tuple[list[Tensor], dict[int, Entry]]] | None = field(default=None, repr=False)

    def unchanged(self, group: dict[str, Any], optimizer: Any) -> bool:
        """Whether an entry without a plan still describes ``group``."""
        # Compared one by one (at C speed): a parameter replaced in the group's list, as model
        # surgery does, must be seen.
        return (
            self.kernel is _kernel.loaded()
            and self.state is optimizer.state
            and self.version == optimizer._state_version != -1  # -1: changes not counted
            and len(self.params) == len(group["params"])
            and all(map(operator.is_, self.params, group["params"]))
        )


def local_data(t: Any) -> Tensor | None:
    """The plain tensor a distributed tensor (DTensor) holds on this rank, which elementwise
    operations between tensors of one placement act on; None for anything else."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    if dtensor is None or not isinstance(t, dtensor):
        return None
    local = t._local_tensor
    return local if type(local) in (Tensor, torch.nn.Parameter) else None


def local_grads(params: list[Tensor]) -> list[Tensor | None] | None:
    """This step's gradients of distributed parameters as the local data the plan updates, or
    None where one is placed unlike its parameter (the reference path redistributes it)."""
    grads: list[Tensor | None] = []
    for p in params:
        g = p.grad
        if g is None:
            grads.append(None)
            continue
        local = local_data(g)
        if local is None or g._spec != p._spec:  # type: ignore[attr-defined]
            return None
        grads.append(local)
    return grads


def bucket_name(p: Tensor) -> str:
    """A bucket's name in reasons: its dtype, and its device where that is not the CPU."""
    dtype = str(p.dtype).replace("torch.", "")
    return dtype if p.is_cpu else f"{p.device.type} {dtype}"


def _bucketed(
    optimizer: Any,
    params: list[Tensor],
    allowed: Any,
    unfit: Any,
    kinds: list[Any] | None = None,
) -> Entry:
    """The entry of a group whose parameters have several dtypes or devices: one bucket per
    (device, dtype), as torch's foreach and fused paths bucket, each run by a plan of its own
    (made at its first step). The CPU's buckets come first; the others decline the kernel and
    are stepped by torch's operations after them. ``kinds``: a further key per parameter (which
    of its state keys are stored in 8 bits), whose values are bucketed apart too."""
    kind_of = dict(zip(map(id, params), kinds or [None] * len(params), strict=True))
    buckets: dict[tuple[torch.device, torch.dtype, Any], list[Tensor]] = {}
    for p in sorted(params, key=lambda p: not p.is_cpu):  # stable: the group's order within
        buckets.setdefault((p.device, p.dtype, kind_of[id(p)]), []).append(p)
    on_cpu = [b for b in buckets.values() if b[0].is_cpu]
    names = " and ".join(bucket_name(b[0]) for b in buckets.values())
    refused = [bucket_name(b[0]) for b in on_cpu if b[0].dtype not in allowed]
    if refused:
        return cast(
            Entry,
            unfit(
                f"the group mixes {names} parameters, and the kernel takes no "
                f"{' or '.join(refused)} ones here (fused=True takes float16 and bfloat16)"
            ),
        )
    # Parameters of two dtypes on one memory (views of another dtype) would be updated by two
    # plans, which check overlaps within themselves only.
    try:
        storages = [{p.untyped_storage().data_ptr() for p in b} for b in on_cpu]
    except (RuntimeError, NotImplementedError):  # a subclass that shows no storage
        return cast(Entry, unfit(f"the group mixes {names} parameters of a tensor subclass"))
    if sum(len(s) for s in storages) != len(set().union(*storages)):
        return cast(Entry, unfit(f"the group's {names} parameters share memory"))
    return _as_found(optimizer, params, buckets=[(bucket, {}) for bucket in buckets.values()])


def _as_found(optimizer: Any, params: list[Tensor], **rest: Any) -> Entry:
    """An entry without a plan of its own that keeps what the group held when it was made, to
    see when that changes: with why it has no plan (``reason``), or its buckets'."""
    return Entry(
        None,
        params=tuple(params),
        state=optimizer.state,
        version=optimizer._state_version,
        kernel=_kernel.loaded(),
        **rest,
    )


def _device_reason(params: list[Tensor]) -> str | None:
    devices = sorted({p.device.type for p in params if not p.is_cpu})
    if not devices:
        return None
    return (
        f"parameters on {', '.join(devices)}: the flat kernel runs on the CPU, and on CUDA "
        "devices as a Triton kernel where triton is installed; here polyak has no GPU kernel, "
        "so steps run torch's operations (on GPUs its foreach path, fused=True included)"
    )


def make(optimizer: Any, group: dict[str, Any]) -> Entry:
    """The entry of ``group``: a plan in the kernel for it, or why it has none."""
    params: list[Tensor] = group["params"]

    def unfit(reason: str) -> Entry:
        return _as_found(optimizer, params, reason=reason)

    if not params:
        return unfit("the group has no parameters")
    if group.get("kahan_sum") or group.get("bf16_stochastic_round"):
        return unfit(
            "kahan_sum or bf16_stochastic_round: the parameters are rounded on the reference path"
        )
    # Nothing of the CPU kernel starts for parameters elsewhere.
    elsewhere = _device_reason(params)
    if elsewhere is not None and not any(p.is_cpu for p in params):
        return unfit(elsewhere)
    kernel = _kernel.load()
    if kernel is None:
        return unfit(f"the flat kernel is {_kernel.status()}")
    if len({id(p) for p in params}) != len(params):
        # A parameter listed twice is updated twice in turn on the reference path; the kernel
        # would update both copies at once.
        return unfit("a parameter is listed twice in the group, and is stepped twice in turn")
    dtype = params[0].dtype
    allowed = FLOATS + _HALVES if group.get("fused") else FLOATS
    if elsewhere is not None or any(p.dtype != dtype for p in params):
        return _bucketed(optimizer, params, allowed, unfit)
    if dtype not in allowed:
        name = str(dtype).replace("torch.", "")
        if dtype in _HALVES:
            return unfit(
                f"{name} parameters: the default step keeps torch's per-tensor numbers, which "
                f"round each operation to {name}, and runs tensor by tensor; fused=True runs "
                "them flat, computing in float32 as torch's fused kernels do"
            )
        return unfit(
            f"{name} parameters: the flat kernel takes float32 and float64 (float16 and "
            "bfloat16 too with fused=True)"
        )
    rounding = _dispatch.rounding(dtype)
    if isinstance(rounding, str):
        return unfit(rounding)
    # Plain tensors are updated in place; distributed ones (every parameter of the group) through
    # the local data each holds, with state of the same placement.
    local: list[Tensor] | None = None
    if any(type(p) not in (Tensor, torch.nn.Parameter) for p in params):
        found_local = [local_data(p) for p in params]
        if any(t is None for t in found_local):
            kinds = sorted({type(p).__name__ for p in params} - {"Tensor", "Parameter"})
            return unfit(f"parameters of type {', '.join(kinds)}, which the kernel cannot see into")
        local = cast(list[Tensor], found_local)
    state = optimizer.state
    if not isinstance(state, dict):
        return unfit("optimizer.state is not a dict")
    # State whose changes are not counted (a mapping assigned as optimizer.state, a plain dict
    # as a parameter's state) is watched: the kernel compares, at every step, each watched
    # parameter's entry and its values (by identity) with what the plan was made from.
    counted = type(state) is OptimizerState
    watch = []
    for i, p in enumerate(params):
        entry = state.get(p)
        if not counted or type(entry) is dict:
            items = list(entry.items()) if isinstance(entry, dict) else []
            watch.append((i, entry, items))
    vector_keys: list[str] = []
    scalar_keys: list[str] = []
    found_dtypes: list[set[torch.dtype]] = []
    for key in type(optimizer).state_keys:
        found = [s[key] for p in params if (s := optimizer.state.get(p)) and key in s]
        if not found:
            continue
        if not all(isinstance(t, Tensor) for t in found):
            return unfit(f"the state {key!r} holds something other than a tensor")
        if found[0].dim() == 0:
            scalar_keys.append(key)
        else:
            vector_keys.append(key)
            found_dtypes.append({t.dtype for t in found})
    # State stored in 8 bits (codes and their absmax, see polyak/_quant.py): a plan takes
    # parameters whose same keys are so stored; smaller tensors, which keep their state in its
    # dtype, run in a plan of their own.
    eight = _eight_bit_keys(optimizer, params, vector_keys)
    if len(set(eight)) > 1:
        return _bucketed(optimizer, params, allowed, unfit, eight)
    quantized = eight[0]
    if _FOUR_BIT in quantized:
        return unfit(
            "4-bit state (torchao's format, two codes a byte): the kernel takes 8-bit state, "
            "and the reference path steps this"
        )
    if quantized:
        if dtype != torch.float32 or local is not None:
            return unfit(
                "8-bit state beside "
                + ("distributed parameters" if local is not None else f"{_name(dtype)} parameters")
                + ": the kernel takes it beside float32 parameters"
            )
        found_dtypes = [
            {torch.float32} if k in quantized else d
            for k, d in zip(vector_keys, found_dtypes, strict=True)
        ]
    state_dtypes = storage_dtypes(dtype, vector_keys, found_dtypes)
    if isinstance(state_dtypes, str):
        return unfit(state_dtypes)
    state_dtypes = tuple(
        torch.uint8 if k in quantized else d for k, d in zip(vector_keys, state_dtypes, strict=True)
    )
    empty = torch.empty(0, dtype=dtype)

    def stored(p: Tensor, key: str) -> Tensor:
        s = optimizer.state.get(p)
        value = s.get(key) if s else None
        return value if isinstance(value, Tensor) else empty

    def held(p: Tensor, key: str) -> Tensor:
        value = stored(p, key)
        if value is empty or local is None or (value.dim() == 0 and type(value) is Tensor):
            return value
        data = local_data(value)
        # State placed unlike its parameter is left to the reference path.
        return data if data is not None and value._spec == p._spec else value  # type: ignore[attr-defined]

    def column(key: str) -> list[Tensor]:
        return [held(p, key) for p in params]

    # The tensors whose version counters a step advances: for local data, the distributed
    # tensors autograd sees (the slot of the gradients is not read).
    versioned: list[list[Tensor]] | None = None
    if local is not None:
        versioned = [list(params), []]
        for key in vector_keys + scalar_keys:
            versioned.append([stored(p, key) for p in params])
    plan = kernel.Plan(
        list(params),
        [column(k) for k in vector_keys],
        [column(k) for k in scalar_keys],
        optimizer.state,
        optimizer._state_version,
        watch,
        rounding.width * dtype.itemsize,
        local,
        versioned,
        fma=rounding.fma,
        max_keep=rounding.max_nan == _dispatch.MAX_NAN_KEEP,
        vdtype=list(state_dtypes),
        qsigned=[
            int(k not in optimizer.unsigned_state) if k in quantized else -1 for k in vector_keys
        ]
        if quantized
        else None,
        absmax=[_absmax_column(optimizer, params, k) if k in quantized else [] for k in vector_keys]
        if quantized
        else None,
    )
    return Entry(
        plan,
        vector_keys,
        scalar_keys,
        local=local,
        rounding=rounding,
        state_dtypes=state_dtypes,
        signed=tuple(k not in optimizer.unsigned_state for k in vector_keys if k in quantized),
    )


def _eight_bit_keys(optimizer: Any, params: list[Tensor], keys: list[str]) -> list[frozenset[str]]:
    """For each parameter, which of ``keys`` its state holds in 8 bits (with :data:`_FOUR_BIT`
    where it holds one in 4); a parameter without state (whose step cannot run flat anyway)
    counts as the first one with state."""
    found: list[frozenset[str] | None] = []
    for p in params:
        entry = optimizer.state.get(p)
        if not entry or any(k not in entry for k in keys):
            found.append(None)
            continue
        coded = [k for k in keys if _precision.quantized(entry, k, optimizer)]
        formats = {k: _precision.code_format(entry[k], p) for k in coded}
        found.append(
            frozenset(_FOUR_BIT if f == _quant.FOUR_BIT else k for k, f in formats.items())
        )
    first = next((f for f in found if f is not None), frozenset())
    if first - {_FOUR_BIT}:
        _load_maps()
    return [first if f is None else f for f in found]


def _absmax_column(optimizer: Any, params: list[Tensor], key: str) -> list[Tensor]:
    """Each parameter's absmax of its 8-bit state ``key`` (an empty tensor where it has
    none: the kernel's check refuses a step that would read it)."""
    name = _precision.absmax_key(optimizer, key)
    empty = torch.empty(0)
    column = []
    for p in params:
        entry = optimizer.state.get(p)
        value = entry.get(name) if entry else None
        column.append(value if isinstance(value, Tensor) else empty)
    return column


#: In :func:`_eight_bit_keys`' answer: a key is stored in 4 bits, which the kernel does not take.
_FOUR_BIT = "4-bit"

#: The kernel modules that hold bitsandbytes' maps (see kernel/quant.h).
_maps_in: set[int] = set()


def _load_maps() -> None:
    """Hand the kernel the 8-bit maps and their tables, as _quant.py quantizes with them."""
    kernel = _kernel.load()
    if kernel is None or id(kernel) in _maps_in:
        return
    for signed in (False, True):
        below, padded, inside = _quant._lookup(signed)
        kernel.set_maps(int(signed), _quant.dynamic_map(signed), padded, below, inside)
    _maps_in.add(id(kernel))


#: What parameter-shaped state may be stored in beside parameters of these dtypes, computed in
#: float32 (see kernel/plan.h's ``vdtype``).
NARROW_STATE = (torch.float32, torch.bfloat16, torch.float16)


def storage_dtypes(
    dtype: torch.dtype, keys: list[str], found: list[set[torch.dtype]]
) -> tuple[torch.dtype, ...] | str:
    """The dtype each state key of ``keys`` is stored in (``found``: the dtypes of its
    tensors), or why the kernel cannot run it beside ``dtype`` parameters. State narrower or
    wider than float32 parameters is widened to float32 as it is read and rounded to its own
    dtype as it is written: ``s = state.float(); <the float32 update, on s>; state.copy_(s)``."""
    dtypes = []
    for key, kinds in zip(keys, found, strict=True):
        if len(kinds) != 1:
            names = " and ".join(sorted(_name(d) for d in kinds))
            return f"the state {key!r} is stored in {names} in one group"
        (kind,) = kinds
        if kind != dtype and not (kind in NARROW_STATE and dtype in NARROW_STATE):
            return (
                f"the state {key!r} is stored in {_name(kind)} beside {_name(dtype)} "
                "parameters: the kernel takes float32, bfloat16 and float16 state beside "
                "parameters of these dtypes, and float64 state beside float64 ones"
            )
        dtypes.append(kind)
    return tuple(dtypes)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: The hyperparameter a step that unscales its gradients (a ``fused=True`` step under a
#: GradScaler) carries its scale in.
GRAD_SCALE = "_grad_scale"
_unscaling: dict[Any, Any] = {}


def _unscaled(update: Any) -> Any:
    """``update`` preceded by dividing each gradient in place by the scale, as torch's fused
    kernels unscale them (the unscaled gradient is left in ``.grad``)."""
    rule = _unscaling.get(update)
    if rule is None:

        def rule(params: list[Tensor], grads: list[Tensor], state: Any, hp: Any) -> None:
            _ops.div_(grads, getattr(hp, GRAD_SCALE))
            update(params, grads, state, hp)

        rule = _unscaling[update] = rule
    return rule


def _traced(
    optimizer: Any,
    entry: Entry,
    hyper: dict[str, Any],
    numbers: list[float],
    structure: tuple[Any, ...],
) -> _program.Program | None:
    update = type(optimizer).update
    if GRAD_SCALE in hyper:
        update = _unscaled(update)
    # Numbers a rule stores as new state values become tensors of the default dtype first.
    key = (
        update,
        tuple(entry.vector_keys),
        tuple(entry.scalar_keys),
        structure,
        torch.get_default_dtype(),
    )
    traced = _programs.setdefault(key, [])
    if traced is None:
        entry.reason = _UNTRACEABLE
        return None
    for program in traced:
        if program.holds(numbers):
            return program
    try:
        program = _trace.trace(update, hyper, entry.vector_keys, entry.scalar_keys)
    except _trace.MissingState:
        entry.reason = FIRST_STEP
        return None  # the reference path creates the state this step
    except _trace.TraceError as error:
        _programs[key] = None
        entry.reason = f"{_UNTRACEABLE} ({error})"
        return None
    if hyper.get("fused"):
        program = _program.fused_form(program)
    traced.append(program)
    return program


#: Why a step ran the reference path where the kernel could run the next ones.
FIRST_STEP = "a parameter had no state yet: its first step makes it on the reference path"
_UNTRACEABLE = "the update rule with these hyperparameters could not be traced into a program"


def load(optimizer: Any, entry: Entry, group: dict[str, Any]) -> bool:
    """Load the group's hyperparameters into its plan, and the program for them where the one
    loaded does not serve them; False if no program can run them."""
    missing = optimizer.missing_key(group)
    if missing is not None:
        entry.reason = f"the group lacks {missing!r}, which the step reads"
        return False
    hyper = {k: v for k, v in group.items() if k not in _NOT_HYPER}
    if group.get("fused"):
        hyper = {k: _as_number(v) for k, v in hyper.items()}
    parts = _program.split(hyper)
    if parts is None:
        entry.reason = (
            "a hyperparameter is neither a number nor a flag (a tensor lr or betas, say): "
            "torch's per-tensor path reads it"
        )
        return False
    numbers, structure = parts
    # A scheduler changes numbers every step; the program usually still holds for them.
    loaded = entry.loaded
    if loaded is None or loaded[0] != structure or not loaded[1].holds(numbers):
        program = _traced(optimizer, entry, hyper, numbers, structure)
        if program is None:
            return False
        kernel = _kernel.load()
        exact_sqrt = bool(group.get("fused"))
        dtype = group["params"][0].dtype
        assert entry.rounding is not None
        vector_bytes = entry.rounding.width * dtype.itemsize
        if exact_sqrt:
            # torch's fused kernels: a vector body of their own width, and a tail per tensor.
            width = _dispatch.fused_width(dtype)
            if isinstance(width, str):
                entry.reason = width
                return False
            vector_bytes = width * dtype.itemsize
        entry.compiled = _compiled.slot(
            kernel,
            program,
            2 + len(entry.vector_keys),
            group["params"][0].dtype,
            exact_sqrt=exact_sqrt,
            rounding=entry.rounding,
            state_dtypes=entry.state_dtypes,
            signed=entry.signed,
        )
        entry.plan.load_program(
            program.vcode,
            program.scode,
            program.n_sregs,
            program.n_vregs,
            program.stored,
            program.checks,
            entry.compiled,
            exact_sqrt,
            vector_bytes,
            exact_sqrt,
        )
        entry.loaded = (structure, program)
    entry.plan.load_numbers(group, numbers)
    return True


def _as_number(value: Any) -> Any:
    """A one-element floating-point tensor on the CPU as the number it holds, which torch's
    fused CPU kernels take it as (``lr.item()``); tuples of them likewise; anything else as
    it is."""
    if isinstance(value, tuple):
        return tuple(_as_number(v) for v in value)
    if (
        type(value) is Tensor
        and value.device.type == "cpu"
        and value.numel() == 1
        and value.is_floating_point()
        and not value.requires_grad
        and not value.is_sparse
    ):
        return value.item()
    return value
