"""Time ``optimizer.step()`` of polyak, torch.optim and peer libraries side by side.

All contenders of one optimizer and one set of parameter shapes (a *case*) run in the same
process, interleaved: after a few warm-up steps each, every round times one step of every
contender, in an order rotated by one each round, so that drifts of the machine (frequency,
other tenants, cache state) hit all contenders alike. The report gives the median step time of
each contender, the effective memory bandwidth it reaches (the bytes the update must move,
divided by the time), that bandwidth as a fraction of the machine's in-place bandwidth measured
in the same run, the speed relative to ``torch.optim`` with ``fused=True``, the peak memory
allocated during one step on top of what was there before, the size of the optimizer state and
the time of the very first step (which includes state allocation and any compilation).

The package: :mod:`~polyak.bench.cases` (the parameter shapes), :mod:`~polyak.bench.optimizers`
(which optimizers, and how each is driven, read off the classes), :mod:`~polyak.bench.contenders`
(torch's, polyak's and the peers'), :mod:`~polyak.bench.measure` (the yardstick, memory, the
machine), :mod:`~polyak.bench.runner` (one case, timed), :mod:`~polyak.bench.results` and
:mod:`~polyak.bench.report` (text and Markdown tables, and the page ``polyak bench --out``
writes); this module runs the whole benchmark.

Only torch and polyak are imported with this package; the peer libraries (torch-optimi, heavyball,
pytorch-optimizer) are imported when a benchmark runs, and any that cannot be imported is
reported as skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

import polyak
from polyak.bench.cases import CASES, DEFAULT_CASES, QUICK_SKIPS, Case, resolve_cases
from polyak.bench.contenders import (
    HEAVYBALL_MAX_TENSORS,
    PEER_LIBRARIES,
    PEER_OPTIMIZERS,
    REFERENCE,
    Contender,
    OptimizerFactory,
    contenders_for,
    import_peers,
)
from polyak.bench.measure import (
    BUSY_MS,
    MEMORY,
    cpu_description,
    default_threads,
    keep_busy,
    kernel_description,
    load_average,
    load_kernel,
    measure_bandwidth,
    state_bytes,
    step_peak_bytes,
)
from polyak.bench.optimizers import (
    CLASS_NAMES,
    CLOSURE_STEPS,
    HYPERPARAMETERS,
    MATRICES_ONLY,
    SETTINGS,
    SPARSE_GRADIENTS,
    SPARSE_ROW_EVERY,
    STATE_TENSORS,
    TENSORS_MOVED,
    case_for,
    needs,
)
from polyak.bench.report import (
    COLUMNS,
    SUMMARY_CONTENDER,
    format_case,
    format_environment,
    format_page,
    format_result,
    format_summary,
)
from polyak.bench.results import BenchResult, CaseResult, Environment, PeerStatus, Row
from polyak.bench.runner import (
    DEFAULT_MEMORY_BUDGET_GIB,
    DEFAULT_ROUNDS,
    DEFAULT_STEP_LIMIT,
    DEFAULT_WARMUP,
    IN_EVERY_BATCH,
    TEMPORARY_TENSORS,
    bench_case,
    plan_batches,
)

#: Defaults of :func:`run_benchmark`, shared with the command line.
DEFAULT_OPTIMIZERS = ("sgd", "adam", "adamw")
#: None: a sweep over 1 thread and every core (``1,2`` on a 2-core machine).
DEFAULT_THREADS: tuple[int, ...] | None = None
DEFAULT_BANDWIDTH_MIB = (64, 1024)
QUICK_ROUNDS = 5
QUICK_WARMUP = 2
QUICK_BANDWIDTH_MIB = (64,)

_GIB = 2**30

__all__ = [
    "BUSY_MS",
    "CASES",
    "CLASS_NAMES",
    "CLOSURE_STEPS",
    "COLUMNS",
    "DEFAULT_BANDWIDTH_MIB",
    "DEFAULT_CASES",
    "DEFAULT_MEMORY_BUDGET_GIB",
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_ROUNDS",
    "DEFAULT_STEP_LIMIT",
    "DEFAULT_THREADS",
    "DEFAULT_WARMUP",
    "HEAVYBALL_MAX_TENSORS",
    "HYPERPARAMETERS",
    "IN_EVERY_BATCH",
    "MATRICES_ONLY",
    "MEMORY",
    "PEER_LIBRARIES",
    "PEER_OPTIMIZERS",
    "QUICK_BANDWIDTH_MIB",
    "QUICK_ROUNDS",
    "QUICK_SKIPS",
    "QUICK_WARMUP",
    "REFERENCE",
    "SETTINGS",
    "SPARSE_GRADIENTS",
    "SPARSE_ROW_EVERY",
    "STATE_TENSORS",
    "SUMMARY_CONTENDER",
    "TEMPORARY_TENSORS",
    "TENSORS_MOVED",
    "BenchResult",
    "Case",
    "CaseResult",
    "Contender",
    "Environment",
    "OptimizerFactory",
    "PeerStatus",
    "Row",
    "bench_case",
    "case_for",
    "contenders_for",
    "cpu_description",
    "default_threads",
    "format_case",
    "format_environment",
    "format_page",
    "format_result",
    "format_summary",
    "import_peers",
    "iter_benchmark",
    "keep_busy",
    "kernel_description",
    "measure_bandwidth",
    "needs",
    "plan_batches",
    "run_benchmark",
    "state_bytes",
    "step_peak_bytes",
]


def iter_benchmark(
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    cases: Sequence[str | Case] = DEFAULT_CASES,
    *,
    rounds: int | None = None,
    warmup: int | None = None,
    threads: Sequence[int] | int | None = DEFAULT_THREADS,
    peers: bool = True,
    quick: bool = False,
    bandwidth_mib: Sequence[int] | None = None,
    memory_budget_gib: float = DEFAULT_MEMORY_BUDGET_GIB,
    step_limit: float = DEFAULT_STEP_LIMIT,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Iterator[Environment | CaseResult]:
    """Run the benchmark, yielding the environment first and then each result as it is ready.

    Args:
        optimizers: which optimizers, keys of :data:`CLASS_NAMES` (e.g. ``"adam"``).
        cases: case names from :data:`CASES`, or custom :class:`Case` objects.
        rounds: timed rounds per batch; None: 30, or 5 when ``quick``.
        warmup: warm-up steps per contender; None: 3, or 2 when ``quick``.
        threads: the thread counts to time every case at, with ``torch.set_num_threads``
            (restored afterwards); None: 1 and every core (:func:`default_threads`).
        peers: include the peer libraries that can be imported.
        quick: fewer rounds and warm-up steps, one bandwidth measurement, and no gpt2.
        bandwidth_mib: operand sizes, in MiB, to measure the in-place bandwidth at; the first
            is the reference. None: 64 and 1024, or only 64 when ``quick``.
        memory_budget_gib: GiB the contenders of one batch may hold together.
        step_limit: seconds; a contender whose warm-up step after the first takes longer is
            dropped from that case.
        seed: seeds the parameters and gradients.
        progress: called with a short line as each batch starts, or None.

    Yields:
        The :class:`Environment`, then one :class:`CaseResult` per (optimizer, case).

    Raises:
        ValueError: an unknown optimizer or case name.
    """
    for name in optimizers:
        if name not in CLASS_NAMES:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(CLASS_NAMES)}")
    selected = resolve_cases(cases)
    skipped: list[tuple[str, str]] = []
    if quick:
        skipped = [(c.name, "left out by quick mode") for c in selected if c.name in QUICK_SKIPS]
        selected = [c for c in selected if c.name not in QUICK_SKIPS]
    rounds = rounds if rounds is not None else (QUICK_ROUNDS if quick else DEFAULT_ROUNDS)
    warmup = warmup if warmup is not None else (QUICK_WARMUP if quick else DEFAULT_WARMUP)
    if bandwidth_mib is None:
        bandwidth_mib = QUICK_BANDWIDTH_MIB if quick else DEFAULT_BANDWIDTH_MIB
    if threads is None:
        sweep = default_threads()
    elif isinstance(threads, int):
        sweep = (threads,)
    else:
        sweep = tuple(threads)
    if not sweep or any(t < 1 for t in sweep):
        raise ValueError(f"thread counts must be positive, got {sweep}")
    previous_threads = torch.get_num_threads()
    try:
        at_start = load_average()
        # Steady state: the kernel is built before anything is timed.
        load_kernel()
        if progress is not None:
            progress("measuring the in-place bandwidth")
        torch.set_num_threads(sweep[-1])
        bandwidth = {mib: measure_bandwidth(mib) for mib in bandwidth_mib}
        # The package's PEER_LIBRARIES, which a caller may have set.
        peer_status = import_peers(PEER_LIBRARIES) if peers else {}
        yield Environment(
            torch_version=torch.__version__,
            polyak_version=polyak.__version__,
            threads=sweep,
            bandwidth=bandwidth,
            peers=tuple(peer_status.values()),
            rounds=rounds,
            warmup=warmup,
            skipped_cases=tuple(skipped),
            load_average=at_start,
            cpu=cpu_description(),
            kernel=kernel_description(),
            capability=torch.backends.cpu.get_cpu_capability(),
            torch_threads=previous_threads,
        )
        for name in optimizers:
            contenders = contenders_for(name, peer_status if peers else None)
            for case in selected:
                for count in sweep:
                    torch.set_num_threads(count)
                    result = bench_case(
                        name,
                        case,
                        contenders,
                        rounds=rounds,
                        warmup=warmup,
                        memory_budget=int(memory_budget_gib * _GIB),
                        step_limit=step_limit,
                        seed=seed,
                        progress=progress,
                    )
                    yield dataclasses.replace(result, threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(previous_threads)


def run_benchmark(
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    cases: Sequence[str | Case] = DEFAULT_CASES,
    **kwargs: Any,
) -> BenchResult:
    """Run the benchmark and collect everything it measured.

    Args:
        optimizers: which optimizers, keys of :data:`CLASS_NAMES` (e.g. ``"adam"``).
        cases: case names from :data:`CASES`, or custom :class:`Case` objects.
        **kwargs: the keyword arguments of :func:`iter_benchmark`.

    Returns:
        The environment and one result per (optimizer, case).
    """
    environment: Environment | None = None
    results: list[CaseResult] = []
    for item in iter_benchmark(optimizers, cases, **kwargs):
        if isinstance(item, Environment):
            environment = item
        else:
            results.append(item)
    assert environment is not None
    return BenchResult(environment, tuple(results))
