"""Building and loading the flat strategy's kernel (``_vm.cpp``).

No step waits for a compiler. Where the kernel is built already (by this machine, for this CPU
type, source, flags and torch version) it loads at once, from the cache folder or its per-user
fallback, even where that folder cannot be written. Otherwise the first step starts the build
in the background (one line on stderr says so and where it goes) and runs the reference path,
with the same numbers, until the kernel is ready; ``polyak build`` builds ahead, as does
``POLYAK_BUILD=eager`` at import.

The build runs torch's C++ extension tooling in a child process, under a lock that the
operating system releases when its holder dies, with a time limit: a build killed midway (a
Jupyter restart, the OOM killer) leaves neither a hung lock nor a half-built library behind,
and two processes share one build. Where the kernel cannot be had, one warning names the cause
and the fix. ``POLYAK_NATIVE=0`` (or ``false``, ``off``, ``no``) turns the kernel off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SOURCE = Path(__file__).with_name("_vm.cpp")


def _march() -> str:
    """The CPU the kernel and programs are built for: this one, or ``POLYAK_MARCH`` (a GCC
    ``-march`` value, such as ``x86-64-v3`` for every AVX2 machine of a cluster)."""
    return os.environ.get("POLYAK_MARCH", "").strip() or "native"


# fp-contract off: every rounding is the one written, so results match torch's kernels.
# no-math-errno: lets sqrt and fma vectorize; it changes no value.
FLAGS = ["-O3", f"-march={_march()}", "-ffp-contract=off"]
if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
    # Whole 512-bit vectors where the CPU has them (GCC otherwise prefers 256 on some).
    FLAGS.append("-mprefer-vector-width=512")
FLAGS += ["-fno-math-errno"]
# fopenmp: at::parallel_for is a header template over OpenMP; without it, it runs serially.
_FLAGS = [*FLAGS, "-fopenmp"]
#: Seconds a build may take before it is given up.
BUILD_TIMEOUT = 900.0
_FALSE = ("0", "false", "off", "no")

_lock = threading.Lock()
_module: Any = None
_failed: str | None = None  # why the kernel cannot be had
_warned = False
_builder: threading.Thread | None = None


def enabled() -> bool:
    """Whether the kernel may be used (``POLYAK_NATIVE`` is not one of 0, false, off, no)."""
    return os.environ.get("POLYAK_NATIVE", "1").strip().lower() not in _FALSE


@functools.cache
def _name() -> str:
    """The kernel module's name: a digest of its source and flags, read once per process."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:12]
    return f"polyak_vm_{digest}"


def _folders() -> list[Path]:
    """The kernel's build folder in each cache root, in order."""
    from polyak.strategies import _codegen

    cxx = _codegen._compiler() or "c++"
    return [root / _codegen._machine_key(cxx) / _name() for root in _codegen._roots()]


def _built() -> Path | None:
    for folder in _folders():
        library = folder / f"{_name()}.so"
        if library.exists():
            return library
    return None


def _import(library: Path) -> Any:
    spec = importlib.util.spec_from_file_location(_name(), library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold ``path`` locked against other processes; the lock dies with its holder."""
    with open(path, "a+b") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): builds may race, each renames its result
            pass
        yield


_BUILD_SCRIPT = """
import sys
import torch
from torch.utils import cpp_extension
name, source, folder = sys.argv[1:4]
flags = sys.argv[4:]
cpp_extension.load(name=name, sources=[source], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                   build_directory=folder, verbose=False)
"""


def _cause(output: str) -> str:
    """The line of a failed build's output that says why."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("error:", "Error:", "not found", "No such file"):
        for line in lines:
            if marker in line and len(line) < 300:
                return line
    return lines[-1][:300] if lines else "no output"


def build() -> str | None:
    """Build the kernel where it is not built yet, in a child process; None on success, else
    why it could not be built (one line, with the fix)."""
    from polyak.strategies import _codegen

    if _built() is not None:
        return None
    if _codegen._compiler() is None:
        return "no C++ compiler was found: install g++ or clang++ (or set CXX to one)"
    if shutil.which("ninja") is None and not _ninja_module():
        return "the ninja build tool is missing: pip install ninja"
    reasons = []
    for folder in _folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _exclusive(folder.with_suffix(".lock")):
                if (folder / f"{_name()}.so").exists():
                    return None  # another process built it meanwhile
                # We hold the only lock builders take, so torch's lock file, if there, is a
                # dead build's.
                (folder / "lock").unlink(missing_ok=True)
                command = [sys.executable, "-c", _BUILD_SCRIPT, _name(), str(_SOURCE)]
                done = subprocess.run(
                    [*command, str(folder), *_FLAGS],
                    capture_output=True,
                    text=True,
                    timeout=BUILD_TIMEOUT,
                    check=False,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            if done.returncode == 0 and (folder / f"{_name()}.so").exists():
                return None
            return f"the build failed ({_cause(done.stdout + done.stderr)})"
        except subprocess.TimeoutExpired:
            return f"the build took longer than {BUILD_TIMEOUT:.0f} s and was stopped"
        except OSError as error:
            reasons.append(f"{folder}: {error.strerror or error}")
    return (
        "no cache folder can be written ("
        + "; ".join(reasons)
        + "): set POLYAK_CACHE_DIR to a writable folder"
    )


def _die_with_parent() -> None:
    """In the build's child process: end when the process that started it ends."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ninja_module() -> bool:
    try:
        from torch.utils import cpp_extension

        return bool(cpp_extension.is_ninja_available())
    except Exception:
        return False


def _finish() -> None:
    global _module, _failed
    reason = build()
    with _lock:
        if reason is not None:
            _failed = reason
            return
        library = _built()
        try:
            _module = _import(library) if library is not None else None
            if _module is None:
                _failed = "the build left no library"
        except Exception as error:
            _failed = f"the built kernel could not be loaded ({type(error).__name__}: {error})"


def _start() -> None:
    global _builder
    if _builder is None:
        folder = _folders()[0]
        print(
            "polyak: building the flat kernel in the background (once per machine, about a "
            f"minute) into {folder}; steps run the reference path until it is ready",
            file=sys.stderr,
            flush=True,
        )
        _builder = threading.Thread(target=_finish, name="polyak-build-kernel", daemon=True)
        _builder.start()


def load(wait: bool = False) -> Any:
    """The compiled kernel module, or None while it is being built and where it cannot be had.

    Args:
        wait: wait for a build in progress (or start one and wait for it) instead of returning
            None meanwhile.
    """
    global _module, _failed
    if _module is not None:
        return _module
    if _failed is not None:
        _warn_once()
        return None
    builder = None
    with _lock:
        if _module is None and _failed is None:
            if not enabled():
                _failed = ""
                return None
            library = _built()
            if library is not None and _builder is None:
                try:
                    _module = _import(library)
                    return _module
                except Exception as error:
                    _failed = f"the cached kernel could not be loaded ({error})"
            else:
                _start()
            builder = _builder
    if wait and builder is not None:
        builder.join()
    if _failed:
        _warn_once()
    return _module


def _warn_once() -> None:
    global _warned
    if _warned or not _failed:
        return
    _warned = True
    # Attributed to the first frame outside polyak: the user's line that stepped.
    level, frame = 2, sys._getframe(1)
    package = str(Path(__file__).parents[1])
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level += 1
        frame = frame.f_back  # type: ignore[assignment]
    warnings.warn(
        f"polyak: the flat kernel is unavailable, so steps run the reference path (same "
        f"numbers, slower): {_failed}",
        RuntimeWarning,
        stacklevel=level,
    )


if os.environ.get("POLYAK_BUILD", "").strip().lower() == "eager" and enabled():
    load()
