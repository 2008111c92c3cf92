"""Every bad input raises what torch.optim raises, with the same type and message."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_params, params_for, step, twin
from registry import REGISTRY, Entry, ErrorCase, ids, takes
from torch.optim.optimizer import required as torch_required

import polyak


def _raised(fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def assert_same_error(mine: Callable[[], Any], theirs: Callable[[], Any]) -> BaseException:
    """Both calls raise, with the same exception type and message."""
    a, b = _raised(mine), _raised(theirs)
    assert type(a) is type(b), (a, b)
    assert str(a) == str(b)
    return a


def _error_cases(field: str = "errors") -> list[Any]:
    """Every (entry, error case) of the registry field ``field``."""
    return [
        pytest.param(entry, case, id=f"{ids(entry)}-{i}")
        for entry in REGISTRY
        for i, case in enumerate(getattr(entry, field))
    ]


@pytest.mark.parametrize(("entry", "case"), _error_cases())
def test_constructor_errors_match_torch(entry: Entry, case: ErrorCase) -> None:
    err = assert_same_error(
        lambda: entry.cls(make_params(), **case.kwargs),
        lambda: entry.reference(make_params(), **case.kwargs),
    )
    assert isinstance(err, case.error)
    assert re.search(case.match, str(err))


PARAM_ERRORS: list[Any] = [
    pytest.param(lambda: torch.zeros(3, requires_grad=True), id="lone-tensor"),
    pytest.param(lambda: 3, id="not-iterable"),
    pytest.param(lambda: [], id="empty"),
    pytest.param(lambda: [torch.zeros(2, requires_grad=True) * 2], id="non-leaf"),
    pytest.param(lambda: [1.0], id="not-a-tensor"),
    pytest.param(lambda: {torch.zeros(2, requires_grad=True)}, id="set"),
    pytest.param(
        lambda: [("a", torch.zeros(2, requires_grad=True)), torch.zeros(2, requires_grad=True)],
        id="names-partly-missing",
    ),
    pytest.param(
        lambda: [{"params": torch.zeros(2, requires_grad=True), "lr": 0.1}, 3],
        id="group-then-not-a-dict",
    ),
]


@pytest.mark.parametrize("make", PARAM_ERRORS)
@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_params_errors_match_torch(entry: Entry, make: Callable[[], Any]) -> None:
    def build(cls: type[torch.optim.Optimizer]) -> Callable[[], Any]:
        def go() -> Any:
            params = make()
            if isinstance(params, set):
                return cls([{"params": params}], lr=0.1)
            return cls(params, lr=0.1)

        return go

    assert_same_error(build(entry.cls), build(entry.reference))


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_parameter_in_two_groups(entry: Entry) -> None:
    shared = torch.zeros(2, requires_grad=True)
    assert_same_error(
        lambda: entry.cls([{"params": [shared]}, {"params": [shared]}], lr=0.1),
        lambda: entry.reference([{"params": [shared]}, {"params": [shared]}], lr=0.1),
    )


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_named_and_unnamed_groups_do_not_mix(entry: Entry) -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    assert_same_error(
        lambda: entry.cls([{"params": [("a", a)]}, {"params": [b]}], lr=0.1),
        lambda: entry.reference([{"params": [("a", a)]}, {"params": [b]}], lr=0.1),
    )


def test_required_hyperparameter() -> None:
    class Mine(polyak.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": polyak.required})

    class Theirs(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": torch_required})

    assert_same_error(
        lambda: Mine([{"params": make_params()}]), lambda: Theirs([{"params": make_params()}])
    )
    assert Mine([{"params": make_params(), "lr": 0.5}]).param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_duplicate_parameter_in_a_group_warns(entry: Entry) -> None:
    p = params_for(entry, [(2,)])[0]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        entry.cls([p, p], lr=0.1)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_add_param_group_errors_change_nothing(entry: Entry) -> None:
    params = make_params()
    opt = entry.cls(params[:1], lr=0.1)
    theirs = entry.reference(params[:1], lr=0.1)
    before = repr(opt)
    bad_groups: list[Callable[[], Any]] = [
        lambda: {"params": [params[1], params[0]]},  # params[0] is already in a group
        lambda: {"params": [params[1], "x"]},
        lambda: {"params": {params[1]}},
        lambda: {"params": [("b", params[1])]},  # names where the first group has none
        lambda: [params[1]],
    ]
    for make in bad_groups:
        mine_group, their_group = make(), make()
        assert_same_error(
            lambda g=mine_group: opt.add_param_group(g),  # type: ignore[misc]
            lambda g=their_group: theirs.add_param_group(g),  # type: ignore[misc]
        )
        if isinstance(mine_group, dict):
            assert set(mine_group) == {"params"}, "the caller's dict was changed"
        assert repr(opt) == before and len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:], "lr": 0.3})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.3]
    assert all(opt.param_groups[1][k] == v for k, v in opt.defaults.items() if k != "lr")


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.fused], ids=ids)
def test_fused_rejects_integer_params_at_step(entry: Entry) -> None:
    def build(cls: type[torch.optim.Optimizer]) -> Callable[[], Any]:
        def go() -> None:
            p = torch.zeros(3, dtype=torch.int64)
            opt = cls([p], lr=0.1, fused=True)
            p.grad = torch.ones_like(p)
            opt.step()

        return go

    assert_same_error(build(entry.cls), build(entry.reference))


@pytest.mark.parametrize("entry", [e for e in REGISTRY if takes(e, "differentiable")], ids=ids)
def test_differentiable_accepts_non_leaf(entry: Entry) -> None:
    p = torch.zeros(2, requires_grad=True) * 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry.cls([p], lr=0.1, differentiable=True)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_bad_step_pre_hook_result(entry: Entry) -> None:
    for cls in (entry.cls, entry.reference):
        opt = cls(params_for(entry), lr=0.1)
        opt.register_step_pre_hook(lambda *_: "nonsense")
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            opt.step()


def test_adagrad_refuses_weight_decay_with_sparse_gradients_and_changes_nothing() -> None:
    def build(cls: type[torch.optim.Optimizer]) -> tuple[Any, torch.Tensor]:
        emb = torch.nn.Embedding(5, 2, sparse=True)
        opt = cls(emb.parameters(), lr=0.1, weight_decay=0.1)
        emb(torch.tensor([1, 3])).sum().backward()
        return opt, emb.weight

    (opt, weight), (ref, _) = build(polyak.Adagrad), build(torch.optim.Adagrad)
    before = weight.detach().clone()
    assert_same_error(opt.step, ref.step)
    assert torch.equal(weight, before)
    assert opt.state_dict()["state"][0]["step"] == 0


@pytest.mark.parametrize(
    "entry",
    [e for e in REGISTRY if "capturable" in inspect.signature(e.cls).parameters],
    ids=ids,
)
@pytest.mark.parametrize("foreach", [None, True], ids=["default", "foreach"])
def test_capturable_on_the_cpu_fails_at_the_step_and_changes_nothing(
    entry: Entry, foreach: bool | None
) -> None:
    def build(cls: type[torch.optim.Optimizer]) -> tuple[Any, list[torch.Tensor]]:
        params = make_params()
        opt = cls(params, **{**entry.stateful, "capturable": True, "foreach": foreach})
        for p in params:
            p.grad = torch.ones_like(p)
        return opt, params

    (opt, params), (ref, _) = build(entry.cls), build(entry.reference)
    before = [p.detach().clone() for p in params]
    assert_same_error(opt.step, ref.step)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def _refused_at_step(
    entry: Entry, kwargs: dict[str, Any], dtype: torch.dtype = torch.float32
) -> BaseException:
    """The first step with these arguments raises as torch's does, and changes nothing."""

    def build(cls: type[torch.optim.Optimizer]) -> tuple[Any, list[torch.Tensor]]:
        params = params_for(entry, dtype=dtype)
        opt = cls(params, **kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        return opt, params

    (opt, params), (ref, _) = build(entry.cls), build(entry.reference)
    before = [p.detach().clone() for p in params]
    err = assert_same_error(lambda: step(opt), lambda: step(ref))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert not opt.state
    return err


@pytest.mark.parametrize(("entry", "case"), _error_cases("step_errors"))
def test_step_errors_match_torch_and_change_nothing(entry: Entry, case: ErrorCase) -> None:
    """Arguments torch takes and refuses at the step: the same error, before any change."""
    err = _refused_at_step(entry, case.kwargs)
    assert isinstance(err, case.error)
    assert re.search(case.match, str(err))


@pytest.mark.parametrize(
    "entry", [e for e in REGISTRY if not e.supports_complex and not e.sparse_grads], ids=ids
)
def test_complex_parameters_are_refused_at_the_step_as_in_torch(entry: Entry) -> None:
    err = _refused_at_step(entry, entry.stateful, torch.complex64)
    assert "does not support complex parameters" in str(err)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.matrices_only], ids=ids)
def test_parameters_that_are_not_matrices_are_refused_as_torch_refuses_them(
    entry: Entry,
) -> None:
    for shapes in ([(5,)], [(3, 4), (2, 2, 2)], [()]):
        err = assert_same_error(
            lambda shapes=shapes: entry.cls(make_params(shapes), **entry.stateful),  # type: ignore[misc]
            lambda shapes=shapes: entry.reference(make_params(shapes), **entry.stateful),  # type: ignore[misc]
        )
        assert "only supports 2D parameters" in str(err)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.one_group], ids=ids)
def test_one_group_only_as_in_torch(entry: Entry) -> None:
    params = params_for(entry)
    assert_same_error(
        lambda: entry.cls([{"params": params[:1]}, {"params": params[1:]}], lr=0.1),
        lambda: entry.reference([{"params": params[:1]}, {"params": params[1:]}], lr=0.1),
    )
    ours, theirs = entry.cls(params[:1], lr=0.1), entry.reference(twin(params[:1]), lr=0.1)
    ours.add_param_group({"params": params[1:]})
    theirs.add_param_group({"params": twin(params[1:])})
    assert_same_error(lambda: step(ours), lambda: step(theirs))
