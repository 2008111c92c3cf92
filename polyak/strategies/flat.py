"""The ``flat`` strategy: a whole parameter group in one pass over memory, in compiled code.

The group's update rule is traced into a program (see ``_trace.py``) that the kernel runs over
every element of every tensor, reading the parameter, its gradient and its state once and
writing the parameter and state once. The kernel keeps the group's tensors between steps, so a
step costs one call from Python whatever the number of tensors.

A step runs here when the group's parameters are dense CPU tensors of one floating dtype, each
with its gradient and state laid out in memory as it is (contiguous, or dense in another order
such as channels-last), its hyperparameters are numbers and flags, and every parameter with a
gradient already has its state; anything else (a parameter's first step, a sparse gradient or
one laid out unlike its parameter, a tensor hyperparameter, a changed dtype) runs the reference
path for that step.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from polyak import _ops
from polyak._state import OptimizerState
from polyak.strategies import _codegen, _dispatch, _native, _trace

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_NOT_HYPER = ("params", "param_names")
# The kernel's answers to a step.
_DONE, _STALE, _RELOAD = 0, 2, 3

#: Traced programs, by (update rule, state layout, hyperparameter structure).
_programs: dict[tuple[Any, ...], list[_trace.Program] | None] = {}


@dataclass
class _Entry:
    """What the strategy knows of one group: the kernel's plan for it, or why it has none."""

    plan: Any
    vector_keys: list[str] = field(default_factory=list)
    scalar_keys: list[str] = field(default_factory=list)
    #: The program loaded into the plan, with the hyperparameters' structure it was made for.
    loaded: tuple[tuple[Any, ...], _trace.Program] | None = field(default=None, repr=False)
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
    #: Without a plan, or after a step the plan could not run: why, in words.
    reason: str = ""
    #: The compiled form of the loaded program (its ``ready`` says whether steps run it).
    kernel_slot: Any = field(default=None, repr=False)
    #: For a group of several dtypes: each dtype's parameters, in the group's order, with the
    #: cache of the entry that runs them (under key 0).
    buckets: list[tuple[list[Tensor], dict[int, _Entry]]] | None = field(default=None, repr=False)

    def unchanged(self, group: dict[str, Any], optimizer: Any) -> bool:
        """Whether an entry without a plan still describes ``group``."""
        # Compared one by one (at C speed): a parameter replaced in the group's list, as model
        # surgery does, must be seen.
        return (
            self.kernel is _native._module
            and self.state is optimizer.state
            and self.version == optimizer._state_version != -1  # -1: changes not counted
            and len(self.params) == len(group["params"])
            and all(map(operator.is_, self.params, group["params"]))
        )


def _local_data(t: Any) -> Tensor | None:
    """The plain tensor a distributed tensor (DTensor) holds on this rank, which elementwise
    operations between tensors of one placement act on; None for anything else."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    if dtensor is None or not isinstance(t, dtensor):
        return None
    local = t._local_tensor
    return local if type(local) in (Tensor, torch.nn.Parameter) else None


def _local_grads(params: list[Tensor]) -> list[Tensor | None] | None:
    """This step's gradients of distributed parameters as the local data the plan updates, or
    None where one is placed unlike its parameter (the reference path redistributes it)."""
    grads: list[Tensor | None] = []
    for p in params:
        g = p.grad
        if g is None:
            grads.append(None)
            continue
        local = _local_data(g)
        if local is None or g._spec != p._spec:  # type: ignore[attr-defined]
            return None
        grads.append(local)
    return grads


def eligible(group: dict[str, Any]) -> bool:
    """Whether a group's flags let it run flat: by default, or with ``fused=True``."""
    if group.get("differentiable") or group.get("capturable"):
        return False
    if group.get("fused"):
        return True
    return group.get("foreach") is None and group.get("fused") is None


def ineligible_reason(group: dict[str, Any]) -> str:
    """Why :func:`eligible` says no to ``group``, in words."""
    if group.get("differentiable"):
        return "differentiable=True: autograd runs through the step, tensor by tensor"
    if group.get("capturable"):
        return "capturable=True: torch's capturable path, tensor by tensor"
    if group.get("foreach"):
        return "foreach=True asks for torch's foreach path (leave it unset for the flat kernel)"
    return "foreach=False asks for the for-loop path (leave it unset for the flat kernel)"


def _bucket_name(p: Tensor) -> str:
    """A bucket's name in reasons: its dtype, and its device where that is not the CPU."""
    dtype = str(p.dtype).replace("torch.", "")
    return dtype if p.is_cpu else f"{p.device.type} {dtype}"


def _bucketed(optimizer: Any, params: list[Tensor], allowed: Any, unfit: Any) -> _Entry:
    """The entry of a group whose parameters have several dtypes or devices: one bucket per
    (device, dtype), as torch's foreach and fused paths bucket, each run by a plan of its own
    (made at its first step). The CPU's buckets come first; the others decline the kernel and
    are stepped by torch's operations after them."""
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in sorted(params, key=lambda p: not p.is_cpu):  # stable: the group's order within
        buckets.setdefault((p.device, p.dtype), []).append(p)
    on_cpu = [b for b in buckets.values() if b[0].is_cpu]
    names = " and ".join(_bucket_name(b[0]) for b in buckets.values())
    refused = [_bucket_name(b[0]) for b in on_cpu if b[0].dtype not in allowed]
    if refused:
        return cast(
            _Entry,
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
        return cast(_Entry, unfit(f"the group mixes {names} parameters of a tensor subclass"))
    if sum(len(s) for s in storages) != len(set().union(*storages)):
        return cast(_Entry, unfit(f"the group's {names} parameters share memory"))
    return _Entry(
        None,
        params=tuple(params),
        state=optimizer.state,
        version=optimizer._state_version,
        kernel=_native._module,
        buckets=[(bucket, {}) for bucket in buckets.values()],
    )


def _device_reason(params: list[Tensor]) -> str | None:
    devices = sorted({p.device.type for p in params if not p.is_cpu})
    if not devices:
        return None
    return (
        f"parameters on {', '.join(devices)}: the flat kernel runs on the CPU only and polyak "
        "has no GPU kernel yet, so steps run torch's operations (on GPUs its foreach path, "
        "fused=True included)"
    )


def _build(optimizer: Any, group: dict[str, Any]) -> _Entry:
    params: list[Tensor] = group["params"]

    def unfit(reason: str) -> _Entry:
        return _Entry(
            None,
            params=tuple(params),
            state=optimizer.state,
            version=optimizer._state_version,
            kernel=_native.loaded(),
            reason=reason,
        )

    if not params:
        return unfit("the group has no parameters")
    # Nothing of the CPU kernel starts for parameters elsewhere.
    elsewhere = _device_reason(params)
    if elsewhere is not None and not any(p.is_cpu for p in params):
        return unfit(elsewhere)
    vm = _native.load()
    if vm is None:
        return unfit(f"the flat kernel is {_native.status()}")
    if len({id(p) for p in params}) != len(params):
        # A parameter listed twice is updated twice in turn on the reference path; the kernel
        # would update both copies at once.
        return unfit("a parameter is listed twice in the group, and is stepped twice in turn")
    dtype = params[0].dtype
    allowed = _FLOATS + _HALVES if group.get("fused") else _FLOATS
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
        found_local = [_local_data(p) for p in params]
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
    for key in type(optimizer).state_keys:
        found = [s[key] for p in params if (s := optimizer.state.get(p)) and key in s]
        if not found:
            continue
        if not all(isinstance(t, Tensor) for t in found):
            return unfit(f"the state {key!r} holds something other than a tensor")
        (scalar_keys if found[0].dim() == 0 else vector_keys).append(key)
    empty = torch.empty(0, dtype=dtype)

    def stored(p: Tensor, key: str) -> Tensor:
        s = optimizer.state.get(p)
        value = s.get(key) if s else None
        return value if isinstance(value, Tensor) else empty

    def held(p: Tensor, key: str) -> Tensor:
        value = stored(p, key)
        if value is empty or local is None or (value.dim() == 0 and type(value) is Tensor):
            return value
        data = _local_data(value)
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
    plan = vm.Plan(
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
    )
    return _Entry(plan, vector_keys, scalar_keys, local=local, rounding=rounding)


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


def _program(
    optimizer: Any,
    entry: _Entry,
    hyper: dict[str, Any],
    numbers: list[float],
    structure: tuple[Any, ...],
) -> _trace.Program | None:
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
        program = _trace.fused_form(program)
    traced.append(program)
    return program


#: Why a step ran the reference path where the flat kernel could run the next ones.
FIRST_STEP = "a parameter had no state yet: its first step makes it on the reference path"
_UNTRACEABLE = "the update rule with these hyperparameters could not be traced into a program"


def _load(optimizer: Any, entry: _Entry, group: dict[str, Any]) -> bool:
    """Load the group's hyperparameters into its plan, and the program for them where the one
    loaded does not serve them; False if no program can run them."""
    hyper = {k: v for k, v in group.items() if k not in _NOT_HYPER}
    if group.get("fused"):
        hyper = {k: _as_number(v) for k, v in hyper.items()}
    parts = _trace.split(hyper)
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
        program = _program(optimizer, entry, hyper, numbers, structure)
        if program is None:
            return False
        vm = _native.load()
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
        entry.kernel_slot = _codegen.kernel(
            vm,
            program,
            2 + len(entry.vector_keys),
            group["params"][0].dtype,
            exact_sqrt=exact_sqrt,
            rounding=entry.rounding,
        )
        entry.plan.load_program(
            program.vcode,
            program.scode,
            program.n_sregs,
            program.n_vregs,
            program.stored,
            program.checks,
            entry.kernel_slot,
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


def step(
    optimizer: Any, group: dict[str, Any], grad_scale: Tensor | None = None
) -> bool | list[Tensor]:
    """Run one step of ``group`` flat: True where it ran; False where this step must take
    another strategy; for a group whose parameters the kernel runs in buckets of one dtype,
    the parameters of the buckets it could not run, which the caller steps another way.

    A ``fused=True`` group given ``grad_scale`` (a GradScaler's scale, one number on the CPU)
    divides each gradient by it in the same pass, leaving the unscaled gradient in ``.grad``
    as torch's fused kernels do.
    """
    cache: dict[int, _Entry] | None = optimizer.__dict__.get("_flat_entries")
    if cache is None:
        cache = optimizer.__dict__["_flat_entries"] = {}
    key = id(group)
    if grad_scale is not None and group.get("fused"):
        if grad_scale.device.type != "cpu" or grad_scale.numel() != 1:
            cache[key] = _declined("the GradScaler's scale is not one number on the CPU")
            return False
        # The scale travels as one more hyperparameter: the kernel sees a group that holds it.
        group = {**group, GRAD_SCALE: float(grad_scale)}
    return _run(optimizer, group, cache, key)


def _run(
    optimizer: Any, group: dict[str, Any], cache: dict[int, _Entry], key: int
) -> bool | list[Tensor]:
    """One step of ``group`` by the entry ``cache[key]``, made or made anew where needed."""
    entry = cache.get(key)
    # The kernel checks that its plan still fits the group, so the usual step is one call.
    for _ in range(3):
        if entry is None:
            entry = cache[key] = _build(optimizer, group)
        if entry.buckets is not None:
            return _run_buckets(optimizer, group, entry, cache, key)
        if entry.plan is None:
            if entry.unchanged(group, optimizer):
                return False
            entry = None
            continue
        if entry.local is None:
            done = entry.plan.step(group, optimizer.state, optimizer._state_version)
        else:
            params = group["params"]
            if len(params) != len(entry.local) or any(
                _local_data(p) is not t for p, t in zip(params, entry.local, strict=False)
            ):
                entry = None
                continue
            grads = _local_grads(params)
            if grads is None:
                cache[key] = _declined("a gradient is placed unlike its distributed parameter")
                return False
            done = entry.plan.step(group, optimizer.state, optimizer._state_version, grads)
        if done == _DONE:
            return True
        if done == _STALE:
            entry = None
        elif done != _RELOAD or not _load(optimizer, entry, group):
            break
    # This step cannot run flat; look at the group afresh next time.
    reason = entry.reason if entry is not None and entry.reason else _REFUSED
    cache[key] = _declined(reason)
    return False


def _run_buckets(
    optimizer: Any, group: dict[str, Any], entry: _Entry, cache: dict[int, _Entry], key: int
) -> bool | list[Tensor]:
    """A step of a group of several dtypes: each dtype's parameters in a plan of their own,
    in the order the group first lists them. Where one bucket cannot run, it and the ones
    after it are returned for the caller to step."""
    assert entry.buckets is not None
    params = group["params"]
    if (
        entry.kernel is not _native._module
        or len(params) != len(entry.params)
        or not all(map(operator.is_, params, entry.params))
    ):
        del cache[key]  # the group changed: made anew next step
        return False
    for i, (bucket, sub_cache) in enumerate(entry.buckets):
        ran = _run(optimizer, {**group, "params": bucket}, sub_cache, 0)
        if ran is not True:
            sub = sub_cache.get(0)
            reason = sub.reason if sub else _REFUSED
            entry.reason = f"its {_bucket_name(bucket[0])} parameters: {reason}"
            return False if i == 0 else [p for b, _ in entry.buckets[i:] for p in b]
    entry.reason = ""
    return True


_REFUSED = (
    "the kernel's check refused the step: a gradient missing its layout, dtype or device, "
    "a sparse gradient, or state replaced by hand"
)


def _declined(reason: str) -> _Entry:
    """What the cache keeps for a group whose step could not run flat: its reason, and nothing
    that describes the group (the next step looks at it afresh)."""
    return _Entry(None, reason=reason, version=-2)


def last_path(optimizer: Any, group: dict[str, Any]) -> tuple[bool, bool, str]:
    """For ``group``'s last step: whether it ran flat, whether compiled, and if not flat why."""
    cache: dict[int, _Entry] = optimizer.__dict__.get("_flat_entries") or {}
    entry = cache.get(id(group))
    if entry is None:
        return False, False, ""
    if entry.buckets is not None:
        if entry.reason:
            return False, False, entry.reason
        subs = [sub.get(0) for _, sub in entry.buckets]
        if any(s is None or s.plan is None for s in subs):
            return False, False, ""
        slots = [s.kernel_slot for s in subs if s is not None]
        ready = all(slot is not None and slot.ready for slot in slots)
        return True, ready, ""
    if entry.plan is None:
        return False, False, entry.reason
    slot = entry.kernel_slot
    return True, bool(slot is not None and slot.ready), ""


def awaits_state(optimizer: Any, group: dict[str, Any]) -> bool:
    """Whether ``group``'s last step could not run flat only because parameters had no state
    yet (see :data:`FIRST_STEP`)."""
    cache: dict[int, _Entry] = optimizer.__dict__.get("_flat_entries") or {}
    entry = cache.get(id(group))
    return entry is not None and entry.reason == FIRST_STEP


def forget(optimizer: Any) -> None:
    """Drop the kernel's plans for ``optimizer``'s groups, whose state was replaced (by
    ``load_state_dict``): they would be made anew at the next step, and until then would keep
    the replaced state alive beside the new one."""
    optimizer.__dict__.pop("_flat_entries", None)


def build_ahead(tick: Any = None) -> tuple[bool, list[str]]:
    """Build the kernel, and compile the default program of every elementwise optimizer class
    polyak has loaded for float32 and float64, waiting for all of it.

    Args:
        tick: while the kernel builds, called about once a second with the seconds so far.

    Returns:
        Whether the kernel is available, and lines saying what was built and where.
    """
    vm = _native.load(wait=True, tick=tick)
    if vm is None:
        return False, [f"the flat kernel is unavailable: {_native._failed or 'turned off'}"]
    lines = [f"flat kernel: {vm.__file__}"]
    lines.append(f"programs built for {_codegen.vector_target()}")
    lines.append(f"numbers {_dispatch.describe()}")
    mode = _codegen.sqrt_mode(vm)
    lines.append(f"sqrt in compiled programs: {_codegen.SQRT_NAMES[mode]}")
    for cls in _optimizer_classes():
        if not getattr(cls, "elementwise", False):
            continue  # no program to compile (Adafactor, LBFGS, Muon)
        for dtype in _FLOATS:
            param = torch.zeros(4, dtype=dtype, requires_grad=True)
            try:
                optimizer = cast(Any, cls)([param])
                for _ in range(2):
                    param.grad = torch.ones_like(param)
                    optimizer.step()
            except Exception:
                continue  # an optimizer that takes no dense gradients (SparseAdam)
    _codegen.wait()
    lines.append(f"programs: {_codegen.cache_dir()}")
    return True, lines


def _optimizer_classes() -> list[Any]:
    """Every concrete optimizer class polyak has loaded: subclasses of the base that the
    optimizers' module registered (found through ``torch.optim.Optimizer``'s subclass tree,
    without importing the package from here)."""
    found: list[Any] = []
    pending: list[Any] = list(torch.optim.Optimizer.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("polyak.algorithms.") and cls not in found:
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)
