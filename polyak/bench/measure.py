"""What the benchmark measures besides step times, and what it runs on: the bandwidth
yardstick, peak memory, state bytes, the busy work before each step, the machine."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from polyak.strategies import flat

_MIB = 2**20

#: The row that measures the memory bandwidth every other row's "% of bw" divides by: an in-place
#: add moving the bytes of one step, timed in the same rounds.
MEMORY = "in-place add, same bytes"


def measure_bandwidth(mib: int = 64, calls: int = 20) -> float:
    """Measure the in-place memory bandwidth as ``a.add_(b, alpha=0.5)`` achieves it.

    Each call reads two float32 tensors of ``mib`` MiB and writes one, 3 x ``mib`` MiB in all.

    Args:
        mib: the size of each operand in MiB.
        calls: how many calls to take the median of, after one warm-up call.

    Returns:
        The bandwidth in bytes per second, from the median call.
    """
    numel = mib * _MIB // 4
    a = torch.randn(numel)
    b = torch.randn(numel)
    a.add_(b, alpha=0.5)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        a.add_(b, alpha=0.5)
        times.append(time.perf_counter() - start)
    return 3 * numel * 4 / statistics.median(times)


class InPlaceAdd:
    """Not an optimizer: ``a.add_(b, alpha=0.5)`` over operands sized so that one call reads and
    writes the bytes one optimizer step moves (the row :data:`MEMORY`).

    Timed in the same rounds as the optimizers, with the same interleaving, it measures the
    bandwidth the machine gives that much memory traffic in the same cache conditions, which a
    separate measurement with operands of one size does not: a step whose data other contenders
    have just evicted runs at memory speed, one run back to back partly from cache.
    """

    def __init__(self, bytes_moved: int) -> None:
        numel = max(1, bytes_moved // (3 * 4))
        self.a = torch.randn(numel)
        self.b = torch.randn(numel)
        self.state: dict[Any, Any] = {}
        self.param_groups: list[dict[str, Any]] = []

    def step(self, closure: Callable[[], float] | None = None) -> None:
        self.a.add_(self.b, alpha=0.5)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to the null device, silencing the profiler's start and stop lines
    that its C++ side writes there unconditionally."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_bytes(step: Callable[[], object]) -> int | None:
    """The peak of CPU memory allocated while a function runs, above what was allocated before.

    The function runs once under ``torch.profiler.profile(profile_memory=True)``; the profiler
    records every allocation and free of torch's CPU allocator with a timestamp. Summing them in
    time order gives the memory allocated since the start, and its running maximum is the peak.
    Memory held by allocators outside torch's (e.g. a library's own C++ code) is not seen.

    Args:
        step: the function, e.g. ``optimizer.step``.

    Returns:
        The peak in bytes (0 if nothing was allocated), or None if the profiler recorded no
        memory events that can be read.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        results: Any = prof.profiler.kineto_results  # type: ignore[union-attr]
        events = [(e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]"]
    except Exception:
        return None
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def state_bytes(optimizer: Any) -> int:
    """The bytes held by the tensors in an optimizer's ``state``, each storage counted once.

    Args:
        optimizer: a torch.optim-style optimizer.

    Returns:
        The total storage bytes of every tensor reachable from ``optimizer.state``.
    """
    seen: set[int] = set()
    total = 0
    stack: list[object] = list(getattr(optimizer, "state", {}).values())
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            # A distributed tensor's bytes are those of its local data.
            local = getattr(item, "_local_tensor", None)
            storage = (local if isinstance(local, Tensor) else item).untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, (list, tuple)):
            stack += item
    return total


#: Milliseconds of matrix products on every thread before each timed step. In training a step
#: follows a backward pass, which keeps every core busy; a core left idle for tens of
#: milliseconds (while a contender steps on one thread) can run the next parallel work several
#: times slower, on virtual machines above all: on the 2-core machine an in-place add of 41 MB
#: at 2 threads took 4.4 ms after 100 ms idle, and 1.06 ms after 2 ms of products.
BUSY_MS = 3.0


@functools.cache
def _busy_matrix() -> Tensor:
    return torch.randn(384, 384, generator=torch.Generator().manual_seed(0))


def keep_busy(ms: float = BUSY_MS) -> None:
    """Keep every thread busy with matrix products for ``ms`` milliseconds, as a backward
    pass would just before a step."""
    matrix = _busy_matrix()
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        torch.mm(matrix, matrix)


def load_kernel() -> None:
    """Load polyak's flat kernel, building it first where this machine has none, so that no
    timed step runs while it builds."""
    flat.kernel(wait=True)


def wait_for_programs(timeout: float = 600) -> None:
    """Wait for the compiled programs that the steps so far asked for (built in the
    background), so that the timed steps run them."""
    flat.wait(timeout=timeout)


def default_threads() -> tuple[int, ...]:
    """The thread sweep of a default run: one thread (where compute limits a step) and every
    core (where memory does)."""
    cores = os.cpu_count() or 1
    return (1,) if cores == 1 else (1, cores)


#: The vector extensions worth naming in the report, as /proc/cpuinfo spells them.
_VECTOR_FLAGS: tuple[str, ...] = (
    *("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"),
    *("avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve", "sve2"),
)


def cpu_description() -> str:
    """The CPU's model and the vector extensions it has, e.g. ``AMD EPYC (avx2 fma avx512f)``."""
    model, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    named = [flag for flag in _VECTOR_FLAGS if flag in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model} ({' '.join(named) or 'no vector extensions listed'}; torch uses {capability})"


def kernel_description() -> str:
    """What polyak's compiled programs run on and whose numbers they give, e.g.
    ``-march=native: AVX-512 vectors, 16 floats; as torch's AVX2 kernels round: ...``."""
    return f"{flat.vector_target()}; {flat.describe_rounding(torch.float32)}"


def load_average() -> float | None:
    """The one-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
