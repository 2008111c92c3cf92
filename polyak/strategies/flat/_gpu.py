"""The flat strategy on GPUs: a group's traced program as one Triton kernel (see ``_triton.py``).

:func:`run` steps one group: it traces the group's update rule (``_trace.py``, as for the CPU
kernel, but without the CPU's fused forms), has the program's kernel generated, written to the
cache folder and imported once per program, dtype and mode (:func:`kernel`), builds the group's
tables (pointers per stream and tensor, element counts, the block-to-tensor map), reusing them
while the tensors stay where they are, and launches the kernel once.

The scalar program runs where the scalar state lies: on the host where it lies in host memory
(torch keeps a step counter there outside CUDA graphs), in the kernel where it lies on the
device (``capturable`` and ``fused`` state), reading the hyperparameters from a table on the
device, into which a tensor hyperparameter on the device is copied there (no host
synchronisation).

Triton is imported only here, and only when a kernel is needed: ``import polyak`` does not import
it. Under ``TRITON_INTERPRET=1`` (read by Triton each time a kernel is decorated) the kernels run
on CPU tensors, which is how they are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import operator
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from polyak import _memo
from polyak.strategies.flat import _program, _toolchain, _trace, _triton
from polyak.strategies.flat._plan import FIRST_STEP

#: Elements per block of the kernel, by bytes per element (float32: 16 KiB per stream).
BLOCK = {2: 4096, 4: 4096, 8: 2048}
_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_NOT_HYPER = ("params", "param_names")
#: A placeholder for a tensor hyperparameter on the device while tracing: the program's guards
#: must not read it (they are checked on the host), and its value comes from the tensor.
_ON_DEVICE = 1e-3

_kernels: dict[tuple[str, bool], Any] = {}
#: Why a kernel could not run, by its source's digest: its groups take the reference path.
_failed: dict[str, str] = {}
_programs: dict[tuple[Any, ...], list[_program.Program] | None] = {}


def available() -> bool:
    """Whether Triton can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernel(text: str) -> Any:
    """The Triton kernel ``polyak_step`` of the source ``text``, imported from a file in the
    cache folder that holds it (written once); one per source and per interpreter mode."""
    key = (_triton.digest(text), interpreting())
    found = _kernels.get(key)
    if found is None:
        folder = _toolchain.cache_dir() / "triton"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"polyak_{key[0]}.py"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        spec = importlib.util.spec_from_file_location(f"polyak_triton_{key[0]}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found = _kernels[key] = module.polyak_step
    return found


@dataclass
class _Tables:
    """A group's tables on the device, for the tensors at the data pointers ``key``."""

    key: tuple[int, ...]
    ptrs: Tensor
    numels: Tensor
    blocks: Tensor
    nblocks: Tensor
    counts: Tensor
    n_blocks: int


@dataclass
class Plan:
    """What a group keeps between steps: its tables and its last program's numbers."""

    tables: _Tables | None = None
    numbers: tuple[tuple[float, ...], Tensor] | None = None
    #: Why the last step did not run here ("" where it did).
    reason: str = ""
    #: Steps run here.
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _dense_like(t: Tensor, p: Tensor) -> bool:
    """Whether ``t`` lies in memory as ``p`` does, in one dense run of ``numel`` elements."""
    if t.shape != p.shape or t.stride() != p.stride() or t.device != p.device:
        return False
    return p.is_contiguous() or (
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
    )


def _tensors(value: Any) -> list[Tensor]:
    """The one-element tensors of a hyperparameter (a tensor, or a tuple holding some)."""
    if isinstance(value, tuple):
        return [t for v in value for t in _tensors(v)]
    return [value] if isinstance(value, Tensor) and value.numel() == 1 else []


def _as_number(value: Any, on_device: list[tuple[int, Tensor]], slot: list[int], feed: bool) -> Any:
    """A hyperparameter as :func:`_program.split` takes it: a one-element floating tensor as
    its number, or (``feed``: the scalar program runs in the kernel) as a placeholder whose
    slot the kernel's table of numbers takes from the tensor, on the device (recorded in
    ``on_device``)."""
    if isinstance(value, tuple):
        return tuple(_as_number(v, on_device, slot, feed) for v in value)
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
            raise TypeError
        if not feed:
            if value.device.type != "cpu":
                raise TypeError  # reading it would wait for the device
            number = value.item()
        else:
            on_device.append((slot[0], value))
            number = _ON_DEVICE
        slot[0] += 1
        return number
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        slot[0] += 1
    return value


def run(
    optimizer: Any,
    group: dict[str, Any],
    plan: Plan,
    block: int | None = None,
    host_scalars: bool | None = None,
    check_only: bool = False,
) -> str:
    """One step of ``group`` by its Triton kernel: "" where it ran, else why not (the step then
    runs another strategy, and nothing was changed).

    Args:
        optimizer: the group's optimizer.
        group: the parameter group.
        plan: what the group kept from its last step (updated here).
        block: elements per block (default: :data:`BLOCK` by dtype).
        host_scalars: run the scalar program on the host (default: where no number it needs
            lies on a GPU).
        check_only: find whether the step would run, writing nothing.
    """
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return ""  # nothing to step, as on every path
    p0 = params[0]
    dtype, device = p0.dtype, p0.device
    allowed = _FLOATS + _HALVES if group.get("fused") else _FLOATS
    if dtype not in allowed:
        return f"{str(dtype).replace('torch.', '')} parameters"
    if len({id(p) for p in params}) != len(params):
        return "a parameter is listed twice in the group"
    for p in params:
        g = p.grad
        assert g is not None
        if g.is_sparse or p.dtype != dtype or g.dtype != dtype or not _dense_like(g, p):
            return "parameters or gradients of several dtypes, devices or layouts"
        if type(p) not in (Tensor, torch.nn.Parameter):
            return f"parameters of type {type(p).__name__}"
    # The state, by key: param-shaped columns and 0-dim scalar columns.
    vector_keys: list[str] = []
    scalar_keys: list[str] = []
    state = optimizer.state
    for key in type(optimizer).state_keys:
        found = [s[key] for p in params if (s := state.get(p)) is not None and key in s]
        if not found:
            continue
        if len(found) != len(params):
            return FIRST_STEP
        if not all(isinstance(t, Tensor) for t in found):
            return f"the state {key!r} holds something other than a tensor"
        vector = key in type(optimizer).param_shaped_state or any(t.dim() > 0 for t in found)
        (vector_keys if vector else scalar_keys).append(key)
    for key in vector_keys:
        if not all(_dense_like(state[p][key], p) and state[p][key].dtype == dtype for p in params):
            return f"the state {key!r} lies unlike its parameter"
    scalar_doubles: list[bool] = []
    scalar_devices: set[torch.device] = set()
    for key in scalar_keys:
        column = [state[p][key] for p in params]
        dtypes = {t.dtype for t in column}
        if len(dtypes) != 1 or not dtypes <= set(_FLOATS) or any(t.numel() != 1 for t in column):
            return f"the state {key!r} is not one float32 or float64 number per parameter"
        scalar_doubles.append(column[0].dtype == torch.float64)
        scalar_devices.update(t.device for t in column)
    if len(scalar_devices) > 1:
        return "scalar state on several devices"
    if host_scalars is None:
        # In the kernel where a number it needs lies on the device (scalar state, a tensor
        # hyperparameter): reading it on the host would wait for the device.
        on_gpu = {t.device.type for v in group.values() for t in _tensors(v)}
        host_scalars = {d.type for d in scalar_devices} | on_gpu <= {"cpu"}
    if not host_scalars and scalar_devices and next(iter(scalar_devices)) != device:
        return "scalar state on another device than the parameters"
    # The hyperparameters: numbers and flags (tensors as numbers, see _as_number).
    on_device: list[tuple[int, Tensor]] = []
    counter = [0]  # slots are numbered in order over all hyperparameters, as split numbers them
    try:
        hyper = {
            k: _as_number(v, on_device, counter, not host_scalars)
            for k, v in group.items()
            if k not in _NOT_HYPER
        }
    except TypeError:
        return (
            "a hyperparameter is neither a number, a flag nor a one-element tensor (on the "
            "host, where the scalar program runs there)"
        )
    parts = _program.split(hyper)
    if parts is None:
        return "a hyperparameter is neither a number nor a flag"
    numbers, structure = parts
    program = _program_for(optimizer, hyper, numbers, structure, vector_keys, scalar_keys)
    if isinstance(program, str):
        return program
    device_slots = {slot for slot, _ in on_device}
    if any(
        g[0] in device_slots or (isinstance(g[2], _program.Slot) and g[2].slot in device_slots)
        for g in program.guards
    ):
        return "the update rule branches on a tensor hyperparameter on the device"
    n_bound = 2 + len(vector_keys)
    vcode = [tuple(int(x) for x in row) for row in program.vcode.tolist()]
    scode = [tuple(int(x) for x in row) for row in program.scode.tolist()]
    text = _triton.source(
        vcode,
        scode,
        n_bound,
        len(numbers),
        program.stored,
        scalar_doubles,
        dtype,
        fma=True,
        host_scalars=host_scalars,
    )
    digest = _triton.digest(text)
    if check_only or digest in _failed:
        return _failed.get(digest, "")
    fn = kernel(text)
    block = block or BLOCK[dtype.itemsize]
    tables = _tables(plan, params, vector_keys, scalar_keys, state, block, device, host_scalars)
    stores: list[tuple[Tensor, float]] = []
    if host_scalars:
        rows, row_of, stores = _host_scalars(
            program, numbers, params, scalar_keys, scalar_doubles, state
        )
        table, sptrs = rows.to(device, non_blocking=True), row_of.to(device, non_blocking=True)
    else:
        table = _numbers(plan, numbers + _triton.constants(scode), device)
        for slot, value in on_device:
            table[slot : slot + 1].copy_(value.reshape(1))
        sptrs = plan.extra["sptrs"]
    grid = (tables.n_blocks,)
    try:
        _launch(fn, grid, tables, sptrs, table, len(params), program.n_sregs, block)
    except Exception as error:  # a kernel that does not compile: nothing was written
        _failed[digest] = f"the Triton kernel failed: {type(error).__name__}: {error}"
        return _failed[digest]
    for held, number in stores:  # the scalar state the host stepped, once the kernel ran
        held.fill_(number)
    plan.steps += 1
    return ""


def _launch(
    fn: Any,
    grid: tuple[int],
    tables: _Tables,
    sptrs: Tensor,
    table: Tensor,
    n_tensors: int,
    n_sregs: int,
    block: int,
) -> None:
    """Launch ``fn`` over ``grid`` (see ``_triton.source`` for the arguments)."""
    fn[grid](
        tables.ptrs,
        sptrs,
        tables.numels,
        tables.blocks,
        tables.nblocks,
        table,
        tables.counts,
        n_tensors,
        tables.n_blocks,
        n_sregs,
        BLOCK=block,
        # Nothing contracted but the fused multiply-adds the source writes.
        **({} if interpreting() else {"enable_fp_fusion": False}),
    )


def takes(group: dict[str, Any]) -> bool:
    """Whether ``group`` is this backend's: its parameters lie on CUDA devices (on the CPU the
    C++ kernel runs), and Triton can be imported."""
    params = group["params"]
    # The first parameter first: on the CPU, every step asks.
    return bool(params) and params[0].is_cuda and all(p.is_cuda for p in params) and available()


def step(
    optimizer: Any, group: dict[str, Any], grad_scale: Tensor | None, check_only: bool = False
) -> bool:
    """One step of a group on CUDA devices by its Triton kernel: whether it ran (or, with
    ``check_only``, would run; nothing is written then). The group's plan, and why its last
    step did not run here, are kept on the optimizer (see :func:`last_path`)."""
    kept = _memo.memo(optimizer, group)
    if kept.triton is None:
        kept.triton = Plan()
    plan: Plan = kept.triton
    if grad_scale is not None:
        why = "a GradScaler's scale: unscaling in the kernel is not written yet"
    else:
        try:
            why = run(optimizer, group, plan, check_only=check_only)
        except Exception as error:  # making or importing the kernel failed; nothing written
            why = f"the Triton kernel failed: {type(error).__name__}: {error}"
    plan.reason = why
    return why == ""


def last_path(optimizer: Any, group: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``group``'s last step ran its Triton kernel, and if not why."""
    kept = _memo.peek(optimizer, group)
    plan = kept.triton if kept is not None else None
    if plan is None:
        return False, ""
    return plan.reason == "", plan.reason


def _program_for(
    optimizer: Any,
    hyper: dict[str, Any],
    numbers: list[float],
    structure: tuple[Any, ...],
    vector_keys: list[str],
    scalar_keys: list[str],
) -> _program.Program | str:
    """The traced program for these hyperparameters (cached while its guards hold), or why
    there is none."""
    update = type(optimizer).update
    key = (update, tuple(vector_keys), tuple(scalar_keys), structure, torch.get_default_dtype())
    traced = _programs.setdefault(key, [])
    if traced is None:
        return "the update rule could not be traced into a program"
    for program in traced:
        if program.holds(numbers):
            return program
    try:
        program = _trace.trace(update, hyper, vector_keys, scalar_keys)
    except _trace.MissingState:
        return FIRST_STEP
    except _trace.TraceError as error:
        _programs[key] = None
        return f"the update rule could not be traced into a program ({error})"
    traced.append(program)
    return program


def _numbers(plan: Plan, values: list[float], device: torch.device) -> Tensor:
    """The table of hyperparameters and constants on the device, uploaded where it changed."""
    key = tuple(values)
    if plan.numbers is None or plan.numbers[0] != key or plan.numbers[1].device != device:
        plan.numbers = (key, torch.tensor(values, dtype=torch.float64).to(device))
    return plan.numbers[1]


def _tables(
    plan: Plan,
    params: list[Tensor],
    vector_keys: list[str],
    scalar_keys: list[str],
    state: Any,
    block: int,
    device: torch.device,
    host_scalars: bool,
) -> _Tables:
    """The group's tables on the device, made anew where a stream moved (a new gradient)."""
    columns: list[Sequence[Tensor]] = [params, [p.grad for p in params]]  # type: ignore[list-item, misc]
    columns += [[state[p][k] for p in params] for k in vector_keys]
    scalars = [[state[p][k] for p in params] for k in scalar_keys]
    key = (block, *(t.data_ptr() for c in columns + scalars for t in c))
    key += (host_scalars, *(p.numel() for p in params))
    tables = plan.tables
    if tables is not None and tables.key == key:
        return tables
    numels = [p.numel() for p in params]
    # An empty tensor still has a block: its scalar state is stepped.
    counts = [max(1, -(-n // block)) for n in numels]
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    index = [j for c in counts for j in range(c)]

    def on(values: list[int], dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype).to(device)

    tables = plan.tables = _Tables(
        key=key,
        ptrs=on([t.data_ptr() for c in columns for t in c], torch.int64),
        numels=on(numels, torch.int64),
        blocks=on(owner + index, torch.int32),
        nblocks=on(counts, torch.int32),
        counts=torch.zeros(len(params), dtype=torch.int32, device=device),
        n_blocks=len(owner),
    )
    if not host_scalars:
        plan.extra["sptrs"] = on([t.data_ptr() for c in scalars for t in c] or [0], torch.int64)
    return tables


def _f32(x: float) -> float:
    try:
        return float(struct.unpack("<f", struct.pack("<f", x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def _div(x: float, y: float) -> float:
    try:
        return x / y
    except ZeroDivisionError:
        if x != x or x == 0:
            return math.nan
        return math.copysign(math.inf, x) * math.copysign(1.0, y)


def _pow(x: float, y: float) -> float:
    try:
        return math.pow(x, y)
    except ValueError:
        return math.nan
    except OverflowError:
        return math.inf


def _host_scalars(
    program: _program.Program,
    numbers: list[float],
    params: list[Tensor],
    scalar_keys: list[str],
    doubles: list[bool],
    state: Any,
) -> tuple[Tensor, Tensor, list[tuple[Tensor, float]]]:
    """The scalar program run on the host for each tensor, as the CPU kernel runs it (float64,
    C's ``pow``): each distinct row of registers once, the row of each tensor, and the stores
    to make to the scalar state (the last store of a key is its value)."""
    scode = [tuple(int(x) for x in row) for row in program.scode.tolist()]
    rows: list[list[float]] = []
    seen: dict[tuple[float, ...], int] = {}
    row_of: list[int] = []
    columns = [[state[p][k] for p in params] for k in scalar_keys]
    stores: list[tuple[Tensor, float]] = []
    for i in range(len(params)):
        held = tuple(float(c[i]) for c in columns)
        if held not in seen:
            seen[held] = len(rows)
            rows.append(_run_scalar(scode, numbers, program.n_sregs, list(held), doubles))
        row = seen[held]
        row_of.append(row)
        r = rows[row]
        for op, _, k, reg in scode:
            if op == _program.S_STORE:
                stores.append((columns[k][i], r[reg]))
    flat = [x for r in rows for x in r] or [0.0]
    return (
        torch.tensor(flat, dtype=torch.float64),
        torch.tensor(row_of, dtype=torch.int64),
        stores,
    )


def _comparison(name: str) -> Callable[[float, float], float]:
    """A comparison of the scalar program: 1.0 or 0.0."""
    compare = _program.COMPARE[name]
    return lambda x, y: float(bool(compare(x, y)))


def _run_scalar(
    scode: list[tuple[int, ...]],
    numbers: list[float],
    n_sregs: int,
    cur: list[float],
    doubles: list[bool],
) -> list[float]:
    """One tensor's scalar registers, as the CPU kernel's ``run_scalar_program`` makes them."""
    r = [0.0] * max(n_sregs, len(numbers))
    r[: len(numbers)] = numbers

    def rounded(k: int, v: float) -> float:
        return v if doubles[k] else _f32(v)

    binary: dict[int, Callable[[float, float], float]] = {
        _program.S_ADD: operator.add,
        _program.S_SUB: operator.sub,
        _program.S_MUL: operator.mul,
        _program.S_DIV: _div,
        _program.S_POW: _pow,
        **{op: _comparison(name) for name, op in _program.S_COMPARISONS.items()},
    }
    for op, d, a, b in scode:
        if op == _program.S_CONST:
            r[d] = float(struct.unpack("<d", struct.pack("<q", b))[0])
        elif op in binary:
            try:
                r[d] = binary[op](r[a], r[b])
            except OverflowError:
                r[d] = math.inf
        elif op == _program.S_NEG:
            r[d] = -r[a]
        elif op == _program.S_LOAD:
            r[d] = cur[a]
        elif op == _program.S_STORE:
            r[b] = cur[a] = rounded(a, r[b])
        elif op == _program.S_F32:
            r[d] = _f32(r[a])
        elif op == _program.S_ROUND:
            r[d] = rounded(b, r[a])
        elif op == _program.S_COPY:
            r[d] = r[a]
        elif op == _program.S_SELECT:
            r[d] = r[a] if r[d] != 0.0 else r[b]
    return r
