"""The benchmark's results as text: aligned plain-text or Markdown tables, and the Markdown page
that ``polyak bench --out`` writes."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

from polyak.bench.cases import CASES
from polyak.bench.contenders import REFERENCE
from polyak.bench.measure import BUSY_MS, MEMORY
from polyak.bench.optimizers import (
    CLASS_NAMES,
    HYPERPARAMETERS,
    SPARSE_ROW_EVERY,
    TENSORS_MOVED,
    needs,
)
from polyak.bench.results import BenchResult, CaseResult, Environment, Row

_MIB = 2**20


def _format_ms(seconds: float | None) -> str:
    """Milliseconds with about three significant digits."""
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _format_count(n: int) -> str:
    """A parameter count such as 8.4M."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


COLUMNS = (
    "contender",
    "median ms",
    "GB/s",
    "% of bw",
    "x vs torch fused",
    "peak extra MiB (%)",
    "state MiB",
    "first step ms",
)


def _cells(result: CaseResult, row: Row) -> list[str]:
    """The table cells of one row."""
    if not row.ok:
        return [row.label, *(["n/a"] * (len(COLUMNS) - 1))]
    rate = result.bytes_moved / row.median
    speedup = row.speedup
    bandwidth_share = row.bandwidth_share
    if row.peak_extra_bytes is None:
        peak = "n/a"
    else:
        share = row.peak_extra_bytes / result.param_bytes
        mib = row.peak_extra_bytes / _MIB
        peak = f"{mib:.{2 if mib < 10 else 1}f} ({share:.0%})"
    return [
        row.label,
        _format_ms(row.median),
        f"{rate / 1e9:.1f}",
        "n/a" if bandwidth_share is None else f"{bandwidth_share:.0%}",
        "n/a" if speedup is None else f"{speedup:.2f}",
        peak,
        "n/a" if row.state_bytes is None else f"{row.state_bytes / _MIB:.1f}",
        _format_ms(row.first_step),
    ]


def format_case(result: CaseResult, *, markdown: bool = False, level: int = 4) -> str:
    """Render one (optimizer, case) result as a table with a title and notes.

    Args:
        result: what :func:`bench_case` returned.
        markdown: render a Markdown table instead of aligned plain text.
        level: the Markdown heading level of the title.

    Returns:
        The text, without a trailing newline.
    """
    case = result.case
    title = (
        f"{result.optimizer} / {case.name}: {len(case.shapes)} tensors, "
        f"{_format_count(case.numel)} parameters"
        + (f" ({case.description})" if case.description else "")
        + f"; a step moves {result.bytes_moved / 1e6:.1f} MB "
        f"({TENSORS_MOVED[result.optimizer]} x 4 B x numel)"
    )
    table = [list(COLUMNS)] + [_cells(result, row) for row in result.rows]
    unavailable = [f"{row.label}: {row.error}" for row in result.rows if row.error is not None]
    if not any(row.label == REFERENCE for row in result.rows):
        unavailable.append(
            f"{REFERENCE}: torch has no fused CPU step for {CLASS_NAMES[result.optimizer]}; "
            "x compares with its fastest path here"
        )
    elif not result.row(REFERENCE).ok:
        unavailable.append(f"x compares with torch's fastest path here, {REFERENCE} failing")
    batch_note = (
        f"ran in {result.batches} memory-limited batches, each with {REFERENCE} and "
        f"{MEMORY}; ratios and shares compare with those of the same batch"
        if result.batches > 1
        else None
    )
    title += f"; {result.threads} thread{'s' if result.threads > 1 else ''}"
    if result.load_average is not None:
        title += f"; load average {result.load_average:.2f}"
    busy = result.busy
    warning = (
        None
        if busy is None
        else f"WARNING: unreliable figures: the machine carried a load of {busy:.1f} besides "
        f"this run's {result.threads} thread{'s' if result.threads > 1 else ''}"
    )
    lines: list[str]
    if markdown:
        lines = [f"{'#' * level} {title}", ""]
        lines.append("| " + " | ".join(table[0]) + " |")
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in table[1:]]
        notes = [f"n/a {note}" for note in unavailable]
        if batch_note is not None:
            notes.append(batch_note)
        if warning is not None:
            notes.insert(0, f"**{warning}**")
        if notes:
            lines += ["", *(f"- {note}" for note in notes)]
    else:
        widths = [max(len(cells[i]) for cells in table) for i in range(len(COLUMNS))]
        lines = [title]
        for cells in table:
            first = cells[0].ljust(widths[0])
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            lines.append("  ".join([first, *rest]).rstrip())
        lines += [f"  n/a {note}" for note in unavailable]
        if batch_note is not None:
            lines.append(f"  note: {batch_note}")
        if warning is not None:
            lines.append(f"  {warning}")
    return "\n".join(lines)


def format_environment(environment: Environment, *, markdown: bool = False) -> str:
    """Render the run's environment: versions, threads, bandwidth and peer libraries.

    Args:
        environment: the run's environment.
        markdown: render Markdown list items instead of plain lines.

    Returns:
        The text, without a trailing newline.
    """
    bandwidth = ", ".join(
        f"{rate / 1e9:.1f} GB/s with {mib} MiB operands"
        for mib, rate in environment.bandwidth.items()
    )
    peers = []
    for peer in environment.peers:
        if peer.error is None:
            peers.append(f"{peer.distribution} {peer.version}")
        else:
            peers.append(f"{peer.distribution} skipped ({peer.error})")
    threads = ", ".join(str(t) for t in environment.threads)
    items = [
        f"CPU: {environment.cpu}, {os.cpu_count()} cores" if environment.cpu else "CPU: unknown",
        *([f"polyak's kernel: {environment.kernel}"] if environment.kernel else []),
        f"torch {environment.torch_version}, polyak {environment.polyak_version}, "
        f"threads {threads} (every case at each), float32 on CPU"
        + (
            ""
            if environment.load_average is None
            else f", load average {environment.load_average:.2f} at the start "
            "(a busy run adds about its thread count)"
        ),
        f"in-place bandwidth measured on its own (a.add_(b, alpha=0.5), 3 x operand size "
        f"moved, back to back): {bandwidth}",
        f"% of bw: the share of the bandwidth of the row {MEMORY!r}, an in-place add moving "
        "the bytes of one step, timed in the same rounds and so in the same cache conditions",
        f"peers: {', '.join(peers) if peers else 'none'}",
        f"{environment.warmup} warm-up steps per contender, then {environment.rounds} "
        "interleaved rounds; times are medians; each timed step follows "
        f"{BUSY_MS:g} ms of matrix products on every thread, as a step follows a backward pass",
    ]
    items += [f"skipped case {name}: {reason}" for name, reason in environment.skipped_cases]
    if markdown:
        return "\n".join(f"- {item}" for item in items)
    return "\n".join(items)


#: The polyak contender the summary shows.
SUMMARY_CONTENDER = "polyak (default)"


def format_summary(
    cases: Sequence[CaseResult], *, markdown: bool = False, peers: bool = True
) -> str:
    """One line per (optimizer, case, thread count): the same-bytes add, torch's fused step and
    polyak's default step, in median ms, with polyak's ratio to torch fused and share of the
    bandwidth, and the best peer's ratio.

    Args:
        cases: the results to summarise, in run order.
        markdown: render a Markdown table instead of aligned plain text.
        peers: include the best peer's column.

    Returns:
        The text, without a trailing newline.
    """
    header = [
        "optimizer / case",
        "threads",
        MEMORY,
        REFERENCE,
        SUMMARY_CONTENDER,
        "x vs torch fused",
        "% of bw",
        "best peer (x vs fused)",
    ]
    table = [header]
    for result in cases:

        def ms(label: str, result: CaseResult = result) -> str:
            try:
                row = result.row(label)
            except KeyError:
                return "n/a"
            return _format_ms(row.median) if row.ok else "n/a"

        try:
            ours: Row | None = result.row(SUMMARY_CONTENDER)
        except KeyError:
            ours = None
        others = [r for r in result.rows if r.ok and r.speedup is not None and not _own(r.label)]
        best = max(others, key=lambda r: r.speedup or 0.0, default=None)
        share = ours.bandwidth_share if ours is not None else None
        speedup = ours.speedup if ours is not None else None
        name = f"{result.optimizer} / {result.case.name}"
        if result.busy is not None:
            name += f" (busy: load {result.load_average:.1f})"
        table.append(
            [
                name,
                str(result.threads),
                ms(MEMORY),
                ms(REFERENCE),
                f"**{ms(SUMMARY_CONTENDER)}**" if markdown else ms(SUMMARY_CONTENDER),
                "n/a" if speedup is None else f"{speedup:.2f}",
                "n/a" if share is None else f"{share:.0%}",
                "none" if best is None else f"{best.label} ({best.speedup:.2f})",
            ]
        )
    if not peers:
        table = [cells[:-1] for cells in table]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |"]
        lines.append("|" + "|".join([":---"] + ["---:"] * 6 + [":---"] * peers) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in table[1:]]
        return "\n".join(lines)
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i in (0, 7) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()
        for cells in table
    )


def _own(label: str) -> bool:
    """Whether a row is torch's, polyak's or the bandwidth yardstick (not a peer library)."""
    return label.startswith(("torch ", "polyak", MEMORY))


def format_result(result: BenchResult, *, markdown: bool = False) -> str:
    """Render a whole benchmark run: the environment and one table per (optimizer, case).

    Args:
        result: what :func:`run_benchmark` returned.
        markdown: render Markdown instead of plain text.

    Returns:
        The text, without a trailing newline.
    """
    parts = [format_environment(result.environment, markdown=markdown)]
    parts += [format_case(c, markdown=markdown) for c in result.cases]
    parts.append(format_summary(result.cases, markdown=markdown))
    return "\n\n".join(parts)


def _cases_run(result: BenchResult) -> list[str]:
    """One line per case of the run: its name, size and where its shapes come from."""
    lines = []
    for name in dict.fromkeys(c.case.name for c in result.cases):
        case = CASES.get(name) or next(c.case for c in result.cases if c.case.name == name)
        size = f"{len(case.shapes)} tensors, {_format_count(case.numel)} parameters"
        lines.append(f"`{name}`: {size}" + (f", {case.description}" if case.description else ""))
    return lines


def _optimizers_run(result: BenchResult) -> list[str]:
    """One line per optimizer of the run: its arguments, and how its steps are driven."""
    lines = []
    for key in dict.fromkeys(c.optimizer for c in result.cases):
        found = needs(key)
        arguments = ", ".join(f"{name}={value}" for name, value in HYPERPARAMETERS[key].items())
        line = f"`{key}`: {CLASS_NAMES[key]}({arguments})"
        if found.matrices:
            line += "; each case's 2-D tensors only"
        if found.sparse:
            line += (
                "; each case's 2-D tensors, as an embedding's, with sparse gradients holding "
                f"one row in {SPARSE_ROW_EVERY}"
            )
        if found.closure:
            line += (
                "; each step with a closure whose loss is a quadratic around the first "
                "parameters, with the case's gradients as its slope"
            )
        lines.append(line)
    return lines


def format_page(result: BenchResult, *, command: str, date: str | None = None) -> str:
    """Render a whole benchmark run as a Markdown page: a header with the command that wrote it,
    the date and the machine, the summary table, the cases and optimizers run, and every
    contender's table.

    Args:
        result: what :func:`run_benchmark` returned.
        command: the command line that ran the benchmark, as the header shows it.
        date: when it ran; None: now, in UTC.

    Returns:
        The page, with a trailing newline.
    """
    environment = result.environment
    if date is None:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    peers = any(peer.error is None for peer in environment.peers)
    threads = " and ".join(str(t) for t in environment.threads)
    header = [
        f"- command: `{command}`",
        f"- date: {date}",
        f"- torch's CPU capability: {environment.capability or 'unknown'}",
        f"- threads: every case at {threads} (`torch.set_num_threads`); torch's default here: "
        f"{environment.torch_threads}, on {os.cpu_count()} cores",
        format_environment(environment, markdown=True),
    ]
    parts = [
        "# Benchmarks",
        "Written by `polyak bench --out`: rerun the command below to refresh it. Each "
        "optimizer's step is timed against its twin in `torch.optim` (for-loop, foreach and "
        "fused paths), polyak's strategies and, where installed, the peer libraries, all in "
        "one process, interleaved round by round, on each case's parameter shapes in float32 "
        "on the CPU.",
        "\n".join(header),
        "The memory-bandwidth yardstick is a row of its own, "
        f"`{MEMORY}`: `a.add_(b, alpha=0.5)` over operands sized so that one call moves the "
        "bytes of one step, timed in the same interleaved rounds as the optimizers and so in "
        "the same cache conditions; `% of bw` is its time over the contender's, and a share "
        "above 100% means a step moved its bytes faster than torch's own in-place add. `x vs "
        f"torch fused` is the speed relative to `{REFERENCE}` in the same batch, or, where "
        "torch has no fused CPU step, to its fastest path (for-loop, foreach, or its only one).",
        "## Summary",
        "Median milliseconds per step; polyak's default step in bold.",
        format_summary(result.cases, markdown=True, peers=peers),
        "## Cases and optimizers",
        "\n".join(f"- {line}" for line in _cases_run(result)),
        "\n".join(f"- {line}" for line in _optimizers_run(result)),
        "## Every contender",
        *(format_case(case, markdown=True, level=3) for case in result.cases),
    ]
    return "\n\n".join(parts) + "\n"
