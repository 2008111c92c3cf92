"""A side-by-side run of ``polyak.SGD`` and ``torch.optim.SGD`` on scikit-learn's digits.

Both optimizers train the same small MLP from the very same initial weights, over the very same
minibatches, so any difference in the trained models comes from the optimizer alone. The demo
needs the ``demo`` extra (scikit-learn, matplotlib, tqdm); those are imported only when the demo
runs, so ``import polyak`` does not need them.
"""

from __future__ import annotations

import copy
import importlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import polyak

#: Defaults of :func:`run_demo`, shared with the command line.
DEFAULT_EPOCHS = 10
DEFAULT_LR = 0.05
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEED = 0
DEFAULT_OUT = "polyak-demo-loss.png"
MOMENTUM = 0.9
HIDDEN = 64
TEST_FRACTION = 0.25

#: ``(import name, distribution name)`` of each optional dependency of the demo.
_DEPENDENCIES = (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm"))
#: How to install them; polyak itself is installed from its checkout (it is on no index).
INSTALL_HINT = "pip install scikit-learn matplotlib tqdm"

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class MissingDemoDependencyError(ImportError):
    """An optional dependency of the demo is not installed."""


@dataclass(frozen=True)
class RunResult:
    """What one training run produced.

    Attributes:
        name: the optimizer's display name.
        accuracy: final accuracy on the test split, in [0, 1].
        losses: the training loss of every step, in order.
        step_times: the wall time in seconds of every ``optimizer.step()`` call.
        model: the trained model.
        flat_steps: how many steps polyak's flat kernel ran (0 for other optimizers).
        strategy: how the steps ran, in words.
        optimizer: the optimizer that ran them.
    """

    name: str
    accuracy: float
    losses: list[float]
    step_times: list[float]
    model: nn.Module
    flat_steps: int = 0
    strategy: str = ""
    optimizer: torch.optim.Optimizer | None = None

    @property
    def median_step_time(self) -> float:
        """The median ``optimizer.step()`` wall time, in seconds."""
        return statistics.median(self.step_times)

    @property
    def first_step_time(self) -> float:
        """The wall time of the first ``optimizer.step()``, in seconds."""
        return self.step_times[0]


@dataclass(frozen=True)
class DemoResult:
    """The outcome of :func:`run_demo`.

    Attributes:
        polyak_run: the run with ``polyak.SGD``.
        torch_run: the run with ``torch.optim.SGD``.
        max_param_diff: the largest absolute difference between any two corresponding
            parameters of the two trained models.
        png_path: where the loss-curve plot was written.
        epochs: the number of epochs each run trained.
        steps_per_epoch: the number of optimizer steps per epoch.
        n_train: the number of training samples.
        n_test: the number of test samples.
    """

    polyak_run: RunResult
    torch_run: RunResult
    max_param_diff: float
    png_path: Path
    epochs: int
    steps_per_epoch: int
    n_train: int
    n_test: int

    @property
    def polyak_accuracy(self) -> float:
        """Test accuracy of the ``polyak.SGD`` run."""
        return self.polyak_run.accuracy

    @property
    def torch_accuracy(self) -> float:
        """Test accuracy of the ``torch.optim.SGD`` run."""
        return self.torch_run.accuracy


def check_dependencies() -> None:
    """Make sure the demo's optional dependencies can be imported.

    Raises:
        MissingDemoDependencyError: naming the missing packages and how to install them.
    """
    missing = []
    for module, distribution in _DEPENDENCIES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        names = " and ".join(
            [", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing
        )
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDemoDependencyError(
            f"the demo needs {names}, which {verb} not installed; "
            f"install the demo extra with: {INSTALL_HINT}"
        )


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load the digits data, split it and standardise it with the training split's statistics.

    Args:
        seed: seeds the stratified train/test split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 features and int64 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    return (
        torch.as_tensor(scaler.transform(x_train), dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.int64),
        torch.as_tensor(scaler.transform(x_test), dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.int64),
    )


def make_model(n_features: int, n_classes: int, seed: int) -> nn.Module:
    """Build the MLP ``n_features``-64-``n_classes`` with a ReLU, initialised from ``seed``.

    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(n_features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_classes))


def batch_orders(n: int, epochs: int, seed: int) -> list[Tensor]:
    """One random permutation of ``range(n)`` per epoch, from a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator) for _ in range(epochs)]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The fraction of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean().item())


def ran_flat(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's last step ran polyak's flat kernel (as :func:`polyak.explain`
    reports it; never for torch's optimizers)."""
    if not isinstance(optimizer, polyak.Optimizer):
        return False
    return any(group.flat for group in polyak.explain(optimizer).groups)


def describe_polyak_strategy(
    flat_steps: int, steps: int, optimizer: torch.optim.Optimizer | None = None
) -> str:
    """Say in words how a polyak run's steps ran, given how many the flat kernel ran, and
    where none did, why (from :func:`polyak.explain` of ``optimizer``)."""
    if flat_steps:
        others = steps - flat_steps
        rest = f", {others} on the reference path" if others else ""
        return f"flat kernel on {flat_steps} of {steps} steps{rest}"
    if isinstance(optimizer, polyak.Optimizer):
        report = polyak.explain(optimizer)
        reason = report.groups[0].reason if report.groups else ""
        return f"for-loop: {reason or 'the flat kernel ' + report.kernel}"
    return "for-loop: the flat kernel ran no step"


def prepare_kernel(make_optimizer: OptimizerFactory, model: nn.Module, progress: bool) -> None:
    """Build the flat kernel (once per machine) with a progress bar, and compile the program
    of ``make_optimizer``'s configuration, so that the timed run compares the fast path with
    torch rather than the path steps take while a build runs."""
    from tqdm import tqdm

    from polyak.strategies import flat

    if not flat.needs_build():
        flat.kernel()
    else:
        with tqdm(
            total=None,
            desc="building the flat kernel (once per machine)",
            unit="s",
            bar_format="{desc}: {n:.0f} s",
            disable=not progress,
            leave=False,
        ) as bar:

            def tick(seconds: float) -> None:
                bar.update(seconds - bar.n)

            flat.kernel(wait=True, tick=tick)
    scratch = copy.deepcopy(model)
    optimizer = make_optimizer(list(scratch.parameters()))
    for _ in range(2):  # the first makes the state, the second asks for the program
        for p in scratch.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    flat.wait(timeout=120)


def train(
    name: str,
    model: nn.Module,
    make_optimizer: OptimizerFactory,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    orders: Sequence[Tensor],
    batch_size: int,
    progress: bool,
) -> RunResult:
    """Train ``model`` in place with cross-entropy over the given batch order and evaluate it.

    Args:
        name: the optimizer's display name, shown on the progress bar.
        model: the model to train.
        make_optimizer: builds the optimizer from the model's parameters.
        data: ``(x_train, y_train, x_test, y_test)``.
        orders: one permutation of the training indices per epoch.
        batch_size: samples per minibatch; the last batch of an epoch may be smaller.
        progress: show a progress bar.

    Returns:
        The run's accuracy, per-step losses and step times, the trained model, and how many
        steps ran polyak's flat kernel.
    """
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    optimizer = make_optimizer(list(model.parameters()))
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    losses: list[float] = []
    step_times: list[float] = []
    flat_steps = 0
    model.train()
    with tqdm(
        total=len(orders) * steps_per_epoch, desc=f"{name:<15}", disable=not progress, leave=True
    ) as bar:
        for order in orders:
            for first in range(0, len(order), batch_size):
                batch = order[first : first + batch_size]
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[batch]), y_train[batch])
                loss.backward()
                start = time.perf_counter()
                optimizer.step()
                step_times.append(time.perf_counter() - start)
                flat_steps += ran_flat(optimizer)
                losses.append(loss.item())
                bar.update()
    return RunResult(
        name,
        accuracy(model, x_test, y_test),
        losses,
        step_times,
        model,
        flat_steps=flat_steps,
        optimizer=optimizer,
    )


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest absolute elementwise difference between the parameters of ``a`` and ``b``."""
    return max(
        (pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )


def plot_losses(runs: Sequence[RunResult], path: Path, title: str) -> None:
    """Plot each run's per-step training loss, later runs dashed, and save a PNG to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax: Any = fig.add_subplot()
    styles: list[dict[str, Any]] = [
        {"linestyle": "-", "linewidth": 2.5, "alpha": 0.6},
        {"linestyle": "--"},
    ]
    for run, style in zip(runs, styles, strict=False):
        ax.plot(range(1, len(run.losses) + 1), run.losses, label=run.name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def run_demo(
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    out: str | Path = DEFAULT_OUT,
    progress: bool = True,
) -> DemoResult:
    """Train the digits MLP with ``polyak.SGD`` and ``torch.optim.SGD`` and compare them.

    Both runs use ``lr``, momentum 0.9 and Nesterov momentum, and start from the same weights and
    see the same minibatches in the same order.

    Args:
        epochs: passes over the training split.
        lr: learning rate of both optimizers.
        batch_size: samples per minibatch.
        seed: seeds the data split, the initial weights and the batch order.
        out: where to write the PNG of both loss curves.
        progress: show a progress bar per run.

    Returns:
        Both runs' results, the largest parameter difference and the plot's path.

    Raises:
        MissingDemoDependencyError: if scikit-learn, matplotlib or tqdm is not installed.
        ValueError: if ``epochs`` or ``batch_size`` is below 1.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_dependencies()

    data = load_data(seed)
    x_train, y_train, x_test, _ = data
    n_classes = int(y_train.max().item()) + 1
    initial = make_model(x_train.shape[1], n_classes, seed)
    orders = batch_orders(len(x_train), epochs, seed)
    hyper: dict[str, Any] = {"lr": lr, "momentum": MOMENTUM, "nesterov": True}

    def make_polyak(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return polyak.SGD(params, **hyper)

    def make_torch(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, **hyper)

    prepare_kernel(make_polyak, initial, progress)
    polyak_run, torch_run = (
        train(name, copy.deepcopy(initial), factory, data, orders, batch_size, progress)
        for name, factory in (("polyak.SGD", make_polyak), ("torch.optim.SGD", make_torch))
    )
    runs = [
        replace(
            polyak_run,
            strategy=describe_polyak_strategy(
                polyak_run.flat_steps, len(polyak_run.step_times), polyak_run.optimizer
            ),
        ),
        # torch.optim's default on the CPU: its foreach path is the default on accelerators only.
        replace(torch_run, strategy="for-loop"),
    ]
    path = Path(out)
    plot_losses(
        runs,
        path,
        f"digits MLP, SGD(lr={lr:g}, momentum={MOMENTUM:g}, nesterov=True), batch {batch_size}",
    )
    return DemoResult(
        polyak_run=runs[0],
        torch_run=runs[1],
        max_param_diff=max_param_diff(runs[0].model, runs[1].model),
        png_path=path,
        epochs=epochs,
        steps_per_epoch=math.ceil(len(x_train) / batch_size),
        n_train=len(x_train),
        n_test=len(x_test),
    )
