"""polyak's Triton kernels on a CUDA GPU: exactness against torch, and step times against torch's
``fused=True`` and ``foreach`` paths and the peers' GPU kernels.

Usage::

    python benchmarks/gpu.py [--optimizers sgd,adam,adamw] [--cases small,mlp,convnet,gpt2]
        [--rounds N] [--skip-exactness] [--skip-timing]

What it prints:

1. The GPU model, torch's and triton's versions.
2. Exactness, per optimizer: after a few steps from the same parameters and gradients, the
   largest difference of polyak's default step (its Triton kernel) from torch's per-tensor
   (``foreach=False``), ``foreach=True`` and ``fused=True`` steps, in absolute value and in units
   in the last place; "exact" where the bits agree.
3. Timing, per case and optimizer: the median time of one step of each contender (CUDA events),
   and a yardstick: a copy of as many bytes as the step reads and writes, the least a step can
   take on this GPU.

Peers (each skipped, with a line saying so, where it cannot be imported): torch-optimi's Triton
kernels (``triton=True``) and bitsandbytes' 32-bit optimizers. Without a CUDA device, or
without triton, the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polyak
from polyak.bench.cases import CASES, tensors

#: polyak's class, torch's twin, and the arguments of each optimizer compared.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {"lr": 0.01, "momentum": 0.9}),
    "adam": ("Adam", {"lr": 1e-3}),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}),
    "adagrad": ("Adagrad", {"lr": 0.01}),
    "rmsprop": ("RMSprop", {"lr": 0.01, "momentum": 0.9}),
    "adamax": ("Adamax", {"lr": 2e-3}),
    "nadam": ("NAdam", {"lr": 2e-3}),
    "radam": ("RAdam", {"lr": 1e-3}),
}
#: The peers' optimizers: module, class, and extra arguments.
PEERS: dict[str, dict[str, tuple[str, str, dict[str, Any]]]] = {
    "optimi (triton)": {
        "sgd": ("optimi", "SGD", {"triton": True}),
        "adam": ("optimi", "Adam", {"triton": True}),
        "adamw": ("optimi", "AdamW", {"triton": True}),
    },
    "bitsandbytes (32-bit)": {
        "sgd": ("bitsandbytes.optim", "SGD32bit", {}),
        "adam": ("bitsandbytes.optim", "Adam32bit", {}),
        "adamw": ("bitsandbytes.optim", "AdamW32bit", {}),
    },
}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance of ``a`` from ``b`` in float32 units in the last place."""
    ia = a.float().view(torch.int32).long()
    ib = b.float().view(torch.int32).long()
    # Order the bit patterns as the numbers they stand for (negative numbers count down).
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max().item()) if a.numel() else 0


Factory = Callable[[list[torch.Tensor]], Any]


def _factory(cls: Any, kwargs: dict[str, Any]) -> Factory:
    """A function making an optimizer of ``cls`` with ``kwargs`` over given parameters."""
    return lambda params: cls(params, **kwargs)


def _run(
    make: Factory, start: list[torch.Tensor], grads: list[list[torch.Tensor]]
) -> list[torch.Tensor]:
    """The parameters after stepping copies of ``start`` by ``make``'s optimizer on ``grads``."""
    params = [t.clone().requires_grad_() for t in start]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def exactness(names: list[str], steps: int = 5) -> None:
    """Print how far polyak's default step is from torch's three paths, per optimizer."""
    print("\nexactness after", steps, "steps (float32; odd sizes, a 0-dim and an empty tensor)")
    shapes = [(1000, 37), (4097,), (), (0,), (3, 5, 7)]
    for name in names:
        cls_name, kwargs = OPTIMIZERS[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        start = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
        grads = [
            [torch.randn(s, generator=gen, device="cuda") for s in shapes] for _ in range(steps)
        ]

        ours_cls = getattr(polyak, cls_name)
        ours = _run(_factory(ours_cls, kwargs), start, grads)
        cells = []
        for label, flags in (
            ("loop", {"foreach": False}),
            ("foreach", {"foreach": True}),
            ("fused", {"fused": True}),
        ):
            torch_cls = getattr(torch.optim, cls_name)
            try:
                theirs = _run(_factory(torch_cls, {**kwargs, **flags}), start, grads)
            except (RuntimeError, TypeError, ValueError) as error:
                cells.append(f"{label}: n/a ({type(error).__name__})")
                continue
            if all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)):
                cells.append(f"{label}: exact")
                continue
            diff = max(
                float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True) if a.numel()
            )
            ulps = max(_ulps(a, b) for a, b in zip(ours, theirs, strict=True))
            cells.append(f"{label}: {diff:.2e} ({ulps} ulp)")
        print(f"  {name:8s} " + "; ".join(cells))


def _time(step: Callable[[], Any], rounds: int) -> float:
    """The median time of ``step`` in milliseconds, by CUDA events, after a warm-up."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return float(statistics.median(times))


def _contenders(name: str) -> dict[str, Factory | str]:
    cls_name, kwargs = OPTIMIZERS[name]
    torch_cls = getattr(torch.optim, cls_name)
    found: dict[str, Factory | str] = {
        "polyak (triton)": _factory(getattr(polyak, cls_name), kwargs),
        "torch fused": _factory(torch_cls, {**kwargs, "fused": True}),
        "torch foreach": _factory(torch_cls, {**kwargs, "foreach": True}),
    }
    for peer, table in PEERS.items():
        if name not in table:
            continue
        module_name, peer_cls, extra = table[name]
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, peer_cls)
        except Exception as error:  # not installed, or built without CUDA
            found[peer] = f"unavailable ({type(error).__name__}: {error})"
            continue
        found[peer] = _factory(cls, {**kwargs, **extra})
    return found


def timing(names: list[str], cases: list[str], rounds: int) -> None:
    """Print the median step time of each contender, per case and optimizer."""
    print(f"\nstep times, median of {rounds} (ms; float32)")
    for case_name in cases:
        case = CASES[case_name]
        print(f"\n{case.name}: {case.description} ({case.numel / 1e6:.1f}M elements)")
        for name in names:
            print(f"  {name}")
            streams = None
            for label, make in _contenders(name).items():
                if isinstance(make, str):
                    print(f"    {label:24s} {make}")
                    continue
                params = [t.cuda().requires_grad_() for t in tensors(case, 0)]
                for p in params:
                    p.grad = torch.randn_like(p)
                try:
                    opt = make(params)
                    ms = _time(opt.step, rounds)
                except Exception as error:
                    print(f"    {label:24s} failed ({type(error).__name__}: {error})")
                    continue
                extra = ""
                if label.startswith("polyak"):
                    paths = {g.strategy for g in polyak.explain(opt).groups}
                    extra = f"  [{', '.join(sorted(paths))}]"
                    shaped = sum(
                        1
                        for v in opt.state[params[0]].values()
                        if isinstance(v, torch.Tensor) and v.shape == params[0].shape
                    )
                    streams = 3 + 2 * shaped  # reads: param, grad, state; writes: param, state
                print(f"    {label:24s} {ms:8.3f}{extra}")
            if streams is not None:
                nbytes = streams * case.numel * 4
                src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
                dst = torch.empty_like(src)
                ms = _time(functools.partial(dst.copy_, src), rounds)
                print(
                    f"    {'copy of the same bytes':24s} {ms:8.3f}  ({nbytes / ms / 1e6:.0f} GB/s)"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="sgd,adam,adamw")
    parser.add_argument("--cases", default="small,mlp,convnet,gpt2")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--skip-exactness", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
            "nothing to measure."
        )
        return 0
    if importlib.util.find_spec("triton") is None:
        print(
            "benchmarks/gpu.py: triton is not installed; polyak's GPU steps would run torch's "
            "operations."
        )
        return 0
    import triton  # type: ignore[import-untyped]

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(OPTIMIZERS)}")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    # Plain tensors stepped as one optimizer (DTensor, GradScaler and per-tensor cases need
    # more set-up than a timing of the kernels is about).
    unknown = [c for c in cases if c not in CASES or CASES[c].variant not in ("", "channels_last")]
    unknown += [c for c in cases if c in CASES and CASES[c].per_tensor]
    if unknown:
        plain = sorted(
            c for c, v in CASES.items() if v.variant in ("", "channels_last") and not v.per_tensor
        )
        parser.error(f"unknown cases {unknown}; choose from {plain}")
    print(
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {triton.__version__}"
    )
    if not args.skip_exactness:
        exactness(names)
    if not args.skip_timing:
        timing(names, cases, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
