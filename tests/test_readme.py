"""The README's quickstart runs as written, and says which path its steps took."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the quickstart has no Python block"
    return match.group(1)


def test_the_quickstart_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_quickstart(), "README quickstart", "exec"), {"__name__": "__quickstart__"})
    report = out.getvalue()
    assert report.startswith("SGD: flat kernel ") and "group 0 (2 parameters): " in report
    assert (tmp_path / "opt.pt").exists()
