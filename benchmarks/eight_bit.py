"""AdamW's flat step with its moments stored in 8 bits, block-wise (``state_dtype="8bit"``),
against torch's ``AdamW(fused=True)`` with float32 moments and against an in-place add moving
the same bytes.

    python benchmarks/eight_bit.py [--tensors 8] [--numel 1048576] [--rounds 40] [--reference]

The 8-bit step reads the parameter and gradient (4 + 4 bytes per element), both moments' codes
(1 + 1) and their absmax (4 bytes per 256 elements each), and writes the parameter (4), the codes
(1 + 1) and the absmax: 16.06 bytes per element. The add (``a.add_(b, alpha=0.5)``, 3 x its
operand's bytes) moves as many. Contenders are timed in interleaved rounds, each call after 3 ms
of matrix products on every thread (as a step follows a backward pass); the median of the
rounds is reported, at 1 and 2 threads. ``--reference`` also times the reference path
(``foreach=False``: dequantized float32 copies, torch's operations, quantized back), a few
rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import polyak
from polyak.bench.measure import InPlaceAdd, keep_busy
from polyak.strategies import flat

#: Bytes an 8-bit AdamW step moves per element (see above).
BYTES = 4 + 4 + 1 + 1 + 4 + 1 + 1 + 4 * 4 / 256


def _params(tensors: int, numel: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(numel, generator=gen).requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(numel, generator=gen)
    return params


def eight_bit(tensors: int, numel: int, **flags: bool) -> Callable[[], None]:
    adamw: Any = polyak.AdamW  # its keywords include those of state_dtype, added at run time
    opt = adamw(_params(tensors, numel), lr=1e-3, state_dtype="8bit", **flags)
    for _ in range(3):  # the first step makes the state, on the reference path
        opt.step()
    assert flat.wait(timeout=300)
    opt.step()
    told = str(polyak.explain(opt))
    assert ("flat, compiled" in told) == (not flags), told
    step: Callable[[], None] = opt.step
    return step


def fused(tensors: int, numel: int) -> Callable[[], None]:
    opt = torch.optim.AdamW(_params(tensors, numel), lr=1e-3, fused=True)
    opt.step()
    return opt.step


def _time(contenders: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            keep_busy()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    elements = args.tensors * args.numel
    contenders = {
        "polyak AdamW, 8-bit moments": eight_bit(args.tensors, args.numel),
        "torch AdamW(fused=True), float32": fused(args.tensors, args.numel),
        f"add, {BYTES:.2f} B/element": InPlaceAdd(int(BYTES * elements)).step,
    }
    reference = {}
    if args.reference:
        reference["reference path (foreach=False)"] = eight_bit(
            args.tensors, args.numel, foreach=False
        )
    before = torch.get_num_threads()
    print(f"{args.tensors} tensors of {args.numel} float32 parameters; ms per step, median")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = _time(contenders, args.rounds)
        ms.update(_time(reference, 3))
        mine, theirs, add = (ms[name] for name in contenders)
        print(f"{threads} thread{'s' if threads > 1 else ''}:")
        for name, took in ms.items():
            print(f"  {name:34} {took:7.2f} ms")
        print(f"  8-bit step: {100 * add / mine:.0f}% of the add, {theirs / mine:.2f}x torch fused")
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
