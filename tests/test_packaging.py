"""The package as a user installs it: its license metadata and the type hints a checker reads."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

import polyak

ROOT = Path(__file__).resolve().parent.parent

# A user's file, type-checked outside the source tree, so that only the installed package can
# answer ``import polyak``. The one error in it is visible only through polyak's own hints.
USER_FILE = """\
import polyak

opt = polyak.SGD([], lr=0.1, nesterov="yes")
"""
EXPECTED_ERROR = (
    'user.py:3: error: Argument "nesterov" to "SGD" has incompatible type "str"; '
    'expected "bool"  [arg-type]'
)
# torch is left unread: checking it takes tens of seconds and proves nothing about polyak.
MYPY_CONFIG = """\
[mypy]
strict = True

[mypy-torch.*]
follow_imports = skip
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}


def _installed_polyak(cwd: Path) -> Path | None:
    """Where ``import polyak`` leads from outside the source tree, or None if nowhere."""
    result = subprocess.run(
        [sys.executable, "-c", "import polyak; print(polyak.__file__)"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_clean_env(),
        check=False,
    )
    return Path(result.stdout.strip()).resolve() if result.returncode == 0 else None


def test_type_checkers_see_the_installed_hints(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    installed = _installed_polyak(tmp_path)
    if installed is None or installed != Path(polyak.__file__).resolve():
        pytest.skip("this source tree is not the installed polyak")
    (tmp_path / "user.py").write_text(USER_FILE)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            "mypy.ini",
            "--cache-dir",
            "cache",
            "user.py",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        check=False,
    )
    lines = result.stdout.splitlines()
    assert EXPECTED_ERROR in lines, (
        f"mypy did not read polyak's hints (reinstall with: pip install -r "
        f"requirements-dev.txt):\n{result.stdout}{result.stderr}"
    )
    assert lines[-1] == "Found 1 error in 1 file (checked 1 source file)", result.stdout


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_license_is_declared_and_shipped() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-3-Clause"
    for name in project["license-files"]:
        text = (ROOT / name).read_text()
        assert "BSD 3-Clause License" in text
        assert "the polyak authors" in text


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_the_kernels_cpp_files_ship_in_the_wheel() -> None:
    """Every C and C++ file of the package (the kernel, the prelude of compiled programs, the
    sqrt probe), which the builds read from the installed package, is package data."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = tool["package-data"]["polyak"]
    package = ROOT / "polyak"
    sources = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.suffix in (".c", ".cc", ".cpp", ".h", ".hpp")
    ]
    assert "strategies/flat/kernel/kernel.cpp" in sources
    unshipped = [s for s in sources if not any(fnmatch.fnmatch(s, p) for p in patterns)]
    assert not unshipped, f"add them to [tool.setuptools.package-data]: {unshipped}"
