"""``fused=True`` against torch's fused CPU kernels: their bits, in their vector body and in the
scalar tail of each tensor, whose arithmetic their compiler contracted on its own."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_same, clone_kwargs, make_params, twin
from registry import REGISTRY, Entry, ids

from polyak.strategies import flat
from polyak.strategies.flat import _compiled, _kernel, _toolchain

vm = _kernel.load(wait=True)
needs_kernel = pytest.mark.skipif(vm is None, reason="the flat kernel is unavailable")
needs_compiler = pytest.mark.skipif(
    vm is None or _toolchain.compiler() is None or not _compiled.compiles(),
    reason="the flat kernel or a C++ compiler is unavailable",
)

# Tensors all tail, body and tail, several blocks, and one without elements.
SHAPES = [(3, 4), (5,), (300,), (2, 2, 2), (1000,), (0,), (67, 3), (1,)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _cases() -> list[Any]:
    """Every configuration of every optimizer torch has a fused CPU kernel for."""
    return [
        pytest.param(entry, config, id=f"{ids(entry)}-{i}")
        for entry in REGISTRY
        if entry.fused and entry.flat and not entry.sparse_grads
        for i, config in enumerate(entry.configs)
    ]


def _shapes(entry: Entry, config: dict[str, Any], dtype: torch.dtype) -> list[tuple[int, ...]]:
    """torch's fused SGD in float16 and bfloat16 does not step its vector body: without
    momentum it leaves those parameters as they were, and with it reads the half-precision
    buffer as float32. Only tensors that are all tail are compared there, and so for Adagrad,
    whose half-precision body keeps its sum unrounded between operations."""
    if entry.cls.__name__ in ("SGD", "Adagrad") and dtype.itemsize == 2:
        return [s for s in SHAPES if torch.Size(s).numel() < 16]
    return SHAPES


#: Absolute tolerance where torch's fused kernel rounds otherwise: Adagrad's in the half
#: types, whose accumulated sum it reads unrounded (compared on finite gradients).
#: Relative, in units of the dtype's epsilon.
TOLERANCES = {("Adagrad", torch.float16): 4.0, ("Adagrad", torch.bfloat16): 4.0}


def _grads(params: list[torch.Tensor], gen: torch.Generator, nan: bool) -> list[torch.Tensor]:
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        g.view(-1)[::7] = 0
        if nan:
            g.view(-1)[5::13] = float("nan")
            g.view(-1)[6::17] = float("inf")
        grads.append(g)
    return grads


def _run(opt: Any, params: list[torch.Tensor], steps: int, wait: bool, nan: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    for k in range(steps):
        for p, g in zip(params, _grads(params, gen, nan=nan and k == steps - 1), strict=True):
            p.grad = g
        opt.step()
        if wait and k == 1:
            assert _compiled.wait(timeout=300)


def _plans(opt: Any) -> list[Any]:
    return [e.plan for e in flat.entries(opt) if e.plan is not None]


def _compare(entry: Entry, config: dict[str, Any], dtype: torch.dtype, compiled: bool) -> None:
    params = make_params(_shapes(entry, config, dtype), dtype=dtype)
    ref_params = twin(params)
    kwargs = {**clone_kwargs(config), "fused": True}
    opt = entry.cls(params, **kwargs)
    ref = entry.reference(ref_params, **clone_kwargs(kwargs))
    atol = TOLERANCES.get((entry.cls.__name__, dtype), 0.0)
    _run(opt, params, 5, wait=compiled, nan=atol == 0.0)
    _run(ref, ref_params, 5, wait=False, nan=atol == 0.0)
    plans = _plans(opt)
    assert plans, "the fused steps did not run flat"
    if compiled:
        assert all(plan.compiled_steps >= 2 for plan in plans)
    else:
        assert all(plan.compiled_steps == 0 for plan in plans)
    # Bit for bit, NaNs in the same places (their sign is the compiler's: torch's body negates
    # by multiplying by -1, which keeps a NaN's sign, and its tail folds negations into fused
    # multiply-adds).
    if atol:
        rtol = atol * torch.finfo(dtype).eps
        for a, b in zip(params, ref_params, strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
        return
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])


@needs_compiler
@pytest.mark.parametrize(("entry", "config"), _cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_fused_steps_are_bit_identical_to_torch_fused(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype
) -> None:
    """From the first step on, NaN and inf gradients included."""
    _compare(entry, config, dtype, compiled=True)


@needs_kernel
@pytest.mark.parametrize(("entry", "config"), _cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreted_fused_steps_are_bit_identical_to_torch_fused(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_compiled, "_slots", {})
    monkeypatch.setenv("POLYAK_COMPILE", "0")
    _compare(entry, config, dtype, compiled=False)


@needs_kernel
def test_a_fused_step_with_a_tensor_lr_runs_flat_and_follows_it_in_place() -> None:
    """torch's fused kernels read a CPU tensor ``lr`` as its number at each step; a scheduler
    that changes it in place is followed."""
    import polyak

    params = make_params([(40,)])
    ref_params = twin(params)
    lr = torch.tensor(0.01)
    opt = polyak.Adam(params, lr=lr, fused=True)
    ref = torch.optim.Adam(ref_params, lr=torch.tensor(0.01), fused=True)
    gen = torch.Generator().manual_seed(0)
    for k in range(4):
        g = torch.randn(40, generator=gen)
        params[0].grad, ref_params[0].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert polyak.explain(opt).groups[0].strategy.startswith("flat")
        lr.mul_(0.5)
        ref.param_groups[0]["lr"].mul_(0.5)
        assert torch.equal(params[0], ref_params[0]), k
