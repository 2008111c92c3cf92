"""Checkpoints: torch's format, both directions, and loading that is all or nothing."""

from __future__ import annotations

import copy
import gc
import io
import weakref
from typing import Any

import pytest
import torch
from conftest import (
    as_grad,
    assert_same,
    clone_kwargs,
    heavy_imports_of,
    make_params,
    params_for,
    step,
    step_both,
    twin,
)
from registry import REGISTRY, Entry, ids

import polyak
from polyak.strategies import flat


def _trained(entry: Entry, config: dict[str, Any], steps: int = 3) -> tuple[Any, Any, Any, Any]:
    params = params_for(entry)
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    step_both(opt, ref, params, ref_params, steps)
    return opt, ref, params, ref_params


def _roundtrip(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _snapshot(opt: torch.optim.Optimizer) -> Any:
    return copy.deepcopy(
        {
            "state_dict": opt.state_dict(),
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "params": [[id(p) for p in g["params"]] for g in opt.param_groups],
            "step_count": getattr(opt, "_step_count", None),
        }
    )


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_format_is_torchs(entry: Entry) -> None:
    for config in entry.configs:
        opt, ref, _, _ = _trained(entry, config)
        sd, ref_sd = opt.state_dict(), ref.state_dict()
        assert set(sd) == set(ref_sd) == {"state", "param_groups"}
        assert_same(sd["state"], ref_sd["state"])
        assert_same(sd["param_groups"], ref_sd["param_groups"])


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
@pytest.mark.parametrize("direction", ["polyak->torch", "torch->polyak", "polyak->polyak"])
def test_mid_training_handover_continues_identically(entry: Entry, direction: str) -> None:
    for config in entry.configs:
        opt, ref, params, ref_params = _trained(entry, config)
        # Hand the state over through a file read with weights_only=True, then keep going.
        source = ref if direction.startswith("torch") else opt
        target_cls = entry.reference if direction.endswith("torch") else entry.cls
        loaded = _roundtrip(source.state_dict())
        new_params = twin(params)
        target = target_cls(new_params, **clone_kwargs(config))
        target.load_state_dict(loaded)
        step_both(target, ref, new_params, ref_params, 3, seed=9)
        assert_same(new_params, ref_params)
        assert_same(target.state_dict()["state"], ref.state_dict()["state"])


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_step_count_is_read_from_step_state_at_load(entry: Entry) -> None:
    opt, ref, params, _ = _trained(entry, entry.stateful, steps=4)
    fresh = entry.cls(twin(params), **clone_kwargs(entry.stateful))
    # A state_dict holds torch's keys only: where the algorithm keeps a per-parameter step,
    # the count is read from it; otherwise nothing tells it.
    counted = 4 if "step" in entry.cls.state_keys else 0
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    assert fresh._step_count == counted
    step(fresh)
    assert fresh._step_count == counted + 1
    fresh.load_state_dict(ref.state_dict())
    assert fresh._step_count == counted


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_load_casts_state_to_param_dtype_and_copies(entry: Entry) -> None:
    config = entry.stateful
    opt64, _, _, _ = _trained(entry, config)
    sd = opt64.state_dict()
    params32 = [p.detach().float().requires_grad_() for p in params_for(entry)]
    opt32 = entry.cls(params32, **config)
    opt32.load_state_dict(sd)
    for p in params32:
        for value in opt32.state[p].values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.float32
    # Stepping must not write into the dict that was loaded.
    kept = copy.deepcopy(sd)
    same = entry.cls(params_for(entry), **config)
    same.load_state_dict(sd)
    for p in same.param_groups[0]["params"]:
        p.grad = as_grad(torch.ones_like(p), entry.sparse_grads)
    step(same)
    assert_same(sd["state"], kept["state"])


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_named_parameters_round_trip(entry: Entry) -> None:
    # Muon takes the weights only.
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    names = [n for n, p in model.named_parameters() if p.ndim == 2 or not entry.matrices_only]

    def named() -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in model.named_parameters() if n in names]

    opt = entry.cls(named(), **entry.stateful)
    ref = entry.reference(named(), **entry.stateful)
    assert opt.param_groups[0]["param_names"] == names
    assert_same(opt.state_dict()["param_groups"], ref.state_dict()["param_groups"])
    other = entry.cls(named(), lr=0.5)
    other.load_state_dict(ref.state_dict())
    assert other.param_groups[0]["param_names"] == names
    assert other.param_groups[0]["lr"] == entry.stateful["lr"]


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_old_checkpoints_without_new_flags_load(entry: Entry) -> None:
    _opt, ref, params, _ref_params = _trained(entry, entry.stateful)
    sd = ref.state_dict()
    flags = [
        f for f in ("maximize", "foreach", "differentiable", "fused") if f in entry.cls.backfill
    ]
    for group in sd["param_groups"]:
        for flag in flags:
            group.pop(flag)
    ref2 = entry.reference(twin(params), lr=1.0)
    ref2.load_state_dict(copy.deepcopy(sd))
    mine = entry.cls(twin(params), lr=1.0)
    mine.load_state_dict(copy.deepcopy(sd))
    for flag in flags:
        # torch's SparseAdam leaves a missing flag missing and reads it with its default.
        expected = ref2.param_groups[0].get(flag, entry.cls.backfill[flag])
        assert mine.param_groups[0][flag] == expected


def _corruptions(
    sd: dict[str, Any], key: str | None
) -> list[tuple[str, type[Exception], dict[str, Any]]]:
    """Broken copies of ``sd``; ``key`` names a state entry of the parameter's shape, if the
    optimizer keeps one (LBFGS keeps flat vectors)."""

    def edit(fn: Any) -> dict[str, Any]:
        new = copy.deepcopy(sd)
        fn(new)
        return new

    first = next(iter(sd["state"]))
    flag = next((k for k, v in sd["param_groups"][0].items() if isinstance(v, bool)), None)
    shaped = [
        (
            "wrong shape",
            ValueError,
            edit(lambda d: d["state"][first].__setitem__(key, torch.zeros(7))),
        ),
        (
            "not a tensor",
            TypeError,
            edit(lambda d: d["state"][first].__setitem__(key, [1.0])),
        ),
    ]
    flagged = [
        (
            "flag a number",
            TypeError,
            edit(lambda d: d["param_groups"][0].__setitem__(flag, 0.5)),
        )
    ]
    return [
        *(shaped if key is not None else []),
        *(flagged if flag is not None else []),
        ("no param_groups", KeyError, edit(lambda d: d.pop("param_groups"))),
        ("no state", KeyError, edit(lambda d: d.pop("state"))),
        (
            "extra group",
            ValueError,
            edit(lambda d: d["param_groups"].append(copy.deepcopy(d["param_groups"][0]))),
        ),
        ("short group", ValueError, edit(lambda d: d["param_groups"][0]["params"].pop())),
        ("bad id", TypeError, edit(lambda d: d["param_groups"][0]["params"].__setitem__(0, [0]))),
        (
            "repeated id",
            ValueError,
            edit(lambda d: d["param_groups"][0]["params"].__setitem__(1, 0)),
        ),
        # torch reads the state with ``.items()``: AttributeError.
        ("state not a dict", AttributeError, edit(lambda d: d.__setitem__("state", [1]))),
        ("param state not a dict", TypeError, edit(lambda d: d["state"].__setitem__(first, 3))),
        ("groups not a list", TypeError, edit(lambda d: d.__setitem__("param_groups", 3))),
        ("group not a dict", TypeError, edit(lambda d: d["param_groups"].__setitem__(0, 3))),
        ("missing lr", KeyError, edit(lambda d: d["param_groups"][0].pop("lr"))),
        ("lr a string", TypeError, edit(lambda d: d["param_groups"][0].__setitem__("lr", "x"))),
        ("bad step count", TypeError, edit(lambda d: d.__setitem__("_step_count", "3"))),
        ("negative step count", ValueError, edit(lambda d: d.__setitem__("_step_count", -1))),
    ]


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_corrupt_state_dicts_are_rejected_and_change_nothing(entry: Entry) -> None:
    opt, _, _, _ = _trained(entry, entry.stateful)
    good = opt.state_dict()
    before = _snapshot(opt)
    shaped = entry.cls.param_shaped_state[0] if entry.cls.param_shaped_state else None
    for name, error, bad in _corruptions(copy.deepcopy(good), shaped):
        with pytest.raises(error):
            opt.load_state_dict(bad)
        after = _snapshot(opt)
        assert_same(after, before), name
    opt.load_state_dict(good)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.flat], ids=ids)
def test_loading_releases_the_state_it_replaces_as_torch_does(entry: Entry) -> None:
    """After ``load_state_dict`` the replaced state tensors are freed at once, as torch frees
    them: a training loop that rolls back to a checkpoint holds one copy of the state, not
    two until its next step."""
    flat.kernel(wait=True)
    released = []
    for cls in (entry.reference, entry.cls):
        params = params_for(entry)
        opt = cls(params, **clone_kwargs(entry.stateful))
        step_both(opt, opt, params, params, 3)
        old = [weakref.ref(t) for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        assert old
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        gc.collect()
        released.append(all(r() is None for r in old))
    assert released == [True, True]


def test_not_a_mapping() -> None:
    opt = polyak.SGD(make_params(), lr=0.1)
    with pytest.raises(TypeError, match="expected a dict"):
        opt.load_state_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_state_dict_hooks(entry: Entry) -> None:
    opt, _, _, _ = _trained(entry, entry.stateful)
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre-first"), prepend=True)

    def post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("post")
        return {**sd, "extra": 1}

    handle = opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == ["pre-first", "pre", "post"] and sd["extra"] == 1
    handle.remove()
    assert "extra" not in opt.state_dict()

    loads: list[str] = []

    def load_pre(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        loads.append("pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.25
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: loads.append("post"))
    opt.register_load_state_dict_post_hook(lambda o: loads.append("post-first"), prepend=True)
    opt.load_state_dict(sd)
    assert loads == ["pre", "post-first", "post"]
    assert opt.param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_keys_added_by_a_scheduler_are_not_required(entry: Entry) -> None:
    opt, _ref, params, _ = _trained(entry, entry.stateful)
    sd = opt.state_dict()
    resumed = entry.cls(twin(params), **entry.stateful)
    torch.optim.lr_scheduler.StepLR(resumed, step_size=2)
    assert "initial_lr" in resumed.param_groups[0]
    resumed.load_state_dict(sd)
    ref_resumed = entry.reference(twin(params), **entry.stateful)
    torch.optim.lr_scheduler.StepLR(ref_resumed, step_size=2)
    ref_resumed.load_state_dict(sd)
    assert_same(
        {k: v for k, v in resumed.param_groups[0].items() if k != "params"},
        {k: v for k, v in ref_resumed.param_groups[0].items() if k != "params"},
    )


@pytest.mark.parametrize(
    "value", [-1, -2.5, float("nan"), torch.tensor(-1.0), torch.tensor(float("inf"))]
)
def test_a_step_counter_that_no_training_makes_is_rejected(value: Any) -> None:
    """torch.optim loads a negative or non-finite step and fails in ``step()`` (a division by
    zero, a complex power); polyak refuses it at load and keeps its state."""
    entry = next(e for e in REGISTRY if e.cls is polyak.Adam)
    opt, _, _, _ = _trained(entry, entry.stateful)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][next(iter(bad["state"]))]["step"] = value
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(bad)
    assert_same(_snapshot(opt), before)


_REFUSED_VALUES = [
    (polyak.SGD, {"lr": -0.1}),
    (polyak.SGD, {"momentum": -0.5}),
    (polyak.SGD, {"nesterov": True, "momentum": 0.0}),
    (polyak.Adam, {"betas": [1, 2]}),
    (polyak.Adam, {"eps": -1.0}),
    (polyak.AdamW, {"weight_decay": -0.1}),
]


@pytest.mark.parametrize(
    ("cls", "values"), _REFUSED_VALUES, ids=[f"{c.__name__}-{v}" for c, v in _REFUSED_VALUES]
)
def test_hyperparameters_no_constructor_takes_are_refused_at_load(
    cls: type[polyak.Optimizer], values: dict[str, Any]
) -> None:
    """torch.optim loads them and fails, or computes nonsense, in ``step()``; polyak raises the
    constructor's error at load and keeps its state."""
    entry = next(e for e in REGISTRY if e.cls is cls)
    opt, _, _, _ = _trained(entry, entry.stateful)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0].update(values)
    before = _snapshot(opt)
    with pytest.raises(ValueError) as caught:
        opt.load_state_dict(bad)
    assert_same(_snapshot(opt), before)
    with pytest.raises(ValueError) as constructed:
        cls(make_params(), **{**entry.stateful, **values})
    assert str(caught.value) == str(constructed.value)


_INIT_STATE = [
    e
    for e in REGISTRY
    if e.cls.init_state is not polyak.Optimizer.init_state and not e.sparse_grads
]


@pytest.mark.parametrize("entry", _INIT_STATE, ids=ids)
@pytest.mark.parametrize("numel", [6, (1 << 20) + 1], ids=["small", "large"])
def test_state_missing_a_key_is_rejected_whatever_the_parameter_size(
    entry: Entry, numel: int
) -> None:
    params = params_for(entry, [(numel,)])
    opt = entry.cls(params, **entry.stateful)
    params[0].grad = torch.ones_like(params[0])
    step(opt)
    good = opt.state_dict()
    before = _snapshot(opt)
    assert good["state"][0]
    if len(good["state"][0]) == 1:
        pytest.skip("without its one key, a parameter's state is no state, which loads")
    for key in good["state"][0]:
        bad = copy.deepcopy(good)
        del bad["state"][0][key]
        with pytest.raises(KeyError, match=f"has no '{key}' entry"):
            opt.load_state_dict(bad)
        assert_same(_snapshot(opt), before)


_LOAD_IMPORTS_SCRIPT = """
import sys
import torch
from registry import REGISTRY

model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)
)
x = torch.randn(2, 1, 8, 8)
for entry in REGISTRY:
    if entry.sparse_grads:
        continue
    params = [p for p in model.parameters() if p.ndim == 2 or not entry.matrices_only]
    opt = entry.cls(params, **entry.stateful)

    def closure():
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss

    opt.step(closure) if entry.step_closure else (closure(), opt.step())
    entry.cls(params, **entry.stateful).load_state_dict(opt.state_dict())
print(sorted(m for m in ("sympy", "torch.fx.experimental.symbolic_shapes") if m in sys.modules))
"""


def test_load_state_dict_of_a_small_model_imports_no_symbolic_shapes() -> None:
    # Checking a checkpoint against the state a parameter's first step makes must not pull in
    # torch's symbolic-shape machinery and sympy: importing them took 0.3-1 s, in a process's
    # first load_state_dict, for a model of a few kilobytes.
    assert heavy_imports_of(_LOAD_IMPORTS_SCRIPT) == "[]"
