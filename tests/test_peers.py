"""Optimizers that torch.optim lacks, against the package each one reproduces (``PEERS``):
numbers, argument errors, checkpoints in both directions, loading that is all or nothing,
resuming, and every strategy against the loop. Each test runs the reference in the test, and
skips where its package cannot be imported."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import assert_same, clone_kwargs, has_tensor, make_params, step_both, twin
from registry import PEERS, Entry, ids, load, takes
from test_state_dict import _corruptions, _roundtrip, _snapshot

import polyak

SHAPES = [(3, 4), (5,), (300,), (2, 2, 2)]


@pytest.fixture(autouse=True)
def _reference_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the test's peer's ``setup`` (see :attr:`Entry.setup`)."""
    callspec = getattr(request.node, "callspec", None)
    entry = callspec.params.get("entry") if callspec is not None else None
    if isinstance(entry, Entry) and entry.setup is not None:
        entry.setup(monkeypatch)


FLAGS: list[dict[str, Any]] = [{}, {"foreach": False}, {"foreach": True}]


def _configs() -> list[Any]:
    return [
        pytest.param(entry, config, id=f"{ids(entry)}-{i}")
        for entry in PEERS
        for i, config in enumerate(entry.configs)
    ]


def _theirs(entry: Entry, config: dict[str, Any]) -> dict[str, Any]:
    """The reference's arguments for ``config``: polyak's, less the strategy flags."""
    return clone_kwargs({k: v for k, v in config.items() if k not in entry.polyak_only})


def _pair(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]:
    reference = load(str(entry.reference))
    params = make_params(SHAPES, dtype=dtype)
    ref_params = twin(params)
    return (
        entry.cls(params, **clone_kwargs(config)),
        reference(ref_params, **_theirs(entry, config)),
        params,
        ref_params,
    )


def _their_keys(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """polyak's state (or group) restricted to the keys the reference keeps."""
    return {k: v for k, v in ours.items() if k in theirs}


def _assert_same_state(opt: Any, ref: Any, atol: float) -> None:
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for i, theirs in ref_sd["state"].items():
        assert_same(_their_keys(sd["state"][i], theirs), theirs, atol)


@pytest.mark.parametrize(("entry", "config"), _configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=["default", "loop", "foreach"])
def test_matches_reference(
    entry: Entry, config: dict[str, Any], dtype: torch.dtype, flags: dict[str, Any]
) -> None:
    """Bit-identical to the reference's default path (or within the entry's ``atol``), on every
    strategy; the default step runs on the flat kernel where the entry says so."""
    if dtype not in entry.dtypes:
        pytest.skip(f"not compared in {dtype} (see the registry file)")
    if flags and not takes(entry, "foreach"):
        pytest.skip("one strategy only")
    opt, ref, params, ref_params = _pair(entry, {**config, **flags}, dtype)
    step_both(opt, ref, params, ref_params, 6)
    if entry.flat and not flags and not has_tensor(config):
        assert polyak.explain(opt).groups[0].flat, polyak.explain(opt)
    assert_same(params, ref_params, entry.atol)
    if not entry.interchange:
        return  # the state layouts differ
    _assert_same_state(opt, ref, entry.atol)
    ours, theirs = opt.state_dict()["param_groups"], ref.state_dict()["param_groups"]
    for a, b in zip(ours, theirs, strict=True):
        # The reference's strategy flags are its own defaults where it is not given polyak's.
        b = {k: v for k, v in b.items() if k not in flags and k not in entry.polyak_only}
        assert_same(_their_keys(a, b), b)


@pytest.mark.parametrize(
    ("entry", "check", "ours", "theirs"),
    [
        pytest.param(entry, check, ours, theirs, id=f"{ids(entry)}-{check.reference}-{i}")
        for entry in PEERS
        for check in entry.cross_checks
        for i, (ours, theirs) in enumerate(check.configs)
    ],
)
def test_matches_other_references(
    entry: Entry, check: Any, ours: dict[str, Any], theirs: dict[str, Any]
) -> None:
    reference = load(check.reference)
    params = make_params(SHAPES)
    ref_params = twin(params)
    opt, ref = entry.cls(params, **ours), reference(ref_params, **theirs)
    step_both(opt, ref, params, ref_params, check.steps)
    assert_same(params, ref_params, check.atol)


@pytest.mark.parametrize(
    ("entry", "case"),
    [
        pytest.param(entry, case, id=f"{ids(entry)}-{i}")
        for entry in PEERS
        for i, case in enumerate(entry.errors)
    ],
)
def test_errors_are_the_references(entry: Entry, case: Any) -> None:
    """A refused argument raises an error of the reference's type, before anything exists."""
    with pytest.raises(case.error, match=case.match) as ours:
        entry.cls(make_params(), **clone_kwargs(case.kwargs))
    reference = load(str(entry.reference))
    with pytest.raises(Exception) as theirs:
        reference(make_params(), **_theirs(entry, case.kwargs))
    assert isinstance(ours.value, type(theirs.value)), (ours.value, theirs.value)


@pytest.mark.parametrize(
    ("entry", "case"),
    [
        pytest.param(entry, case, id=f"{ids(entry)}-{i}")
        for entry in PEERS
        for i, case in enumerate(entry.refusals)
    ],
)
def test_features_not_implemented_are_refused(entry: Entry, case: Any) -> None:
    with pytest.raises(case.error, match=case.match):
        entry.cls(make_params(), **clone_kwargs(case.kwargs))


@pytest.mark.parametrize("entry", PEERS, ids=ids)
@pytest.mark.parametrize("direction", ["polyak->peer", "peer->polyak", "polyak->polyak"])
def test_mid_training_handover_continues_identically(entry: Entry, direction: str) -> None:
    """A checkpoint written mid-training by either side, read back with weights_only=True,
    continues with the same numbers as the reference that was not interrupted."""
    if direction != "polyak->polyak" and not entry.interchange:
        pytest.skip("the state layouts differ")
    for config in entry.configs:
        opt, ref, params, ref_params = _pair(entry, config)
        step_both(opt, ref, params, ref_params, 3)
        source = ref if direction.startswith("peer") else opt
        target_cls = load(str(entry.reference)) if direction.endswith("peer") else entry.cls
        target_config = _theirs(entry, config) if direction.endswith("peer") else config
        new_params = twin(params)
        target = target_cls(new_params, **clone_kwargs(target_config))
        target.load_state_dict(_roundtrip(source.state_dict()))
        step_both(target, ref, new_params, ref_params, 3, seed=9)
        assert_same(new_params, ref_params, entry.atol)


@pytest.mark.parametrize("entry", PEERS, ids=ids)
def test_resumed_training_equals_uninterrupted(entry: Entry) -> None:
    """save -> load -> step equals stepping on, bit for bit, on every strategy."""
    for flags in FLAGS if takes(entry, "foreach") else [{}]:
        config = {**entry.stateful, **flags}
        params = make_params(SHAPES)
        opt = entry.cls(params, **clone_kwargs(config))
        step_both(opt, opt, params, params, 3)
        resumed_params = twin(params)
        resumed = entry.cls(resumed_params, **clone_kwargs(config))
        resumed.load_state_dict(_roundtrip(opt.state_dict()))
        step_both(opt, resumed, params, resumed_params, 3, seed=4)
        assert_same(resumed_params, params)
        assert_same(resumed.state_dict(), opt.state_dict())


@pytest.mark.parametrize("entry", PEERS, ids=ids)
def test_corrupt_state_dicts_are_rejected_and_change_nothing(entry: Entry) -> None:
    params = make_params(SHAPES)
    opt = entry.cls(params, **clone_kwargs(entry.stateful))
    step_both(opt, opt, params, params, 3)
    good = opt.state_dict()
    before = _snapshot(opt)
    shaped = entry.cls.param_shaped_state[0] if entry.cls.param_shaped_state else None
    for name, error, bad in _corruptions(copy.deepcopy(good), shaped):
        if name == "flag a number" and any(
            bad["param_groups"][0][k] != v for k, v in opt.fixed.items()
        ):
            continue  # a setting of the optimizer, which no checkpoint changes
        with pytest.raises(error):
            opt.load_state_dict(bad)
        assert_same(_snapshot(opt), before), name
    opt.load_state_dict(good)


@pytest.mark.parametrize("entry", [e for e in PEERS if takes(e, "foreach")], ids=ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_strategy_matches_loop(entry: Entry, dtype: torch.dtype) -> None:
    for config in [c for c in entry.configs if not has_tensor(c)]:
        runs = []
        for flags in FLAGS:
            params = make_params(SHAPES, dtype=dtype)
            opt = entry.cls(params, **clone_kwargs({**config, **flags}))
            step_both(opt, opt, params, params, 4)
            runs.append(params)
        for params in runs[1:]:
            assert_same(params, runs[0])


@pytest.mark.parametrize("entry", [e for e in PEERS if not e.supports_complex], ids=ids)
def test_complex_parameters_are_refused_at_the_step(entry: Entry) -> None:
    params = [torch.randn(3, dtype=torch.complex64, requires_grad=True)]
    opt = entry.cls(params, **clone_kwargs(entry.stateful))
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="does not support complex parameters"):
        opt.step()
    assert torch.equal(params[0].detach(), before)
