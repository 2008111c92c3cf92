"""The toolchain that builds the kernel and the compiled programs, and where builds are kept.

Both builds share it: the C++ compiler and its flags, the CPU the code is built for (and so the
cache folder of this machine), the cache folders themselves, the C++ files of ``kernel/`` as the
compiler sees them, and the one routine that builds a library. That routine runs in a process
of its own session, detached from the one that started it, so that a process that ends before
its build leaves it to finish; it builds in a scratch folder under a lock that the operating
system releases when its holder dies, and renames the finished library into place, so a library
is there whole or not at all. The environment switches (``POLYAK_NATIVE``, ``POLYAK_COMPILE``)
are read here too, by one rule.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

#: The C++ files: the kernel, the prelude of compiled programs, the sqrt probe.
KERNEL_DIR = Path(__file__).with_name("kernel")
#: Values of an environment switch that turn it off.
_OFF = ("0", "false", "off", "no")


def switch(variable: str, default: bool) -> bool:
    """Whether the environment switch ``variable`` is on: unset or empty, ``default``; one of
    0, false, off, no (in any case), off; anything else, on."""
    value = os.environ.get(variable, "").strip().lower()
    return default if not value else value not in _OFF


_INCLUDE = re.compile(r'^#include "([^"]+)"[^\n]*\n', re.MULTILINE)


@functools.cache
def source(name: str) -> str:
    """A C++ file of ``kernel/`` as the compiler sees it: each file of ``kernel/`` that it
    includes (``#include "prelude.h"``) put in its place, so that a digest of the text covers
    every file the build reads."""
    text = (KERNEL_DIR / name).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: source(m.group(1)), text)


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
#: The kernel's flags. fopenmp: at::parallel_for is a header template over OpenMP; without it,
#: it runs serially.
KERNEL_FLAGS = [*FLAGS, "-fopenmp"]
#: A compiled program's flags (every rounding the one written), for a plain shared library.
PROGRAM_FLAGS = [*FLAGS, "-fno-trapping-math", "-fPIC", "-shared"]
#: Bumped whenever the generated code changes meaning, so that old builds are not reused.
VERSION = 7


def compiler() -> str | None:
    """The C++ compiler: ``CXX``, else the first of c++, g++, clang++ found; None if none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


_compiler_versions: dict[str, str] = {}


def compiler_version(cxx: str) -> str:
    """The first line of ``cxx --version`` (``cxx`` itself where it says nothing)."""
    if cxx not in _compiler_versions:
        try:
            done = subprocess.run(
                [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
            _compiler_versions[cxx] = done.stdout.splitlines()[0] if done.stdout else cxx
        except (OSError, subprocess.SubprocessError):
            _compiler_versions[cxx] = cxx
    return _compiler_versions[cxx]


def cpu_signature() -> str:
    """What identifies this CPU type for ``-march=native`` code: model name and feature flags."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if flags and model:
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{model or platform.processor()}|{flags}"


_VECTOR_MACROS = (
    ("__AVX512F__", "AVX-512 vectors, 16 floats"),
    ("__AVX2__", "AVX2 vectors, 8 floats"),
    ("__ARM_NEON", "NEON vectors, 4 floats"),
)


@functools.cache
def vector_target() -> str:
    """What compiled programs run on: the ``-march`` they are built for and the vectors that
    gives them (``-march=native: AVX-512 vectors, 16 floats``); asked of the compiler."""
    march = next((f for f in PROGRAM_FLAGS if f.startswith("-march=")), "-march=native")
    cxx = compiler()
    if cxx is None:
        return f"{march}: no C++ compiler"
    try:
        done = subprocess.run(
            [cxx, march, "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return f"{march}: unknown vectors"
    macros = set(line.split()[1] for line in done.stdout.splitlines() if line.count(" ") >= 1)
    for macro, name in _VECTOR_MACROS:
        if macro in macros and (macro != "__AVX2__" or "__FMA__" in macros):
            return f"{march}: {name}"
    return f"{march}: no whole vectors (per element, as the compiler vectorises)"


def cache_dir() -> Path:
    """Where builds are kept: ``POLYAK_CACHE_DIR``, else the user's cache folder."""
    root = os.environ.get("POLYAK_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "polyak"


_machine_keys: dict[str, str] = {}


def machine_key(cxx: str) -> str:
    """The cache's folder for this machine: CPU type, compiler, flags, torch and code version."""
    if cxx not in _machine_keys:
        parts = (str(VERSION), cpu_signature(), compiler_version(cxx), " ".join(PROGRAM_FLAGS))
        # The kernel is a Python extension: its build serves one Python version and torch.
        text = "|".join((*parts, torch.__version__, str(sys.implementation.cache_tag)))
        _machine_keys[cxx] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _machine_keys[cxx]


def roots() -> list[Path]:
    """The cache folders, in order: :func:`cache_dir`, then a per-user folder in the temporary
    directory, for a cache that cannot be written (a read-only home, a shared cache)."""
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return [cache_dir(), Path(tempfile.gettempdir()) / f"polyak-{user}"]


#: A scratch folder older than this belonged to a build that died (no build runs so long).
STALE_SECONDS = 3600.0

#: The detached build (argv: the library to make, the time limit in seconds, then the build's
#: command line, in which ``{scratch}`` stands for its scratch folder; on stdin, the files to
#: write into that folder first, as JSON): under the library's lock, unless the library is
#: there already, removes what dead builds left, runs the command in a fresh scratch folder
#: beside the library, and renames the library of the same name that the command made there
#: into place. Exits 0 when the library is there, 2 past the time limit, 1 otherwise, with the
#: build's output in ``<library>.log``.
_DRIVER = f"""
import json, os, shutil, subprocess, sys, time, pathlib
library = pathlib.Path(sys.argv[1])
limit = float(sys.argv[2])
command = sys.argv[3:]
files = json.loads(sys.stdin.read())  # a parent that died while writing them: no build
folder, stem = library.parent, library.stem
with open(library.with_suffix(".lock"), "a+b") as lock:
    try:
        import fcntl
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    except ImportError:
        pass
    if library.exists():
        sys.exit(0)
    # The only lock builders take is ours: a build tool's lock here is a dead build's, as are
    # this library's scratch folders, and any scratch folder past the age no build reaches.
    (folder / "lock").unlink(missing_ok=True)
    for old in folder.glob(".build-*"):
        try:
            dead = old.name.startswith(".build-" + stem + "-")
            if dead or time.time() - old.stat().st_mtime > {STALE_SECONDS}:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    scratch = folder / (".build-" + stem + "-" + str(os.getpid()))
    scratch.mkdir()
    for name, text in files.items():
        (scratch / name).write_text(text, encoding="utf-8")
    command = [arg.replace("{{scratch}}", str(scratch)) for arg in command]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=limit)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        output, code = "", 2
    built = scratch / library.name
    if code == 0 and built.exists():
        os.replace(built, library)
    else:
        library.with_suffix(".log").write_text(output, encoding="utf-8")
    shutil.rmtree(scratch, ignore_errors=True)
sys.exit(0 if library.exists() else (code if code == 2 else 1))
"""


def launch(
    library: Path, command: list[str], limit: float, files: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the detached build of ``library`` (see the module's docstring): ``command``, run in
    a scratch folder (``{scratch}`` in it) into which ``files`` (name: text) are written first,
    must make the library of the same name there, within ``limit`` seconds. Returns the
    process, whose exit status says how it went (0 built, 2 past the time limit, 1 failed, the
    output then in :func:`log`); raises OSError where the library's folder cannot be written.
    """
    library.parent.mkdir(parents=True, exist_ok=True)
    log(library).unlink(missing_ok=True)
    # Its own session: the build outlives this process, and a Ctrl-C here is not its.
    child = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(library), str(limit), *command],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert child.stdin is not None
    with child.stdin:
        child.stdin.write(json.dumps(files or {}).encode())
    return child


def log(library: Path) -> Path:
    """Where the output of a failed build of ``library`` is kept."""
    return library.with_suffix(".log")
