"""Adam's flat step with its moments stored in bfloat16 (and float16) beside float32
parameters, against the same with float32 moments and against an in-place add moving the same
bytes.

    python benchmarks/mixed_state.py [--tensors 8] [--numel 1048576] [--rounds 40]

Each step reads the parameter, gradient and both moments and writes the parameter and both
moments: 20 bytes per element with 16-bit moments, 32 with float32 ones. The add
(``a.add_(b, alpha=0.5)``, 3 x its operand's bytes) moves as many bytes as the step it is
compared with. Contenders are timed in interleaved rounds, each call after 3 ms of matrix
products on every thread (as a step follows a backward pass); the median of the rounds is
reported, at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import polyak
from polyak.bench.measure import InPlaceAdd, keep_busy
from polyak.strategies import flat


def adam(tensors: int, numel: int, state: torch.dtype) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(numel, generator=gen).requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(numel, generator=gen)
    opt = polyak.Adam(params, lr=1e-3)
    opt.step()  # the first step makes the state (float32), on the reference path
    if state != torch.float32:
        for p in params:
            for key in ("exp_avg", "exp_avg_sq"):
                opt.state[p][key] = opt.state[p][key].to(state)
    for _ in range(2):
        opt.step()
    assert flat.wait(timeout=300)
    opt.step()
    assert "flat, compiled" in str(polyak.explain(opt)), str(polyak.explain(opt))
    return opt.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    elements = args.tensors * args.numel
    contenders = {
        "adam, bfloat16 moments": adam(args.tensors, args.numel, torch.bfloat16),
        "adam, float16 moments": adam(args.tensors, args.numel, torch.float16),
        "adam, float32 moments": adam(args.tensors, args.numel, torch.float32),
        "add, 20 B/element": InPlaceAdd(20 * elements).step,
        "add, 32 B/element": InPlaceAdd(32 * elements).step,
    }
    before = torch.get_num_threads()
    print(f"{args.tensors} tensors of {args.numel} float32 parameters; ms per step, median")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, step in contenders.items():
                keep_busy()
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"{threads} thread{'s' if threads > 1 else ''}:")
        for moments, add in (
            ("bfloat16", "add, 20 B/element"),
            ("float16", "add, 20 B/element"),
            ("float32", "add, 32 B/element"),
        ):
            took = ms[f"adam, {moments} moments"]
            share = f"{100 * ms[add] / took:3.0f}% of the add ({ms[add]:.2f} ms)"
            print(f"  {moments:8} moments {took:6.2f} ms, {share}")
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
