"""Every strategy runs the same update rule: each matches the reference, and the flat kernel
keeps every semantic of the per-tensor path."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import (
    assert_same,
    clone_kwargs,
    has_tensor,
    make_params,
    params_for,
    set_grads,
    step_both,
    twin,
)
from conftest import step as step_once
from registry import REGISTRY, Entry, ids, takes

import polyak
from polyak.strategies import flat
from polyak.strategies.flat import _kernel, _plan

needs_kernel = pytest.mark.skipif(
    _kernel.load(wait=True) is None, reason="the flat kernel is unavailable"
)


@pytest.fixture
def flat_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Records, for every group step, whether the flat kernel ran it."""
    calls: list[bool] = []
    real = flat.step

    def spy(
        optimizer: Any, group: dict[str, Any], grad_scale: Any = None, prechecked: bool = False
    ) -> bool:
        done = real(optimizer, group, grad_scale, prechecked)
        calls.append(done)
        return done

    monkeypatch.setattr(flat, "step", spy)
    yield calls


def _cases(fused: bool = False) -> list[Any]:
    return [
        pytest.param(entry, config, id=f"{ids(entry)}-{i}")
        for entry in REGISTRY
        if entry.fused or not fused
        for i, config in enumerate(entry.configs)
        if not has_tensor(config)
    ]


@needs_kernel
@pytest.mark.parametrize(("entry", "config"), _cases())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_flat_default_is_bit_identical_to_torch(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, flat_steps: list[bool]
) -> None:
    """The default path runs flat after each parameter's first step, with torch's numbers."""
    params = params_for(entry, [(3, 4), (5,), (300,), (2, 2, 2)], dtype=dtype)
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    step_both(opt, ref, params, ref_params, 5)
    if entry.flat:
        assert flat_steps[1:] == [True] * 4, flat_steps
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])


@needs_kernel
@pytest.mark.parametrize(("entry", "config"), _cases(fused=True))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_flat_fused_half_precision_matches_torch_fused(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, flat_steps: list[bool]
) -> None:
    params = params_for(entry, dtype=dtype)
    ref_params = twin(params)
    opt = entry.cls(params, fused=True, **clone_kwargs(config))
    ref = entry.reference(ref_params, fused=True, **clone_kwargs(config))
    step_both(opt, ref, params, ref_params, 4)
    assert any(flat_steps) or not entry.flat
    assert_same(params, ref_params, entry.fused_tolerances[dtype])


@needs_kernel
@pytest.mark.parametrize(("entry", "config"), _cases(fused=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flat_fused_unscales_gradients_in_the_same_pass(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, flat_steps: list[bool]
) -> None:
    """Under a GradScaler a fused step runs flat: each gradient is divided by the scale in the
    pass (and left so in ``.grad``), and the update matches torch's fused step."""
    params = make_params(dtype=dtype)
    ref_params = twin(params)
    opt = entry.cls(params, fused=True, **clone_kwargs(config))
    ref = entry.reference(ref_params, fused=True, **clone_kwargs(config))
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        for p, q in zip(params, ref_params, strict=True):
            # A scale that is not a power of two: the division rounds.
            grad = (torch.randn(p.shape, generator=gen) * 1000.0).to(dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        for o in (opt, ref):
            o.grad_scale, o.found_inf = torch.tensor(1000.0), torch.tensor(0.0)
            o.step()
            del o.grad_scale, o.found_inf
        assert_same([p.grad for p in params], [q.grad for q in ref_params])
    if entry.flat:
        assert flat_steps[-3:] == [True] * 3, flat_steps
    assert_same(params, ref_params, entry.fused_tolerances[dtype])


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_strategy_matches_loop(entry: Entry, dtype: torch.dtype) -> None:
    # Tensor hyperparameters are left out: torch's per-tensor path computes with them as
    # float32 tensors and its fused path as numbers, which differ beyond rounding.
    for config in [c for c in entry.configs if not has_tensor(c)]:
        runs = []
        if not takes(entry, "foreach"):
            continue
        strategies: list[dict[str, Any]] = [{"foreach": False}, {}]
        if entry.paths_agree:
            strategies.append({"foreach": True})
        for flags in strategies + ([{"fused": True}] if entry.fused else []):
            params = params_for(entry, dtype=dtype)
            try:
                opt = entry.cls(params, **clone_kwargs({**config, **flags}))
            except ValueError:
                continue  # tensor hyperparameters with foreach, as torch refuses too
            step_both(opt, opt, params, params, 4)
            runs.append((flags, params))
        loop = runs[0][1]
        for flags, params in runs[1:]:
            atol = entry.fused_tolerances[dtype] if flags.get("fused") else 0.0
            assert_same(params, loop, atol)


def _versions(opt: Any, params: list[torch.Tensor]) -> dict[str, int]:
    """The version counter of every tensor a step may write: parameters, gradients, state."""
    versions = {}
    for i, p in enumerate(params):
        versions[f"param {i}"] = p._version
        if p.grad is not None:
            versions[f"grad {i}"] = p.grad._version
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                versions[f"{key} {i}"] = value._version
    return versions


def _advanced(opt: Any, params: list[torch.Tensor]) -> set[str]:
    """The tensors whose version one step advances."""
    before = _versions(opt, params)
    step_once(opt)
    after = _versions(opt, params)
    return {name for name, version in after.items() if version != before.get(name)}


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"fused": True}], ids=str)
def test_a_step_advances_the_version_of_every_tensor_it_writes(
    entry: Entry, flags: dict[str, Any], flat_steps: list[bool]
) -> None:
    """Autograd refuses a graph whose saved tensors a step changed by their version counters:
    every strategy advances those of the tensors it writes, as torch's per-tensor path does
    (torch's fused kernels leave them: a graph saved before a fused step would silently use
    the new values)."""
    if not all(takes(entry, flag) for flag in flags):
        pytest.skip("torch's class does not take these flags")
    config = next(c for c in entry.configs if not has_tensor(c))
    params = params_for(entry)
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs({**config, **flags}))
    ref_flags = {"foreach": False} if takes(entry, "foreach") else {}
    ref = entry.reference(ref_params, **clone_kwargs({**config, **ref_flags}))
    step_both(opt, ref, params, ref_params, 2)
    gen = torch.Generator().manual_seed(5)
    set_grads(params, ref_params, gen, entry.sparse_grads)
    assert _advanced(opt, params) == _advanced(ref, ref_params)
    if entry.flat and not flags:
        assert flat_steps[-1] is True, flat_steps


@needs_kernel
def test_backward_through_a_graph_saved_before_a_flat_step_fails_as_after_torchs(
    flat_steps: list[bool],
) -> None:
    for cls in (torch.optim.Adam, polyak.Adam):
        w = torch.randn(5, requires_grad=True)
        opt = cls([w], lr=0.1)
        (w * w).sum().backward()
        opt.step()
        loss = (w * w).sum()
        loss.backward(retain_graph=True)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    assert flat_steps[-1] is True


@needs_kernel
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_parameters_made_in_inference_mode_step_only_inside_it_as_torchs(
    momentum: float, flat_steps: list[bool]
) -> None:
    """An inference tensor has no version counter: torch refuses to update it in place
    outside inference mode, and updates it without counting inside."""
    with torch.inference_mode():
        params = [torch.randn(4, 3), torch.randn(7)]
        ref_params = [p.clone() for p in params]
    for p, q in zip(params, ref_params, strict=True):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    opt = polyak.SGD(params, lr=0.1, momentum=momentum)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=momentum)
    for o in (opt, ref):
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside"):
            o.step()
    assert_same(params, ref_params)
    for _ in range(3):
        with torch.inference_mode():
            opt.step()
            ref.step()
    assert_same(params, ref_params)
    assert flat_steps[-1] is True


@needs_kernel
def test_flat_skips_params_without_grad_and_takes_new_ones(flat_steps: list[bool]) -> None:
    params = make_params([(4,), (5,), (6,)])
    ref_params = twin(params)
    opt = polyak.Adam(params, lr=0.1)
    ref = torch.optim.Adam(ref_params, lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        active = [0, 1] if step < 3 else [0, 1, 2]
        for i in range(3):
            g = torch.randn(params[i].shape, generator=gen) if i in active else None
            params[i].grad = g
            ref_params[i].grad = None if g is None else g.clone()
        opt.step()
        ref.step()
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])
    assert True in flat_steps


@needs_kernel
def test_flat_follows_replaced_data_state_and_groups(flat_steps: list[bool]) -> None:
    model = torch.nn.Linear(4, 3)
    ref_model = torch.nn.Linear(4, 3)
    ref_model.load_state_dict(model.state_dict())
    opt = polyak.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4)

    def train(steps: int, dtype: torch.dtype = torch.float32) -> None:
        for _ in range(steps):
            for m, o in ((model, opt), (ref_model, ref)):
                o.zero_grad()
                m(x.to(dtype)).square().sum().backward()
                o.step()

    train(3)
    # A momentum buffer changed by hand is the one the kernel updates.
    for o in (opt, ref):
        for state in o.state.values():
            state["momentum_buffer"].mul_(0.5)
    train(2)
    # Checkpoints replace the state; module.to() replaces the parameters' data.
    opt.load_state_dict(opt.state_dict())
    train(2)
    model.double()
    ref_model.double()
    train(2, torch.float64)
    extra, ref_extra = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra], "lr": 0.01})
    ref.add_param_group({"params": [ref_extra], "lr": 0.01})
    extra.grad, ref_extra.grad = torch.ones(3), torch.ones(3)
    train(2, torch.float64)
    assert_same(list(model.parameters()), list(ref_model.parameters()))
    assert_same(extra, ref_extra)
    assert flat_steps.count(True) >= 5


def _dense_in_another_order(gen: torch.Generator) -> list[torch.Tensor]:
    """Parameters whose memory is dense but not in row-major order: channels-last convolution
    weights (one with a dimension of one, whose stride is free), and a transposed matrix."""
    return [
        torch.randn(8, 3, 3, 5, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(4, 1, 3, 3, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(6, 20, generator=gen).t(),
        torch.randn(7, generator=gen),
    ]


@needs_kernel
@pytest.mark.parametrize(("entry", "config"), [c for c in _cases() if c.values[0].flat])
def test_flat_runs_parameters_dense_in_another_order_with_torchs_numbers(
    entry: Entry, config: dict[str, Any], flat_steps: list[bool]
) -> None:
    """A channels-last model's parameters, gradients (autograd gives them the parameter's
    strides) and state share one dense layout: the kernel runs over their memory in order, as
    torch's kernels do, with the same numbers."""
    gen = torch.Generator().manual_seed(0)
    params = [p.requires_grad_() for p in _dense_in_another_order(gen)]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    assert [p.stride() for p in ref_params] == [p.stride() for p in params]
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    for _ in range(4):
        for p, q in zip(params, ref_params, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad = torch.empty_like(p).copy_(g)
            q.grad = torch.empty_like(q).copy_(g)
        opt.step()
        ref.step()
    assert flat_steps[1:] == [True] * 3, flat_steps
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])


@needs_kernel
def test_flat_falls_back_for_a_gradient_laid_out_unlike_its_parameter(
    flat_steps: list[bool],
) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [p.requires_grad_() for p in _dense_in_another_order(gen)]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = polyak.Adam(params, lr=0.1)
    ref = torch.optim.Adam(ref_params, lr=0.1)
    for _ in range(3):
        for p, q in zip(params, ref_params, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()  # row-major, where the parameters are not
        opt.step()
        ref.step()
    assert_same(params, ref_params)
    assert True not in flat_steps


@needs_kernel
def test_flat_falls_back_for_odd_gradients(flat_steps: list[bool]) -> None:
    params = make_params([(4, 3)])
    ref_params = twin(params)
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    for _ in range(4):
        g = torch.randn(3, 4).t()  # not contiguous
        params[0].grad, ref_params[0].grad = g, g.clone()
        opt.step()
        ref.step()
    assert_same(params, ref_params)
    assert True not in flat_steps


def test_no_kernel_means_one_warning_at_the_users_line_and_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_kernel, "_module", None)
    monkeypatch.setattr(_kernel, "_failed", "no C++ compiler was found: install g++")
    monkeypatch.setattr(_kernel, "_warned", False)
    params = make_params()
    ref_params = twin(params)
    opt = polyak.Adam(params, lr=0.1)
    ref = torch.optim.Adam(ref_params, lr=0.1)
    with pytest.warns(RuntimeWarning, match="no C.. compiler was found: install g..") as record:
        step_both(opt, ref, params, ref_params, 3)
    assert len(record) == 1 and record[0].filename.endswith("conftest.py")
    assert "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_both(opt, ref, params, ref_params, 2, seed=4)
    assert_same(params, ref_params)


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_polyak_native_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("POLYAK_NATIVE", value)
    monkeypatch.setattr(_kernel, "_module", None)
    monkeypatch.setattr(_kernel, "_failed", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernel.load() is None


@needs_kernel
def test_flat_sees_hyperparameter_changes(flat_steps: list[bool]) -> None:
    """A scheduler's new lr, a flag flipped mid-training, and a tensor lr all take effect."""
    params = make_params()
    ref_params = twin(params)
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)

    def every_step(i: int) -> None:
        for o in (opt, ref):
            group = o.param_groups[0]
            group["lr"] = 0.1 / (i + 2)
            group["nesterov"] = i % 2 == 1
            group["weight_decay"] = 0.0 if i < 3 else 0.01
            if i == 5:
                group["lr"] = torch.tensor(0.02)

    step_both(opt, ref, params, ref_params, 8, between=every_step)
    assert_same(params, ref_params)
    assert flat_steps.count(True) >= 4


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.duplicates_in_turn], ids=ids)
def test_a_parameter_listed_twice_is_updated_twice_in_turn(entry: Entry) -> None:
    params = params_for(entry, [(300,), (4,)])
    ref_params = twin(params)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = entry.cls([params[0], params[1], params[0]], **clone_kwargs(entry.stateful))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref = entry.reference(
            [ref_params[0], ref_params[1], ref_params[0]], **clone_kwargs(entry.stateful)
        )
    step_both(opt, ref, params, ref_params, 4)
    assert_same(params, ref_params)


def test_a_parameter_replaced_in_the_group_list_is_the_one_updated() -> None:
    params = make_params([(300,), (4,)])
    ref_params = twin(params)
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    step_both(opt, ref, params, ref_params, 3)
    new, ref_new = make_params([(300,)], seed=7)[0], make_params([(300,)], seed=7)[0]
    opt.param_groups[0]["params"][0] = new
    ref.param_groups[0]["params"][0] = ref_new
    params[0], ref_params[0] = new, ref_new
    step_both(opt, ref, params, ref_params, 3, seed=2)
    assert_same(params, ref_params)


@needs_kernel
@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_flat_counts_steps_of_parameters_without_elements(
    entry: Entry, flat_steps: list[bool]
) -> None:
    params = params_for(entry, [(0,), (5,), (0, 3)])
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(entry.stateful))
    ref = entry.reference(ref_params, **clone_kwargs(entry.stateful))
    if not entry.empty_params:
        # The rule divides by the number of elements, and fails as torch's does, before
        # anything changes.
        before = twin(params)
        for p, q in zip(params, ref_params, strict=True):
            p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        with pytest.raises(ZeroDivisionError) as mine:
            step_once(opt)
        with pytest.raises(ZeroDivisionError) as theirs:
            step_once(ref)
        assert str(mine.value) == str(theirs.value)
        assert_same(params, before)
        assert not opt.state
        return
    step_both(opt, ref, params, ref_params, 4)
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])
    assert not entry.flat or flat_steps[-1]


@needs_kernel
def test_flat_keeps_running_when_equal_hyperparameters_are_new_objects(
    flat_steps: list[bool],
) -> None:
    """Schedulers assign new floats and tuples every step; equal values keep the program, new
    values and new keys take effect."""
    params = make_params()
    ref_params = twin(params)
    opt = polyak.Adam(params, lr=0.1)
    ref = torch.optim.Adam(ref_params, lr=0.1)

    def every_step(i: int) -> None:
        for o in (opt, ref):
            group = o.param_groups[0]
            group["lr"] = float(str(0.05 if i < 4 else 0.02))
            group["betas"] = (float(str(0.9)), 0.999 if i < 6 else 0.99)
            if i == 3:
                group["extra_key"] = "ignored by the update"

    step_both(opt, ref, params, ref_params, 9, between=every_step)
    assert_same(params, ref_params)
    assert all(flat_steps[1:])


@needs_kernel
@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_flat_follows_state_whose_storage_is_swapped_by_hand(
    entry: Entry, flat_steps: list[bool]
) -> None:
    """``.data =`` on a state tensor gives it new memory, or a layout the kernel does not run:
    the new memory is the one updated, and the odd tensor alone takes the reference path."""
    params = params_for(entry, [(4, 3), (5,), (6,)])
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(entry.stateful))
    ref = entry.reference(ref_params, **clone_kwargs(entry.stateful))
    step_both(opt, ref, params, ref_params, 3)
    for o, ps in ((opt, params), (ref, ref_params)):
        for value in o.state[ps[0]].values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value.data = value.clone()
        for value in o.state[ps[1]].values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                strided = torch.empty(2 * value.numel())[::2].view(value.shape)
                value.data = strided.copy_(value)
    before = len(flat_steps)
    step_both(opt, ref, params, ref_params, 3, seed=5)
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])
    # A strided state tensor sends its group's step to the reference path.
    assert not any(flat_steps[before:])


@needs_kernel
def test_new_numbers_from_a_scheduler_are_taken_by_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OneCycleLR changes lr and betas every step: while the program's branches stay the same,
    the kernel takes the new numbers itself, and a branch that flips loads a new program."""
    loads: list[int] = []  # the step count at each load
    real = _plan.load

    def spy(optimizer: Any, entry: Any, group: dict[str, Any]) -> bool:
        loads.append(optimizer._step_count)
        return real(optimizer, entry, group)

    monkeypatch.setattr(_plan, "load", spy)
    params = make_params()
    ref_params = twin(params)
    opt = polyak.AdamW(params, lr=0.1, weight_decay=0.0)
    ref = torch.optim.AdamW(ref_params, lr=0.1, weight_decay=0.0)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20) for o in (opt, ref)
    ]

    def every_step(i: int) -> None:
        for sched in scheds:
            sched.step()
        if i == 8:
            for o in (opt, ref):
                o.param_groups[0]["weight_decay"] = 0.01  # a branch of the rule flips

    step_both(opt, ref, params, ref_params, 12, between=every_step)
    assert_same(params, ref_params)
    # The first step creates the state, the second loads a program, the tenth another one.
    assert loads == [0, 1, 9]


@needs_kernel
def test_the_kernel_takes_new_bounds_and_loads_another_program_for_a_nan_one(
    monkeypatch: pytest.MonkeyPatch, flat_steps: list[bool]
) -> None:
    """Rprop's step-size bounds are compared with each other (torch fills NaN where one is
    NaN): new finite bounds are taken by the kernel, a NaN one loads the program that fills."""
    loads: list[int] = []
    real = _plan.load

    def spy(optimizer: Any, entry: Any, group: dict[str, Any]) -> bool:
        loads.append(optimizer._step_count)
        return real(optimizer, entry, group)

    monkeypatch.setattr(_plan, "load", spy)
    params = make_params([(300,), (5,)])
    ref_params = twin(params)
    opt = polyak.Rprop(params, lr=0.01)
    ref = torch.optim.Rprop(ref_params, lr=0.01)
    bounds = [(1e-6, 50.0), (1e-3, 1e-3), (0.1, 1e-3), (float("nan"), 50.0)]

    def every_step(i: int) -> None:
        for o in (opt, ref):
            o.param_groups[0]["step_sizes"] = bounds[min(i // 2, 3)]

    step_both(opt, ref, params, ref_params, 9, between=every_step)
    for a, b in zip(params, ref_params, strict=True):
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8))
    assert all(flat_steps[1:]) and loads == [0, 1, 7]


@needs_kernel
@pytest.mark.parametrize(
    ("cls", "ref_cls", "config"),
    [
        (polyak.RAdam, torch.optim.RAdam, {"lr": 0.01, "betas": (0.8, 0.99)}),
        (polyak.ASGD, torch.optim.ASGD, {"lr": 0.02, "t0": 2, "lambd": 0.01}),
    ],
    ids=["RAdam", "ASGD"],
)
def test_flat_branches_on_computed_numbers_tensor_by_tensor(
    cls: Any, ref_cls: Any, config: dict[str, Any], flat_steps: list[bool]
) -> None:
    """RAdam's rectification and ASGD's averaging start at a step count: tensors whose counts
    differ (one stepped alone first) take different branches in the same flat step."""
    params = make_params([(3, 4), (300,), (5,)])
    ref_params = twin(params)
    opt = cls(params, **config)
    ref = ref_cls(ref_params, **config)
    step_both(opt, ref, params[:1], ref_params[:1], 3)
    step_both(opt, ref, params, ref_params, 7, seed=2)
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])
    assert all(flat_steps[1:3]) and all(flat_steps[4:])


@needs_kernel
@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_flat_follows_state_replaced_by_assignment(entry: Entry, flat_steps: list[bool]) -> None:
    """A state tensor, a parameter's whole state dict, or the whole state replaced by hand (as
    code that resets momentum or moves state does) is the one the next steps use."""
    params = params_for(entry, [(4, 3), (5,), (6,)])
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(entry.stateful))
    ref = entry.reference(ref_params, **clone_kwargs(entry.stateful))

    def replace(edit: Any) -> None:
        for o, ps in ((opt, params), (ref, ref_params)):
            edit(o, ps)

    def one_tensor(o: Any, ps: list[torch.Tensor]) -> None:
        state = o.state[ps[0]]
        key = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
        state[key] = torch.full_like(state[key], 0.5)

    def whole_dict(o: Any, ps: list[torch.Tensor]) -> None:
        o.state[ps[1]] = {
            k: v.clone().mul_(0.5) if isinstance(v, torch.Tensor) else v
            for k, v in o.state[ps[1]].items()
        }

    def everything(o: Any, ps: list[torch.Tensor]) -> None:
        o.state = defaultdict(dict)

    step_both(opt, ref, params, ref_params, 3)
    for edit in (one_tensor, whole_dict, everything):
        replace(edit)
        step_both(opt, ref, params, ref_params, 3, seed=len(flat_steps))
        assert_same(params, ref_params)
        assert_same(opt.state_dict()["state"], ref.state_dict()["state"])
    assert not entry.flat or flat_steps[-1]
    assert isinstance(opt.state, defaultdict)


@needs_kernel
def test_scalar_state_of_mixed_dtypes_rounds_each_in_its_own(flat_steps: list[bool]) -> None:
    """Two tensors whose scalar state holds the same value in float32 and in float64 (NAdam's
    mu_product) each round the new value in their own dtype, as torch does."""
    results = []
    for cls in (polyak.NAdam, torch.optim.NAdam):
        params = make_params([(6,), (6,), (6,)])
        opt = cls(params, lr=0.01)
        gen = torch.Generator().manual_seed(4)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            if step == 0:
                state = opt.state[params[1]]
                state["mu_product"] = state["mu_product"].to(torch.float64)
        results.append((params, [opt.state[p]["mu_product"] for p in params]))
    assert results[0][1][1].dtype == torch.float64
    assert_same(results[0], results[1])
    assert any(flat_steps)


def test_optimizers_whose_torch_twin_defaults_to_its_loop_keep_it_on_accelerators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's Adafactor takes its foreach path only when asked, and Muon has no other: without
    a flag they stay per tensor where the others take foreach (accelerators; CPU tensors stand
    in for an accelerator's here)."""
    from polyak import strategies

    monkeypatch.setattr(strategies, "_FOREACH_DEVICES", ("cpu",))
    taken: list[tuple[str, str]] = []
    real = strategies.Strategy.run

    def spy(self: Any, update: Any, *args: Any) -> None:
        taken.append((update.__qualname__.split(".")[0], self.value))
        real(self, update, *args)

    monkeypatch.setattr(strategies.Strategy, "run", spy)
    for entry in REGISTRY:
        if entry.step_closure or entry.sparse_grads:
            continue
        params = params_for(entry)
        opt = entry.cls(params, **clone_kwargs(entry.stateful))
        for p in params:
            p.grad = torch.ones_like(p)
        step_once(opt)
    expected = {"Adafactor": "loop", "Muon": "loop", "SGD": "foreach", "Adam": "foreach"}
    assert {name: taken_as for name, taken_as in taken if name in expected} == expected


@needs_kernel
def test_memory_moved_into_overlap_is_seen_when_every_step_brings_new_gradients(
    flat_steps: list[bool],
) -> None:
    """The kernel skips its overlap check while the memory a step writes stays where it was,
    whatever the gradients (a loop that sets them to None gives new ones every step); a
    parameter given another's memory is still seen, and updated in turn as torch does."""
    params = make_params([(6,), (6,), (5,)])
    ref_params = twin(params)
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    step_both(opt, ref, params, ref_params, 3)
    assert flat_steps[1:] == [True, True]
    params[0].data = params[1].data
    ref_params[0].data = ref_params[1].data
    step_both(opt, ref, params, ref_params, 2, seed=2)
    assert flat_steps[3:] == [False, False]
    assert_same(params, ref_params)


def _shared_gradient_run(cls: Any, **config: Any) -> list[list[torch.Tensor]]:
    """Two parameters holding one gradient tensor, refilled at each step, stepped fused twice
    plainly, then twice under a GradScaler: the parameters and the gradient after each step."""
    params = make_params([(8,), (8,)])
    opt = cls(params, lr=0.1, fused=True, **config)
    gen = torch.Generator().manual_seed(5)
    out = []
    grad = torch.empty(8)  # one tensor throughout, refilled: the memory stays where it was
    for scaled in (False, False, True, True):
        grad.copy_(torch.randn(8, generator=gen) * 64)
        params[0].grad = params[1].grad = grad
        if scaled:
            opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(0.0)
        opt.step()
        if scaled:
            del opt.grad_scale, opt.found_inf
        out.append([p.detach().clone() for p in params] + [grad.clone()])
    return out


@needs_kernel
def test_a_gradient_two_parameters_share_is_checked_once_unscaling_writes_it(
    flat_steps: list[bool],
) -> None:
    """The overlap check covers gradients once a GradScaler step writes them, even where an
    earlier step found the same memory disjoint: the shared gradient leaves the flat pass, and
    ends divided once per parameter, as torch's fused step leaves it."""
    ours = _shared_gradient_run(polyak.SGD, momentum=0.9)
    assert flat_steps[-3] and flat_steps[-2:] == [False, False], flat_steps
    theirs = _shared_gradient_run(torch.optim.SGD, momentum=0.9)
    assert_same([step[-1] for step in ours], [step[-1] for step in theirs])


@pytest.mark.parametrize(
    ("name", "config"),
    [("SGD", {"momentum": 0.9}), ("Adam", {"betas": (0.8, 0.9)}), ("Adagrad", {})],
)
def test_parameters_sharing_a_gradient_under_a_grad_scaler_match_torch(
    name: str, config: dict[str, Any]
) -> None:
    """torch's fused step unscales and updates parameter by parameter, so the second of two
    parameters holding one gradient reads it divided twice; the reference path does the same."""
    ours = _shared_gradient_run(getattr(polyak, name), **config)
    theirs = _shared_gradient_run(getattr(torch.optim, name), **config)
    assert_same(ours, theirs, 1e-5)
