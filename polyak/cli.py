"""The ``polyak`` command line: ``polyak demo``, ``polyak bench``, ``polyak quality`` and
``polyak build`` (also ``python -m polyak ...``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
            "parameter difference, the median and first optimizer.step() times and the "
            "strategy each step ran (whether polyak's flat kernel ran), and plot both loss "
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


def _comma_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A parser of a comma-separated list whose items must be among ``choices``."""

    def parse(text: str) -> list[str]:
        items = [item.strip().lower() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"choose a comma-separated list from {','.join(choices)}; got {text!r}"
            )
        return items

    return parse


def _thread_list(text: str) -> tuple[int, ...]:
    counts = tuple(_positive_int(part) for part in text.split(",") if part.strip())
    if not counts:
        raise argparse.ArgumentTypeError("expected comma-separated positive thread counts")
    return counts


def _add_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from polyak import bench

    parser = subparsers.add_parser(
        "bench",
        help="time optimizer steps of polyak, torch.optim and peer libraries side by side",
        description=(
            "Time optimizer.step() of torch.optim (for-loop, foreach, fused), polyak (default, "
            "for-loop, foreach, fused) and the peer libraries torch-optimi, heavyball and "
            "pytorch-optimizer where installed, interleaved in one process, on several sets of "
            "parameter shapes. Print one table per optimizer and case: median step time, "
            "effective bandwidth, its share of the measured in-place bandwidth, speed relative "
            "to torch's fused step, peak extra memory, state size and first-step time, each "
            "case at one thread and at every core, then a summary. On a 2-core machine a "
            "default run takes about 20 minutes (GPT-2's 124M parameters take most of it), "
            "--quick about 1 minute, plus about a minute and a half the first time for the "
            "kernel's build."
        ),
    )
    parser.add_argument(
        "--optimizers",
        type=_comma_list(tuple(bench.CLASS_NAMES)),
        default=",".join(bench.DEFAULT_OPTIMIZERS),
        help=(
            "comma-separated optimizers, from "
            + ",".join(bench.CLASS_NAMES)
            + " (default: %(default)s); where torch has no fused CPU step, ratios compare with "
            "its fastest path"
        ),
    )
    parser.add_argument(
        "--cases",
        type=_comma_list(tuple(bench.CASES)),
        default=",".join(bench.DEFAULT_CASES),
        help="comma-separated parameter-shape sets, from "
        + ",".join(bench.CASES)
        + " (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        help=(
            f"interleaved timed rounds (default: {bench.DEFAULT_ROUNDS}, "
            f"or {bench.QUICK_ROUNDS} with --quick)"
        ),
    )
    parser.add_argument(
        "--threads",
        type=_thread_list,
        default=None,
        help=(
            "comma-separated thread counts; every case is timed at each "
            f"(default: {','.join(str(t) for t in bench.default_threads())}, "
            "one thread and every core)"
        ),
    )
    parser.add_argument(
        "--memory-budget",
        type=_positive_float,
        default=bench.DEFAULT_MEMORY_BUDGET_GIB,
        metavar="GIB",
        help=(
            "GiB that the contenders run together may hold; more contenders run in "
            "consecutive batches (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--step-limit",
        type=_positive_float,
        default=bench.DEFAULT_STEP_LIMIT,
        metavar="SEC",
        help=(
            "drop a contender whose warm-up step after the first takes longer than this "
            "(default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="few rounds, one bandwidth measurement, no gpt2"
    )
    parser.add_argument(
        "--no-peers", dest="peers", action="store_false", help="leave the peer libraries out"
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--out",
        metavar="FILE",
        help=(
            "also write the run as a Markdown page to FILE: a header with this command line, "
            "the date, the versions and the machine, the summary table, the cases and every "
            "contender's table (docs/benchmarks.md is such a page)"
        ),
    )
    parser.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from polyak import bench

    def progress(line: str) -> None:
        print(f"polyak bench: {line}", file=sys.stderr, flush=True)

    environment = None
    cases = []
    for item in bench.iter_benchmark(
        args.optimizers,
        args.cases,
        rounds=args.rounds,
        threads=args.threads,
        peers=args.peers,
        quick=args.quick,
        memory_budget_gib=args.memory_budget,
        step_limit=args.step_limit,
        progress=progress,
    ):
        if isinstance(item, bench.Environment):
            environment = item
            text = bench.format_environment(item, markdown=args.markdown)
        else:
            cases.append(item)
            text = bench.format_case(item, markdown=args.markdown)
        print(text + "\n", flush=True)
    if cases:
        print("Summary\n", flush=True)
        print(bench.format_summary(cases, markdown=args.markdown) + "\n", flush=True)
    if args.out is not None and environment is not None:
        command = shlex.join(["polyak", *args.argv])
        page = bench.format_page(bench.BenchResult(environment, tuple(cases)), command=command)
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(page)
        progress(f"wrote {args.out}")
    return 0


def _add_quality(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from polyak.bench import quality

    parser = subparsers.add_parser(
        "quality",
        help="train one small language model with AdamW in fp32, bf16 and 8-bit, and compare",
        description=(
            "Train the same character-level MLP language model on the source of Python's "
            "standard library once per variant: fp32 AdamW (the baseline), bf16 parameters "
            "with kahan_sum or bf16_stochastic_round, plain bf16 parameters, and fp32 "
            "parameters with 8-bit or bf16 state; same initial weights, batches and "
            "learning-rate schedule for all. Print each variant's final training and "
            "validation loss, its difference from fp32, the state's bytes per parameter and "
            "the time, and plot the loss curves. On the CPU, at one thread; a default run "
            "takes about a minute."
        ),
    )
    parser.add_argument(
        "--variants",
        type=_comma_list(tuple(quality.VARIANTS)),
        default=",".join(quality.DEFAULT_VARIANTS),
        help="comma-separated variants, from %(default)s (default: all)",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=quality.DEFAULT_STEPS,
        help="optimizer steps per variant; e.g. 6000 for a longer run, about 5 minutes "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=quality.DEFAULT_BATCH_SIZE,
        help="windows of text per step (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=quality.DEFAULT_SEED,
        help="seeds the initial weights, the batches and stochastic rounding "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=quality.DEFAULT_THREADS,
        help="torch's thread count for the runs (default: %(default)s, which other work on "
        "the machine slows the least)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--out",
        metavar="FILE",
        default=quality.DEFAULT_OUT,
        help="where to write the PNG of the loss curves (default: %(default)s)",
    )
    parser.add_argument(
        "--no-plot", dest="plot", action="store_false", help="write no PNG (needs no matplotlib)"
    )
    parser.set_defaults(handler=_run_quality)


def _run_quality(args: argparse.Namespace) -> int:
    import importlib.util

    from polyak.bench import quality, quality_report

    def progress(line: str) -> None:
        print(f"polyak quality: {line}", file=sys.stderr, flush=True)

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        progress("the plot needs matplotlib: pip install matplotlib, or pass --no-plot")
        return 1
    config = quality.QualityConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    result = quality.run_quality(args.variants, config, threads=args.threads, progress=progress)
    print(quality_report.format_quality(result, markdown=args.markdown), flush=True)
    if args.plot:
        progress(f"wrote {quality_report.plot_quality(result, args.out)}")
    return 0


def _format_time(seconds: float) -> str:
    """Format a duration in microseconds below 1 ms, in seconds from 1 s, else in milliseconds."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds >= 1:
        return f"{seconds:.2f} s"
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
        f"{'optimizer':<{width}}  {'test acc':>8}  {'median step':>11}  {'first step':>10}  "
        "strategy",
    ]
    for run in runs:
        lines.append(
            f"{run.name:<{width}}  {run.accuracy:>8.2%}  {_format_time(run.median_step_time):>11}"
            f"  {_format_time(run.first_step_time):>10}  {run.strategy}"
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


def _add_build(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build the flat kernel and compile the optimizers' default programs ahead",
        description=(
            "Build the flat kernel for this machine, decide how compiled programs compute "
            "sqrt, and compile the default program of every optimizer, so that no step of "
            "a later process waits or runs the reference path meanwhile (e.g. in a container "
            "image). Takes about a minute and a half on a 2-core machine the first time; "
            "prints where the builds are cached."
        ),
    )
    parser.set_defaults(handler=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    import polyak
    from polyak.strategies import flat

    classes = [getattr(polyak, name) for name in polyak.__all__]
    ok, lines = flat.build_ahead(
        [c for c in classes if isinstance(c, type) and issubclass(c, polyak.Optimizer)],
        tick=_elapsed_line(),
    )
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for line in lines:
        print(line)
    return 0 if ok else 1


def _elapsed_line() -> Any:
    """A progress report for a wait of unknown length: on a terminal, one line rewritten with
    the seconds so far; elsewhere (a log), a line every 15 seconds."""
    terminal = sys.stderr.isatty()
    said = [0.0]

    def tick(seconds: float) -> None:
        if terminal:
            print(f"\r  building: {seconds:.0f} s ", end="", file=sys.stderr, flush=True)
        elif seconds - said[0] >= 15:
            said[0] = seconds
            print(f"  still building: {seconds:.0f} s", file=sys.stderr, flush=True)

    return tick


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
    _add_bench(subparsers)
    _add_quality(subparsers)
    _add_build(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``polyak`` command line.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 1 if the command could not run.
    """
    args = build_parser().parse_args(argv)
    # The command line as given, for the report that shows it.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handler: Handler = args.handler
    return handler(args)
