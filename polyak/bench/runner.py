"""One (optimizer, case) timed: contenders in memory-limited batches, each batch set up, warmed
up, profiled, and timed in interleaved rounds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from polyak.bench.cases import Case, tensors
from polyak.bench.contenders import REFERENCE, Contender, OptimizerFactory
from polyak.bench.measure import (
    MEMORY,
    InPlaceAdd,
    keep_busy,
    load_average,
    state_bytes,
    step_peak_bytes,
    wait_for_programs,
)
from polyak.bench.optimizers import (
    CLASS_NAMES,
    STATE_TENSORS,
    TENSORS_MOVED,
    Needs,
    case_for,
    needs,
    quadratic_closure,
    sparse_rows,
)
from polyak.bench.results import CaseResult, Row, describe

DEFAULT_ROUNDS = 30
DEFAULT_WARMUP = 3
DEFAULT_MEMORY_BUDGET_GIB = 8.0

#: The rows that run in every memory-limited batch, so that each batch has its own.
IN_EVERY_BATCH = (REFERENCE, MEMORY)

#: Parameter-sized temporaries allowed for when sizing memory-limited batches.
TEMPORARY_TENSORS = 1

#: A contender whose warm-up step after the first takes longer than this, in seconds, is
#: dropped from the case rather than timed over every round.
DEFAULT_STEP_LIMIT = 10.0

_GIB = 2**30


class _Scaled:
    """An optimizer stepped as a mixed-precision loop steps it: ``scaler.step``, then
    ``scaler.update``. A fused optimizer unscales in its step; others are unscaled first."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2**30)
        self.scaler.scale(torch.ones(()))  # makes the scale tensor
        self.state = optimizer.state
        self.param_groups = optimizer.param_groups

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()


def plan_batches(labels: Sequence[str], per_contender: int, budget: int) -> list[list[str]]:
    """Split contenders into batches that fit a memory budget, each holding the reference rows.

    Args:
        labels: the contenders' labels, the rows of :data:`IN_EVERY_BATCH` among them or not.
        per_contender: the bytes one contender is expected to hold.
        budget: the bytes all contenders of a batch may hold together.

    Returns:
        The batches, in order; every batch starts with those of :data:`IN_EVERY_BATCH` that are
        in ``labels``, in that order.
    """
    kept = [label for label in IN_EVERY_BATCH if label in labels]
    others = [label for label in labels if label not in IN_EVERY_BATCH]
    size = max(len(kept) + 1, budget // max(per_contender, 1))
    room = size - len(kept)
    batches = [others[i : i + room] for i in range(0, len(others), room)] or [[]]
    return [[*kept, *batch] for batch in batches]


class _PerTensor:
    """One optimizer per parameter, stepped one after another (see :attr:`Case.per_tensor`)."""

    def __init__(self, make: OptimizerFactory, params: list[Tensor]) -> None:
        self.optimizers = [make([p]) for p in params]

    @property
    def state(self) -> dict[Any, Any]:
        return {k: v for opt in self.optimizers for k, v in opt.state.items()}

    def step(self) -> None:
        # Autograd runs the hooks that step them with grad mode off.
        with torch.no_grad():
            for opt in self.optimizers:
                opt.step()


class _TooSlowError(Exception):
    """A contender's steps take longer than the step limit."""


class _Live:
    """A contender during a batch: its parameters, gradients and optimizer, and the closure its
    steps take, if any."""

    def __init__(
        self,
        row: Row,
        params: list[Tensor],
        grads: list[Tensor],
        optimizer: Any,
        closure: Callable[[], float] | None = None,
    ):
        self.row = row
        self.params = params
        self.grads = grads
        self.optimizer = optimizer
        self.closure = closure

    def load_grads(self) -> None:
        """Give every parameter its pre-made gradient again."""
        for param, grad in zip(self.params, self.grads, strict=True):
            param.grad = grad

    def step(self) -> None:
        """One step of the optimizer, with the closure where it takes one."""
        if self.closure is None:
            self.optimizer.step()
        else:
            self.optimizer.step(self.closure)

    def timed_step(self) -> float:
        """Run one step with fresh gradients and return its wall time in seconds."""
        self.load_grads()
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start


def bench_case(
    optimizer: str,
    case: Case,
    contenders: Sequence[Contender],
    *,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    memory_budget: int = int(DEFAULT_MEMORY_BUDGET_GIB * _GIB),
    step_limit: float = DEFAULT_STEP_LIMIT,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CaseResult:
    """Time every contender of one optimizer on one case, interleaved.

    Each contender gets its own parameters and gradients (the same seeded values for all), so
    that a library which frees or modifies gradients, or keeps extra state, affects only
    itself. When all contenders' parameters, gradients, state and temporaries would not fit in
    ``memory_budget``, they run in consecutive batches that each include the reference, and
    every contender is compared with the reference of its own batch.

    Args:
        optimizer: a key of :data:`CLASS_NAMES`; sets the bytes a step must move, and how its
            steps are driven (:func:`~polyak.bench.optimizers.needs`).
        case: the parameter shapes.
        contenders: who takes part; those with ``unavailable`` set get an empty row.
        rounds: timed rounds per batch; each times one step of every contender.
        warmup: untimed steps per contender before the rounds (at least 1); the first is
            reported as ``first_step``.
        memory_budget: bytes the contenders of one batch may hold together.
        step_limit: seconds; a contender whose warm-up step after the first takes longer is
            dropped with an n/a row instead of being timed.
        seed: seeds the parameters and gradients.
        progress: called with a short line as each batch starts, or None.

    Returns:
        The result, with one row per contender in the given order.
    """
    case = case_for(optimizer, case)
    element = torch.tensor([], dtype=torch.float32).element_size()
    param_bytes = case.numel * element
    per_contender = param_bytes * (2 + STATE_TENSORS[optimizer] + TEMPORARY_TENSORS)
    rows = {c.label: Row(c.label, error=c.unavailable) for c in contenders}
    if not case.shapes:
        none = f"{CLASS_NAMES[optimizer]} takes 2-D tensors; this case has none"
        for row in rows.values():
            row.error = row.error or none
    for c in contenders:
        if c.unavailable is None and c.max_tensors is not None and len(case.shapes) > c.max_tensors:
            rows[c.label].error = (
                f"left out above {c.max_tensors} tensors ({len(case.shapes)} here): "
                + c.why_max_tensors
            )
    makers = {
        c.label: c.make for c in contenders if rows[c.label].error is None and c.make is not None
    }
    batches = plan_batches(list(makers), per_contender, memory_budget)
    for index, batch in enumerate(batches):
        if progress is not None:
            where = f" (batch {index + 1}/{len(batches)})" if len(batches) > 1 else ""
            progress(f"{optimizer} / {case.name}{where}: {len(batch)} contenders")
        kept_times = _run_batch(
            [(rows[label], makers[label]) for label in batch],
            case,
            drive=needs(optimizer),
            rounds=rounds,
            warmup=max(1, warmup),
            step_limit=step_limit,
            seed=seed,
            batch=index,
            keep_first=index == 0,
        )
        medians = {label: statistics.median(times) for label, times in kept_times.items()}
        for label in batch:
            if label != REFERENCE and REFERENCE in medians:
                rows[label].reference_median = medians[REFERENCE]
            if label != MEMORY and MEMORY in medians:
                rows[label].memory_median = medians[MEMORY]
    if REFERENCE in rows and rows[REFERENCE].ok:
        rows[REFERENCE].reference_median = rows[REFERENCE].median
    else:
        # torch has no fused step for this optimizer, or not for these tensors (DTensor
        # parameters of some optimizers): compare with its fastest CPU path.
        timed = [r for r in rows.values() if r.label.startswith("torch ") and r.ok]
        if timed:
            fastest = min(timed, key=lambda r: r.median).median
            for row in rows.values():
                row.reference_median = fastest
    if MEMORY in rows and rows[MEMORY].ok:
        rows[MEMORY].memory_median = rows[MEMORY].median
    return CaseResult(
        optimizer=optimizer,
        case=case,
        rows=tuple(rows[c.label] for c in contenders),
        batches=len(batches),
        bytes_moved=TENSORS_MOVED[optimizer] * param_bytes,
        param_bytes=param_bytes,
        load_average=load_average(),
    )


def _run_batch(
    members: Sequence[tuple[Row, OptimizerFactory]],
    case: Case,
    *,
    drive: Needs,
    rounds: int,
    warmup: int,
    step_limit: float,
    seed: int,
    batch: int,
    keep_first: bool,
) -> dict[str, list[float]]:
    """Set up, warm up, profile and time one batch of contenders; fill in their rows.

    Returns:
        The step times in this batch of the rows of :data:`IN_EVERY_BATCH` that ran in it.
    """
    live: list[tuple[Row, _Live]] = []
    for row, make in members:
        fresh = Row(row.label, batch=batch)
        try:
            params = [p.requires_grad_() for p in tensors(case, seed)]
            grads = tensors(case, seed + 1)
            if drive.sparse:
                grads = [sparse_rows(g) for g in grads]
            closure = quadratic_closure(params, grads) if drive.closure else None
            if case.per_tensor and closure is not None:
                raise ValueError("a closure step re-evaluates the whole model, not one tensor")
            made = _PerTensor(make, params) if case.per_tensor else make(params)
            if case.variant == "amp" and not isinstance(made, InPlaceAdd):
                made = _Scaled(made)
            contender = _Live(fresh, params, grads, made, closure)
            for step in range(warmup):
                elapsed = contender.timed_step()
                if step == 0:
                    fresh.first_step = elapsed
                elif elapsed > step_limit:
                    raise _TooSlowError(
                        f"too slow: warm-up step {step + 1} took {elapsed:.1f} s "
                        f"(limit {step_limit:g} s; first step {fresh.first_step:.1f} s)"
                    )
            # Steady state: the programs the warm-up asked for are compiled in the background.
            wait_for_programs(timeout=600)
            contender.load_grads()
            fresh.peak_extra_bytes = step_peak_bytes(contender.step)
            fresh.state_bytes = state_bytes(contender.optimizer)
        except _TooSlowError as error:
            row.error = str(error)
            continue
        except Exception as error:
            row.error = describe(error)
            continue
        live.append((row, contender))

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            shift = round_index % len(live) if live else 0
            for _, contender in live[shift:] + live[:shift]:
                if contender.row.error is not None:
                    continue
                try:
                    keep_busy()
                    contender.row.times.append(contender.timed_step())
                except Exception as error:
                    contender.row.error = describe(error)
    finally:
        if gc_was_enabled:
            gc.enable()

    kept_times: dict[str, list[float]] = {}
    for row, contender in live:
        fresh = contender.row
        if fresh.error is not None:
            row.error = fresh.error
            continue
        if row.label in IN_EVERY_BATCH:
            kept_times[row.label] = list(fresh.times)
        row.times += fresh.times
        if keep_first or row.first_step is None:
            row.first_step = fresh.first_step
            row.peak_extra_bytes = fresh.peak_extra_bytes
            row.state_bytes = fresh.state_bytes
            row.batch = batch
    live.clear()
    gc.collect()
    return kept_times
