"""polyak.explain: which path each group's last step took, and why not a faster one."""

from __future__ import annotations

import warnings

import pytest
import torch

import polyak
from polyak.strategies import _native

needs_kernel = pytest.mark.skipif(
    _native.load(wait=True) is None, reason="the flat kernel is unavailable"
)


def _step(opt: torch.optim.Optimizer, times: int = 3) -> None:
    for _ in range(times):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()


@needs_kernel
def test_a_default_group_runs_flat_and_says_so() -> None:
    opt = polyak.AdamW([torch.nn.Parameter(torch.randn(10))])
    assert [g.strategy for g in polyak.explain(opt).groups] == ["no step yet"]
    _step(opt)
    (group,) = polyak.explain(opt).groups
    assert group.flat and group.strategy.startswith("flat") and group.params == 1
    assert "built and loaded" in polyak.explain(opt).kernel
    assert "group 0 (1 parameters): flat" in str(polyak.explain(opt))


@needs_kernel
@pytest.mark.parametrize(
    ("make", "strategy", "words"),
    [
        (lambda ps: polyak.SGD(ps, lr=0.1, foreach=True), "foreach", "foreach=True"),
        (lambda ps: polyak.SGD(ps, lr=0.1, foreach=False), "loop", "foreach=False"),
        (lambda ps: polyak.Adafactor(ps), "loop", "not elementwise"),
        (
            lambda ps: polyak.SGD([{"params": ps}], lr=torch.tensor(0.1)),
            "loop",
            "neither a number nor a flag",
        ),
    ],
    ids=["foreach", "for-loop", "adafactor", "tensor-lr"],
)
def test_each_fallback_is_reported_with_its_reason(make, strategy: str, words: str) -> None:  # type: ignore[no-untyped-def]
    opt = make([torch.nn.Parameter(torch.randn(4, 3))])
    _step(opt)
    (group,) = polyak.explain(opt).groups
    assert group.strategy == strategy and not group.flat
    assert words in group.reason


@needs_kernel
@pytest.mark.parametrize(
    ("dtypes", "words"),
    [
        ((torch.bfloat16,), "fused=True runs them flat"),
        ((torch.float32, torch.float64), "mixes float32 and float64"),
    ],
    ids=["bf16", "mixed"],
)
def test_dtype_fallbacks_say_what_to_do(dtypes: tuple[torch.dtype, ...], words: str) -> None:
    params = [torch.nn.Parameter(torch.randn(5, dtype=d)) for d in dtypes]
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    _step(opt)
    (group,) = polyak.explain(opt).groups
    assert not group.flat and words in group.reason


@needs_kernel
def test_the_fallback_warning_is_opt_in_and_once_per_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = [torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))]
    opt = polyak.SGD(params, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt)  # not asked for: silent
    monkeypatch.setenv("POLYAK_WARN_FALLBACK", "1")
    opt = polyak.SGD([torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))], lr=0.1)
    with pytest.warns(RuntimeWarning, match="group 0 does not run the flat kernel: bfloat16"):
        _step(opt, times=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt)  # once per group


def test_gpu_parameters_start_no_cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """zero_grad and steps of parameters off the CPU (meta here, as CUDA ones) neither load
    nor build the CPU kernel, and explain says what runs instead."""
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_builder", None)
    monkeypatch.setattr(_native, "_failed", None)
    started: list[bool] = []
    monkeypatch.setattr(_native, "_start", lambda wait: started.append(wait))
    monkeypatch.setattr(_native, "_built", lambda: None)
    p = torch.nn.Parameter(torch.randn(8, device="meta"))
    opt = polyak.AdamW([p])
    for _ in range(2):
        opt.zero_grad()
        p.grad = torch.ones_like(p)
        opt.step()
    assert started == [] and _native.loaded() is None
    (group,) = polyak.explain(opt).groups
    assert group.strategy == "loop" and "parameters on meta" in group.reason
    assert "no GPU kernel" in group.reason and "fused=True" in group.reason
