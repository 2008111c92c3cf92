"""The flat strategy's Triton kernels (``polyak/strategies/flat/_triton.py``, ``_gpu.py``), run by
Triton's interpreter on CPU tensors: every elementwise optimizer of the registry, stepped by
its generated kernel, against polyak's ``loop`` strategy (``foreach=False``).

The interpreter computes with numpy in the tensors' own precision: float32 operations in
float32, float64 in float64, ``tl.fma`` rounded once, ``tl.div_rn`` and ``tl.sqrt_rn`` correctly
rounded. The kernel's numbers are those of torch's CUDA kernels, whose sqrt is correctly rounded;
torch's CPU sqrt (MKL's) is not, in a few percent of float32 inputs. So the reference runs with
a correctly rounded sqrt (numpy's), and then every result is compared bit for bit, except with
a tensor hyperparameter: the kernel takes its number (float64), the loop strategy computes with
the tensor (float32 arithmetic for ``lr / bias_correction``, say), which differs in the last
bits (compared within ``TENSOR_HYPER_RTOL``).

float16 and bfloat16 (``fused=True``) are computed in float32 and rounded when stored: compared
with the loop strategy's float32 step rounded likewise, exactly in float16, within one unit in the
last place in bfloat16, which the interpreter narrows to by truncation (a GPU rounds to nearest
even).

``TRITON_INTERPRET`` is read by Triton 3.9 each time a kernel is decorated (``triton.knobs``
looks the variable up on every read), so it is set for this module only, before its kernels are
generated; ``_gpu.kernel`` keeps interpreted kernels apart from compiled ones.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    as_matrix,
    assert_same,
    clone_kwargs,
    has_tensor,
    heavy_imports_of,
    make_params,
)
from registry import REGISTRY, Entry, ids, takes

import polyak
from polyak import _memo, _ops
from polyak.strategies.flat import _gpu

pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0)")
# The interpreter computes with numpy, which warns where a select's other side is NaN (the
# continuation a branch does not keep, the NaN of a negative base to a fractional power).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

#: Relative tolerance where a hyperparameter is a tensor (see the module's docstring).
TENSOR_HYPER_RTOL = 1e-5
#: A group that exercises the tables: sizes not multiples of the block (:data:`BLOCK`), one
#: spanning several blocks, a 0-dim tensor and an empty one.
SHAPES = [(37,), (), (0,), (3, 5), (70,)]
BLOCK = 16
FLAT = [
    e
    for e in REGISTRY
    if e.flat and e.elementwise and getattr(e.cls, "elementwise", False) and takes(e, "foreach")
]


@pytest.fixture(autouse=True, scope="module")
def interpreted() -> Iterator[None]:
    """Triton's interpreter for this module's kernels."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _exact_sqrt(x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x.sqrt()  # the tracer's stand-in
    with np.errstate(invalid="ignore"):  # NaN for negative numbers, as torch's
        return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))


@pytest.fixture
def ieee_sqrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop strategy's sqrt correctly rounded, as torch's CUDA sqrt and the kernel's are."""

    def sqrt(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_exact_sqrt(x) for x in xs]

    def sqrt_(xs: list[torch.Tensor]) -> None:
        for x in xs:
            if isinstance(x, torch.Tensor):
                x.copy_(_exact_sqrt(x))
            else:
                x.sqrt_()

    monkeypatch.setattr(_ops, "sqrt", sqrt)
    monkeypatch.setattr(_ops, "sqrt_", sqrt_)


def _params(entry: Entry, dtype: torch.dtype) -> list[torch.Tensor]:
    shapes = [as_matrix(s) for s in SHAPES] if entry.matrices_only else SHAPES
    return make_params(shapes, dtype=dtype)


def run_kernel(
    entry: Entry,
    config: dict[str, Any],
    dtype: torch.dtype,
    steps: int = 3,
    host_scalars: bool | None = None,
) -> None:
    """``steps`` steps of the kernel after a first step that makes the state, against the loop
    strategy from the same parameters and gradients; params and state compared after each."""
    ref_params = _params(entry, dtype)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    cls: Any = entry.cls
    ref = cls(ref_params, **clone_kwargs(config), foreach=False)
    opt = cls(params, **clone_kwargs(config), foreach=False)
    rtol = TENSOR_HYPER_RTOL if has_tensor(config) else 0.0
    gen = torch.Generator().manual_seed(1)
    plan = _gpu.Plan()
    for k in range(steps + 1):
        for a, b in zip(ref_params, params, strict=True):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        if k == 0:
            opt.step()  # makes the state, as the flat strategy's first step does
            continue
        why = _gpu.run(opt, opt.param_groups[0], plan, block=BLOCK, host_scalars=host_scalars)
        assert why == "", why
        for a, b in zip(ref_params, params, strict=True):
            _close(a.detach(), b.detach(), rtol)
            _close(ref.state[a], opt.state[b], rtol)
    assert plan.steps == steps


def _close(a: Any, b: Any, rtol: float) -> None:
    if rtol == 0.0 or not isinstance(a, (torch.Tensor, dict)):
        assert_same(a, b)
    elif isinstance(a, dict):
        for key in a:
            _close(a[key], b[key], rtol)
    else:
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-12)


def _cases(exhaustive: bool) -> list[Any]:
    cases = []
    for entry in FLAT:
        configs = entry.configs if exhaustive else entry.configs[:1] + entry.configs[-1:]
        for i, config in enumerate(configs):
            for dtype in (torch.float32, torch.float64):
                if not exhaustive and dtype == torch.float64 and i > 0:
                    continue
                name = f"{ids(entry)}-{i}-{str(dtype)[6:]}"
                cases.append(pytest.param(entry, config, dtype, id=name))
    return cases


@pytest.mark.parametrize(("entry", "config", "dtype"), _cases(exhaustive=False))
def test_kernel_matches_loop(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, ieee_sqrt: None
) -> None:
    """A sample: each optimizer's first and last configuration in float32, its first in
    float64."""
    run_kernel(entry, config, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("entry", "config", "dtype"), _cases(exhaustive=True))
def test_kernel_matches_loop_every_configuration(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, ieee_sqrt: None
) -> None:
    """Every configuration of every elementwise optimizer, in float32 and float64."""
    run_kernel(entry, config, dtype, steps=2)


@pytest.mark.parametrize("entry", [e for e in FLAT if "step" in e.cls.state_keys], ids=ids)
def test_scalar_program_in_the_kernel(entry: Entry, ieee_sqrt: None) -> None:
    """With the scalar program run in the kernel (as for scalar state on the device: CUDA graphs),
    the numbers are the same: pow by double-double squaring rounds as C's pow here, and the last
    block of each tensor stores its step."""
    run_kernel(entry, entry.configs[0], torch.float32, host_scalars=False)


def test_tensor_lr_on_the_device_is_read_in_the_kernel(ieee_sqrt: None) -> None:
    """With the scalar program in the kernel, a tensor lr is read there: copied, on the device,
    into the kernel's table of numbers (the host never reads it). float64, so that the loop
    strategy's tensor arithmetic rounds as the kernel's float64 scalar program does."""
    entry = next(e for e in FLAT if e.cls is polyak.Adam)
    lr = torch.tensor(0.01, dtype=torch.float64)
    run_kernel(entry, {"lr": lr}, torch.float64, host_scalars=False)


def test_without_gradients_nothing_is_launched() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = polyak.SGD([p], lr=0.1)
    plan = _gpu.Plan()
    assert _gpu.run(opt, opt.param_groups[0], plan) == "" and plan.steps == 0
    assert torch.equal(p.detach(), torch.zeros(3))


def test_import_polyak_does_not_import_triton() -> None:
    found = heavy_imports_of("import sys, polyak; print('triton' in sys.modules)")
    assert found == "False"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad"])
def test_half_precision_computes_in_float32(name: str, dtype: torch.dtype, ieee_sqrt: None) -> None:
    """``fused=True`` half-precision tensors: loaded into float32, stepped there, rounded to
    nearest even when stored, as torch's fused kernels do; each step equals the loop strategy's
    float32 step from the same (widened) values, rounded to ``dtype`` (see :func:`_narrowed`)."""
    entry = next(e for e in FLAT if e.cls.__name__ == name)
    cls: Any = entry.cls
    config = {**entry.stateful, "fused": True}
    params = make_params(SHAPES, dtype=dtype)
    opt = cls(params, **config)
    gen = torch.Generator().manual_seed(1)
    plan = _gpu.Plan()
    for k in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if k == 0:
            opt.step()
            continue
        wide = [p.detach().float().requires_grad_() for p in params]
        ref = cls(wide, **{**config, "fused": None}, foreach=False)
        for p, w, g in zip(params, wide, grads, strict=True):
            ref.state[w] = {
                key: v.float() if v.dtype == dtype else v.clone() for key, v in opt.state[p].items()
            }
            w.grad = g.float()
        ref.step()
        assert _gpu.run(opt, opt.param_groups[0], plan, block=BLOCK) == ""
        for p, w in zip(params, wide, strict=True):
            _narrowed(p.detach(), w.detach(), dtype)
            for key, v in opt.state[p].items():
                _narrowed(v, ref.state[w][key], v.dtype)


def _narrowed(got: torch.Tensor, wide: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` is ``wide`` rounded to ``dtype``: to nearest even, bit for bit, except in
    bfloat16, which Triton 3.9's interpreter narrows to by truncation (a GPU rounds to nearest
    even): there within one unit in the last place (``2**-7`` relative)."""
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, wide.to(dtype), rtol=2**-7, atol=1e-38)
    else:
        assert_same(got, wide.to(dtype))


def test_the_strategy_steps_cuda_groups_by_their_kernel(
    monkeypatch: pytest.MonkeyPatch, ieee_sqrt: None
) -> None:
    """Through ``optimizer.step()``: a group the Triton backend takes (here CPU tensors, as if
    on a CUDA device) runs its kernel from its second step (the first makes the state), every
    group of a step is checked first, and :func:`polyak.explain` names the path."""
    from polyak.strategies import flat

    monkeypatch.setattr(_gpu, "takes", lambda group: True)
    params = make_params(SHAPES)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = polyak.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=0.01)
    ref = polyak.Adam(
        [{"params": ref_params[:2]}, {"params": ref_params[2:], "lr": 0.02}],
        lr=0.01,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(ref_params, params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ref.step()
        opt.step()
    for a, b in zip(ref_params, params, strict=True):
        assert_same(a.detach(), b.detach())
    assert [_memo.memo(opt, group).triton.steps for group in opt.param_groups] == [2, 2]
    assert flat.runs_triton(opt.param_groups[0])
    assert [g.strategy for g in polyak.explain(opt).groups] == ["flat, triton"] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device: the script measures")
def test_gpu_benchmark_exits_cleanly_without_a_gpu() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
