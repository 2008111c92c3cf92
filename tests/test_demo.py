"""Tests of the digits demo and the ``polyak demo`` command."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from polyak.cli import format_demo, main
from polyak.demo import DemoResult, run_demo
from polyak.strategies.flat import _kernel

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCHS = 3
BATCH_SIZE = 32


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    out = tmp_path_factory.mktemp("demo") / "loss.png"
    return run_demo(epochs=EPOCHS, batch_size=BATCH_SIZE, out=out, progress=False)


def test_writes_png(result: DemoResult) -> None:
    assert result.png_path.is_file()
    assert result.png_path.read_bytes().startswith(PNG_SIGNATURE)


def test_both_optimizers_learn(result: DemoResult) -> None:
    assert result.polyak_accuracy > 0.85
    assert result.torch_accuracy > 0.85


def test_bit_exact_with_torch(result: DemoResult) -> None:
    assert result.max_param_diff == 0.0
    assert result.polyak_run.losses == result.torch_run.losses


def test_losses_and_step_times_per_step(result: DemoResult) -> None:
    steps = EPOCHS * math.ceil(result.n_train / BATCH_SIZE)
    assert result.epochs * result.steps_per_epoch == steps
    for run in (result.polyak_run, result.torch_run):
        assert len(run.losses) == steps
        assert len(run.step_times) == steps
        assert all(math.isfinite(loss) for loss in run.losses)
        assert run.median_step_time > 0


def test_states_the_strategy_that_ran(result: DemoResult) -> None:
    run = result.polyak_run
    steps = len(run.step_times)
    assert result.torch_run.flat_steps == 0
    assert result.torch_run.strategy == "for-loop"
    if _kernel.load() is None:
        assert run.flat_steps == 0
        assert run.strategy == "for-loop: the flat kernel is not available"
    else:
        # Not the first step, which creates the momentum buffers on the reference path.
        assert 1 <= run.flat_steps <= steps - 1
        rest = steps - run.flat_steps
        assert run.strategy == (
            f"flat kernel on {run.flat_steps} of {steps} steps, {rest} on the reference path"
        )


def test_without_the_kernel_the_summary_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo says the kernel is unavailable and why (no compiler here)."""
    monkeypatch.setattr(_kernel, "_module", None)
    monkeypatch.setattr(_kernel, "_failed", "no C++ compiler was found: install g++")
    monkeypatch.setattr(_kernel, "_warned", True)
    result = run_demo(epochs=1, out=tmp_path / "x.png", progress=False)
    assert result.polyak_run.flat_steps == 0
    assert result.polyak_run.strategy == (
        "for-loop: the flat kernel is unavailable: no C++ compiler was found: install g++"
    )
    assert result.max_param_diff == 0.0


def test_summary_shows_first_step_and_strategy(result: DemoResult) -> None:
    lines = format_demo(result).splitlines()
    header = next(line for line in lines if line.startswith("optimizer "))
    assert header.split() == [
        "optimizer",
        "test",
        "acc",
        "median",
        "step",
        "first",
        "step",
        "strategy",
    ]
    for run in (result.polyak_run, result.torch_run):
        assert run.first_step_time == run.step_times[0] > 0
        row = next(line for line in lines if line.startswith(run.name + " "))
        assert row.endswith("  " + run.strategy)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        run_demo(epochs=0, out=tmp_path / "x.png", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        run_demo(batch_size=0, out=tmp_path / "x.png", progress=False)


def test_cli_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plots" / "loss.png"
    assert main(["demo", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert any(line.startswith("polyak.SGD ") and "%" in line for line in lines)
    assert any(line.startswith("torch.optim.SGD ") and "%" in line for line in lines)
    assert "max |param difference|: 0 (identical)" in lines
    assert f"loss curves: {out}" in lines
    assert captured.err == ""


def test_cli_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = tmp_path / "loss.png"
    assert main(["demo", "--epochs", "1", "--no-progress", "--out", str(out)]) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "tqdm" in err
    assert "pip install scikit-learn matplotlib tqdm" in err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_cli_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
