"""Building and loading the flat strategy's kernel (``_vm.cpp``).

No step waits for a compiler. Where the kernel is built already (by this machine, for this CPU
type, source, flags and torch version) it loads at once, from the cache folder or its per-user
fallback, even where that folder cannot be written. Otherwise the first step starts the build
in the background (one line on stderr says so and where it goes) and runs the reference path,
with the same numbers, until the kernel is ready; ``polyak build`` builds ahead, as does
``POLYAK_BUILD=eager`` at import.

The build runs torch's C++ extension tooling in a process of its own session, detached from the
one that started it: a script that ends before the build (a short run, a test, a demo) leaves
it to finish, and the next process finds the kernel built. It builds in a scratch folder under
a lock that the operating system releases when its holder dies, and renames the finished
library into place, so a library is there whole or not at all: a build killed midway (the OOM
killer, a reboot) leaves neither a hung lock nor a half-built library, and the next build
removes its scratch folder. Two processes share one build; each build has a time limit. Where
the kernel cannot be had, one warning names the cause and the fix. ``POLYAK_NATIVE=0`` (or
``false``, ``off``, ``no``) turns the kernel off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
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


#: Builds the kernel ``name`` from ``source`` into ``folder`` (argv[1:4]) with the flags after.
_BUILD_SCRIPT = """
import sys
import torch
from torch.utils import cpp_extension
name, source, folder = sys.argv[1:4]
flags = sys.argv[4:]
cpp_extension.load(name=name, sources=[source], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                   build_directory=folder, verbose=False)
"""

#: The detached build (argv: the build script, name, source, folder, time limit, flags...):
#: under the folder's lock, runs the build script in a scratch folder and renames the library
#: into the folder; exits 0 when the library is there, 2 past the time limit, 1 otherwise,
#: with the build's output in ``build.log``.
_DRIVER = """
import os, shutil, subprocess, sys, pathlib
script, name, source, folder, limit = sys.argv[1:6]
flags = sys.argv[6:]
folder = pathlib.Path(folder)
library = folder / (name + ".so")
with open(folder.with_suffix(".lock"), "a+b") as lock:
    try:
        import fcntl
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    except ImportError:
        pass
    if library.exists():
        sys.exit(0)
    # The only lock builders take is ours: what else is here is a dead build's.
    (folder / "lock").unlink(missing_ok=True)
    for old in folder.glob(".build-*"):
        shutil.rmtree(old, ignore_errors=True)
    scratch = folder / (".build-" + str(os.getpid()))
    scratch.mkdir()
    try:
        done = subprocess.run([sys.executable, "-c", script, name, source, str(scratch), *flags],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=float(limit))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        output, code = "", 2
    built = scratch / (name + ".so")
    if code == 0 and built.exists():
        os.replace(built, library)
    else:
        (folder / "build.log").write_text(output)
    shutil.rmtree(scratch, ignore_errors=True)
sys.exit(0 if library.exists() else (code if code == 2 else 1))
"""


def _cause(output: str) -> str:
    """The line of a failed build's output that says why."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("error:", "Error:", "not found", "No such file"):
        for line in lines:
            if marker in line and len(line) < 300:
                return line
    return lines[-1][:300] if lines else "no output"


def missing_tools() -> str | None:
    """Why the kernel cannot be built here (one line, with the fix), or None."""
    from polyak.strategies import _codegen

    if _codegen._compiler() is None:
        return "no C++ compiler was found: install g++ or clang++ (or set CXX to one)"
    if shutil.which("ninja") is None and not _ninja_module():
        return "the ninja build tool is missing: pip install ninja"
    return None


def build() -> str | None:
    """Build the kernel where it is not built yet, in a detached process, and wait for it;
    None on success, else why it could not be built (one line, with the fix)."""
    if _built() is not None:
        return None
    launched = _launch()
    return launched if isinstance(launched, str) else _outcome(*launched)


def _launch() -> tuple[subprocess.Popen[bytes], Path] | str:
    """Start the detached build: the process and the folder it builds into, or why it cannot
    start. It is started at once, by the caller, so that a process that ends right after its
    first step has started it."""
    missing = missing_tools()
    if missing is not None:
        return missing
    reasons = []
    for folder in _folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "build.log").unlink(missing_ok=True)
            command = [sys.executable, "-c", _DRIVER, _BUILD_SCRIPT, _name(), str(_SOURCE)]
            command += [str(folder), str(BUILD_TIMEOUT), *_FLAGS]
            # Its own session: the build outlives this process, and a Ctrl-C here is not its.
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            return child, folder
        except OSError as error:
            reasons.append(f"{folder}: {error.strerror or error}")
    return (
        "no cache folder can be written ("
        + "; ".join(reasons)
        + "): set POLYAK_CACHE_DIR to a writable folder"
    )


def _outcome(child: subprocess.Popen[bytes], folder: Path) -> str | None:
    """Wait for a detached build; None when the kernel is built, else why not."""
    code = child.wait()
    if code == 0 and (folder / f"{_name()}.so").exists():
        return None
    if code == 2:
        return f"the build took longer than {BUILD_TIMEOUT:.0f} s and was stopped"
    log = folder / "build.log"
    try:
        output = log.read_text() if log.exists() else ""
    except OSError:
        output = ""
    return f"the build failed ({_cause(output)})"


def _ninja_module() -> bool:
    try:
        from torch.utils import cpp_extension

        return bool(cpp_extension.is_ninja_available())
    except Exception:
        return False


def _finish(launched: tuple[subprocess.Popen[bytes], Path] | str) -> None:
    global _module, _failed
    reason = launched if isinstance(launched, str) else _outcome(*launched)
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


def _start(wait: bool) -> None:
    global _builder, _failed
    if _builder is not None:
        return
    launched = _launch()
    if isinstance(launched, str):  # no compiler, no ninja, no writable folder: nothing started
        _failed = launched
        return
    said = f"polyak: building the flat kernel into {launched[1]}"
    if wait:
        said += " (once per machine, about a minute)"
    else:
        said += (
            " in the background (once per machine, about a minute; it finishes even if this "
            "process ends); steps run the reference path, with the same numbers, until it is "
            "ready"
        )
    print(said, file=sys.stderr, flush=True)
    _builder = threading.Thread(
        target=_finish, args=(launched,), name="polyak-build-kernel", daemon=True
    )
    _builder.start()


def status() -> str:
    """The kernel's state in words: loaded, being built, turned off, or unavailable and why."""
    if _module is not None:
        return f"built and loaded ({Path(_module.__file__).parent})"
    if not enabled():
        return "turned off (POLYAK_NATIVE=0)"
    if _failed:
        return f"unavailable: {_failed}"
    if _builder is not None and _builder.is_alive():
        return f"being built into {_folders()[0]}"
    if _built() is not None:
        return "built, not loaded yet (the next CPU step loads it)"
    return "not built yet (the first CPU step starts its build; `polyak build` builds it now)"


def loaded() -> Any:
    """The kernel module where it is loaded already, else None; starts nothing."""
    return _module


def load(wait: bool = False, tick: Callable[[float], None] | None = None) -> Any:
    """The compiled kernel module, or None while it is being built and where it cannot be had.

    Args:
        wait: wait for a build in progress (or start one and wait for it) instead of returning
            None meanwhile.
        tick: while waiting, called about once a second with the seconds waited so far (a
            progress bar's update).
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
                _start(wait)
            builder = _builder
    if wait and builder is not None:
        started = time.monotonic()
        while builder.is_alive():
            builder.join(1.0)
            if tick is not None:
                tick(time.monotonic() - started)
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
