"""State stored narrower than the parameters (``state_dtype``): each step computes as with state
of the parameter's dtype and rounds what it stores, which torch's optimizer, its state rounded
through the narrow dtype after every step, reproduces bit for bit."""

from __future__ import annotations

import copy
import inspect
import io
from typing import Any

import pytest
import torch
from registry import REGISTRY, Entry, ids

import polyak
from polyak import _precision

NARROW = [torch.bfloat16, torch.float16]

#: The registry's optimizers that take ``state_dtype`` and step on dense gradients without a
#: closure (the storage tests of every format run over them).
CASES = [
    entry
    for entry in REGISTRY
    if "state_dtype" in inspect.signature(entry.cls).parameters
    and not entry.sparse_grads
    and not entry.step_closure
]

SHAPES = [(5, 3), (7,), ()]


def _round_state(opt: torch.optim.Optimizer, keys: tuple[str, ...], dtype: Any) -> None:
    """Round ``opt``'s parameter-shaped state through ``dtype``, in place."""
    for entry in opt.state.values():
        for key in keys:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                narrow = dtype.get(key) if isinstance(dtype, dict) else dtype
                if narrow is not None:
                    value.copy_(value.to(narrow))


def _pair(
    entry: Entry, config: dict[str, Any], state_dtype: Any, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, Any]:
    torch.manual_seed(seed)
    shapes = [(4, 3)] if entry.matrices_only else SHAPES
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = entry.cls(params, **copy.deepcopy(config), state_dtype=state_dtype)
    theirs = entry.reference(twins, **copy.deepcopy(config))
    _round_state(theirs, entry.cls.param_shaped_state, state_dtype)
    return params, twins, ours, theirs


def _step_both(
    entry: Entry,
    params: list[torch.Tensor],
    twins: list[torch.Tensor],
    ours: Any,
    theirs: Any,
    state_dtype: Any,
    steps: int = 3,
) -> None:
    for _ in range(steps):
        for p, q in zip(params, twins, strict=True):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        _round_state(theirs, entry.cls.param_shaped_state, state_dtype)


def _assert_same(
    entry: Entry,
    params: list[torch.Tensor],
    twins: list[torch.Tensor],
    ours: Any,
    theirs: Any,
    state_dtype: Any,
) -> None:
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
        for key, value in theirs.state[q].items():
            mine = ours.state[p][key]
            if (
                isinstance(value, torch.Tensor)
                and value.dim() > 0
                and key in entry.cls.param_shaped_state
            ):
                narrow = state_dtype.get(key) if isinstance(state_dtype, dict) else state_dtype
                assert mine.dtype == (narrow or p.dtype), key
                assert torch.equal(mine.to(value.dtype), value), key
            elif isinstance(value, torch.Tensor):
                assert torch.equal(mine, value), key


def stepping_configs(entry: Entry, flags: dict[str, Any]) -> list[dict[str, Any]]:
    """``entry``'s configurations under the strategy ``flags``, but those that choose their
    own strategy or capture, and those torch refuses (a tensor lr under ``foreach=True``)."""
    found = []
    for config in entry.configs:
        if "foreach" in config or "fused" in config or "capturable" in config:
            continue
        config = {**config, **flags}
        try:
            entry.reference([torch.nn.Parameter(torch.zeros(2))], **copy.deepcopy(config))
        except ValueError:
            continue
        found.append(config)
    return found


@pytest.mark.parametrize("dtype", NARROW, ids=str)
@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"foreach": True}], ids=str)
@pytest.mark.parametrize("entry", CASES, ids=ids)
def test_narrow_state_steps_as_torch_with_its_state_rounded_after_each_step(
    entry: Entry, flags: dict[str, Any], dtype: torch.dtype
) -> None:
    for config in stepping_configs(entry, flags):
        params, twins, ours, theirs = _pair(entry, config, dtype)
        _step_both(entry, params, twins, ours, theirs, dtype)
        _assert_same(entry, params, twins, ours, theirs, dtype)


def test_state_dtype_per_key() -> None:
    """A mapping stores the keys it names narrow, the others in the parameter's dtype."""
    entry = next(e for e in CASES if e.cls is polyak.Adam)
    narrow = {"exp_avg": torch.bfloat16}
    params, twins, ours, theirs = _pair(entry, {"amsgrad": True}, narrow)
    _step_both(entry, params, twins, ours, theirs, narrow)
    _assert_same(entry, params, twins, ours, theirs, narrow)
    state = ours.state[params[0]]
    assert state["exp_avg"].dtype == torch.bfloat16
    assert state["exp_avg_sq"].dtype == state["max_exp_avg_sq"].dtype == torch.float32


def test_a_group_keeps_its_own_state_dtype() -> None:
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = polyak.AdamW(
        [{"params": [a]}, {"params": [b], "state_dtype": None}], state_dtype=torch.float16
    )
    c = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [c]})
    for p in (a, b, c):
        p.grad = torch.randn(4)
    opt.step()
    assert opt.state[a]["exp_avg"].dtype == torch.float16
    assert opt.state[b]["exp_avg"].dtype == torch.float32
    assert opt.state[c]["exp_avg"].dtype == torch.float16


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (torch.int8, ValueError, "Invalid state_dtype"),
        ("bfloat16", ValueError, "Invalid state_dtype"),
        (16, TypeError, "must be a torch.dtype"),
        ({"exp_avg": torch.int32}, ValueError, "Invalid state_dtype\\['exp_avg'\\]"),
        ({"momentum_buffer": torch.bfloat16}, ValueError, "no parameter-shaped state"),
    ],
)
def test_a_bad_state_dtype_is_refused(value: Any, error: type[Exception], match: str) -> None:
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(error, match=match):
        polyak.Adam([p], state_dtype=value)
    opt = polyak.Adam([p])
    q = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [q], "state_dtype": value})
    assert len(opt.param_groups) == 1


def test_optimizers_that_are_not_elementwise_do_not_take_it() -> None:
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(TypeError):
        polyak.Muon([p], state_dtype=torch.bfloat16)  # type: ignore[call-arg]


@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_a_float32_checkpoint_loads_narrow_and_back(dtype: torch.dtype) -> None:
    """torch's float32 checkpoint loads into a narrow optimizer (rounded at load) and steps as
    torch does with rounded state; the narrow optimizer's checkpoint loads into torch, which
    widens it, and into a float32 polyak optimizer, which keeps float32 state."""
    entry = next(e for e in CASES if e.cls is polyak.AdamW)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    source = torch.optim.AdamW(twins)
    for _ in range(2):
        for q in twins:
            q.grad = torch.randn(q.shape)
        source.step()
    for p, q in zip(params, twins, strict=True):
        p.data.copy_(q)
    ours = polyak.AdamW(params, state_dtype=dtype)
    ours.load_state_dict(source.state_dict())
    assert ours.param_groups[0]["state_dtype"] == dtype
    assert ours.state[params[0]]["exp_avg"].dtype == dtype
    _round_state(source, entry.cls.param_shaped_state, dtype)
    _step_both(entry, params, twins, ours, source, dtype)
    _assert_same(entry, params, twins, ours, source, dtype)

    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    back.load_state_dict(saved)
    assert back.state[back.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32
    wide = polyak.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    wide.load_state_dict(saved)
    assert "state_dtype" not in wide.param_groups[0]
    state = wide.state[wide.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], ours.state[params[0]]["exp_avg"].float())


def test_a_refused_checkpoint_leaves_narrow_state_unchanged() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = polyak.Adam([p], state_dtype=torch.bfloat16)
    p.grad = torch.randn(4)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, value in before["state"][0].items():
        assert torch.equal(after["state"][0][key], value)
        assert after["state"][0][key].dtype == value.dtype


# ------------------------------------------------ 16-bit parameters without master weights


def test_stochastic_rounding_is_torchaos_given_the_same_bits() -> None:
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    x = torch.cat([torch.randn(10000) * 3, torch.tensor([0.0, -0.0, 1e-40, 3e38, -1.5])])
    torch.manual_seed(5)
    ours = _precision.stochastic_round(x)
    torch.manual_seed(5)
    theirs = quant_utils._fp32_to_bf16_sr(x)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    torch.manual_seed(0)
    x = torch.randn(64) * 5
    draws = torch.stack([_precision.stochastic_round(x) for _ in range(4000)]).float()
    down = x.bfloat16().float()
    # Each draw is one of the two bfloat16 numbers around x.
    ulp = (torch.nextafter(x.abs(), torch.tensor(float("inf"))) - x.abs()) * 65536
    assert bool(((draws - x).abs() <= ulp).all())
    # Unbiased: the mean of 4000 draws is within 5 standard errors of x.
    spread = ulp / 2 / 4000**0.5
    assert bool(((draws.mean(0) - x).abs() <= 5 * spread + 1e-12).all())
    assert not torch.equal(draws.mean(0), down)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_a_stochastically_rounded_step_is_the_float32_step_rounded_at_random(name: str) -> None:
    """The update computes in float32 on widened parameters, gradients and state; the
    parameters are rounded stochastically and the state (bfloat16, as the parameters) to
    nearest: torch's (or polyak's own) float32 step, rounded so, gives the same bits."""
    kwargs: dict[str, Any] = {"lr": 0.01, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in [(50, 7), (33,)]]
    ours = getattr(polyak, name)(params, **kwargs, bf16_stochastic_round=True)
    twins = [torch.nn.Parameter(p.detach().float()) for p in params]
    module = torch.optim if hasattr(torch.optim, name) else polyak
    theirs = (
        getattr(module, name)(twins, **kwargs, foreach=False)
        if module is torch.optim
        else (getattr(module, name)(twins, **kwargs))
    )
    for step in range(4):
        grads = [torch.randn(p.shape).bfloat16() for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.float()
        torch.manual_seed(100 + step)
        ours.step()
        theirs.step()
        _round_state(theirs, ours.param_shaped_state, torch.bfloat16)
        torch.manual_seed(100 + step)
        for p, q in zip(params, twins, strict=True):
            expected = _precision.stochastic_round(q.detach())
            assert torch.equal(p.detach().view(torch.int16), expected.view(torch.int16))
            q.data.copy_(p.detach().float())
    assert "stochastic" in str(polyak.explain(ours))


def test_kahan_summation_is_optimis_given_the_same_step() -> None:
    """torch-optimi's ``kahan_sum`` adds each update to the compensation, the compensation to
    the parameter, and keeps what the parameter's rounding lost: with a learning rate that
    bfloat16 holds exactly (optimi rounds ``lr`` to the parameters' dtype, polyak computes the
    step in float32), SGD's steps are the same, bit for bit. The compensation differs where
    the float32 step itself rounds (p + u inexact in float32): a few elements in ten thousand."""
    optimi = pytest.importorskip("optimi")
    torch.manual_seed(0)
    n = 10000
    p = torch.nn.Parameter(torch.randn(n).bfloat16())
    q = torch.nn.Parameter(p.detach().clone())
    ours = polyak.SGD([p], lr=2**-7, kahan_sum=True)
    theirs = optimi.SGD([q], lr=2**-7, kahan_sum=True)
    for _ in range(20):
        g = torch.randn(n).bfloat16()
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(p, q)
    comp, their_comp = ours.state[p]["kahan_comp"], theirs.state[q]["kahan_comp"]
    assert comp.dtype == torch.bfloat16
    assert int((comp != their_comp).sum()) <= n // 2000


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_kahan_summation_tracks_float32_master_weights(name: str) -> None:
    """Small updates that plain bfloat16 parameters lose are kept: the compensated parameter
    (p + c) stays within a few of the compensation's units of float32 training, where plain
    bfloat16 drifts by many of the parameters' units."""
    kwargs: dict[str, Any] = {"lr": 1e-4} if name == "AdamW" else {"lr": 1e-3, "momentum": 0.9}
    torch.manual_seed(0)
    start = torch.randn(4096).bfloat16()
    master = torch.nn.Parameter(start.float())
    kahan = torch.nn.Parameter(start.clone())
    plain = torch.nn.Parameter(start.clone())
    opts = [
        getattr(torch.optim, name)([master], **kwargs),
        getattr(polyak, name)([kahan], **kwargs, kahan_sum=True),
        getattr(polyak, name)([plain], **kwargs),
    ]
    for _ in range(200):
        g = torch.randn(4096).bfloat16()
        master.grad, kahan.grad, plain.grad = g.float(), g.clone(), g.clone()
        for opt in opts:
            opt.step()
    compensated = kahan.detach().float() + opts[1].state[kahan]["kahan_comp"].float()
    kahan_error = (compensated - master.detach()).abs().max().item()
    plain_error = (plain.detach().float() - master.detach()).abs().max().item()
    assert kahan_error < plain_error / 20


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kahan_sum": True, "bf16_stochastic_round": True}, ValueError, "choose one"),
        ({"kahan_sum": 1}, TypeError, "kahan_sum must be a bool"),
    ],
)
def test_bad_parameter_roundings_are_refused(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    p = torch.nn.Parameter(torch.randn(4).bfloat16())
    with pytest.raises(error, match=match):
        polyak.AdamW([p], **kwargs)


def test_the_compensation_is_saved_loaded_and_checked() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = polyak.AdamW([p], lr=1e-3, kahan_sum=True)
    for _ in range(3):
        p.grad = torch.randn(8).bfloat16()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["kahan_comp"].dtype == torch.bfloat16
    q = torch.nn.Parameter(p.detach().clone())
    other = polyak.AdamW([q], lr=1e-3, kahan_sum=True)
    other.load_state_dict(saved)
    assert torch.equal(other.state[q]["kahan_comp"], opt.state[p]["kahan_comp"])
    bad = copy.deepcopy(saved)
    bad["state"][0]["kahan_comp"] = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        other.load_state_dict(bad)
    assert torch.equal(other.state[q]["kahan_comp"], opt.state[p]["kahan_comp"])
