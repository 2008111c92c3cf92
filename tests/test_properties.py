"""Properties that hold for every optimizer and configuration, checked with Hypothesis."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
from conftest import (
    as_grad,
    assert_same,
    clone_kwargs,
    params_for,
    set_grads,
    step,
    takes_sparse_grads,
    twin,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from registry import REGISTRY, takes

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

entries = st.sampled_from(REGISTRY)


@st.composite
def entry_and_config(draw: st.DrawFn) -> tuple[Any, dict[str, Any]]:
    entry = draw(entries)
    config = clone_kwargs(draw(st.sampled_from(entry.configs)))
    flags = draw(st.sampled_from([{}, {"foreach": True}, {"foreach": False}]))
    if not takes(entry, "foreach"):
        flags = {}
    try:
        entry.reference(params_for(entry), **clone_kwargs({**config, **flags}))
    except (ValueError, RuntimeError):
        flags = {}  # a combination torch rejects; the errors are tested elsewhere
    return entry, {**config, **flags}


def _steps(opt: Any, params: list[torch.Tensor], n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shadow = twin(params)
    for _ in range(n):
        set_grads(params, shadow, gen, takes_sparse_grads(opt))
        step(opt)


@SETTINGS
@given(entry_and_config(), st.integers(1, 4))
def test_lr_zero_leaves_params_unchanged(case: Any, steps: int) -> None:
    entry, config = case
    assume(entry.lr_zero_is_identity)
    config["lr"] = 0.0
    params = params_for(entry)
    before = twin(params)
    _steps(entry.cls(params, **config), params, steps, seed=1)
    assert_same(params, before)


@SETTINGS
@given(entry_and_config(), st.integers(1, 4))
def test_zero_gradient_without_decay_leaves_params_unchanged(case: Any, steps: int) -> None:
    entry, config = case
    assume(entry.zero_grad_is_identity)
    if "weight_decay" in inspect.signature(entry.cls).parameters:
        config["weight_decay"] = 0.0
    assume(config.get("eps") != 0.0)  # 0 / (0 + eps) is NaN without an epsilon
    params = params_for(entry)
    before = twin(params)
    opt = entry.cls(params, **config)
    for _ in range(steps):
        for p in params:
            p.grad = as_grad(torch.zeros_like(p), entry.sparse_grads)
        step(opt)
    assert_same(params, before)


@SETTINGS
@given(entry_and_config(), st.integers(0, 4), st.integers(1, 4))
def test_save_load_step_equals_uninterrupted(case: Any, before: int, after: int) -> None:
    entry, config = case
    params = params_for(entry)
    resumed_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(config))
    _steps(opt, params, before, seed=1)
    resumed = entry.cls(resumed_params, **clone_kwargs(config))
    with torch.no_grad():
        for p, q in zip(resumed_params, params, strict=True):
            p.copy_(q)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps(opt, params, after, seed=2)
    _steps(resumed, resumed_params, after, seed=2)
    assert_same(resumed_params, params)
    if "step" in entry.cls.state_keys:
        assert resumed._step_count == opt._step_count == before + after


@SETTINGS
@given(entry_and_config(), st.lists(st.integers(0, 3), min_size=4, max_size=4))
def test_regrouping_does_not_change_results(case: Any, assignment: list[int]) -> None:
    entry, config = case
    assume(not entry.one_group)
    shapes = [(3, 4), (5,), (2, 2, 2), (7,)]
    params = params_for(entry, shapes)
    grouped_params = twin(params)
    groups: dict[int, list[torch.Tensor]] = {}
    for p, g in zip(grouped_params, assignment, strict=True):
        groups.setdefault(g, []).append(p)
    one = entry.cls(params, **clone_kwargs(config))
    many = entry.cls([{"params": ps} for ps in groups.values()], **clone_kwargs(config))
    _steps(one, params, 3, seed=4)
    gen = torch.Generator().manual_seed(4)
    shadow = twin(grouped_params)
    # Same gradients per parameter as the one-group run, whatever the order of the groups.
    for _ in range(3):
        set_grads(grouped_params, shadow, gen, entry.sparse_grads)
        step(many)
    for p, q in zip(params, grouped_params, strict=True):
        assert_same(p, q)


_VALUES = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.floats(-2, 2),
    st.text(max_size=3),
    st.booleans(),
    st.lists(st.integers(0, 5), max_size=3),
    st.builds(lambda n: torch.zeros(n), st.integers(0, 4)),
    st.just({}),
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            paths += _paths(v, (*prefix, i))
    return paths


def _snapshot(opt: Any) -> Any:
    return copy.deepcopy(
        (opt.state_dict(), [[id(p) for p in g["params"]] for g in opt.param_groups])
    )


# A corrupted id leaves a parameter without state and state under an id no group lists, which
# loading reports.
@pytest.mark.filterwarnings("ignore:loaded state dict has state under ids:UserWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry_and_config(), st.data())
def test_corrupt_state_dict_loads_or_changes_nothing(case: Any, data: st.DataObject) -> None:
    entry, config = case
    config = {**config, **clone_kwargs(entry.stateful)}
    params = params_for(entry)

    def groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        if entry.one_group:
            return [{"params": ps}]
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.3}]

    opt = entry.cls(groups(params), **clone_kwargs(config))
    _steps(opt, params, 2, seed=1)
    sd = copy.deepcopy(opt.state_dict())
    before = _snapshot(opt)
    path = data.draw(st.sampled_from(_paths(sd)))
    parent = sd
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_VALUES)
    saved = copy.deepcopy(sd)
    try:
        opt.load_state_dict(sd)
    except (ValueError, TypeError, KeyError, AttributeError):  # as torch refuses it
        assert_same(_snapshot(opt), before)
    # Whatever happened, the optimizer still steps, or fails as torch.optim fails with the same
    # state dict (both take a flag such as capturable=True at load and refuse it at the step).
    try:
        _steps(opt, params, 1, seed=3)
    except Exception as error:
        ref_params = twin(params)
        ref = entry.reference(groups(ref_params), **clone_kwargs(config))
        with pytest.raises(type(error)):
            ref.load_state_dict(saved)
            _steps(ref, ref_params, 1, seed=3)
