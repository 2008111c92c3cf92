"""State stored in 8 bits (``state_dtype="8bit"``) on the flat path: the kernel reads each code
as its map value times its block's absmax, runs the float32 program, and quantizes each block
of 256 new values as ``polyak/_quant.py`` does.

The reference is the same optimizer stepping with ``foreach=False``, which dequantizes to
float32 copies, runs torch's operations and quantizes back: parameters, codes and absmax must
agree bit for bit, interpreted and compiled, at 1 and 2 threads, on tensors whose sizes are not
multiples of 256, one that two threads split, and small ones whose state stays float32 (a plan
of their own beside the 8-bit one).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import clone_kwargs, has_tensor
from registry import REGISTRY, Entry, ids
from test_precision import stepping_configs

import polyak
from polyak import _quant
from polyak.strategies import flat
from polyak.strategies.flat import _compiled, _kernel, _plan, _toolchain

vm = _kernel.load(wait=True)
pytestmark = pytest.mark.skipif(vm is None, reason="the flat kernel is unavailable")

#: 8-bit tensors of one block short of full, several blocks, and one that two threads split
#: (70001 elements: its own chunk per thread, off any block boundary); small ones keep float32.
SHAPES = [(20, 30), (300,), (70_001,), (7,), ()]
MODES = ["compiled", "interpreted"]
#: ``POLYAK_TRIALS=exhaustive`` runs every case at 1 and 2 threads, compiled and interpreted;
#: otherwise each case runs one of the four, in turn.
EXHAUSTIVE = os.environ.get("POLYAK_TRIALS", "").strip().lower() == "exhaustive"
_RUNS = [(threads, mode) for mode in MODES for threads in (1, 2)]


def _cases() -> list[Any]:
    cases = [
        (entry, config, i)
        for entry in REGISTRY
        if entry.flat
        and entry.elementwise
        and not entry.sparse_grads
        and not entry.step_closure
        and "state_dtype" in inspect.signature(entry.cls).parameters
        for i, config in enumerate(c for c in stepping_configs(entry, {}) if not has_tensor(c))
    ]
    params = []
    for n, (entry, config, i) in enumerate(cases):
        runs = _RUNS if EXHAUSTIVE else [_RUNS[n % len(_RUNS)]]
        for threads, mode in runs:
            name = f"{ids(entry)}-{i}-{threads}threads-{mode}"
            params.append(pytest.param(entry, config, i, threads, mode, id=name))
    return params


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _assert_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """The same dtype, shape and bits; NaN where the other has NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if not a.is_floating_point():
        assert torch.equal(a, b), what
        return
    nan = a.isnan().reshape(-1)
    assert torch.equal(nan, b.isnan().reshape(-1)), what
    kind = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    same = a.reshape(-1).view(kind)[~nan] == b.reshape(-1).view(kind)[~nan]
    assert bool(same.all()), (what, a.reshape(-1)[~nan][~same][:5], b.reshape(-1)[~nan][~same][:5])


def _mode(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "interpreted":
        monkeypatch.setattr(_compiled, "_slots", {})
        monkeypatch.setenv("POLYAK_COMPILE", "0")
    elif _toolchain.compiler() is None or not _compiled.compiles():
        pytest.skip("no C++ compiler: programs are interpreted")


def _compare(
    cls: Any,
    config: dict[str, Any],
    seed: int,
    threads: int,
    mode: str,
    shapes: list[tuple[int, ...]],
    steps: int = 4,
    grads: Any = None,
) -> Any:
    """Steps ``cls`` with 8-bit state flat and with ``foreach=False``; compares every bit."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    settings = {"state_dtype": "8bit", "min_8bit_size": 256}
    ours = cls(params, **clone_kwargs(config), **settings)
    theirs = cls(twins, **clone_kwargs(config), **settings, foreach=False)
    with _threads(threads):
        for k in range(steps):
            for p, q in zip(params, twins, strict=True):
                g = torch.randn(p.shape, generator=gen) if grads is None else grads(p, k)
                p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
            if k > 0:  # the first step makes the state, on the reference path
                assert flat.last_path(ours, ours.param_groups[0])[0], polyak.explain(ours)
            if k == 1 and mode == "compiled":
                assert _compiled.wait(timeout=300)
    told = str(polyak.explain(ours))
    assert f"flat, {mode}" in told, told
    assert "loop" in str(polyak.explain(theirs))
    for p, q in zip(params, twins, strict=True):
        _assert_bits(p.detach(), q.detach(), "parameter")
        assert set(ours.state[p]) == set(theirs.state[q])
        for key, value in theirs.state[q].items():
            _assert_bits(ours.state[p][key], value, f"{tuple(p.shape)} {key}")
    # The 8-bit state was stepped, not only the float32 one: a large tensor's state is codes.
    big = ours.state[params[0]]
    shaped = [v for k, v in big.items() if v.shape == params[0].shape and k != "kahan_comp"]
    assert all(v.dtype == torch.uint8 for v in shaped), [v.dtype for v in shaped]
    return ours


@pytest.mark.parametrize(("entry", "config", "index", "threads", "mode"), _cases())
def test_eight_bit_state_steps_flat_as_the_reference_path(
    entry: Entry,
    config: dict[str, Any],
    index: int,
    threads: int,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _mode(mode, monkeypatch)
    _compare(entry.cls, config, index, threads, mode, SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2])
def test_blocks_with_ties_zeros_and_outliers(
    threads: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGD's momentum (``buf = 0.9 * buf + g``): blocks of zeros, of one sign, with values on
    the maps' midpoints, huge and tiny outliers, NaN and infinity, over one tensor split by two
    threads."""
    _mode(mode, monkeypatch)
    mids = ((_quant.dynamic_map(True)[:-1] + _quant.dynamic_map(True)[1:]) / 2).tolist()

    def grads(p: torch.Tensor, k: int) -> torch.Tensor:
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)).reshape(-1)
        if g.numel() < 5000:
            return g.view(p.shape)
        g[:512] = 0
        g[512:768] = g[512:768].abs()
        # A block of zeros, then of the midpoints (ties, which go to the lower code) with 1.0
        # as its absmax: the momentum 0.9 * 0 + g holds them exactly, quantized by the kernel.
        g[1024 : 1024 + len(mids)] = torch.tensor(mids) if k == 1 else 0.0
        g[1024 + 255] = 1.0 if k == 1 else 0.0
        g[2048::997] *= 1e30
        g[4096::991] *= 1e-30
        if k == 2:  # a block holding NaN, and one holding infinity, on the kernel's last step
            g[60_000], g[61_000] = float("nan"), float("inf")
        return g.view(p.shape)

    config = {"lr": 0.1, "momentum": 0.9}
    _compare(polyak.SGD, config, 0, threads, mode, [(70_001,), (257,)], steps=3, grads=grads)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_a_block_quantizes_as_the_reference_rule(signed: bool) -> None:
    """The kernel's quantization of one block, full or short, against ``_quant.quantize``:
    midpoints (ties go to the lower code), just off them, zeros, signed zeros, NaN, infinity."""
    assert vm is not None
    _plan._load_maps()
    code = _quant.dynamic_map(signed)
    mids = (code[:-1] + code[1:]) / 2
    near = torch.cat(
        [mids, torch.nextafter(mids, torch.ones(1)), torch.nextafter(mids, -torch.ones(1))]
    )
    gen = torch.Generator().manual_seed(1)
    for values in (
        near[:256],
        near[256:512],
        near[512:],
        torch.zeros(256),
        -torch.zeros(100),
        torch.randn(256, generator=gen) * 1e-39,
        torch.randn(77, generator=gen),
        torch.tensor([float("nan"), 1.0, 2.0]),
        torch.tensor([float("inf"), 1.0, -3.0, 0.0]),
        torch.cat([torch.tensor([float("-inf")]), torch.randn(255, generator=gen)]),
    ):
        if not signed:
            values = values.abs()
        codes, absmax = vm.quant_block(values, signed)
        want_codes, want_absmax = _quant.quantize(values, signed)
        assert torch.equal(codes, want_codes), values
        _assert_bits(absmax, want_absmax, "absmax")


def test_state_of_another_type_falls_back_unread() -> None:
    """An absmax given another length, or codes another dtype, by ``.data =`` (which
    ``optimizer.state`` does not count): the kernel's check sends the step to the reference
    path (which raises or copes as it does) rather than read them as 8-bit state."""
    p = torch.nn.Parameter(torch.randn(600))
    adamw: Any = polyak.AdamW  # its keywords include those of state_dtype, added at run time
    opt = adamw([p], state_dtype="8bit", min_8bit_size=256)
    for _ in range(2):
        p.grad = torch.randn(600)
        opt.step()
    assert flat.last_path(opt, opt.param_groups[0])[0]
    absmax = opt.state[p]["exp_avg_absmax"]
    kept = absmax.data
    absmax.data = torch.ones(2)  # one block short
    p.grad = torch.randn(600)
    with pytest.raises(RuntimeError):
        opt.step()  # the reference path's quantization refuses it
    assert not flat.last_path(opt, opt.param_groups[0])[0]
    absmax.data = kept
    opt.step()
    assert flat.last_path(opt, opt.param_groups[0])[0]
    codes = opt.state[p]["exp_avg_sq"]
    # float32 values where uint8 codes were: the reference path takes them as float32 state.
    codes.data = _quant.dequantize(codes, opt.state[p]["exp_avg_sq_absmax"], False)
    opt.step()
    assert not flat.last_path(opt, opt.param_groups[0])[0]
    assert opt.state[p]["exp_avg_sq"].dtype == torch.uint8  # quantized again after the step


def test_four_bit_state_is_left_to_the_reference_path_with_its_reason() -> None:
    """torchao's 4-bit codes are uint8 with an absmax too, packed two a byte: never read as
    8-bit state."""
    p = torch.nn.Parameter(torch.randn(20, 64))
    adamw: Any = polyak.AdamW  # its keywords include those of state_dtype, added at run time
    opt = adamw([p], state_dtype="4bit", min_8bit_size=256)
    for _ in range(3):
        p.grad = torch.randn(20, 64)
        opt.step()
    assert opt.state[p]["exp_avg"].numel() * 2 == p.numel()
    assert not flat.last_path(opt, opt.param_groups[0])[0]
    assert "4-bit state" in str(polyak.explain(opt))
