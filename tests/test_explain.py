"""polyak.explain: which path each group's last step took, and why not a faster one."""

from __future__ import annotations

import warnings

import pytest
import torch

import polyak
from polyak.strategies import flat
from polyak.strategies.flat import _kernel

needs_kernel = pytest.mark.skipif(
    _kernel.load(wait=True) is None, reason="the flat kernel is unavailable"
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
        ((torch.float32, torch.bfloat16), "takes no bfloat16 ones here"),
    ],
    ids=["bf16", "mixed-with-bf16"],
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
    monkeypatch.setattr(_kernel, "_module", None)
    monkeypatch.setattr(_kernel, "_builder", None)
    monkeypatch.setattr(_kernel, "_failed", None)
    started: list[bool] = []
    monkeypatch.setattr(_kernel, "_start", lambda wait: started.append(wait))
    monkeypatch.setattr(_kernel, "_built", lambda: None)
    p = torch.nn.Parameter(torch.randn(8, device="meta"))
    opt = polyak.AdamW([p])
    for _ in range(2):
        opt.zero_grad()
        p.grad = torch.ones_like(p)
        opt.step()
    assert started == [] and _kernel.loaded() is None
    (group,) = polyak.explain(opt).groups
    assert group.strategy == "loop" and "parameters on meta" in group.reason
    assert "no GPU kernel" in group.reason and "fused=True" in group.reason


def _twins(dtypes: list[torch.dtype]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    mine = [
        torch.nn.Parameter(torch.randn(37, generator=gen, dtype=torch.float64).to(d))
        for d in dtypes
    ]
    return mine, [torch.nn.Parameter(p.detach().clone()) for p in mine]


@needs_kernel
@pytest.mark.parametrize(
    ("name", "kwargs", "dtypes"),
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9}, [torch.float32, torch.float64, torch.float32]),
        ("Adam", {"amsgrad": True}, [torch.float64, torch.float32]),
        ("AdamW", {"fused": True}, [torch.float32, torch.bfloat16, torch.float16]),
    ],
    ids=["sgd", "adam", "adamw-fused"],
)
def test_a_group_of_several_dtypes_runs_flat_per_dtype_with_torchs_numbers(
    name: str, kwargs: dict[str, object], dtypes: list[torch.dtype]
) -> None:
    """torch's numbers on the default path; with fused=True, the numbers of one group per
    dtype (polyak's fused steps are within rounding of torch's)."""
    mine, theirs = _twins(dtypes)
    opt = getattr(polyak, name)(mine, **kwargs)
    if kwargs.get("fused"):
        ref = getattr(polyak, name)([{"params": [q]} for q in theirs], **kwargs)
    else:
        ref = getattr(torch.optim, name)(theirs, **kwargs)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        for p, q in zip(mine, theirs, strict=True):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    (group,) = polyak.explain(opt).groups
    assert group.flat, group
    for p, q in zip(mine, theirs, strict=True):
        assert torch.equal(p, q)
    for p, q in zip(mine, theirs, strict=True):
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


@needs_kernel
def test_a_bucket_that_cannot_run_leaves_the_others_flat_and_steps_the_rest_once() -> None:
    """A float64 parameter whose gradient is laid out unlike it: the float32 bucket runs flat,
    the float64 one by torch's operations, and no parameter is stepped twice."""
    mine, theirs = _twins([torch.float32, torch.float64])
    opt = polyak.SGD(mine, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for k in range(4):
        for p, q in zip(mine, theirs, strict=True):
            g = torch.full(p.shape, float(k + 1), dtype=p.dtype)
            if p.dtype == torch.float64 and k == 3:
                g = torch.full((2 * p.numel(),), float(k + 1), dtype=p.dtype)[::2]
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    (group,) = polyak.explain(opt).groups
    assert not group.flat and group.reason.startswith("its float64 parameters")
    for p, q in zip(mine, theirs, strict=True):
        assert torch.equal(p, q)


@needs_kernel
def test_a_group_on_two_devices_runs_its_cpu_parameters_flat() -> None:
    """A group holding CPU parameters and parameters elsewhere (meta here, as CUDA ones): the
    CPU bucket runs flat with torch's numbers, the other is stepped by torch's operations, and
    explain names it."""
    gen = torch.Generator().manual_seed(5)
    cpu = [torch.nn.Parameter(torch.randn(37, generator=gen)) for _ in range(2)]
    elsewhere = torch.nn.Parameter(torch.randn(37, device="meta"))
    twins = [torch.nn.Parameter(p.detach().clone()) for p in cpu]
    opt = polyak.Adam([cpu[0], elsewhere, cpu[1]], amsgrad=True)
    ref = torch.optim.Adam(twins, amsgrad=True)
    for _ in range(4):
        for p, q in zip(cpu, twins, strict=True):
            g = torch.randn(37, generator=gen)
            p.grad, q.grad = g, g.clone()
        elsewhere.grad = torch.ones(37, device="meta")
        opt.step()
        ref.step()
    for p, q in zip(cpu, twins, strict=True):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert set(opt.state[elsewhere]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    entry = flat.entries(opt)[0]
    (cpu_bucket, cpu_cache), (other, _) = entry.buckets
    assert [id(p) for p in cpu_bucket] == [id(p) for p in cpu]
    assert [id(p) for p in other] == [id(elsewhere)] and cpu_cache[0].plan is not None
    (group,) = polyak.explain(opt).groups
    assert not group.flat and group.reason.startswith("its meta float32 parameters: parameters")
