"""The compiled form of each program: built in the background, cached, and plugged into the kernel.

Each program's C++ (``_codegen.py``) is compiled for this machine (``-march=native``) in a
background thread, once per program and machine: the result is cached on disk under a key of
the source, the compiler flags and version and the CPU (see ``_toolchain.py``), so that a later
process loads it at once and a cache shared by machines of several CPU types never loads code
built for another. Until it is ready, steps run the kernel's interpreter, which computes the
same bits. A plan holds its program's compiled form in a slot (the kernel's ``Compiled``) that
is filled when the build is done.

How compiled programs compute float32 sqrt with torch's bits is decided here once per machine,
by the sqrt probe (``kernel/sqrt_probe.cpp``), and kept beside the programs.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from polyak.strategies.flat import _dispatch, _toolchain
from polyak.strategies.flat._codegen import (
    SQRT_EXACT,
    SQRT_MKL_CALL,
    SQRT_MKL_INLINE,
    STORAGE,
    generate,
)
from polyak.strategies.flat._program import V_SQRT


def target(source: str, name: str, root: Path) -> Path | None:
    """Where the build of ``source`` is kept in the cache folder ``root``; None without a
    compiler."""
    cxx = _toolchain.compiler()
    if cxx is None:
        return None
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    return root / _toolchain.machine_key(cxx) / f"{name}-{key}.so"


def cached(source: str, name: str) -> Path | None:
    """The cached build of ``source``, if there is one; reading needs no write access."""
    for root in _toolchain.roots():
        library = target(source, name, root)
        if library is not None and library.exists():
            return library
    return None


#: Seconds one program's compile may take.
_COMPILE_SECONDS = 300


def build(source: str, name: str) -> Path | None:
    """The shared library built from ``source`` for this machine, from the cache if there;
    None where it cannot be built.

    Each build is the toolchain's detached, locked build (see ``_toolchain.launch``): a process
    that ends while it builds leaves it to finish, a build killed midway leaves no partial
    library and no lock, two processes building the same program share one build, and what dead
    builds left is removed by later ones.
    """
    cxx = _toolchain.compiler()
    if cxx is None:
        return None
    found = cached(source, name)
    if found is not None:
        return found
    for root in _toolchain.roots():
        library = target(source, name, root)
        assert library is not None
        command = [cxx, *_toolchain.PROGRAM_FLAGS, "-o", f"{{scratch}}/{library.name}"]
        try:
            child = _toolchain.launch(
                library,
                [*command, f"{{scratch}}/{name}.cpp"],
                _COMPILE_SECONDS,
                {f"{name}.cpp": source},
            )
        except OSError:
            continue  # not writable: the next folder
        except subprocess.SubprocessError:
            return None
        try:
            child.wait(timeout=_COMPILE_SECONDS + 30)
        except subprocess.TimeoutExpired:
            return None
        return library if library.exists() else None
    return None


_libraries: dict[Path, ctypes.CDLL] = {}


def _open(path: Path) -> ctypes.CDLL:
    """The library at ``path``, opened once per process."""
    if path not in _libraries:
        _libraries[path] = ctypes.CDLL(str(path))
    return _libraries[path]


_sqrt_lock = threading.Lock()
_sqrt_mode: int | None = None


def _verdict_paths() -> list[Path]:
    cxx = _toolchain.compiler()
    if cxx is None:
        return []
    # MKL picks its code path by the CPU and by its environment variables: a verdict holds for
    # one setting of them.
    path = hashlib.sha256(_dispatch.mkl_path().encode()).hexdigest()[:12]
    return [root / _toolchain.machine_key(cxx) / f"sqrt-{path}.json" for root in _toolchain.roots()]


def _known_sqrt_mode(kernel: Any) -> int | None:
    """The sqrt mode where it is decided already (in this process or on disk), else None."""
    global _sqrt_mode
    if _sqrt_mode is not None:
        return _sqrt_mode
    if not kernel.has_mkl_sqrt():
        return SQRT_EXACT
    for verdict in _verdict_paths():
        try:
            mode = int(json.loads(verdict.read_text())["mode"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if mode in (SQRT_EXACT, SQRT_MKL_INLINE, SQRT_MKL_CALL):
            _sqrt_mode = mode
            return mode
    return None


def probe_sqrt(kernel: Any, which: int) -> int:
    """Over all 2**32 float32 inputs, how many times torch's MKL sqrt differs from the inline
    copy of its algorithm (``which=0``) or from the correctly rounded sqrt (``which=1``); -1
    where the probe cannot be built or the copy is not available on this CPU."""
    probe = build(_toolchain.source("sqrt_probe.cpp"), "sqrt-probe")
    return -1 if probe is None else run_probe(_open(probe), kernel, which)


def run_probe(library: ctypes.CDLL, kernel: Any, which: int) -> int:
    """The count :func:`probe_sqrt` returns, from a built probe ``library``."""
    run = library.polyak_probe_sqrt
    run.restype = ctypes.c_int64
    run.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return int(run(kernel.ctx_address(), which))


def sqrt_mode(kernel: Any) -> int:
    """How compiled default-path programs compute float32 sqrt on this machine, with torch's
    bits: ``SQRT_EXACT`` where torch's sqrt is correctly rounded (no MKL, or an MKL whose
    results are), ``SQRT_MKL_INLINE`` where the inline copy of MKL's algorithm gives MKL's
    result for all 2**32 inputs, and ``SQRT_MKL_CALL`` otherwise. Decided once per machine
    (a few seconds, in the background thread) and cached."""
    global _sqrt_mode
    known = _known_sqrt_mode(kernel)
    if known is not None:
        return known
    with _sqrt_lock:
        if _sqrt_mode is not None:
            return _sqrt_mode
        mode = SQRT_MKL_CALL
        if probe_sqrt(kernel, 0) == 0:
            mode = SQRT_MKL_INLINE
        elif probe_sqrt(kernel, 1) == 0:
            mode = SQRT_EXACT
        for verdict in _verdict_paths():
            try:
                verdict.parent.mkdir(parents=True, exist_ok=True)
                partial = verdict.with_suffix(f".{os.getpid()}")
                partial.write_text(json.dumps({"mode": mode}))
                os.replace(partial, verdict)
                break
            except OSError:
                continue
        _sqrt_mode = mode
        return mode


class _BuildQueue:
    """One background thread that compiles programs in the order they are asked for."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.pending = 0
        self.idle = threading.Condition(self.lock)

    def submit(self, job: Callable[[], None]) -> None:
        with self.lock:
            self.pending += 1
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="polyak-build", daemon=True)
                self.thread.start()
        self.jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception as error:  # a failed build leaves the interpreter running
                print(f"polyak: a program could not be compiled ({error})", file=sys.stderr)
            finally:
                with self.lock:
                    self.pending -= 1
                    self.idle.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self.lock:
            return self.idle.wait_for(lambda: self.pending == 0, timeout)


_queue = _BuildQueue()


@atexit.register
def _finish_builds() -> None:
    # A compile under way finishes in its own process whatever this one does; a process that
    # ends gives the ones it asked for and has not started yet a moment (each takes about half
    # a second), so that they land in the cache for the next process.
    _queue.wait(timeout=_EXIT_WAIT)


#: Seconds a process that ends waits for the builds it started.
_EXIT_WAIT = 30.0
#: The slot of each program's compiled form, by what determines its source.
_slots: dict[tuple[Any, ...], Any] = {}


def compiles() -> bool:
    """Whether programs are compiled (``POLYAK_COMPILE=0`` keeps every step interpreted)."""
    return _toolchain.switch("POLYAK_COMPILE", True)


def slot(
    kernel: Any,
    program: Any,
    n_bound: int,
    dtype: torch.dtype,
    exact_sqrt: bool,
    rounding: _dispatch.Rounding | None = None,
    state_dtypes: tuple[torch.dtype, ...] = (),
    signed: tuple[bool, ...] = (),
) -> Any:
    """The slot of ``program``'s compiled form (a ``kernel.Compiled``) that a plan runs:
    filled at once where its build is cached, by the background thread otherwise, and never
    where it cannot be built (the kernel's interpreter runs the program).
    ``rounding``: how torch's kernels round (default: fused multiply-adds, NaN as all ones
    in maximum's vector body); ``state_dtypes``: the storage dtype of each state register
    (default: ``dtype``; uint8 for 8-bit codes, with ``signed`` saying each one's map)."""
    vcode = [tuple(int(x) for x in row) for row in program.vcode.tolist()]
    fma = rounding is None or rounding.fma
    max_keep = rounding is not None and rounding.max_nan == _dispatch.MAX_NAN_KEEP
    state = tuple(state_dtypes) or (dtype,) * (n_bound - 2)
    key = (
        tuple(vcode),
        n_bound,
        tuple(program.stored),
        dtype,
        state,
        tuple(signed),
        exact_sqrt,
        fma,
        max_keep,
    )
    found = _slots.get(key)
    if found is not None:
        return found
    compiled = _slots[key] = kernel.Compiled()
    if not compiles() or any(d not in STORAGE for d in (dtype, *state)):
        return compiled
    uses_sqrt = any(row[0] == V_SQRT for row in vcode)

    def source(mode: int) -> str:
        if exact_sqrt or not uses_sqrt:
            mode = SQRT_EXACT
        return generate(
            vcode,
            n_bound,
            list(program.stored),
            dtype,
            mode,
            fma,
            max_keep,
            state_dtypes=state,
            signed=signed,
        )

    def install(path: Path | None) -> None:
        if path is not None:
            function = _open(path).polyak_run
            compiled.set(ctypes.cast(function, ctypes.c_void_p).value)

    # Built before, by this process or another: loaded at once.
    known = SQRT_EXACT if exact_sqrt or not uses_sqrt else _known_sqrt_mode(kernel)
    if known is not None:
        library = cached(source(known), "program")
        if library is not None:
            install(library)
            return compiled
    _queue.submit(lambda: install(build(source(sqrt_mode(kernel)), "program")))
    return compiled


def wait(timeout: float | None = None) -> bool:
    """Wait until every program asked for so far is compiled (or failed); False on timeout."""
    return _queue.wait(timeout)
