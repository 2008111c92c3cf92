"""Train one small language model with AdamW in several precisions and compare the losses.

``polyak quality`` shows, rather than claims, what storing less costs in training quality. The
same character-level model is trained once per *variant*: float32 parameters and state (the
baseline), bfloat16 parameters with Kahan-compensated or stochastically rounded updates,
plain bfloat16 parameters (every operation rounded to bfloat16, as torch steps them), and
float32 parameters with 8-bit or bfloat16 state. Every variant starts from the same weights,
sees the same batches in the same order and follows the same learning-rate schedule; only the
parameters' dtype and the optimizer's precision options differ.

The text is Python's own standard library: a fixed list of its modules, read from the source
files of the running interpreter (:func:`load_text`), so every machine with the same Python
release trains on the same characters. The last tenth of the text is held out for validation.

The model (:func:`make_model`) is an MLP language model in the manner of Bengio et al. (2003):
the embeddings of the previous ``context`` characters, concatenated, pass through two hidden
layers to logits over the next character. Its first weight matrix has over half a million
elements, so the 8-bit variant really stores 8-bit state. A bfloat16 variant's model runs its
forward and backward passes in bfloat16 too, as pure bfloat16 training does; the loss is
always computed in float32.

The recipe is fixed up front, not tuned per variant: AdamW with nanoGPT's character-level
settings (lr 1e-3, betas (0.9, 0.99), weight decay 0.1), a linear warm-up over the first
``min(100, steps // 10)`` steps, then a cosine decay to a tenth of the peak.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import polyak
from polyak.bench.measure import (
    cpu_description,
    load_average,
    load_kernel,
    state_bytes,
    wait_for_programs,
)

#: The standard-library modules whose source is the text, in this order.
MODULES = (
    "argparse",
    "dataclasses",
    "functools",
    "inspect",
    "textwrap",
    "typing",
    "enum",
    "random",
    "difflib",
    "statistics",
    "contextlib",
    "fractions",
    "heapq",
    "shlex",
)
#: Characters are bytes of the UTF-8 text; any byte past ASCII becomes :data:`OTHER`.
VOCAB = 128
OTHER = 0
#: The share of the text, at its end, held out for validation.
VALIDATION_FRACTION = 0.1
#: Validation windows, spread evenly over the held-out text.
VALIDATION_WINDOWS = 8192

#: Defaults of :func:`run_quality`, shared with the command line.
DEFAULT_STEPS = 1500
DEFAULT_BATCH_SIZE = 128
DEFAULT_CONTEXT = 32
DEFAULT_EMBEDDING = 64
DEFAULT_HIDDEN = 256
DEFAULT_SEED = 0
DEFAULT_OUT = "polyak-quality.png"
#: One thread: the runs' matrices are small, and on a machine shared with other work a pool
#: spanning every core stalls whenever another process takes one of them (a default run on 2
#: busy cores: 1 minute at one thread, 14 at two, with the same losses).
DEFAULT_THREADS = 1
#: nanoGPT's character-level AdamW settings, the same for every variant.
LR = 1e-3
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.1
MIN_LR_FRACTION = 0.1
MAX_WARMUP = 100
#: Untimed steps per variant, on a copy of the model, before any run: see :func:`warm_up`.
WARMUP_STEPS = 3
#: The final training loss is the mean over this share of the last steps.
FINAL_FRACTION = 0.1
#: Validation losses measured per run, evenly spaced, the last after the last step.
EVALUATIONS = 10
#: How close to the float32 baseline's final training loss a variant should come, in percent.
TARGET_PERCENT = 2.0


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of storing the parameters and the optimizer's state.

    Attributes:
        key: the name the command line takes, e.g. ``"bf16-kahan"``.
        label: the name in tables and plots.
        param_dtype: the dtype of the model's parameters (and of its forward and backward).
        options: the precision keywords given to ``polyak.AdamW``.
    """

    key: str
    label: str
    param_dtype: torch.dtype
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


#: Every variant, the baseline first.
VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("fp32", "fp32 AdamW", torch.float32),
        Variant("bf16-kahan", "bf16 + kahan_sum", torch.bfloat16, {"kahan_sum": True}),
        Variant(
            "bf16-sr",
            "bf16 + stochastic rounding",
            torch.bfloat16,
            {"bf16_stochastic_round": True},
        ),
        Variant("bf16", "bf16, plain", torch.bfloat16),
        Variant("8bit", "fp32 + 8-bit state", torch.float32, {"state_dtype": "8bit"}),
        Variant("bf16-state", "fp32 + bf16 state", torch.float32, {"state_dtype": torch.bfloat16}),
    )
}
BASELINE = "fp32"
DEFAULT_VARIANTS = tuple(VARIANTS)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The text, as character codes, split for training and validation.

    Attributes:
        files: the source files read, in order.
        train: the training characters, int64 codes below :data:`VOCAB`.
        validation: the held-out characters.
    """

    files: tuple[Path, ...]
    train: Tensor
    validation: Tensor


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """What is trained, and for how long.

    Attributes:
        steps: optimizer steps per variant.
        batch_size: windows per step.
        context: characters each prediction sees.
        embedding: the width of each character's embedding.
        hidden: the width of both hidden layers.
        seed: seeds the initial weights, the batches and stochastic rounding.
    """

    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    context: int = DEFAULT_CONTEXT
    embedding: int = DEFAULT_EMBEDDING
    hidden: int = DEFAULT_HIDDEN
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context", "embedding", "hidden"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"Invalid {name} value: {value} (expected at least 1)")

    @property
    def warmup(self) -> int:
        """Steps of linear warm-up before the cosine decay."""
        return min(MAX_WARMUP, self.steps // 10)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (counted from 0)."""
        if step < self.warmup:
            return LR * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)


@dataclasses.dataclass(frozen=True)
class VariantResult:
    """One variant's run.

    Attributes:
        variant: which variant.
        losses: the training loss of every step.
        evaluations: ``(steps done, validation loss)`` pairs, the last after the last step.
        parameters: the model's parameter count.
        param_bytes: the bytes of the model's parameters.
        state_bytes: the bytes of the optimizer's state after the run.
        seconds: wall time of the training steps (forward, backward, optimizer step), without
            the validation passes.
        step_seconds: the median wall time of one ``optimizer.step()``.
        param_dtypes: the dtype of each parameter after the run, by name.
        state_dtypes: the dtype of each state tensor after the run, by parameter name and key.
        largest: the name of the model's largest parameter.
    """

    variant: Variant
    losses: list[float]
    evaluations: list[tuple[int, float]]
    parameters: int
    param_bytes: int
    state_bytes: int
    seconds: float
    step_seconds: float
    param_dtypes: dict[str, torch.dtype]
    state_dtypes: dict[str, dict[str, torch.dtype]]
    largest: str

    @property
    def final_loss(self) -> float:
        """The mean training loss of the last :data:`FINAL_FRACTION` of the steps."""
        tail = max(1, round(len(self.losses) * FINAL_FRACTION))
        return statistics.fmean(self.losses[-tail:])

    @property
    def validation_loss(self) -> float:
        """The validation loss after the last step."""
        return self.evaluations[-1][1]


@dataclasses.dataclass(frozen=True)
class QualityResult:
    """Everything :func:`run_quality` measured.

    Attributes:
        config: what was trained.
        corpus: the text it was trained on.
        runs: one result per variant, in the order asked.
        threads: torch's thread count during the runs.
        cpu: the CPU, in words.
        python: the Python version whose standard library is the text.
        load_average: the machine's one-minute load average before the runs, or None where
            the platform has none (other work slows the runs, not their losses).
    """

    config: QualityConfig
    corpus: Corpus
    runs: tuple[VariantResult, ...]
    threads: int
    cpu: str
    python: str
    load_average: float | None

    @property
    def baseline(self) -> VariantResult | None:
        """The float32 run, if it was among the variants."""
        return next((r for r in self.runs if r.variant.key == BASELINE), None)


def source_files(modules: Sequence[str] = MODULES) -> list[Path]:
    """The source file of each standard-library module, looked up in this interpreter's
    standard-library directory (not on ``sys.path``, where a file of the same name could
    shadow it).

    Raises:
        FileNotFoundError: naming the modules whose source is not installed.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found, missing = [], []
    for name in modules:
        relative = Path(*name.split("."))
        for path in (stdlib / relative.with_suffix(".py"), stdlib / relative / "__init__.py"):
            if path.is_file():
                found.append(path)
                break
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(
            f"the standard library's source of {', '.join(missing)} is not in {stdlib}; "
            "the quality benchmark trains on it (some distributions ship it in a package "
            "of its own)"
        )
    return found


def encode(text: str) -> Tensor:
    """The character codes of ``text``: its UTF-8 bytes, those past ASCII as :data:`OTHER`."""
    codes = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return torch.where(codes < VOCAB, codes, OTHER)


def load_text(modules: Sequence[str] = MODULES) -> Corpus:
    """Read the modules' sources, encode them and split off the last tenth for validation."""
    files = source_files(modules)
    codes = encode("\n".join(path.read_text(encoding="utf-8") for path in files))
    split = round(len(codes) * (1 - VALIDATION_FRACTION))
    return Corpus(tuple(files), codes[:split], codes[split:])


def make_model(config: QualityConfig) -> nn.Sequential:
    """The MLP language model, initialised from ``config.seed`` in float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return nn.Sequential(
            nn.Embedding(VOCAB, config.embedding),
            nn.Flatten(),
            nn.Linear(config.context * config.embedding, config.hidden),
            nn.GELU(),
            nn.Linear(config.hidden, config.hidden),
            nn.GELU(),
            nn.Linear(config.hidden, VOCAB),
        )


def windows(codes: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """The ``context`` characters from each start, and the character after each window."""
    index = starts[:, None] + torch.arange(context)
    return codes[index], codes[starts + context]


def batch_starts(corpus: Corpus, config: QualityConfig) -> Tensor:
    """Every step's window starts, ``(steps, batch_size)``, drawn once from ``config.seed``."""
    generator = torch.Generator().manual_seed(config.seed)
    high = len(corpus.train) - config.context
    if high < 1:
        raise ValueError(f"the training text is shorter than the context ({config.context})")
    return torch.randint(high, (config.steps, config.batch_size), generator=generator)


def validation_starts(corpus: Corpus, context: int) -> Tensor:
    """Up to :data:`VALIDATION_WINDOWS` window starts, evenly spread over the held-out text."""
    high = len(corpus.validation) - context
    if high < 1:
        raise ValueError(f"the validation text is shorter than the context ({context})")
    return torch.linspace(0, high - 1, min(VALIDATION_WINDOWS, high)).long()


def loss_of(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the next character, computed in float32 whatever the model's dtype."""
    logits: Tensor = model(inputs)
    return nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, chunk: int = 2048) -> float:
    """The mean validation loss, in chunks of ``chunk`` windows."""
    total = 0.0
    for start in range(0, len(inputs), chunk):
        part = slice(start, start + chunk)
        total += loss_of(model, inputs[part], targets[part]).item() * len(inputs[part])
    return total / len(inputs)


def _dtypes(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], ...]:
    names = {id(p): name for name, p in model.named_parameters()}
    params = {name: p.dtype for name, p in model.named_parameters()}
    state = {
        names[id(p)]: {k: v.dtype for k, v in entry.items() if isinstance(v, Tensor)}
        for p, entry in optimizer.state.items()
    }
    return params, state


def _optimizer(model: nn.Module, variant: Variant) -> torch.optim.Optimizer:
    return polyak.AdamW(
        model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **variant.options
    )


def warm_up(
    variants: Sequence[Variant], initial: nn.Module, corpus: Corpus, config: QualityConfig
) -> None:
    """Take a few untimed steps of every variant on a copy of ``initial``, then wait for the
    programs they asked polyak to compile, so that no run's time includes a compilation (or
    steps taken on another path meanwhile) and the first run's includes no one-time set-up of
    torch's. The runs' numbers do not depend on it: they start afresh, with their own
    generator state."""
    starts = batch_starts(corpus, dataclasses.replace(config, steps=WARMUP_STEPS))
    with torch.random.fork_rng(devices=[]):
        for variant in variants:
            model = copy.deepcopy(initial).to(variant.param_dtype)
            optimizer = _optimizer(model, variant)
            for batch in starts:
                loss = loss_of(model, *windows(corpus.train, batch, config.context))
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
    wait_for_programs()


def train_variant(
    variant: Variant,
    initial: nn.Module,
    corpus: Corpus,
    config: QualityConfig,
    starts: Tensor,
    validation: tuple[Tensor, Tensor],
    progress: Callable[[str], None] | None = None,
) -> VariantResult:
    """Train a copy of ``initial`` with ``polyak.AdamW`` as ``variant`` says.

    Args:
        variant: the parameters' dtype and the optimizer's precision options.
        initial: the float32 model every variant starts from (left unchanged).
        corpus: the text.
        config: the run's settings.
        starts: every step's window starts, from :func:`batch_starts`.
        validation: the validation inputs and targets.
        progress: called with a short line at each validation pass, or None.

    Returns:
        The variant's losses, sizes, times and dtypes.
    """
    model = copy.deepcopy(initial).to(variant.param_dtype)
    optimizer = _optimizer(model, variant)
    every = max(1, config.steps // EVALUATIONS)
    losses: list[float] = []
    evaluations: list[tuple[int, float]] = []
    step_times: list[float] = []
    seconds = 0.0
    # Stochastic rounding draws from torch's default generator: the same draws every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for step in range(config.steps):
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            loss = loss_of(model, *windows(corpus.train, starts[step], config.context))
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            stepped = time.perf_counter()
            optimizer.step()
            ended = time.perf_counter()
            step_times.append(ended - stepped)
            seconds += ended - began
            losses.append(loss.item())
            if (step + 1) % every == 0 or step + 1 == config.steps:
                evaluations.append((step + 1, evaluate(model, *validation)))
                if progress is not None:
                    progress(
                        f"{variant.label}: step {step + 1}/{config.steps}, train loss "
                        f"{loss.item():.3f}, validation loss {evaluations[-1][1]:.3f}"
                    )
    param_dtypes, state_dtypes = _dtypes(model, optimizer)
    return VariantResult(
        variant=variant,
        losses=losses,
        evaluations=evaluations,
        parameters=sum(p.numel() for p in model.parameters()),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        state_bytes=state_bytes(optimizer),
        seconds=seconds,
        step_seconds=statistics.median(step_times),
        param_dtypes=param_dtypes,
        state_dtypes=state_dtypes,
        largest=max(model.named_parameters(), key=lambda item: item[1].numel())[0],
    )


def resolve_variants(keys: Sequence[str]) -> list[Variant]:
    """The variants named by ``keys``, keys of :data:`VARIANTS`.

    Raises:
        ValueError: an unknown key.
    """
    unknown = [key for key in keys if key not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return [VARIANTS[key] for key in keys]


def run_quality(
    variants: Sequence[str] = DEFAULT_VARIANTS,
    config: QualityConfig | None = None,
    *,
    threads: int | None = DEFAULT_THREADS,
    warm: bool = True,
    progress: Callable[[str], None] | None = None,
) -> QualityResult:
    """Train the model once per variant.

    :func:`polyak.bench.quality_report.format_quality` makes a table of the result, and
    :func:`~polyak.bench.quality_report.plot_quality` a plot.

    Args:
        variants: keys of :data:`VARIANTS`, in the order to run and report them.
        config: the run's settings; None: the defaults.
        threads: torch's thread count for the runs (``torch.set_num_threads``, restored
            afterwards); None: as it is.
        warm: build polyak's flat kernel first where this machine has none, and take a few
            untimed steps of every variant (:func:`warm_up`), so that no run's time includes
            a build or a compilation. The losses are the same either way.
        progress: called with a short line as each run goes, or None.

    Returns:
        The configuration, the text and one result per variant.

    Raises:
        ValueError: an unknown variant, or fewer than 1 thread.
        FileNotFoundError: the standard library's source is not installed.
    """
    chosen = resolve_variants(variants)
    config = config if config is not None else QualityConfig()
    if threads is not None and threads < 1:
        raise ValueError(f"Invalid threads value: {threads} (expected at least 1)")
    at_start = load_average()
    corpus = load_text()
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        initial = make_model(config)
        if warm:
            if progress is not None:
                progress("loading polyak's kernel (built first where this machine has none)")
            load_kernel()
            if progress is not None:
                progress(f"{WARMUP_STEPS} untimed steps of every variant")
            warm_up(chosen, initial, corpus, config)
        starts = batch_starts(corpus, config)
        validation = windows(
            corpus.validation, validation_starts(corpus, config.context), config.context
        )
        runs = tuple(
            train_variant(v, initial, corpus, config, starts, validation, progress) for v in chosen
        )
        return QualityResult(
            config=config,
            corpus=corpus,
            runs=runs,
            threads=torch.get_num_threads(),
            cpu=cpu_description(),
            python=".".join(str(part) for part in sys.version_info[:3]),
            load_average=at_start,
        )
    finally:
        torch.set_num_threads(previous)
