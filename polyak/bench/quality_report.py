"""The table and the plot of ``polyak quality``: what :func:`polyak.bench.quality.run_quality`
measured, as text, as Markdown, and as a PNG of the loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polyak.bench.quality import (
    BETAS,
    FINAL_FRACTION,
    LR,
    MIN_LR_FRACTION,
    TARGET_PERCENT,
    WEIGHT_DECAY,
    QualityResult,
    VariantResult,
)

#: The table's columns, in order.
COLUMNS = (
    "variant",
    "params",
    "state",
    "state B/param",
    "total B/param",
    "final train loss",
    "vs fp32",
    "val loss",
    "vs fp32",
    f"within {TARGET_PERCENT:g}%",
    "time (s)",
    "step (ms)",
)
_SHORT = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.uint8: "8-bit",
}


def _short(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def state_summary(run: VariantResult) -> str:
    """How the largest parameter's moments are stored, e.g. ``bf16 + comp`` or ``8-bit``: the
    dtypes of its parameter-shaped state, ``+ comp`` where a Kahan compensation is kept."""
    keys = run.state_dtypes.get(run.largest, {})
    moments = [k for k in keys if k not in ("step", "kahan_comp") and not k.endswith("_absmax")]
    text = "/".join(dict.fromkeys(_short(keys[k]) for k in moments)) or "none"
    return text + (" + comp" if "kahan_comp" in keys else "")


def percent(value: float, baseline: float) -> float:
    """How far ``value`` lies above ``baseline``, in percent of it."""
    return (value - baseline) / baseline * 100


def rows(result: QualityResult) -> list[list[str]]:
    """One row of :data:`COLUMNS` per run, as strings."""
    base = result.baseline
    out = []
    for run in result.runs:
        if base is None or run is base:
            train_delta = val_delta = verdict = "—"
        else:
            train = percent(run.final_loss, base.final_loss)
            val = percent(run.validation_loss, base.validation_loss)
            train_delta, val_delta = f"{train:+.2f}%", f"{val:+.2f}%"
            verdict = "yes" if train <= TARGET_PERCENT else "no"
        params = "/".join(dict.fromkeys(_short(d) for d in run.param_dtypes.values()))
        out.append(
            [
                run.variant.label,
                params,
                state_summary(run),
                f"{run.state_bytes / run.parameters:.2f}",
                f"{(run.state_bytes + run.param_bytes) / run.parameters:.2f}",
                f"{run.final_loss:.4f}",
                train_delta,
                f"{run.validation_loss:.4f}",
                val_delta,
                verdict,
                f"{run.seconds:.1f}",
                f"{run.step_seconds * 1e3:.2f}",
            ]
        )
    return out


def _table(header: Sequence[str], body: list[list[str]], markdown: bool) -> str:
    left = 3  # the text columns: variant, params, state
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(":---" if i < left else "---:" for i in range(len(header))))
        lines[-1] += "|"
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [list(header), *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in body)])


def describe(result: QualityResult) -> list[str]:
    """The lines above the table: the text, the model, the recipe and the machine."""
    config, corpus = result.config, result.corpus
    first = result.runs[0] if result.runs else None
    size = f"{first.parameters:,} parameters" if first is not None else "no runs"
    load = "" if result.load_average is None else f", load average {result.load_average:.2f}"
    names = ", ".join(
        path.parent.name if path.stem == "__init__" else path.stem for path in corpus.files
    )
    return [
        f"text: Python {result.python}'s standard library ({names}), "
        f"{len(corpus.train):,} characters to train on, {len(corpus.validation):,} held out",
        f"model: MLP language model, {config.context} characters of context, embedding "
        f"{config.embedding}, 2 hidden layers of {config.hidden} (GELU), {size}",
        f"optimizer: polyak.AdamW(lr={LR:g}, betas={BETAS}, weight_decay={WEIGHT_DECAY:g}), "
        f"{config.warmup} warm-up steps, cosine decay to {MIN_LR_FRACTION:g} x lr; "
        f"{config.steps} steps of {config.batch_size} windows, seed {config.seed}",
        f"machine: {result.cpu}, {result.threads} torch thread"
        + ("s" if result.threads != 1 else "")
        + load,
    ]


def notes(result: QualityResult) -> list[str]:
    """The lines below the table: how to read it."""
    tail = max(1, round(result.config.steps * FINAL_FRACTION))
    return [
        f"final train loss: the mean training loss of the last {tail} steps; val loss: after "
        "the last step; vs fp32: the difference from the fp32 AdamW run, in percent of it; "
        f"within {TARGET_PERCENT:g}%: whether the final train loss is at most "
        f"{TARGET_PERCENT:g}% above fp32's",
        "state B/param: the optimizer state's bytes per parameter (total: with the "
        "parameters'); time: the training steps (forward, backward, step) without the "
        "validation passes; step: the median optimizer.step()",
    ]


def format_quality(result: QualityResult, *, markdown: bool = False) -> str:
    """Render a quality run as the report ``polyak quality`` prints.

    Args:
        result: what :func:`polyak.bench.quality.run_quality` returned.
        markdown: a Markdown table and list, instead of aligned text.

    Returns:
        The report, without a trailing newline.
    """
    bullet = "- " if markdown else ""
    head = [bullet + line for line in describe(result)]
    tail = [bullet + line for line in notes(result)]
    return "\n".join([*head, "", _table(COLUMNS, rows(result), markdown), "", *tail])


def smooth(values: Sequence[float], window: int) -> list[float]:
    """The running mean of the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_quality(result: QualityResult, path: str | Path) -> Path:
    """Plot every run's training loss (a running mean) and validation loss, and save a PNG.

    Args:
        result: what :func:`polyak.bench.quality.run_quality` returned.
        path: where to write the PNG (its folder is made if missing).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    train: Any = fig.add_subplot(1, 3, 1)
    validation: Any = fig.add_subplot(1, 3, 2)
    relative: Any = fig.add_subplot(1, 3, 3)
    window = max(1, result.config.steps // 50)
    base = result.baseline
    for run in result.runs:
        style: dict[str, Any] = {"linewidth": 1.2, "label": run.variant.label}
        if run is base:
            # Dashed and on top: the other curves lie close to it.
            style.update(linewidth=1.6, color="black", linestyle="--", zorder=3)
        steps = range(1, len(run.losses) + 1)
        train.plot(steps, smooth(run.losses, window), **style)
        done, losses = zip(*run.evaluations, strict=True)
        validation.plot(done, losses, marker="o", markersize=3, **style)
        if base is not None:
            # Every run of a result evaluates after the same steps.
            pairs = zip(run.evaluations, base.evaluations, strict=True)
            gaps = [percent(x, b) for (_, x), (_, b) in pairs]
            relative.plot(done, gaps, marker="o", markersize=3, **style)
    # The first steps' losses dwarf the differences at the end: show from a tenth of the run.
    start = max(1, result.config.steps // 10)
    ends = [smooth(run.losses, window)[start - 1] for run in result.runs]
    lows = [min(smooth(run.losses, window)) for run in result.runs]
    if ends and lows:
        train.set_ylim(min(lows) * 0.97, max(ends) * 1.03)
    train.set_title(f"training loss (running mean of {window} steps)")
    validation.set_title("validation loss")
    relative.set_title("validation loss vs fp32 AdamW")
    for ax in (train, validation, relative):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    train.set_ylabel("cross-entropy (nats per character)")
    validation.set_ylabel("cross-entropy (nats per character)")
    relative.set_ylabel("difference (% of fp32's)")
    relative.axhline(TARGET_PERCENT, color="grey", linestyle=":", linewidth=1)
    validation.legend()
    fig.suptitle(
        f"polyak.AdamW, {result.runs[0].parameters:,}-parameter character MLP on Python "
        f"{result.python}'s standard library"
        if result.runs
        else "no runs"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
