"""The quality benchmark's machinery, on a tiny model for a few steps: every variant trains,
stores what it claims to store, and the report and the plot come out."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from polyak.bench import quality
from polyak.bench.quality import QualityConfig, QualityResult, run_quality
from polyak.bench.quality_report import COLUMNS, format_quality, plot_quality
from polyak.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The first weight matrix has context x embedding x hidden = 8 x 16 x 32 = 4096 elements: just
# large enough for 8-bit state (min_8bit_size), while the biases keep theirs in float32.
TINY = QualityConfig(steps=40, batch_size=32, context=8, embedding=16, hidden=32)
EIGHT_BIT_MATRIX = "2.weight"


@pytest.fixture(scope="module")
def result() -> QualityResult:
    return run_quality(config=TINY, warm=False)


def test_every_variant_runs_and_learns(result: QualityResult) -> None:
    assert [run.variant.key for run in result.runs] == list(quality.DEFAULT_VARIANTS)
    for run in result.runs:
        assert len(run.losses) == TINY.steps
        assert all(math.isfinite(loss) for loss in run.losses), run.variant.key
        assert all(math.isfinite(loss) for _, loss in run.evaluations), run.variant.key
        assert run.evaluations[-1][0] == TINY.steps
        # From about ln(128) = 4.85 nats at the start.
        assert run.final_loss < sum(run.losses[:5]) / 5 - 0.1, run.variant.key
        assert run.validation_loss < run.evaluations[0][1], run.variant.key


def test_same_start_and_batches_for_every_variant(result: QualityResult) -> None:
    first = {run.variant.key: run.losses[0] for run in result.runs}
    # float32 parameters: the same weights and the same first batch, the same loss exactly.
    assert first["fp32"] == first["8bit"] == first["bf16-state"]
    # bfloat16 parameters: the same weights rounded, the same batch.
    for key in ("bf16-kahan", "bf16-sr", "bf16"):
        assert first[key] == pytest.approx(first["fp32"], rel=0.01)
    assert first["bf16-kahan"] == first["bf16-sr"] == first["bf16"]


def test_parameters_and_state_are_stored_as_claimed(result: QualityResult) -> None:
    runs = {run.variant.key: run for run in result.runs}
    for key, run in runs.items():
        expected = run.variant.param_dtype
        assert set(run.param_dtypes.values()) == {expected}, key
        assert run.largest == EIGHT_BIT_MATRIX
    matrix = {key: run.state_dtypes[EIGHT_BIT_MATRIX] for key, run in runs.items()}
    moments = ("exp_avg", "exp_avg_sq")
    assert all(matrix["fp32"][k] == torch.float32 for k in moments)
    assert all(matrix["8bit"][k] == torch.uint8 for k in moments)
    assert matrix["8bit"]["exp_avg_absmax"] == torch.float32
    assert all(matrix["bf16-state"][k] == torch.bfloat16 for k in moments)
    for key in ("bf16-kahan", "bf16-sr", "bf16"):
        assert all(matrix[key][k] == torch.bfloat16 for k in moments), key
    assert matrix["bf16-kahan"]["kahan_comp"] == torch.bfloat16
    assert "kahan_comp" not in matrix["bf16-sr"] and "kahan_comp" not in matrix["bf16"]
    # Tensors under min_8bit_size keep their state in their own dtype.
    assert runs["8bit"].state_dtypes["2.bias"]["exp_avg"] == torch.float32
    per_param = {key: run.state_bytes / run.parameters for key, run in runs.items()}
    assert per_param["fp32"] == pytest.approx(8, abs=0.01)
    assert per_param["bf16-kahan"] == pytest.approx(6, abs=0.01)
    assert per_param["8bit"] < 4


def test_table_has_a_row_per_variant(result: QualityResult) -> None:
    text = format_quality(result, markdown=True)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(result.runs)
    assert table[0].count("|") == len(COLUMNS) + 1
    for run, row in zip(result.runs, table[2:], strict=True):
        assert row.startswith(f"| {run.variant.label} |")
    plain = format_quality(result)
    assert all(run.variant.label in plain for run in result.runs)


def test_plot_is_written(result: QualityResult, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = plot_quality(result, tmp_path / "nested" / "quality.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    argv = ["quality", "--variants", "fp32,bf16", "--steps", "2", "--threads", "2", "--markdown"]
    threads = torch.get_num_threads()
    assert main([*argv, "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "| fp32 AdamW |" in printed and "| bf16, plain |" in printed
    assert "2 torch threads," in printed
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_unknown_variant_and_bad_config() -> None:
    with pytest.raises(ValueError, match="unknown variant 'fp8'"):
        run_quality(["fp8"], TINY)
    with pytest.raises(ValueError, match="Invalid steps value: 0"):
        QualityConfig(steps=0)
