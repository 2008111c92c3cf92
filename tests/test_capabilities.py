"""torch's bits under every CPU capability this machine offers, and every MKL path.

torch picks the kernels it runs by the CPU and by ``ATEN_CPU_CAPABILITY``, and the capabilities
round differently (fused multiply-adds or not, maximum's NaN, where a vector body ends; see
``polyak.strategies.flat._dispatch``). This run covers the capability it was started at; here the
bit-exactness tests of ``test_compiled.py`` run again in a process for each other capability
the CPU supports, and once with MKL held to an older code path.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polyak.strategies import flat
from polyak.strategies.flat import _dispatch, _kernel

ROOT = Path(__file__).resolve().parents[1]
#: The values of ATEN_CPU_CAPABILITY torch knows, by architecture.
CAPABILITIES = ("default", "avx2", "avx512", "sve256")
#: The bit-exactness tests against torch.
EXACTNESS = "bit_identical or nan_bits or the_inline_sqrt"
_TESTS = ("tests/test_compiled.py", "tests/test_fused.py", "-k", EXACTNESS)


@functools.cache
def _runs_at(value: str) -> str:
    """The capability torch reports when started with ``ATEN_CPU_CAPABILITY=value``."""
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": value},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def _exactness_tests(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *_TESTS],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


def _summary(done: subprocess.CompletedProcess[str]) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])


needs_kernel = pytest.mark.skipif(
    not _kernel.enabled() or _kernel.load(wait=True) is None,
    reason="the flat kernel is unavailable (turned off, or no compiler)",
)


@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("value", CAPABILITIES)
def test_bit_identical_to_torch_at_each_capability(value: str) -> None:
    here = _dispatch.capability()
    if value.upper() == here:
        pytest.skip(f"this run itself runs at {here}")
    if _runs_at(value) != value.upper():
        pytest.skip(f"this CPU does not run torch's {value.upper()} kernels")
    done = _exactness_tests({"ATEN_CPU_CAPABILITY": value})
    assert done.returncode == 0, _summary(done)
    assert " passed" in _summary(done)


@pytest.mark.slow
@needs_kernel
def test_bit_identical_to_torch_with_mkl_held_to_sse() -> None:
    """MKL's sqrt is called by torch; whether the inline copy of it holds is decided per MKL
    setting, so that one proven for MKL's AVX-512 path is not used for another path."""
    done = _exactness_tests({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"})
    assert done.returncode == 0, _summary(done)
    assert " passed" in _summary(done)


def test_the_rounding_found_is_torchs_for_this_capability() -> None:
    """On x86 the FMA capabilities fuse and write NaN as all ones in maximum's body; the
    default one rounds products apart and passes the NaN through. Every dtype gets an answer."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        found = _dispatch.rounding(dtype)
        assert isinstance(found, _dispatch.Rounding), found
        assert found.capability == _dispatch.capability()
        assert found.width == _dispatch.NO_BODY or found.width & (found.width - 1) == 0
        if found.capability in ("AVX2", "AVX512"):
            assert found.fma and found.max_nan == _dispatch.MAX_NAN_ONES
        elif found.capability == "DEFAULT" and platform.machine() in ("x86_64", "AMD64"):
            assert not found.fma and found.max_nan == _dispatch.MAX_NAN_KEEP


def test_the_tail_found_is_where_torchs_maximum_changes_its_nan() -> None:
    """For sizes around each multiple of the width found, torch's maximum writes the body's
    NaN before the tail and the canonical NaN in it, as the kernel assumes."""
    for dtype in (torch.float32, torch.float64):
        found = _dispatch.rounding(dtype)
        assert isinstance(found, _dispatch.Rounding)
        width = found.width
        for n in (1, 7, 31, 33, 100, 257):
            nan = torch.full((n,), float("nan"), dtype=dtype)
            got = torch.maximum(nan, torch.zeros(n, dtype=dtype))
            bits = got.view(torch.int32 if dtype == torch.float32 else torch.int64)
            canonical = torch.tensor(float("nan"), dtype=dtype).view(bits.dtype)
            tail = n if width == _dispatch.NO_BODY else n % width
            assert bool((bits[n - tail :] == canonical).all())
            if found.max_nan == _dispatch.MAX_NAN_ONES:
                assert bool((bits[: n - tail] == -1).all())


def test_an_unknown_rounding_declines_the_flat_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's kernels round in a way the kernel does not follow, steps run torch's
    operations, with torch's numbers."""
    import polyak

    monkeypatch.setattr(_dispatch, "rounding", lambda dtype: "rounds in an unknown way")
    params = [torch.randn(40, requires_grad=True) for _ in range(2)]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = polyak.Adam(params, amsgrad=True), torch.optim.Adam(ref_params, amsgrad=True)
    for _ in range(3):
        for p, q in zip(params, ref_params, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert all(e.plan is None for e in flat.entries(opt))
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)


def test_a_probe_that_fails_declines_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's kernels cannot be asked (an operation raising in some build), the answer
    is a reason, not an exception in the step."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(_dispatch, "_fma", broken)
    _dispatch._rounding.cache_clear()
    try:
        found = _dispatch.rounding(torch.float32)
        assert isinstance(found, str) and "could not be asked" in found
        assert "no kernel for this" in found
    finally:
        monkeypatch.undo()
        _dispatch._rounding.cache_clear()
    assert isinstance(_dispatch.rounding(torch.float32), _dispatch.Rounding)
