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
path (``loop`` or ``foreach``, see :mod:`polyak.strategies`) for that step.

This module is the strategy's face: what the optimizer, :func:`polyak.explain`, the command line
and the benchmarks use. Behind it (see ``docs/design.md``, "The package, module by module"):
``_plan.py`` (a group's plan in the kernel), ``_trace.py`` and ``_program.py`` (the tracer, and
the programs it makes), ``_codegen.py`` and ``_compiled.py`` (each program as C++, and its
compiled form), ``_kernel.py`` (building and loading the kernel), ``_toolchain.py`` (compiler,
flags, cache folders, the one build routine), ``_dispatch.py`` (how torch's kernels round),
``kernel/`` (the C++), and ``_triton.py`` and ``_gpu.py`` (each program as one Triton kernel per
group, which steps groups whose parameters lie on CUDA devices, where triton is installed).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor

from polyak import _memo
from polyak.strategies.flat import _codegen, _compiled, _dispatch, _gpu, _kernel, _plan, _toolchain
from polyak.strategies.flat._plan import FIRST_STEP, GRAD_SCALE, Entry

__all__ = [
    "FIRST_STEP",
    "awaits_state",
    "build_ahead",
    "check",
    "compiles",
    "describe_rounding",
    "eligible",
    "entries",
    "ineligible_reason",
    "kernel",
    "last_path",
    "loaded_kernel",
    "needs_build",
    "runs_triton",
    "status",
    "step",
    "vector_target",
    "wait",
]

# The kernel's answers to a step (kernel.cpp's kDone, kFallback, kStale, kReload).
_DONE = 0
#: Something this step cannot do (a gradient missing, sparse or laid out unlike its parameter,
#: state replaced by hand): the step runs another strategy.
_FALLBACK = 1
#: The group's parameters or its state changed: its plan is made anew.
_STALE = 2
#: The hyperparameters changed beyond what the loaded program holds: a program is loaded.
_RELOAD = 3

# How a call into the kernel steps (kernel.cpp's ``step``'s ``mode``): it checks the group and
# steps it; it only checks it; or it steps on the records of a check-only call made just
# before in the same optimizer step.
_CHECK_AND_STEP = 0
_CHECK_ONLY = 1
_PRECHECKED = 2


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


def step(
    optimizer: Any,
    group: dict[str, Any],
    grad_scale: Tensor | None = None,
    prechecked: bool = False,
) -> bool | list[Tensor]:
    """Run one step of ``group`` flat: True where it ran; False where this step must take
    another strategy; for a group whose parameters the kernel runs in buckets of one dtype,
    the parameters of the buckets it could not run, which the caller steps another way.

    A ``fused=True`` group given ``grad_scale`` (a GradScaler's scale, one number on the CPU)
    divides each gradient by it in the same pass, leaving the unscaled gradient in ``.grad``
    as torch's fused kernels do. ``prechecked``: :func:`check` found the group fit just before,
    in the same optimizer step, and the kernel takes what it recorded then.
    """
    return _enter(optimizer, group, grad_scale, _PRECHECKED if prechecked else _CHECK_AND_STEP)


def check(
    optimizer: Any, group: dict[str, Any], grad_scale: Tensor | None = None
) -> bool | list[Tensor]:
    """What :func:`step` would answer for ``group``, found by the kernel's check alone, which
    writes nothing: an optimizer whose later group would fail learns it before stepping the
    earlier ones."""
    return _enter(optimizer, group, grad_scale, _CHECK_ONLY)


def _enter(
    optimizer: Any, group: dict[str, Any], grad_scale: Tensor | None, mode: int
) -> bool | list[Tensor]:
    if _gpu.takes(group):  # parameters on CUDA devices: the group's Triton kernel
        return _gpu.step(optimizer, group, grad_scale, check_only=mode == _CHECK_ONLY)
    cache: dict[int, Entry] = _memo.memo(optimizer, group).flat
    key = 0
    if grad_scale is not None and group.get("fused"):
        if grad_scale.device.type != "cpu" or grad_scale.numel() != 1:
            cache[key] = _declined("the GradScaler's scale is not one number on the CPU")
            return False
        # The scale travels as one more hyperparameter: the kernel sees a group that holds it.
        group = {**group, GRAD_SCALE: float(grad_scale)}
    return _run(optimizer, group, cache, key, mode)


def _run(
    optimizer: Any, group: dict[str, Any], cache: dict[int, Entry], key: int, mode: int
) -> bool | list[Tensor]:
    """One step of ``group`` by the entry ``cache[key]``, made or made anew where needed."""
    entry = cache.get(key)
    # The kernel checks that its plan still fits the group, so the usual step is one call.
    for _ in range(3):
        if entry is None:
            entry = cache[key] = _plan.make(optimizer, group)
        if entry.buckets is not None:
            return _run_buckets(optimizer, group, entry, cache, key, mode)
        if entry.plan is None:
            if entry.unchanged(group, optimizer):
                return False
            entry = None
            continue
        if entry.local is None:
            done = entry.plan.step(group, optimizer.state, optimizer._state_version, None, mode)
        else:
            params = group["params"]
            if len(params) != len(entry.local) or any(
                _plan.local_data(p) is not t for p, t in zip(params, entry.local, strict=False)
            ):
                entry = None
                continue
            grads = _plan.local_grads(params)
            if grads is None:
                cache[key] = _declined("a gradient is placed unlike its distributed parameter")
                return False
            done = entry.plan.step(group, optimizer.state, optimizer._state_version, grads, mode)
        if done == _DONE:
            return True
        if done == _STALE:
            entry = None
            continue
        if done == _RELOAD and _plan.load(optimizer, entry, group):
            continue
        break  # _FALLBACK, or new hyperparameters that no program runs
    # This step cannot run flat; look at the group afresh next time.
    reason = entry.reason if entry is not None and entry.reason else _REFUSED
    cache[key] = _declined(reason)
    return False


def _run_buckets(
    optimizer: Any,
    group: dict[str, Any],
    entry: Entry,
    cache: dict[int, Entry],
    key: int,
    mode: int,
) -> bool | list[Tensor]:
    """A step of a group of several dtypes: each dtype's parameters in a plan of their own,
    in the order the group first lists them. Where one bucket cannot run, it and the ones
    after it are returned for the caller to step."""
    assert entry.buckets is not None
    params = group["params"]
    if (
        entry.kernel is not _kernel.loaded()
        or len(params) != len(entry.params)
        or not all(map(operator.is_, params, entry.params))
    ):
        del cache[key]  # the group changed: made anew next step
        return False
    for i, (bucket, sub_cache) in enumerate(entry.buckets):
        ran = _run(optimizer, {**group, "params": bucket}, sub_cache, 0, mode)
        if ran is not True:
            sub = sub_cache.get(0)
            reason = sub.reason if sub else _REFUSED
            entry.reason = f"its {_plan.bucket_name(bucket[0])} parameters: {reason}"
            return False if i == 0 else [p for b, _ in entry.buckets[i:] for p in b]
    entry.reason = ""
    return True


_REFUSED = (
    "the kernel's check refused the step: a gradient missing its layout, dtype or device, "
    "a sparse gradient, or state replaced by hand"
)


def _declined(reason: str) -> Entry:
    """What the cache keeps for a group whose step could not run flat: its reason, and nothing
    that describes the group (the next step looks at it afresh)."""
    return Entry(None, reason=reason, version=-2)


def last_path(optimizer: Any, group: dict[str, Any]) -> tuple[bool, bool, str]:
    """For ``group``'s last step: whether it ran flat, whether compiled, and if not flat why."""
    if _gpu.takes(group):
        ran, why = _gpu.last_path(optimizer, group)
        return ran, ran, why
    kept = _memo.peek(optimizer, group)
    entry = kept.flat.get(0) if kept is not None else None
    if entry is None:
        return False, False, ""
    if entry.buckets is not None:
        if entry.reason:
            return False, False, entry.reason
        subs = [sub.get(0) for _, sub in entry.buckets]
        if any(s is None or s.plan is None for s in subs):
            return False, False, ""
        slots = [s.compiled for s in subs if s is not None]
        ready = all(slot is not None and slot.ready for slot in slots)
        return True, ready, ""
    if entry.plan is None:
        return False, False, entry.reason
    slot = entry.compiled
    return True, bool(slot is not None and slot.ready), ""


def runs_triton(group: dict[str, Any]) -> bool:
    """Whether ``group`` is stepped by a generated Triton kernel (its parameters lie on CUDA
    devices, see ``_gpu.py``) rather than by the CPU kernel."""
    return _gpu.takes(group)


def awaits_state(optimizer: Any, group: dict[str, Any]) -> bool:
    """Whether ``group``'s last step could not run flat only because parameters had no state
    yet (see :data:`FIRST_STEP`)."""
    if _gpu.takes(group):
        return _gpu.last_path(optimizer, group)[1] == FIRST_STEP
    kept = _memo.peek(optimizer, group)
    entry = kept.flat.get(0) if kept is not None else None
    return entry is not None and entry.reason == FIRST_STEP


def entries(optimizer: Any) -> list[Entry]:
    """The kernel's entries for ``optimizer``'s groups (their plans, or why they have none)."""
    return [e for kept in _memo.memos(optimizer) if (e := kept.flat.get(0)) is not None]


def build_ahead(
    classes: Iterable[type], tick: Callable[[float], None] | None = None
) -> tuple[bool, list[str]]:
    """Build the kernel, and compile the default program of each elementwise optimizer class of
    ``classes`` for float32 and float64, waiting for all of it.

    Args:
        classes: the optimizer classes (``polyak build`` passes polyak's).
        tick: while the kernel builds, called about once a second with the seconds so far.

    Returns:
        Whether the kernel is available, and lines saying what was built and where.
    """
    loaded = _kernel.load(wait=True, tick=tick)
    if loaded is None:
        return False, [f"the flat kernel is unavailable: {_kernel.failure() or 'turned off'}"]
    lines = [f"flat kernel: {loaded.__file__}"]
    lines.append(f"programs built for {_toolchain.vector_target()}")
    lines.append(f"numbers {_dispatch.describe()}")
    mode = _compiled.sqrt_mode(loaded)
    lines.append(f"sqrt in compiled programs: {_codegen.SQRT_NAMES[mode]}")
    for cls in sorted(classes, key=lambda c: c.__name__):
        if not getattr(cls, "elementwise", False):
            continue  # no program to compile (Adafactor, LBFGS, Muon)
        for dtype in _plan.FLOATS:
            param = torch.zeros(4, dtype=dtype, requires_grad=True)
            try:
                optimizer = cast(Any, cls)([param])
                for _ in range(2):
                    param.grad = torch.ones_like(param)
                    optimizer.step()
            except Exception:
                continue  # an optimizer that takes no dense gradients (SparseAdam)
    _compiled.wait()
    lines.append(f"programs: {_toolchain.cache_dir()}")
    return True, lines


def kernel(wait: bool = False, tick: Callable[[float], None] | None = None) -> Any:
    """The kernel module (the C++ extension that runs plans): loaded, or its build started,
    where it is not loaded yet; None while it is being built and where it cannot be had.

    Args:
        wait: wait for a build in progress (or start one and wait for it) instead of returning
            None meanwhile.
        tick: while waiting, called about once a second with the seconds waited so far.
    """
    return _kernel.load(wait, tick)


def loaded_kernel() -> Any:
    """The kernel module where it is loaded already, else None; starts nothing."""
    return _kernel.loaded()


def needs_build() -> bool:
    """Whether :func:`kernel` would wait for a build: the kernel is turned on, and neither
    loaded nor built on this machine."""
    return _kernel.needs_build()


def status() -> str:
    """The kernel's state in words: loaded, being built, turned off, or unavailable and why."""
    return _kernel.status()


def compiles() -> bool:
    """Whether programs are compiled (``POLYAK_COMPILE=0`` keeps every step interpreted)."""
    return _compiled.compiles()


def wait(timeout: float | None = None) -> bool:
    """Wait until every program asked for so far is compiled (or failed); False on timeout."""
    return _compiled.wait(timeout)


def vector_target() -> str:
    """What compiled programs run on, e.g. ``-march=native: AVX-512 vectors, 16 floats``."""
    return _toolchain.vector_target()


def describe_rounding(dtype: torch.dtype = torch.float32) -> str:
    """How torch's kernels round ``dtype`` in this process, which the kernel follows, in
    words."""
    return _dispatch.describe(dtype)
