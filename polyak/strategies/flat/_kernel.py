"""Building and loading the kernel: the C++ extension (``kernel/kernel.cpp``) that runs plans.

No step waits for a compiler. Where the kernel is built already (by this machine, for this CPU
type, source, flags and torch version) it loads at once, from the cache folder or its per-user
fallback, even where that folder cannot be written. Otherwise the first step starts the build
in the background (one line on stderr says so and where it goes) and runs the reference path,
with the same numbers, until the kernel is ready; ``polyak build`` builds ahead, as does
``POLYAK_BUILD=eager`` at import.

The build runs torch's C++ extension tooling through the toolchain's detached, locked build
(see ``_toolchain.py``): a script that ends before the build (a short run, a test, a demo)
leaves it to finish, and the next process finds the kernel built; a build killed midway (the
OOM killer, a reboot) leaves neither a hung lock nor a half-built library. Two processes share
one build; each build has a time limit. Where the kernel cannot be had, one warning names the
cause and the fix. ``POLYAK_NATIVE=0`` (or ``false``, ``off``, ``no``) turns the kernel off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polyak.strategies.flat import _toolchain

_SOURCE = _toolchain.KERNEL_DIR / "kernel.cpp"
#: Seconds a build may take before it is given up.
BUILD_TIMEOUT = 900.0

_lock = threading.Lock()
_module: Any = None
_failed: str | None = None  # why the kernel cannot be had
_warned = False
_builder: threading.Thread | None = None


def enabled() -> bool:
    """Whether the kernel may be used (``POLYAK_NATIVE`` is not one of 0, false, off, no)."""
    return _toolchain.switch("POLYAK_NATIVE", True)


@functools.cache
def _name() -> str:
    """The kernel module's name: a digest of its source (every file it includes inlined) and
    flags, read once per process."""
    text = _toolchain.source(_SOURCE.name) + " ".join(_toolchain.KERNEL_FLAGS)
    return f"polyak_kernel_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _folders() -> list[Path]:
    """The kernel's build folder in each cache root, in order."""
    cxx = _toolchain.compiler() or "c++"
    return [root / _toolchain.machine_key(cxx) / _name() for root in _toolchain.roots()]


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
    if _toolchain.compiler() is None:
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
        command = [sys.executable, "-c", _BUILD_SCRIPT, _name(), str(_SOURCE), "{scratch}"]
        try:
            child = _toolchain.launch(
                folder / f"{_name()}.so", [*command, *_toolchain.KERNEL_FLAGS], BUILD_TIMEOUT
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
    log = _toolchain.log(folder / f"{_name()}.so")
    try:
        output = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
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


def failure() -> str | None:
    """Why the kernel cannot be had (empty where it is turned off), or None where nothing has
    said so yet."""
    return _failed


def needs_build() -> bool:
    """Whether loading the kernel would wait for its build: it is turned on, and neither loaded
    nor built."""
    return _module is None and enabled() and _built() is None


def load(wait: bool = False, tick: Callable[[float], None] | None = None) -> Any:
    """The kernel module, or None while it is being built and where it cannot be had.

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
    package = str(Path(__file__).parents[2])
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
