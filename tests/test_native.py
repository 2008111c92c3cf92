"""Building the kernel: never a hang, never a half-built library, one clear line on failure;
and its source numbering what Python numbers as Python does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from polyak.strategies import flat
from polyak.strategies.flat import _kernel, _toolchain

_FAKE_BUILD = "import sys, pathlib; pathlib.Path(sys.argv[3], sys.argv[1] + '.so').write_text('')"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setattr(_toolchain, "roots", lambda: [root])
    return root


def _build_in_thread(timeout: float) -> str | None:
    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(_kernel.build()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the build hung"
    return outcome[0]


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork and SIGKILL")
def test_a_build_killed_midway_leaves_the_next_one_working(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _kernel._folders()[0]
    folder.mkdir(parents=True)
    # A build that holds the lock and has left torch's lock file, killed with SIGKILL.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time, pathlib\n"
            "folder = pathlib.Path(sys.argv[1])\n"
            "with open(folder / (folder.name + '.lock'), 'a+b') as lock:\n"
            "    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)\n"
            "    (folder / 'lock').write_text('')\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(120)\n",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    monkeypatch.setattr(_kernel, "_BUILD_SCRIPT", _FAKE_BUILD)
    assert _build_in_thread(timeout=60) is None
    assert not (folder / "lock").exists()
    assert _kernel._built() == folder / f"{_kernel._name()}.so"


def test_a_build_past_its_time_limit_is_stopped(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_kernel, "_BUILD_SCRIPT", "import time; time.sleep(60)")
    monkeypatch.setattr(_kernel, "BUILD_TIMEOUT", 1.0)
    started = time.monotonic()
    reason = _build_in_thread(timeout=50)
    assert reason is not None and "longer than 1 s" in reason
    assert time.monotonic() - started < 50
    assert _kernel._built() is None


def test_no_compiler_is_one_line_with_the_fix(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_toolchain, "compiler", lambda: None)
    reason = _kernel.build()
    assert reason is not None and "\n" not in reason
    assert "no C++ compiler" in reason and "install" in reason


def test_an_unwritable_cache_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a file where a folder must go
    monkeypatch.setattr(_toolchain, "roots", lambda: [blocked])
    reason = _kernel.build()
    assert reason is not None and "POLYAK_CACHE_DIR" in reason


def test_a_failed_build_names_its_cause(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        _kernel, "_BUILD_SCRIPT", "import sys; sys.exit('error: something.h: No such file')"
    )
    reason = _kernel.build()
    assert reason is not None and "something.h" in reason and "\n" not in reason


def test_a_build_in_a_read_only_cache_is_loaded_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second root holds a build; the first cannot be written: found without writing."""
    blocked, shared = tmp_path / "blocked", tmp_path / "shared"
    blocked.write_text("")
    monkeypatch.setattr(_toolchain, "roots", lambda: [blocked, shared])
    folder = _kernel._folders()[1]
    folder.mkdir(parents=True)
    library = folder / f"{_kernel._name()}.so"
    library.write_text("")
    folder.chmod(0o555)
    try:
        assert _kernel._built() == library
        assert _kernel.build() is None
    finally:
        folder.chmod(0o755)


def test_steps_switch_to_the_kernel_once_its_build_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    import polyak

    vm = _kernel.load(wait=True)
    if vm is None:
        pytest.skip("the flat kernel is unavailable")
    monkeypatch.setattr(_kernel, "_module", None)
    monkeypatch.setattr(_kernel, "_builder", threading.Thread(target=lambda: None))
    p = torch.nn.Parameter(torch.ones(10))
    opt = polyak.SGD([p], lr=0.1, momentum=0.9)
    for _ in range(3):
        p.grad = torch.ones(10)
        opt.step()
    assert all(e.plan is None for e in flat.entries(opt))
    monkeypatch.setattr(_kernel, "_module", vm)  # the background build is done
    p.grad = torch.ones(10)
    opt.step()
    assert all(e.plan is not None for e in flat.entries(opt))


_SLOW_BUILD = (
    "import sys, time, pathlib; time.sleep(3); "
    "pathlib.Path(sys.argv[3], sys.argv[1] + '.so').write_text('')"
)


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL")
@pytest.mark.parametrize("how", ["killed", "exits"])
def test_a_build_finishes_after_the_process_that_started_it_ends(tmp_path: Path, how: str) -> None:
    """The kernel's build is detached: killed or ended normally, the process that started it
    leaves it to finish, whole, and the next process finds the kernel built."""
    cache = tmp_path / "cache"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, os, threading\n"
            "from polyak.strategies.flat import _kernel\n"
            f"_kernel._BUILD_SCRIPT = {_SLOW_BUILD!r}\n"
            "_kernel._start(wait=False)\n"
            "print(_kernel._folders()[0], flush=True)\n"
            "if sys.argv[1] == 'killed':\n"
            "    threading.Event().wait(60)\n",
            how,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "POLYAK_CACHE_DIR": str(cache)},
    )
    assert starter.stdout is not None
    folder = Path(starter.stdout.readline().strip())
    library = folder / f"{folder.name}.so"
    if how == "killed":
        time.sleep(1.0)  # the build has started
        os.kill(starter.pid, signal.SIGKILL)
    starter.wait(timeout=30)
    assert not library.exists()  # the build still runs
    deadline = time.monotonic() + 60
    while not library.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert library.exists()
    assert not list(folder.glob(".build-*"))  # the scratch folder is gone


def test_a_half_built_library_is_never_taken_for_a_built_one(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that dies leaves its scratch folder, which is not the library and is removed by
    the next build."""
    folder = _kernel._folders()[0]
    dead = folder / f".build-{_kernel._name()}-12345"
    dead.mkdir(parents=True)
    (dead / f"{_kernel._name()}.so").write_text("half written")
    assert _kernel._built() is None
    monkeypatch.setattr(_kernel, "_BUILD_SCRIPT", _FAKE_BUILD)
    assert _build_in_thread(timeout=60) is None
    assert _kernel._built() == folder / f"{_kernel._name()}.so"
    assert not dead.exists()


def test_without_a_compiler_nothing_says_a_build_started(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No 'building' line, then a warning that says why not: only the warning."""
    monkeypatch.setattr(_toolchain, "compiler", lambda: None)
    monkeypatch.setattr(_kernel, "_module", None)
    monkeypatch.setattr(_kernel, "_failed", None)
    monkeypatch.setattr(_kernel, "_warned", False)
    monkeypatch.setattr(_kernel, "_builder", None)
    monkeypatch.setattr(_kernel, "_built", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert _kernel.load() is None
    assert "building" not in capsys.readouterr().err
    assert "no C++ compiler" in _kernel.status()


def _enum(source: str, name: str, prefix: str) -> dict[str, int]:
    """The entries ``PREFIX_NAME = number`` of the C++ enum ``name`` in ``source``."""
    match = re.search(rf"enum {name} : int64_t \{{(.*?)\}};", source, re.DOTALL)
    assert match is not None, name
    entries = re.findall(rf"\b({prefix}\w+) = (\d+)", match.group(1))
    return {entry: int(value) for entry, value in entries}


def test_the_kernel_numbers_the_opcodes_and_its_answers_as_python_does() -> None:
    """The opcodes are numbered once in Python (``_program.py``) and written again in the
    kernel's enums; the answers of a plan's step likewise (``flat``'s ``_DONE``...)."""
    from polyak.strategies import flat
    from polyak.strategies.flat import _program

    source = _toolchain.source("kernel.cpp")
    for enum, prefix in (("VOp", "V_"), ("SOp", "S_")):
        in_cpp = _enum(source, enum, prefix)
        in_python = {
            name: value
            for name, value in vars(_program).items()
            if name.startswith(prefix) and isinstance(value, int)
        }
        assert in_cpp == in_python
    assert f"constexpr int kMaxRegs = {_program.MAX_VREGS};" in source
    answers = dict(re.findall(r"constexpr int64_t k(Done|Fallback|Stale|Reload) = (\d+);", source))
    assert {name.upper(): int(value) for name, value in answers.items()} == {
        name: getattr(flat, f"_{name}") for name in ("DONE", "FALLBACK", "STALE", "RELOAD")
    }


def test_what_a_build_compiles_is_what_its_cache_key_hashes() -> None:
    """Each C++ file's text, as the cache keys hash it, has the files it includes from
    ``kernel/`` in their place: a change to any of them is a new key."""
    for path in sorted(_toolchain.KERNEL_DIR.iterdir()):
        text = _toolchain.source(path.name)
        assert '#include "' not in text, path.name
    assert _toolchain.source("prelude.h") in _toolchain.source("sqrt_probe.cpp")
    kernel = _toolchain.source("kernel.cpp")
    for part in ("interpret.h", "plan.h", "check.h"):
        assert _toolchain.source(part) in kernel
