"""Tests of the optimizer-step benchmark and the ``polyak bench`` command."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import time
from pathlib import Path

import pytest
import torch

import polyak
from polyak import bench
from polyak.cli import main

TINY = bench.Case("tiny", ((64,), (8, 8), (3, 2, 2, 2)), "three small tensors")
ROUNDS = 3

TORCH_LABELS = [bench.MEMORY, "torch foreach=False", "torch foreach=True", bench.REFERENCE]
POLYAK_LABELS = [
    "polyak (default)",
    "polyak foreach=False",
    "polyak foreach=True",
    "polyak fused=True",
]


@pytest.fixture(scope="module")
def result() -> bench.BenchResult:
    return bench.run_benchmark(
        ["sgd", "adam", "adamw"],
        [TINY],
        rounds=ROUNDS,
        warmup=1,
        threads=1,
        peers=False,
        bandwidth_mib=(4,),
    )


def test_environment(result: bench.BenchResult) -> None:
    environment = result.environment
    assert environment.torch_version == torch.__version__
    assert environment.threads == (1,)
    assert environment.cpu
    assert environment.bandwidth and all(rate > 0 for rate in environment.bandwidth.values())
    assert environment.peers == ()
    assert environment.rounds == ROUNDS


def test_one_result_per_optimizer(result: bench.BenchResult) -> None:
    assert [(c.optimizer, c.case.name) for c in result.cases] == [
        ("sgd", "tiny"),
        ("adam", "tiny"),
        ("adamw", "tiny"),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_contenders_and_numbers(result: bench.BenchResult, index: int) -> None:
    case = result.cases[index]
    assert [row.label for row in case.rows] == TORCH_LABELS + POLYAK_LABELS
    assert case.bytes_moved == bench.TENSORS_MOVED[case.optimizer] * 4 * TINY.numel
    has_polyak = hasattr(polyak, bench.CLASS_NAMES[case.optimizer])
    for row in case.rows:
        if row.label.startswith("polyak") and not has_polyak:
            assert not row.ok
            assert row.error is not None
            continue
        assert row.ok, row.error
        assert len(row.times) == ROUNDS
        assert all(t > 0 for t in row.times)
        assert row.first_step is not None and row.first_step > 0
        assert row.speedup is not None and row.speedup > 0
        assert row.peak_extra_bytes is not None and row.peak_extra_bytes >= 0
        assert row.bandwidth_share is not None and row.bandwidth_share > 0
        assert row.state_bytes is not None
        if row.label != bench.MEMORY:
            assert row.state_bytes >= bench.STATE_TENSORS[case.optimizer] * 4 * TINY.numel
    assert case.row(bench.REFERENCE).speedup == 1.0
    assert case.row(bench.MEMORY).bandwidth_share == 1.0


def test_format(result: bench.BenchResult) -> None:
    text = bench.format_result(result)
    for label in TORCH_LABELS:
        assert label in text
    for column in bench.COLUMNS:
        assert column in text
    memory_line = next(line for line in text.splitlines() if line.startswith(bench.MEMORY))
    assert " 100% " in memory_line
    markdown = bench.format_result(result, markdown=True)
    assert "| contender | median ms |" in markdown
    assert "#### adamw / tiny" in markdown


def test_builtin_cases() -> None:
    assert len(bench.CASES["small"].shapes) == 2000
    assert len(bench.CASES["mlp"].shapes) == 16
    assert bench.CASES["mlp"].numel == 8 * (1024 * 1024 + 1024)
    assert len(bench.CASES["convnet"].shapes) == 48
    assert abs(bench.CASES["convnet"].numel - 12.5e6) < 0.1e6
    assert len(bench.CASES["gpt2"].shapes) == 148
    assert bench.CASES["gpt2"].numel == 124_439_808


def test_batches_keep_the_reference_rows() -> None:
    labels = ["a", bench.REFERENCE, "b", "c", bench.MEMORY, "d", "e"]
    batches = bench.plan_batches(labels, per_contender=10, budget=40)
    assert all(batch[:2] == [bench.REFERENCE, bench.MEMORY] for batch in batches)
    assert sorted(label for batch in batches for label in batch[2:]) == ["a", "b", "c", "d", "e"]
    assert all(len(batch) <= 4 for batch in batches)
    assert bench.plan_batches(labels, per_contender=1, budget=100) == [
        [bench.REFERENCE, bench.MEMORY, "a", "b", "c", "d", "e"]
    ]
    assert bench.plan_batches(["a", "b"], per_contender=10, budget=10) == [["a"], ["b"]]


def test_memory_batches_compare_within_batch() -> None:
    per_contender = TINY.numel * 4 * (2 + bench.STATE_TENSORS["sgd"] + bench.TEMPORARY_TENSORS)
    case = bench.bench_case(
        "sgd",
        TINY,
        bench.contenders_for("sgd"),
        rounds=2,
        warmup=1,
        memory_budget=3 * per_contender,
    )
    assert case.batches > 1
    for label in bench.IN_EVERY_BATCH:
        assert case.row(label).ok
        assert len(case.row(label).times) == 2 * case.batches
    assert all(row.speedup is not None for row in case.rows if row.ok)
    assert all(row.bandwidth_share is not None for row in case.rows if row.ok)


def test_a_failing_contender_is_reported() -> None:
    def broken(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        raise RuntimeError("cannot run here")

    contenders = [
        *bench.contenders_for("sgd")[:4],
        bench.Contender("broken", broken),
        bench.Contender("missing", None, "not installed"),
    ]
    case = bench.bench_case("sgd", TINY, contenders, rounds=2, warmup=1)
    assert case.row("broken").error == "RuntimeError: cannot run here"
    assert case.row("missing").error == "not installed"
    assert case.row(bench.REFERENCE).ok
    text = bench.format_case(case)
    assert "n/a broken: RuntimeError: cannot run here" in text


class _Sleepy(torch.optim.Optimizer):
    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        time.sleep(0.3)


def test_slow_and_too_many_tensors_are_left_out() -> None:
    contenders = [
        *bench.contenders_for("sgd")[:4],
        bench.Contender("sleepy", _Sleepy),
        bench.Contender("few", bench.contenders_for("sgd")[0].make, None, 1, "a reason"),
    ]
    case = bench.bench_case("sgd", TINY, contenders, rounds=2, warmup=2, step_limit=0.15)
    assert (case.row("sleepy").error or "").startswith("too slow: warm-up step 2 took")
    assert case.row("few").error == "left out above 1 tensors (3 here): a reason"
    assert case.row(bench.REFERENCE).ok


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        bench.run_benchmark(["sophia"], [TINY], peers=False)
    with pytest.raises(ValueError, match="unknown case"):
        bench.run_benchmark(["sgd"], ["resnet"], peers=False)


def test_step_peak_bytes_sees_temporaries() -> None:
    def allocate() -> None:
        a = torch.empty(2**20)
        del a
        torch.empty(2**19)

    peak = bench.step_peak_bytes(allocate)
    assert peak is not None
    assert 4 * 2**20 <= peak < 4.1 * 2**20


def test_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "PEER_LIBRARIES", ())
    assert (
        main(["bench", "--quick", "--cases", "small", "--optimizers", "sgd", "--rounds", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert "sgd / small: 2000 tensors" in out
    assert bench.REFERENCE in out


def test_cli_rejects_unknown_case(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "small,resnet"])
    assert "resnet" in capsys.readouterr().err


def test_a_default_run_sweeps_one_thread_and_every_core() -> None:
    assert bench.default_threads()[0] == 1
    assert bench.default_threads()[-1] == (os.cpu_count() or 1)


def test_each_case_runs_at_every_thread_count_of_the_sweep() -> None:
    ran = bench.run_benchmark(
        ["sgd"], [TINY], rounds=1, warmup=1, threads=(1, 2), peers=False, bandwidth_mib=(4,)
    )
    assert ran.environment.threads == (1, 2)
    assert [c.threads for c in ran.cases] == [1, 2]
    summary = bench.format_summary(ran.cases, markdown=True)
    assert summary.count("\n| sgd / tiny") == 2


def test_a_busy_machine_is_flagged_in_the_table(result: bench.BenchResult) -> None:
    case = dataclasses.replace(result.cases[0], load_average=3.0, threads=1)
    assert case.busy == pytest.approx(2.0)
    assert "WARNING: unreliable figures" in bench.format_case(case)
    assert "WARNING: unreliable figures" in bench.format_case(case, markdown=True)
    assert "busy" in bench.format_summary([case])
    quiet = dataclasses.replace(case, load_average=1.2)
    assert quiet.busy is None and "WARNING" not in bench.format_case(quiet)


def test_a_peer_that_cannot_be_imported_is_said_once_in_the_header() -> None:
    missing = bench.PeerStatus("nosuchpeer", "no-such-peer", None, "ModuleNotFoundError")
    labels = [c.label for c in bench.contenders_for("sgd", {"nosuchpeer": missing})]
    assert "nosuchpeer" not in labels


def test_an_optimizer_without_a_fused_torch_step_compares_with_torchs_fastest_path() -> None:
    ran = bench.run_benchmark(
        ["rprop"], [TINY], rounds=1, warmup=1, threads=1, peers=False, bandwidth_mib=(4,)
    )
    case = ran.cases[0]
    labels = [row.label for row in case.rows]
    assert bench.REFERENCE not in labels and "polyak fused=True" not in labels
    fastest = min(row.median for row in case.rows if row.label.startswith("torch ") and row.ok)
    assert case.row("polyak (default)").reference_median == fastest
    assert "fastest path" in bench.format_case(case)


@pytest.mark.parametrize("variant", ["amp", "dtensor", "channels_last"])
def test_grad_scaler_dtensor_and_channels_last_cases_step_every_contender(variant: str) -> None:
    import torch.distributed as dist

    if variant == "dtensor" and not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable")
    case = bench.Case(f"tiny-{variant}", (*TINY.shapes, (8, 4, 3, 3)), "tiny", variant)
    try:
        ran = bench.run_benchmark(
            ["adamw"], [case], rounds=1, warmup=2, threads=1, peers=False, bandwidth_mib=(4,)
        )
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    rows = {row.label: row for row in ran.cases[0].rows}
    for label in (bench.MEMORY, bench.REFERENCE, *POLYAK_LABELS):
        assert rows[label].ok, (label, rows[label].error)
    assert rows["polyak (default)"].state_bytes == rows[bench.REFERENCE].state_bytes > 0


def test_a_channels_last_case_lays_out_its_convolution_weights_so() -> None:
    tensors = bench.cases.tensors(bench.CASES["convnet-cl"], seed=0)
    weights = [t for t in tensors if t.dim() == 4]
    assert len(weights) == 16
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in weights)
    assert not all(t.is_contiguous() for t in weights)
    assert all(t.is_contiguous() for t in tensors if t.dim() < 4)


def test_optimizers_that_take_a_closure_matrices_or_sparse_gradients() -> None:
    """LBFGS steps with a closure, Muon and SparseAdam over the case's 2-D tensors (SparseAdam
    with sparse gradients); each against torch's one path."""
    ran = bench.run_benchmark(
        ["adafactor", "muon", "lbfgs", "sparseadam"],
        [TINY],
        rounds=1,
        warmup=1,
        threads=1,
        peers=False,
        bandwidth_mib=(4,),
    )
    by_name = {case.optimizer: case for case in ran.cases}
    assert [row.label for row in by_name["adafactor"].rows] == [
        bench.MEMORY,
        "torch foreach=False",
        "torch foreach=True",
        *POLYAK_LABELS[:3],
    ]
    for name in ("muon", "lbfgs", "sparseadam"):
        case = by_name[name]
        assert [row.label for row in case.rows] == [
            bench.MEMORY,
            "torch (default)",
            "polyak (default)",
        ]
        expected = (8, 8) if name != "lbfgs" else None
        assert expected is None or case.case.shapes == (expected,)
    for case in ran.cases:
        for row in case.rows:
            assert row.ok, (case.optimizer, row.label, row.error)
        assert case.row("polyak (default)").reference_median is not None
    lbfgs = by_name["lbfgs"].row("polyak (default)")
    assert lbfgs.state_bytes is not None and lbfgs.state_bytes > 0


def test_a_case_without_matrices_is_said_so_for_muon() -> None:
    vectors = bench.Case("vectors", ((16,), (4,)))
    ran = bench.run_benchmark(
        ["muon"], [vectors], rounds=1, warmup=1, threads=1, peers=False, bandwidth_mib=(4,)
    )
    assert all("2-D tensors" in (row.error or "") for row in ran.cases[0].rows)


def test_the_markdown_page_has_its_command_machine_and_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "benchmarks.md"
    argv = ["bench", "--quick", "--cases", "in-backward", "--optimizers", "sgd,rprop"]
    argv += ["--rounds", "1", "--threads", "1", "--no-peers", "--markdown", "--out", str(page)]
    assert main(argv) == 0
    text = page.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Benchmarks"
    assert f"- command: `polyak {shlex.join(argv)}`" in lines
    assert any(re.fullmatch(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", line) for line in lines)
    assert f"torch {torch.__version__}, polyak {polyak.__version__}, threads 1 " in text
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"- torch's CPU capability: {capability}" in lines
    assert any(line.startswith("- threads: every case at 1 ") for line in lines)
    assert any(line.startswith("- CPU: ") for line in lines)
    assert f"`{bench.MEMORY}`: `a.add_(b, alpha=0.5)`" in text
    headings = [line for line in lines if line.startswith("#")]
    assert headings[1:4] == ["## Summary", "## Cases and optimizers", "## Every contender"]
    assert [h.split(":")[0] for h in headings[4:]] == [
        "### sgd / in-backward",
        "### rprop / in-backward",
    ]
    # Every table: a header, its alignment row, then rows of as many cells.
    tables: list[list[str]] = []
    for previous, line in zip(["", *lines[:-1]], lines, strict=True):
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
    assert len(tables) == 3
    summary = tables[0]
    assert summary[0].startswith("| optimizer / case | threads | in-place add, same bytes |")
    assert "best peer" not in summary[0]
    names = [row.split(" | ")[0].split(" (busy")[0] for row in summary[2:]]
    assert names == ["| sgd / in-backward", "| rprop / in-backward"]
    for table in tables:
        assert set(table[1]) <= set("|:-")
        assert len({row.count("|") for row in table}) == 1, table
    assert "`in-backward`: 40 tensors, 83.2k parameters, 20 Linear(64, 64)" in text
    assert "- `sgd`: SGD(lr=0.001, momentum=0.9)" in lines
    assert "n/a torch fused=True: torch has no fused CPU step for Rprop" in text
    assert capsys.readouterr().out.startswith("- CPU: ")
