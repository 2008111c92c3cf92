"""What a benchmark run measured: one row per contender, one result per (optimizer, case),
and the environment the run had."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from polyak.bench.cases import Case


@dataclass(frozen=True)
class PeerStatus:
    """Whether a peer library could be imported.

    Attributes:
        name: the import name.
        distribution: the pip distribution name.
        version: the imported version, or None.
        error: why the import failed, or None.
    """

    name: str
    distribution: str
    version: str | None
    error: str | None


@dataclass(frozen=True)
class Environment:
    """What the benchmark ran on.

    Attributes:
        torch_version: ``torch.__version__``.
        polyak_version: ``polyak.__version__``.
        threads: the thread counts the run sweeps, each case timed at every one.
        bandwidth: in-place bandwidth in bytes per second, measured on its own before the cases,
            by operand size in MiB: context for the tables, whose "% of bw" column divides by
            the bandwidth of the same bytes measured within each case (:data:`MEMORY`).
        peers: the import status of every peer library asked for.
        rounds: timed rounds per batch of contenders.
        warmup: warm-up steps per contender, the first of which is reported separately.
        skipped_cases: cases left out, with the reason.
        load_average: the one-minute load average when the run started, or None where the
            platform has none; other work on the machine makes the timings noisier.
        cpu: the CPU's model name, and the vector extensions it has that the kernels use.
        kernel: what polyak's compiled programs are built for, and whose roundings they
            follow (torch's capability in this process).
        capability: the CPU capability torch's kernels run at, e.g. ``AVX512``.
        torch_threads: ``torch.get_num_threads()`` before the run, what a training script
            gets; None where unknown.
    """

    torch_version: str
    polyak_version: str
    threads: tuple[int, ...]
    bandwidth: dict[int, float]
    peers: tuple[PeerStatus, ...]
    rounds: int
    warmup: int
    skipped_cases: tuple[tuple[str, str], ...] = ()
    load_average: float | None = None
    cpu: str = ""
    kernel: str = ""
    capability: str = ""
    torch_threads: int | None = None


@dataclass
class Row:
    """The measurements of one contender on one case.

    Attributes:
        label: the contender's label.
        times: the wall time in seconds of every timed step.
        first_step: the wall time in seconds of the very first step.
        peak_extra_bytes: the peak of CPU memory allocated during a step, above what was
            allocated before it; None if it could not be measured.
        state_bytes: the bytes held by the optimizer's state tensors.
        batch: the index of the memory-limited batch the contender ran in.
        reference_median: the median step time of the reference in the same batch, or None.
        memory_median: the median time of the same-bytes in-place add (:data:`MEMORY`) in the
            same batch, or None.
        error: why the contender has no numbers, or None.
    """

    label: str
    times: list[float] = field(default_factory=list)
    first_step: float | None = None
    peak_extra_bytes: int | None = None
    state_bytes: int | None = None
    batch: int = 0
    reference_median: float | None = None
    memory_median: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the contender ran and has timings."""
        return self.error is None and bool(self.times)

    @property
    def median(self) -> float:
        """The median timed step, in seconds."""
        return statistics.median(self.times)

    @property
    def speedup(self) -> float | None:
        """How many times faster than the reference in the same batch (> 1: faster)."""
        if self.reference_median is None or not self.ok:
            return None
        return self.reference_median / self.median

    @property
    def bandwidth_share(self) -> float | None:
        """The share of the memory bandwidth measured in the same batch that the step reaches:
        the same-bytes in-place add's time over this row's (1: as fast as memory allows)."""
        if self.memory_median is None or not self.ok:
            return None
        return self.memory_median / self.median


@dataclass(frozen=True)
class CaseResult:
    """All contenders of one optimizer on one case.

    Attributes:
        optimizer: the optimizer's key, e.g. ``"adam"``.
        case: the parameter shapes.
        rows: one row per contender, in contender order.
        batches: how many memory-limited batches the contenders ran in.
        bytes_moved: the bytes one step must read and write.
        param_bytes: the bytes of the parameters.
        load_average: the one-minute load average when the case finished, or None where the
            platform has none.
        threads: ``torch.get_num_threads()`` while the case ran.
    """

    optimizer: str
    case: Case
    rows: tuple[Row, ...]
    batches: int
    bytes_moved: int
    param_bytes: int
    load_average: float | None = None
    threads: int = 1

    @property
    def busy(self) -> float | None:
        """The load the machine carried besides this run's threads, where it was enough to
        make the figures unreliable (more than half a core), else None."""
        if self.load_average is None:
            return None
        other = self.load_average - self.threads
        return other if other > 0.5 else None

    def row(self, label: str) -> Row:
        """The row of a contender.

        Args:
            label: the contender's label.

        Returns:
            The row.

        Raises:
            KeyError: no contender has that label.
        """
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)


@dataclass(frozen=True)
class BenchResult:
    """Everything one benchmark run measured.

    Attributes:
        environment: what it ran on.
        cases: one result per (optimizer, case), in run order.
    """

    environment: Environment
    cases: tuple[CaseResult, ...]


def describe(error: BaseException) -> str:
    """One line saying what went wrong."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if len(message) > 160:
        message = message[:157] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
