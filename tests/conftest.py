"""Shared helpers: build twin parameter sets and step polyak and torch.optim side by side."""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from polyak.strategies import flat

# The kernel builds in the background on first use; the tests run with it from the first step,
# so that which path a step takes does not depend on how long the build takes.
flat.kernel(wait=True)


def has_tensor(config: dict[str, Any]) -> bool:
    """Whether a configuration holds a tensor hyperparameter (also inside a tuple: betas)."""
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, tuple) and has_tensor(dict(enumerate(v))))
        for v in config.values()
    )


def as_matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 2-D shape for ``shape``, for optimizers that take matrices only: a vector becomes a
    column, higher dimensions fold into the columns."""
    if len(shape) == 2:
        return shape
    if len(shape) < 2:
        return (shape[0] if shape else 1, 1)
    return (shape[0], math.prod(shape[1:]))


def make_params(
    shapes: list[tuple[int, ...]] = ((3, 4), (5,), (2, 2, 2)),  # type: ignore[assignment]
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    matrices: bool = False,
) -> list[torch.Tensor]:
    """Seeded parameters of ``shapes``, made 2-D where ``matrices`` (:func:`as_matrix`)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(as_matrix(s) if matrices else s, generator=gen, dtype=torch.float64)
        .to(dtype)
        .requires_grad_()
        for s in shapes
    ]


def params_for(entry: Any, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """:func:`make_params` with shapes the registry entry's optimizer takes."""
    return make_params(*args, matrices=entry.matrices_only, **kwargs)


def twin(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def clone_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(kwargs)


def takes_sparse_grads(opt: Any) -> bool:
    """Whether the optimizer under test steps on sparse gradients only (SparseAdam)."""
    from registry import SPARSE_GRADIENTS

    return type(opt) in SPARSE_GRADIENTS


def needs_closure(opt: Any) -> bool:
    """Whether the optimizer under test steps with a closure only (LBFGS)."""
    from registry import CLOSURE_STEPS

    return type(opt) in CLOSURE_STEPS


def quadratic_closure(opt: Any) -> Callable[[], torch.Tensor]:
    """A closure for ``opt.step``: the loss <g, θ - θ_0> + |θ - θ_0|^2 / 2 around the current
    parameters θ_0, where g is the gradient each parameter holds now; it sets the gradient
    g + θ - θ_0 and returns the loss, computed in the parameters' dtype."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    slopes = [p.grad.detach().clone() for p in params]
    anchors = [p.detach().clone() for p in params]

    def closure() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for p, g, p0 in zip(params, slopes, anchors, strict=True):
            delta = p.detach() - p0
            p.grad = g + delta
            total += (g * delta).sum().real.double() + 0.5 * (delta.abs() ** 2).sum().double()
        return total

    return closure


def step(opt: Any) -> Any:
    """One ``opt.step()``, with :func:`quadratic_closure` where the optimizer needs one."""
    if needs_closure(opt):
        return opt.step(quadratic_closure(opt))
    return opt.step()


def as_grad(g: torch.Tensor, sparse: bool) -> torch.Tensor:
    """A gradient in the layout the optimizer takes: a sparse one holds g's nonzero rows."""
    return g.to_sparse(1) if sparse and g.dim() > 0 else g


def set_grads(
    params_a: list[torch.Tensor],
    params_b: list[torch.Tensor],
    gen: torch.Generator,
    sparse: bool = False,
) -> None:
    """Give both parameter sets the same random gradients; sparse ones hold about half the
    rows."""
    for p, q in zip(params_a, params_b, strict=True):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.is_complex():
            g = torch.complex(g, torch.randn(p.shape, generator=gen, dtype=torch.float64))
        if sparse and g.dim() > 0:
            rows = torch.rand(g.shape[0], generator=gen) < 0.5
            g[rows] = 0
        p.grad = as_grad(g.to(p.dtype), sparse)
        q.grad = as_grad(g.to(q.dtype), sparse)


def _equal_with_nans(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, with NaNs in the same places (a step that diverges, as torch's does)."""
    if not (a.is_floating_point() or a.is_complex()):
        return False
    nans = a.isnan()
    return torch.equal(nans, b.isnan()) and torch.equal(a[~nans], b[~nans])


def assert_same(a: Any, b: Any, atol: float = 0.0) -> None:
    """Exact equality (or within ``atol``) of tensors, nested in dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), (a, b)
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        if atol == 0.0:
            assert torch.equal(a, b) or _equal_with_nans(a, b), (a - b).abs().max()
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a, b)
        for k in a:
            assert_same(a[k], b[k], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y, atol)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), (a, b)
    else:
        assert a == b, (a, b)


def step_both(
    opt_a: torch.optim.Optimizer,
    opt_b: torch.optim.Optimizer,
    params_a: list[torch.Tensor],
    params_b: list[torch.Tensor],
    steps: int,
    seed: int = 1,
    between: Callable[[int], None] | None = None,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        set_grads(params_a, params_b, gen, takes_sparse_grads(opt_a))
        step(opt_a)
        step(opt_b)
        if between is not None:
            between(i)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(worker: Callable[..., None], world_size: int, out_dir: str, seconds: float) -> None:
    """Run ``worker(rank, world_size, port, out_dir)`` in one process per rank, failing the
    test if they have not all finished within ``seconds``."""
    import torch.multiprocessing as torch_mp

    ctx = torch_mp.spawn(
        worker, args=(world_size, free_port(), out_dir), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {seconds} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes more than a few seconds (still part of the default run)"
    )


def heavy_imports_of(script: str) -> str:
    """Run ``script`` (which prints the heavy modules it finds imported) in a fresh process,
    with the tests' helpers importable and the kernel off, and return what it printed."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, POLYAK_NATIVE="0")
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tests.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
