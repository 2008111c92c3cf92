"""Checkpoints as torch.optim writes and reads them: ids, keys, step counts, old formats."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import pytest
import torch
from conftest import assert_same, clone_kwargs, params_for, step_both, twin
from registry import REGISTRY, Entry, ids

import polyak

STRATEGIES = [{}, {"foreach": False}, {"foreach": True}]
STRATEGY_IDS = ["default", "loop", "foreach"]


def _entry(cls: type[polyak.Optimizer]) -> Entry:
    return next(e for e in REGISTRY if e.cls is cls)


def _pair(entry: Entry, config: dict[str, Any], steps: int = 3) -> tuple[Any, Any, Any, Any]:
    params = params_for(entry)
    ref_params = twin(params)
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    step_both(opt, ref, params, ref_params, steps)
    return opt, ref, params, ref_params


def _load_both(
    entry: Entry, config: dict[str, Any], sd: dict[str, Any], params: list[torch.Tensor]
) -> tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]:
    """A fresh polyak and torch.optim optimizer over copies of ``params``, each loading ``sd``."""
    mine_params, ref_params = twin(params), twin(params)
    mine = entry.cls(mine_params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    ref.load_state_dict(copy.deepcopy(sd))
    mine.load_state_dict(copy.deepcopy(sd))
    return mine, ref, mine_params, ref_params


def _step(opt: Any, params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    opt.step()


# --------------------------------------------------------------- state_dict keys (torch's)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_state_dict_has_exactly_torchs_keys(entry: Entry) -> None:
    for config in entry.configs:
        opt, ref, _, _ = _pair(entry, config)
        assert opt.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_checkpoints_with_a_step_count_of_older_versions_still_load(entry: Entry) -> None:
    opt, _, params, _ = _pair(entry, entry.stateful, steps=4)
    sd = {**opt.state_dict(), "_step_count": 4}
    fresh = entry.cls(twin(params), **clone_kwargs(entry.stateful))
    fresh.load_state_dict(sd)
    assert fresh._step_count == 4
    assert "_step_count" not in fresh.state_dict()


# ------------------------------------------------------------------------ parameter ids


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
@pytest.mark.parametrize("flags", STRATEGIES, ids=STRATEGY_IDS)
def test_ids_of_any_hashable_kind_load_as_in_torch(entry: Entry, flags: dict[str, Any]) -> None:
    """torch.distributed.checkpoint hands optimizers state_dicts keyed by parameter names."""
    if flags and "foreach" not in inspect.signature(entry.cls).parameters:
        pytest.skip(f"{entry.cls.__name__} has one strategy")
    config = {**entry.stateful, **flags}
    _, ref, _params, ref_params = _pair(entry, config)
    sd = ref.state_dict()
    names = ["a.weight", "a.bias", ("b", 3)]
    renamed = {
        "state": {names[i]: v for i, v in sd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]
        ],
    }
    mine, ref2, mine_params, ref2_params = _load_both(entry, config, renamed, ref_params)
    step_both(mine, ref2, mine_params, ref2_params, 2, seed=5)
    assert_same(mine_params, ref2_params)
    assert_same(mine.state_dict(), ref2.state_dict())


def test_unhashable_ids_are_refused_with_torchs_error_and_change_nothing() -> None:
    entry = _entry(polyak.Adam)
    opt, ref, _, _ = _pair(entry, entry.stateful)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["params"][0] = [0]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError) as mine:
        opt.load_state_dict(bad)
    with pytest.raises(TypeError) as theirs:
        ref.load_state_dict(copy.deepcopy(bad))
    assert str(mine.value) == str(theirs.value)
    assert_same(opt.state_dict(), before)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_a_parameter_listed_twice_saves_torchs_ids(entry: Entry) -> None:
    p = params_for(entry, shapes=[(2,), (3,), (4,), (5,)])
    layouts = [
        [{"params": [p[0], p[1], p[2], p[3], p[1]]}],
        [{"params": [p[0], p[1]]}, {"params": [p[2], p[3], p[2]]}],
    ][: 1 if entry.one_group else 2]
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning about duplicate parameters
        for layout in layouts:
            mine = entry.cls(copy.deepcopy(layout), **entry.stateful)
            ref = entry.reference(copy.deepcopy(layout), **entry.stateful)
            saved.append([g["params"] for g in mine.state_dict()["param_groups"]])
            assert mine.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    assert saved == [[[0, 4, 2, 3, 4]], [[0, 1], [4, 3, 4]]][: len(layouts)]


# ---------------------------------------------------------------------------- AdamW flag


@pytest.mark.parametrize("saved", ["absent", False, None])
@pytest.mark.parametrize("flags", STRATEGIES, ids=STRATEGY_IDS)
def test_adamw_checkpoints_without_decoupled_decay_load_as_adamw(
    saved: Any, flags: dict[str, Any]
) -> None:
    """torch <= 2.5 wrote no ``decoupled_weight_decay``; torch.optim.AdamW forces it True."""
    entry = _entry(polyak.AdamW)
    config = {"lr": 0.01, "weight_decay": 0.5, **flags}
    _, ref, _, ref_params = _pair(entry, config)
    sd = copy.deepcopy(ref.state_dict())
    for group in sd["param_groups"]:
        if saved == "absent":
            del group["decoupled_weight_decay"]
        else:
            group["decoupled_weight_decay"] = saved
    mine, ref2, mine_params, ref2_params = _load_both(entry, config, sd, ref_params)
    assert mine.param_groups[0]["decoupled_weight_decay"] is True
    assert ref2.param_groups[0]["decoupled_weight_decay"] is True
    step_both(mine, ref2, mine_params, ref2_params, 5, seed=3)
    assert_same(mine_params, ref2_params)


# --------------------------------------------------------------------------- step counts


def _with_steps(value_of: Any, flags: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    entry = _entry(polyak.Adam)
    config = {"lr": 0.01, **flags}
    _, ref, _, ref_params = _pair(entry, config)
    sd = copy.deepcopy(ref.state_dict())
    for entry_state in sd["state"].values():
        entry_state["step"] = value_of(entry_state["step"])
    return entry, config, sd, ref_params


@pytest.mark.parametrize("flags", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize(
    "convert",
    [lambda s: s.to(torch.int64), lambda s: s.reshape(1), lambda s: s.double()],
    ids=["int64", "shape-1", "float64"],
)
def test_step_tensors_torch_steps_with_load_and_step_as_in_torch(
    convert: Any, flags: dict[str, Any]
) -> None:
    entry, config, sd, ref_params = _with_steps(convert, flags)
    mine, ref, mine_params, ref2_params = _load_both(entry, config, sd, ref_params)
    outcome = []
    for opt, ps in ((ref, ref2_params), (mine, mine_params)):
        try:
            for seed in (4, 5):
                _step(opt, ps, seed)
            outcome.append(None)
        except Exception as error:  # compared with torch's below
            outcome.append(type(error))
    assert outcome[0] == outcome[1]
    if outcome[0] is None:
        assert_same(mine_params, ref2_params)
        assert_same(mine.state_dict(), ref.state_dict())


@pytest.mark.parametrize("value", ["1_0", "10", "nan"])
def test_a_step_given_as_a_string_is_refused_as_torch_refuses_it(value: str) -> None:
    entry, config, sd, ref_params = _with_steps(lambda s: value, {})
    ref = entry.reference(twin(ref_params), **config)
    with pytest.raises(ValueError):
        ref.load_state_dict(copy.deepcopy(sd))
    mine = entry.cls(twin(ref_params), **config)
    before = copy.deepcopy(mine.state_dict())
    with pytest.raises(ValueError, match="step"):
        mine.load_state_dict(copy.deepcopy(sd))
    assert_same(mine.state_dict(), before)


# --------------------------------------------------------------------------- orphan ids


def _orphaned(entry: Entry) -> tuple[Any, dict[str, Any], list[torch.Tensor]]:
    opt, _, params, _ = _pair(entry, entry.stateful)
    sd = copy.deepcopy(opt.state_dict())
    # The second parameter's state is filed under an id that no group lists.
    sd["state"][7] = sd["state"].pop(1)
    return opt, sd, params


@pytest.mark.parametrize("entry", [_entry(polyak.SGD), _entry(polyak.Adam)], ids=ids)
def test_state_under_ids_no_group_lists_is_reported_and_kept(entry: Entry) -> None:
    _, sd, params = _orphaned(entry)
    fresh = entry.cls(twin(params), **entry.stateful)
    with pytest.warns(UserWarning, match=r"no parameter group lists.*\[7\].*\[1\]"):
        fresh.load_state_dict(copy.deepcopy(sd))
    assert_same(fresh.state[7], sd["state"][7])
    assert_same(fresh.state_dict()["state"][7], sd["state"][7])
    # torch.optim keeps it the same way.
    ref = entry.reference(twin(params), **entry.stateful)
    ref.load_state_dict(copy.deepcopy(sd))
    assert_same(fresh.state_dict(), ref.state_dict())


def test_state_under_an_id_a_parameter_takes_on_saving_is_reported() -> None:
    entry = _entry(polyak.Adam)
    opt, _, params, _ = _pair(entry, entry.stateful)
    saved = copy.deepcopy(opt.state_dict())
    states = saved["state"]
    sd = {
        "state": {0: states[0], 6: states[2], 2: states[1]},
        "param_groups": [{**saved["param_groups"][0], "params": [0, 5, 6]}],
    }
    fresh = entry.cls(twin(params), **entry.stateful)
    with pytest.warns(UserWarning, match=r"no parameter group lists.*\[2\].*\[5\]"):
        fresh.load_state_dict(copy.deepcopy(sd))
    with pytest.warns(UserWarning, match=r"id 2 .*index of a parameter"):
        out = fresh.state_dict()
    assert_same(out["state"][2], states[2])


def test_a_complete_checkpoint_loads_without_warnings() -> None:
    entry = _entry(polyak.Adam)
    opt, _, params, _ = _pair(entry, entry.stateful)
    fresh = entry.cls(twin(params), **entry.stateful)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(opt.state_dict())
        fresh.state_dict()


# ---------------------------------------------------------------------- add_param_group


def _bad_group_values(entry: Entry, extra: torch.Tensor) -> list[dict[str, Any]]:
    """Values the constructor refuses, among the hyperparameters it takes."""
    candidates: list[dict[str, Any]] = [
        {"momentum": -1.0},
        {"nesterov": True, "momentum": 0.0},
        {"betas": (1.5, 0.9)},
        {"eps": -1.0},
        {"weight_decay": -1.0},
    ]
    takes = inspect.signature(entry.cls).parameters

    def refused(values: dict[str, Any]) -> bool:
        try:
            entry.reference([extra], **{**entry.stateful, **values})
        except (ValueError, TypeError):
            return True
        return False

    values: list[dict[str, Any]] = [{"lr": -0.5}, {"lr": "0.1"}]
    return values + [v for v in candidates if all(key in takes for key in v) and refused(v)]


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_add_param_group_checks_values_as_the_constructor(entry: Entry) -> None:
    extra = params_for(entry, [(3,)])[0]
    for values in _bad_group_values(entry, extra):
        opt = entry.cls(params_for(entry), **entry.stateful)
        group = {"params": [extra], **values}
        kept = dict(group)
        with pytest.raises((ValueError, TypeError)) as added:
            opt.add_param_group(group)
        with pytest.raises((ValueError, TypeError)) as constructed:
            entry.cls([extra], **{**entry.stateful, **values})
        assert type(added.value) is type(constructed.value)
        assert str(added.value) == str(constructed.value)
        assert group == kept and len(opt.param_groups) == 1
