"""The ``polyak`` command line: ``polyak demo`` (also ``python -m polyak demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import polyak

if TYPE_CHECKING:
    from polyak.demo import DemoResult

#: Every subcommand handler takes the parsed arguments and returns the exit code.
Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    """Parse a command-line number that must be greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from polyak import demo

    parser = subparsers.add_parser(
        "demo",
        help="train a small MLP on the digits data with polyak.SGD and torch.optim.SGD",
        description=(
            "Train a 64-64-10 MLP on scikit-learn's digits data twice, from the same initial "
            "weights and over the same minibatches: once with polyak.SGD and once with "
            "torch.optim.SGD (momentum 0.9, Nesterov). Print both test accuracies, the largest "
            "parameter difference and the median optimizer.step() times, and plot both loss "
            f"curves. Needs the demo extra: {demo.INSTALL_HINT}."
        ),
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=demo.DEFAULT_EPOCHS,
        help="passes over the training data (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=demo.DEFAULT_LR,
        help="learning rate of both optimizers (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=demo.DEFAULT_BATCH_SIZE,
        help="samples per minibatch (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=demo.DEFAULT_SEED,
        help="seeds the data split, initial weights and batch order (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default=demo.DEFAULT_OUT,
        help="where to write the PNG of both loss curves (default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    parser.set_defaults(handler=_run_demo)


def _format_time(seconds: float) -> str:
    """Format a duration in microseconds below 1 ms, else in milliseconds."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def format_demo(result: DemoResult) -> str:
    """Render a demo result as the short report ``polyak demo`` prints.

    Args:
        result: what :func:`polyak.demo.run_demo` returned.

    Returns:
        The report, without a trailing newline.
    """
    runs = (result.polyak_run, result.torch_run)
    width = max(len("optimizer"), *(len(run.name) for run in runs))
    lines = [
        f"digits: {result.n_train} train / {result.n_test} test, "
        f"{result.epochs} epochs x {result.steps_per_epoch} steps",
        "",
        f"{'optimizer':<{width}}  {'test acc':>8}  {'median step':>11}",
    ]
    for run in runs:
        lines.append(
            f"{run.name:<{width}}  {run.accuracy:>8.2%}  {_format_time(run.median_step_time):>11}"
        )
    verdict = "identical" if result.max_param_diff == 0.0 else "differ"
    lines += [
        "",
        f"max |param difference|: {result.max_param_diff:.3g} ({verdict})",
        f"loss curves: {result.png_path}",
    ]
    return "\n".join(lines)


def _run_demo(args: argparse.Namespace) -> int:
    from polyak.demo import MissingDemoDependencyError, run_demo

    try:
        result = run_demo(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            out=args.out,
            progress=args.progress,
        )
    except MissingDemoDependencyError as error:
        print(f"polyak demo: {error}", file=sys.stderr)
        return 1
    print(format_demo(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``polyak`` argument parser with one subparser per command.

    Returns:
        The parser; each subcommand sets ``handler`` on the parsed namespace.
    """
    parser = argparse.ArgumentParser(
        prog="polyak", description="PyTorch optimizers written from scratch."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {polyak.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``polyak`` command line.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 1 if the command could not run.
    """
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)
