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

Only torch and polyak are imported with this module; the peer libraries (torch-optimi, heavyball,
pytorch-optimizer) are imported when a benchmark runs, and any that cannot be imported is
reported as skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib
import inspect
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import polyak
from polyak.strategies import _codegen
from polyak.strategies import _native as native

#: Defaults of :func:`run_benchmark`, shared with the command line.
DEFAULT_OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_CASES = ("small", "mlp", "convnet", "gpt2", "in-backward")
DEFAULT_ROUNDS = 30
DEFAULT_WARMUP = 3
#: None: a sweep over 1 thread and every core (``1,2`` on a 2-core machine).
DEFAULT_THREADS: tuple[int, ...] | None = None
DEFAULT_BANDWIDTH_MIB = (64, 1024)
DEFAULT_MEMORY_BUDGET_GIB = 8.0
QUICK_ROUNDS = 5
QUICK_WARMUP = 2
QUICK_BANDWIDTH_MIB = (64,)
#: Cases that ``quick`` mode leaves out because they take too long.
QUICK_SKIPS = ("gpt2",)

#: The contender every other one is compared with.
REFERENCE = "torch fused=True"

#: The row that measures the memory bandwidth every other row's "% of bw" divides by: an in-place
#: add moving the bytes of one step, timed in the same rounds.
MEMORY = "in-place add, same bytes"

#: The rows that run in every memory-limited batch, so that each batch has its own.
IN_EVERY_BATCH = (REFERENCE, MEMORY)

#: Hyperparameters of each benchmarked optimizer, as torch.optim spells them.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.9},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "rmsprop": {"lr": 1e-3},
    "adagrad": {"lr": 1e-2},
    "adamax": {"lr": 2e-3},
    "adadelta": {"lr": 1.0},
    "nadam": {"lr": 2e-3},
    "radam": {"lr": 1e-3},
    "asgd": {"lr": 1e-2},
    "rprop": {"lr": 1e-2},
    "adafactor": {"lr": 1e-2},
    "muon": {"lr": 2e-2},
    # A history of 10 pairs: the default 100 would hold 200 copies of the parameters.
    "lbfgs": {"lr": 1.0, "max_iter": 5, "history_size": 10},
    "sparseadam": {"lr": 1e-3},
}

#: The class name of each optimizer in torch.optim and polyak.
CLASS_NAMES = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "adamax": "Adamax",
    "adadelta": "Adadelta",
    "nadam": "NAdam",
    "radam": "RAdam",
    "asgd": "ASGD",
    "rprop": "Rprop",
    "adafactor": "Adafactor",
    "muon": "Muon",
    "lbfgs": "LBFGS",
    "sparseadam": "SparseAdam",
}

#: Optimizers of 2-D parameters only (Muon): each case is reduced to its 2-D tensors.
MATRICES_ONLY = frozenset({"muon"})

#: Optimizers whose step takes a closure (LBFGS): each evaluation sets the gradient of the
#: quadratic <g, θ - θ_0> + |θ - θ_0|^2 / 2 around the first parameters θ_0, with the case's
#: gradients g, and returns its value.
CLOSURE_STEPS = frozenset({"lbfgs"})

#: Optimizers of sparse gradients (SparseAdam): each case is reduced to its 2-D tensors, as an
#: embedding's, whose gradients hold one row in :data:`SPARSE_ROW_EVERY`.
SPARSE_GRADIENTS = frozenset({"sparseadam"})
SPARSE_ROW_EVERY = 8

#: Parameter-sized state tensors each optimizer keeps (momentum buffer; first and second moments;
#: RMSprop's and Adagrad's one average, ASGD's average, Rprop's previous gradient and step sizes).
STATE_TENSORS = {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 1, "adagrad": 1, "adamax": 2}
STATE_TENSORS |= {"adadelta": 2, "nadam": 2, "radam": 2, "asgd": 1, "rprop": 2}
#: Adafactor's second moment of vectors (the factors of matrices are far smaller), Muon's
#: momentum, SparseAdam's two moments and LBFGS's history of pairs, direction and gradient.
STATE_TENSORS |= {"adafactor": 1, "muon": 1, "sparseadam": 2}
STATE_TENSORS["lbfgs"] = 2 * HYPERPARAMETERS["lbfgs"]["history_size"] + 2

#: Parameter-sized tensors one step must read plus those it must write: the parameter, its
#: gradient and the state are read, the parameter and the state written (SGD with momentum:
#: p, g, buf read and p, buf written; Adam: p, g, m, v read and p, m, v written).
TENSORS_MOVED = {name: 3 + 2 * count for name, count in STATE_TENSORS.items()}

#: Parameter-sized temporaries allowed for when sizing memory-limited batches.
TEMPORARY_TENSORS = 1

#: A contender whose warm-up step after the first takes longer than this, in seconds, is
#: dropped from the case rather than timed over every round.
DEFAULT_STEP_LIMIT = 10.0

#: heavyball compiles its update with torch.compile over the whole list of tensors, unrolled
#: tensor by tensor, so compilation time grows with the number of tensors: on a shared 2-core
#: machine its first SGD step took about 20 s on 148 tensors and 220 s on the 2000 of ``small``.
#: Cases with more tensors than this leave heavyball out; None includes it everywhere.
HEAVYBALL_MAX_TENSORS: int | None = 1000

#: The peer libraries, as ``(import name, pip distribution name)``.
PEER_LIBRARIES: tuple[tuple[str, str], ...] = (
    ("optimi", "torch-optimi"),
    ("heavyball", "heavyball"),
    ("pytorch_optimizer", "pytorch-optimizer"),
)

#: Builds an optimizer over the given parameters.
OptimizerFactory = Callable[[list[Tensor]], Any]

_MIB = 2**20
_GIB = 2**30


@dataclass(frozen=True)
class Case:
    """A set of parameter shapes to optimize.

    Attributes:
        name: how the case is called on the command line and in the report.
        shapes: the shape of every parameter tensor.
        description: a few words on where the shapes come from.
        per_tensor: each tensor has an optimizer of its own, stepped on its own with grad
            mode off, as optimizer-in-backward steps each parameter in a hook as its gradient
            is ready; a timed step steps them all.
    """

    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str = ""
    #: How the parameters are held and stepped: ``""`` plain tensors; ``"dtensor"`` DTensor
    #: shards on a one-rank mesh, as FSDP2 holds them; ``"amp"`` each step through a
    #: GradScaler (scale 1, so the reused gradients stay as they are); ``"channels_last"``
    #: 4-D parameters and gradients in channels-last memory format.
    variant: str = ""
    per_tensor: bool = False

    @property
    def numel(self) -> int:
        """The total number of parameter elements."""
        return sum(math.prod(shape) for shape in self.shapes)


def _gpt2_shapes() -> tuple[tuple[int, ...], ...]:
    """The 148 parameter shapes of GPT-2 small (124M), in ``named_parameters`` order."""
    d, vocab, ctx = 768, 50257, 1024
    block = (
        (d,),
        (d,),
        (d, 3 * d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (d, 4 * d),
        (4 * d,),
        (4 * d, d),
        (d,),
    )
    return ((vocab, d), (ctx, d), *(block * 12), (d,), (d,))


def _convnet_shapes() -> tuple[tuple[int, ...], ...]:
    """48 ResNet-like shapes: 16 convolutions, 15 batch norms and a classifier, 12.5M in all."""
    convs = (
        (64, 3, 7, 7),
        (64, 64, 3, 3),
        (64, 64, 3, 3),
        (128, 64, 3, 3),
        (128, 128, 3, 3),
        (128, 64, 1, 1),
        (256, 128, 3, 3),
        (256, 256, 3, 3),
        (256, 256, 3, 3),
        (256, 128, 1, 1),
        (512, 256, 3, 3),
        (512, 512, 3, 3),
        (512, 512, 3, 3),
        (512, 512, 3, 3),
        (512, 256, 1, 1),
        (1536, 512, 1, 1),
    )
    shapes: list[tuple[int, ...]] = []
    for index, conv in enumerate(convs):
        shapes.append(conv)
        if index < len(convs) - 1:
            shapes += [(conv[0],), (conv[0],)]
    return (*shapes, (1000, 1536), (1000,))


#: The built-in cases, by name.
CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("small", ((1024,),) * 2000, "2000 tensors of 1024"),
        Case("mlp", ((1024, 1024), (1024,)) * 8, "8 Linear(1024, 1024) layers"),
        Case("convnet", _convnet_shapes(), "ResNet-like convolutions, batch norms, classifier"),
        Case("gpt2", _gpt2_shapes(), "GPT-2 small"),
        Case(
            "mlp-dtensor",
            ((1024, 1024), (1024,)) * 8,
            "the mlp set as DTensor shards (one-rank mesh, as FSDP2 holds them)",
            "dtensor",
        ),
        Case("mlp-amp", ((1024, 1024), (1024,)) * 8, "the mlp set, stepped by a GradScaler", "amp"),
        Case(
            "convnet-cl",
            _convnet_shapes(),
            "the convnet set in channels-last memory format",
            "channels_last",
        ),
        Case(
            "in-backward",
            ((64, 64), (64,)) * 20,
            "20 Linear(64, 64), an optimizer per tensor (optimizer-in-backward)",
            per_tensor=True,
        ),
    )
}


@dataclass(frozen=True)
class Contender:
    """One implementation of an optimizer, as it takes part in a benchmark.

    Attributes:
        label: the row label in the report.
        make: builds the optimizer over a list of parameters; None when unavailable.
        unavailable: why the contender cannot run, or None.
        max_tensors: the most parameter tensors the contender takes part with, or None for
            no limit; a case with more gets an n/a row saying so.
        why_max_tensors: the reason for ``max_tensors``, shown in that row.
    """

    label: str
    make: OptimizerFactory | None
    unavailable: str | None = None
    max_tensors: int | None = None
    why_max_tensors: str = ""


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


def _describe(error: BaseException) -> str:
    """One line saying what went wrong."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if len(message) > 160:
        message = message[:157] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def import_peers(names: Sequence[tuple[str, str]] | None = None) -> dict[str, PeerStatus]:
    """Import the peer libraries that can be imported.

    Args:
        names: ``(import name, distribution name)`` pairs; None: :data:`PEER_LIBRARIES`.

    Returns:
        The status of each, by import name.
    """
    status = {}
    for name, distribution in PEER_LIBRARIES if names is None else names:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            status[name] = PeerStatus(name, distribution, None, _describe(error))
        else:
            version = getattr(module, "__version__", None)
            if version is None:
                try:
                    from importlib.metadata import version as dist_version

                    version = dist_version(distribution)
                except Exception:
                    version = "?"
            status[name] = PeerStatus(name, distribution, str(version), None)
    return status


def _own_class(module: ModuleType, name: str) -> tuple[Any, str | None]:
    """A peer's class of that name, or why it does not count as the peer's own."""
    cls = getattr(module, name, None)
    if cls is None:
        return None, f"{module.__name__} has no {name}"
    if cls is getattr(torch.optim, name, None):
        return None, f"{module.__name__}.{name} is torch.optim.{name} re-exported"
    return cls, None


def _factory(cls: Any, **kwargs: Any) -> OptimizerFactory:
    """A factory that builds ``cls(params, **kwargs)``."""

    def make(params: list[Tensor]) -> Any:
        return cls(params, **kwargs)

    return make


def _peer_contender(optimizer: str, module: ModuleType) -> Contender:
    """A peer library's implementation of an optimizer, with hyperparameters matching
    torch.optim's so that every contender performs the same update."""
    name = module.__name__
    lr = HYPERPARAMETERS[optimizer]["lr"]
    momentum = HYPERPARAMETERS[optimizer].get("momentum", 0.0)
    weight_decay = HYPERPARAMETERS[optimizer].get("weight_decay", 0.0)
    adam = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    if name == "optimi":
        # optimi's defaults differ from torch's (betas (0.9, 0.99), eps 1e-6, a momentum buffer
        # starting at zero), so they are set to torch's; its AdamW decays by lr * weight_decay
        # like torch's. foreach and triton stay at their defaults: on CPU that is a for-loop.
        cls = getattr(module, CLASS_NAMES[optimizer])
        if optimizer == "sgd":
            make = _factory(cls, lr=lr, momentum=momentum, torch_init=True)
        else:
            make = _factory(cls, **adam)
        return Contender(f"optimi.{CLASS_NAMES[optimizer]}", make)
    if name == "heavyball":
        # heavyball has SGD with heavy-ball momentum and AdamW (decay by lr * weight_decay);
        # Adam without weight decay is its AdamW with weight_decay=0. It compiles its update
        # functions with torch.compile on first use, so its first step includes compilation.
        why = (
            "its torch.compile'd update unrolls over every tensor, so compiling for this many "
            "takes minutes (bench.HEAVYBALL_MAX_TENSORS sets the limit)"
        )
        if optimizer == "sgd":
            make = _factory(module.SGD, lr=lr, beta=momentum)
            label = "heavyball.SGD"
        else:
            make = _factory(module.AdamW, **adam)
            label = "heavyball.AdamW" + ("(weight_decay=0)" if optimizer == "adam" else "")
        return Contender(label, make, None, HEAVYBALL_MAX_TENSORS, why)
    if name == "pytorch_optimizer":
        # Its SGD, Adam and AdamW are torch.optim's classes re-exported; its own SGD is SGDW,
        # which with weight_decay=0 is SGD with momentum.
        class_name = "SGDW" if optimizer == "sgd" else CLASS_NAMES[optimizer]
        cls, reason = _own_class(module, class_name)
        label = f"pytorch_optimizer.{class_name}"
        if cls is None:
            return Contender(label, None, reason)
        if optimizer == "sgd":
            return Contender(label, _factory(cls, lr=lr, momentum=momentum, weight_decay=0.0))
        return Contender(label, _factory(cls, **HYPERPARAMETERS[optimizer]))
    return Contender(name, None, "no recipe for this library")


#: The optimizers the peer libraries are timed for, with hyperparameters matching torch's.
PEER_OPTIMIZERS = ("sgd", "adam", "adamw")


def contenders_for(optimizer: str, peers: dict[str, PeerStatus] | None = None) -> list[Contender]:
    """Every contender for an optimizer: torch.optim, polyak and the peer libraries.

    Args:
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        peers: the peer libraries' import status, from :func:`import_peers`; None leaves the
            peers out.

    Returns:
        The contenders; those that cannot run carry the reason in ``unavailable``.

    Raises:
        ValueError: the optimizer is not one of the benchmarked ones.
    """
    if optimizer not in CLASS_NAMES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(CLASS_NAMES)}")
    name = CLASS_NAMES[optimizer]
    hyper = HYPERPARAMETERS[optimizer]
    torch_cls = getattr(torch.optim, name)
    polyak_cls = getattr(polyak, name, None)

    moved = TENSORS_MOVED[optimizer]

    def in_place_add(params: list[Tensor]) -> Any:
        return _InPlaceAdd(moved * sum(p.numel() * p.element_size() for p in params))

    takes = inspect.signature(torch_cls).parameters
    contenders = [Contender(MEMORY, in_place_add)]
    if "foreach" in takes:
        contenders += [
            Contender("torch foreach=False", _factory(torch_cls, **hyper, foreach=False)),
            Contender("torch foreach=True", _factory(torch_cls, **hyper, foreach=True)),
        ]
    else:
        # One path only (Muon, LBFGS, SparseAdam).
        contenders.append(Contender("torch (default)", _factory(torch_cls, **hyper)))
    fused = "fused" in takes
    if fused:
        contenders.append(Contender(REFERENCE, _factory(torch_cls, **hyper, fused=True)))
    strategies: tuple[tuple[str, dict[str, bool]], ...] = (
        ("polyak foreach=False", {"foreach": False}),
        ("polyak foreach=True", {"foreach": True}),
    )
    polyak_flags: tuple[tuple[str, dict[str, bool]], ...] = (
        ("polyak (default)", {}),
        *(strategies if "foreach" in takes else ()),
        *((("polyak fused=True", {"fused": True}),) if fused else ()),
    )
    for label, flags in polyak_flags:
        if polyak_cls is None:
            contenders.append(Contender(label, None, f"polyak.{name} does not exist yet"))
        else:
            contenders.append(Contender(label, _factory(polyak_cls, **hyper, **flags)))
    for peer in (peers or {}).values():
        # A peer that cannot be imported is said once, in the run's header, not in every table.
        if peer.error is None and optimizer in PEER_OPTIMIZERS:
            contenders.append(_peer_contender(optimizer, importlib.import_module(peer.name)))
    return contenders


def measure_bandwidth(mib: int = 64, calls: int = 20) -> float:
    """Measure the in-place memory bandwidth as ``a.add_(b, alpha=0.5)`` achieves it.

    Each call reads two float32 tensors of ``mib`` MiB and writes one, 3 x ``mib`` MiB in all.

    Args:
        mib: the size of each operand in MiB.
        calls: how many calls to take the median of, after one warm-up call.

    Returns:
        The bandwidth in bytes per second, from the median call.
    """
    numel = mib * _MIB // 4
    a = torch.randn(numel)
    b = torch.randn(numel)
    a.add_(b, alpha=0.5)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        a.add_(b, alpha=0.5)
        times.append(time.perf_counter() - start)
    return 3 * numel * 4 / statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to the null device, silencing the profiler's start and stop lines
    that its C++ side writes there unconditionally."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_bytes(step: Callable[[], object]) -> int | None:
    """The peak of CPU memory allocated while a function runs, above what was allocated before.

    The function runs once under ``torch.profiler.profile(profile_memory=True)``; the profiler
    records every allocation and free of torch's CPU allocator with a timestamp. Summing them in
    time order gives the memory allocated since the start, and its running maximum is the peak.
    Memory held by allocators outside torch's (e.g. a library's own C++ code) is not seen.

    Args:
        step: the function, e.g. ``optimizer.step``.

    Returns:
        The peak in bytes (0 if nothing was allocated), or None if the profiler recorded no
        memory events that can be read.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        results: Any = prof.profiler.kineto_results  # type: ignore[union-attr]
        events = [(e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]"]
    except Exception:
        return None
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def state_bytes(optimizer: Any) -> int:
    """The bytes held by the tensors in an optimizer's ``state``, each storage counted once.

    Args:
        optimizer: a torch.optim-style optimizer.

    Returns:
        The total storage bytes of every tensor reachable from ``optimizer.state``.
    """
    seen: set[int] = set()
    total = 0
    stack: list[object] = list(getattr(optimizer, "state", {}).values())
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            # A distributed tensor's bytes are those of its local data.
            local = getattr(item, "_local_tensor", None)
            storage = (local if isinstance(local, Tensor) else item).untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, (list, tuple)):
            stack += item
    return total


def _tensors(case: Case, seed: int) -> list[Tensor]:
    """Seeded standard-normal float32 tensors of the case's shapes (DTensors, sharded on their
    first dimension, for a ``dtensor`` case; 4-D ones in channels-last memory format, as a
    model's convolution weights and their gradients are after ``model.to(memory_format=
    torch.channels_last)``, for a ``channels_last`` case)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator) for shape in case.shapes]
    if case.variant == "channels_last":
        return [
            t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors
        ]
    if case.variant != "dtensor":
        return tensors
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _one_rank_mesh()
    return [distribute_tensor(t, mesh, [Shard(0)]) for t in tensors]


def _one_rank_mesh() -> Any:
    """A device mesh of this process alone, made with the process group it needs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return init_device_mesh("cpu", (dist.get_world_size(),))


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


class _InPlaceAdd:
    """Not an optimizer: ``a.add_(b, alpha=0.5)`` over operands sized so that one call reads and
    writes the bytes one optimizer step moves.

    Timed in the same rounds as the optimizers, with the same interleaving, it measures the
    bandwidth the machine gives that much memory traffic in the same cache conditions, which a
    separate measurement with operands of one size does not: a step whose data other contenders
    have just evicted runs at memory speed, one run back to back partly from cache.
    """

    def __init__(self, bytes_moved: int) -> None:
        numel = max(1, bytes_moved // (3 * 4))
        self.a = torch.randn(numel)
        self.b = torch.randn(numel)
        self.state: dict[Any, Any] = {}
        self.param_groups: list[dict[str, Any]] = []

    def step(self, closure: Callable[[], float] | None = None) -> None:
        self.a.add_(self.b, alpha=0.5)


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


def _sparse_rows(grad: Tensor) -> Tensor:
    """A sparse gradient holding one row of ``grad`` in :data:`SPARSE_ROW_EVERY`, coalesced."""
    rows = torch.arange(0, grad.shape[0], SPARSE_ROW_EVERY)
    sparse = torch.sparse_coo_tensor(
        rows.unsqueeze(0), grad[rows], grad.shape, check_invariants=True
    )
    return sparse.coalesce()


def _quadratic_closure(params: list[Tensor], grads: list[Tensor]) -> Callable[[], float]:
    """The closure of :data:`CLOSURE_STEPS`: the loss <g, θ - θ_0> + |θ - θ_0|^2 / 2 around
    the parameters θ_0 it is made at, and its gradient g + θ - θ_0 set as each ``.grad``."""
    anchors = [p.detach().clone() for p in params]

    def closure() -> float:
        loss = 0.0
        for p, g, p0 in zip(params, grads, anchors, strict=True):
            delta = p.detach() - p0
            p.grad = g + delta
            flat = delta.view(-1)
            loss += float(g.view(-1).dot(flat)) + 0.5 * float(flat.dot(flat))
        return loss

    return closure


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


#: Milliseconds of matrix products on every thread before each timed step. In training a step
#: follows a backward pass, which keeps every core busy; a core left idle for tens of
#: milliseconds (while a contender steps on one thread) can run the next parallel work several
#: times slower, on virtual machines above all: on the 2-core machine an in-place add of 41 MB
#: at 2 threads took 4.4 ms after 100 ms idle, and 1.06 ms after 2 ms of products.
BUSY_MS = 3.0


@functools.cache
def _busy_matrix() -> Tensor:
    return torch.randn(384, 384, generator=torch.Generator().manual_seed(0))


def keep_busy(ms: float = BUSY_MS) -> None:
    """Keep every thread busy with matrix products for ``ms`` milliseconds, as a backward
    pass would just before a step."""
    matrix = _busy_matrix()
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        torch.mm(matrix, matrix)


def case_for(optimizer: str, case: Case) -> Case:
    """The tensors of ``case`` an optimizer takes: the 2-D ones for :data:`MATRICES_ONLY` and
    :data:`SPARSE_GRADIENTS`, all of them otherwise."""
    if optimizer not in MATRICES_ONLY | SPARSE_GRADIENTS:
        return case
    shapes = tuple(shape for shape in case.shapes if len(shape) == 2)
    what = f"its {len(shapes)} 2-D tensors"
    return Case(case.name, shapes, f"{case.description}; {what}" if case.description else what)


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
            steps are driven (:func:`case_for`, :data:`CLOSURE_STEPS`,
            :data:`SPARSE_GRADIENTS`).
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
            optimizer=optimizer,
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
        load_average=_load_average(),
    )


def _run_batch(
    members: Sequence[tuple[Row, OptimizerFactory]],
    case: Case,
    *,
    optimizer: str,
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
            params = [p.requires_grad_() for p in _tensors(case, seed)]
            grads = _tensors(case, seed + 1)
            if optimizer in SPARSE_GRADIENTS:
                grads = [_sparse_rows(g) for g in grads]
            closure = _quadratic_closure(params, grads) if optimizer in CLOSURE_STEPS else None
            if case.per_tensor and closure is not None:
                raise ValueError("a closure step re-evaluates the whole model, not one tensor")
            made = _PerTensor(make, params) if case.per_tensor else make(params)
            if case.variant == "amp" and not isinstance(made, _InPlaceAdd):
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
            _codegen.wait(timeout=600)
            contender.load_grads()
            fresh.peak_extra_bytes = step_peak_bytes(contender.step)
            fresh.state_bytes = state_bytes(contender.optimizer)
        except _TooSlowError as error:
            row.error = str(error)
            continue
        except Exception as error:
            row.error = _describe(error)
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
                    contender.row.error = _describe(error)
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


def default_threads() -> tuple[int, ...]:
    """The thread sweep of a default run: one thread (where compute limits a step) and every
    core (where memory does)."""
    cores = os.cpu_count() or 1
    return (1,) if cores == 1 else (1, cores)


#: The vector extensions worth naming in the report, as /proc/cpuinfo spells them.
_VECTOR_FLAGS: tuple[str, ...] = (
    *("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"),
    *("avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve", "sve2"),
)


def cpu_description() -> str:
    """The CPU's model and the vector extensions it has, e.g. ``AMD EPYC (avx2 fma avx512f)``."""
    model, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    named = [flag for flag in _VECTOR_FLAGS if flag in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model} ({' '.join(named) or 'no vector extensions listed'}; torch uses {capability})"


def kernel_description() -> str:
    """What polyak's compiled programs run on and whose numbers they give, e.g.
    ``-march=native: AVX-512 vectors, 16 floats; as torch's AVX2 kernels round: ...``."""
    from polyak.strategies import _dispatch

    return f"{_codegen.vector_target()}; {_dispatch.describe(torch.float32)}"


def _load_average() -> float | None:
    """The one-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _resolve_cases(cases: Sequence[str | Case]) -> list[Case]:
    """Look up named cases; pass custom ones through."""
    resolved = []
    for case in cases:
        if isinstance(case, Case):
            resolved.append(case)
        elif case in CASES:
            resolved.append(CASES[case])
        else:
            raise ValueError(f"unknown case {case!r}; choose from {sorted(CASES)}")
    return resolved


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
        optimizers: which optimizers, from ``"sgd"``, ``"adam"``, ``"adamw"``.
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
    selected = _resolve_cases(cases)
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
        load_average = _load_average()
        # Steady state: the kernel is built before anything is timed.
        native.load(wait=True)
        if progress is not None:
            progress("measuring the in-place bandwidth")
        torch.set_num_threads(sweep[-1])
        bandwidth = {mib: measure_bandwidth(mib) for mib in bandwidth_mib}
        peer_status = import_peers() if peers else {}
        yield Environment(
            torch_version=torch.__version__,
            polyak_version=polyak.__version__,
            threads=sweep,
            bandwidth=bandwidth,
            peers=tuple(peer_status.values()),
            rounds=rounds,
            warmup=warmup,
            skipped_cases=tuple(skipped),
            load_average=load_average,
            cpu=cpu_description(),
            kernel=kernel_description(),
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
        optimizers: which optimizers, from ``"sgd"``, ``"adam"``, ``"adamw"``.
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


def format_case(result: CaseResult, *, markdown: bool = False) -> str:
    """Render one (optimizer, case) result as a table with a title and notes.

    Args:
        result: what :func:`bench_case` returned.
        markdown: render a Markdown table instead of aligned plain text.

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
        lines = [f"#### {title}", ""]
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


def format_summary(cases: Sequence[CaseResult], *, markdown: bool = False) -> str:
    """One line per (optimizer, case, thread count): the same-bytes add, torch's fused step and
    polyak's default step, in median ms, with polyak's ratio to torch fused and share of the
    bandwidth, and the best peer's ratio.

    Args:
        cases: the results to summarise, in run order.
        markdown: render a Markdown table instead of aligned plain text.

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
        peers = [r for r in result.rows if r.ok and r.speedup is not None and not _own(r.label)]
        best = max(peers, key=lambda r: r.speedup or 0.0, default=None)
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
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |"]
        lines.append("|" + "|".join([":---"] + ["---:"] * 6 + [":---"]) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in table[1:]]
        return "\n".join(lines)
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
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
