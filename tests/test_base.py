"""The base class: identity of parameters, hooks, zero_grad, pickling, and independence from
``torch.optim.Optimizer``'s own methods."""

from __future__ import annotations

import collections
import copy
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import assert_same, make_params, params_for, step, step_both, twin
from registry import DENSE, Entry, ids
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import polyak
from polyak.strategies import flat


@pytest.fixture
def torch_optimizer_disabled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every method torch.optim.Optimizer defines raises when called."""

    def make_raiser(name: str) -> Any:
        def raiser(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"torch.optim.Optimizer.{name} was called")

        return raiser

    for name, value in list(vars(torch.optim.Optimizer).items()):
        if name in ("__dict__", "__weakref__", "__doc__", "__module__", "__annotations__"):
            continue
        if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
            monkeypatch.setattr(torch.optim.Optimizer, name, make_raiser(name))
    yield


def test_everything_works_with_torch_optimizer_methods_disabled(
    torch_optimizer_disabled: None,
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = polyak.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    handles = [
        opt.register_step_pre_hook(lambda *a: None),
        opt.register_step_post_hook(lambda *a: None),
        opt.register_state_dict_pre_hook(lambda o: None),
        opt.register_state_dict_post_hook(lambda o, sd: None),
        opt.register_load_state_dict_pre_hook(lambda o, sd: None),
        opt.register_load_state_dict_post_hook(lambda o: None),
    ]
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=False)
    opt.step(lambda: model(x).sum())
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert "Parameter Group 2" in repr(opt)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone._step_count == opt._step_count
    copy.deepcopy(opt)
    for handle in handles:
        handle.remove()
    assert isinstance(opt, torch.optim.Optimizer)


def test_groups_hold_the_models_own_tensors() -> None:
    model = torch.nn.Linear(3, 2)
    opt = polyak.SGD(model.parameters(), lr=0.1)
    assert opt.param_groups[0]["params"][0] is model.weight
    assert opt.param_groups[0]["params"][1] is model.bias
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert not torch.equal(model.weight, before)


def test_defaults_and_repr_match_torch() -> None:
    params = make_params()
    kwargs: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    opt = polyak.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], **kwargs)
    ref = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], **kwargs)
    assert opt.defaults == ref.defaults
    assert repr(opt) == repr(ref)


def test_step_count() -> None:
    params = make_params()
    opt = polyak.SGD(params, lr=0.1)
    assert opt._step_count == 0
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert opt._step_count == 2


def test_step_hooks_order_and_removal() -> None:
    calls: list[str] = []
    params = make_params()
    opt = polyak.SGD(params, lr=0.1)
    pre_global = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global-pre"))
    post_global = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global-post"))
    try:
        pre = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        post = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.step(lambda: calls.append("closure"))
        assert calls == ["global-pre", "pre", "closure", "post", "global-post"]
        pre.remove()
        post.remove()
    finally:
        pre_global.remove()
        post_global.remove()
    calls.clear()
    opt.step()
    assert calls == []


def test_pre_hook_can_replace_arguments() -> None:
    opt = polyak.SGD(make_params(), lr=0.1)
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": lambda: seen.append("x") or 7}))
    assert opt.step() == 7
    assert seen == ["x"]


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"fused": True}])
def test_zero_grad(flags: dict[str, Any]) -> None:
    params = make_params()
    opt = polyak.SGD(params, lr=0.1, **flags)
    for p in params:
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(params, grads, strict=True):
        assert p.grad is g and torch.equal(g, torch.zeros_like(g))
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_zero_grad_sets_every_kind_of_parameters_gradient_to_none_as_torch_does() -> None:
    """Plain tensors and Parameters are cleared in one call where the kernel is built; a
    subclass with a gradient setter of its own, and any tensor under a torch function mode,
    go through ``p.grad = None`` as torch's loop sends them."""
    from torch.overrides import TorchFunctionMode

    class Watched(torch.nn.Parameter):
        cleared = 0

        @property  # type: ignore[override]
        def grad(self) -> Any:
            return torch.Tensor.grad.__get__(self)

        @grad.setter
        def grad(self, value: Any) -> None:
            Watched.cleared += value is None
            torch.Tensor.grad.__set__(self, value)

    class Counting(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.setters = 0

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            self.setters += getattr(func, "__name__", "") == "__set__"
            return func(*args, **(kwargs or {}))

    flat.kernel(wait=True)
    plain = [torch.zeros(3, requires_grad=True), torch.nn.Parameter(torch.zeros(2, 2))]
    watched = Watched(torch.zeros(4))
    never = torch.nn.Parameter(torch.zeros(1))  # no gradient: left alone
    params = [*plain, watched, never]
    opt = polyak.Adam([{"params": params[:2]}, {"params": params[2:]}])
    for _ in range(2):
        for p in params[:3]:
            p.grad = torch.ones_like(p)
        opt.zero_grad()
        assert all(p.grad is None for p in params)
    assert Watched.cleared == 2
    for p in params[:3]:
        p.grad = torch.ones_like(p)
    with Counting() as mode:
        opt.zero_grad()
    assert all(p.grad is None for p in params)
    assert mode.setters == 3


def test_zero_grad_detaches_a_grad_with_history() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = polyak.SGD([p], lr=0.1)
    p.grad = torch.ones(3, requires_grad=True) * 2
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad


def test_pickle_and_deepcopy_keep_state_and_continue_identically() -> None:
    params = make_params()
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(twin(params), lr=0.1, momentum=0.9)
    step_both(opt, ref, params, ref.param_groups[0]["params"], 2)
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert isinstance(clone, polyak.SGD)
        assert clone._step_count == 2
        assert_same(clone.state_dict(), opt.state_dict())
        cloned_params = clone.param_groups[0]["params"]
        ref_copy = copy.deepcopy(ref)
        step_both(clone, ref_copy, cloned_params, ref_copy.param_groups[0]["params"], 2, seed=3)
        assert_same(cloned_params, ref_copy.param_groups[0]["params"])


def test_a_custom_subclass_gets_hooks_and_machinery() -> None:
    class SignDescent(polyak.Optimizer):
        def __init__(self, params: Any, lr: float = 0.1) -> None:
            super().__init__(params, {"lr": lr})

        def step(self, closure: Any = None) -> Any:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.sub_(group["lr"] * p.grad.sign())
            return None

    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = SignDescent([p])
    calls: list[str] = []
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.tensor([3.0, -2.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.9, -0.9]))
    assert calls == ["post"]
    assert opt.state_dict()["param_groups"] == [{"lr": 0.1, "params": [0]}]


def test_model_to_and_replaced_parameters() -> None:
    model = torch.nn.Linear(3, 2)
    opt = polyak.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    model.to(torch.float64)  # changes .data in place: the optimizer follows
    model.zero_grad()
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    assert model.weight.dtype == torch.float64


def test_amp_scaling_flag_only_for_fused() -> None:
    assert not getattr(polyak.SGD(make_params(), lr=0.1), "_step_supports_amp_scaling", False)
    assert polyak.SGD(make_params(), lr=0.1, fused=True)._step_supports_amp_scaling


def test_profiler_records_step_and_zero_grad_under_torchs_names() -> None:
    params = make_params()
    opt = polyak.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    with torch.profiler.profile() as prof:
        opt.step()
        opt.zero_grad()
    names = {event.name for event in prof.events()}
    assert {"Optimizer.step#SGD.step", "Optimizer.zero_grad#SGD.zero_grad"} <= names


def test_state_counts_its_changes_in_copies_and_pickles() -> None:
    """``optimizer.state`` stays torch's defaultdict of dicts; each copy counts its own changes."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = polyak.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    assert isinstance(opt.state, collections.defaultdict)
    assert type(opt.state_dict()["state"][0]) is dict
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        (q,) = other.param_groups[0]["params"]
        before, theirs = opt._state_version, other._state_version
        other.state[q]["momentum_buffer"] = torch.zeros(3)
        assert other._state_version == theirs + 1
        assert opt._state_version == before
    before = opt._state_version
    opt.state[p].pop("momentum_buffer")
    assert opt._state_version == before + 1


def test_a_step_count_kept_as_a_number_is_no_change_of_the_state() -> None:
    """SparseAdam's step is a Python int, replaced at every step; no tensor changes with it,
    so strategies that keep a group's tensors need not look at them again."""
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = polyak.SparseAdam([p], lr=0.1)
    p.grad = torch.ones(4, 3).to_sparse(1)
    opt.step()
    before = opt._state_version
    for count in (2, 3):
        p.grad = torch.ones(4, 3).to_sparse(1)
        opt.step()
        assert opt.state[p]["step"] == count
    assert opt._state_version == before
    opt.state[p]["step"] = 10
    assert opt._state_version == before + 1


@pytest.mark.parametrize("entry", DENSE, ids=ids)
def test_type_checks_by_torchs_class_pass_without_its_methods(
    entry: Entry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``isinstance(opt, torch.optim.AdamW)`` holds (accelerate maps DeepSpeed's optimizer by
    it), while nothing of torch's twin class (nor of its bases) is ever called."""

    def make_raiser(owner: str, name: str) -> Any:
        def raiser(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{owner}.{name} was called")

        return raiser

    for cls in entry.reference.__mro__:
        if cls is object:
            continue
        for name, value in list(vars(cls).items()):
            if name in ("__dict__", "__weakref__", "__doc__", "__module__", "__annotations__"):
                continue
            if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                monkeypatch.setattr(cls, name, make_raiser(cls.__name__, name))
    params = params_for(entry)
    opt = entry.cls(params, **entry.stateful)
    assert isinstance(opt, entry.reference)
    assert isinstance(opt, torch.optim.Optimizer)
    for flags in ({}, {"foreach": False}):
        for group in opt.param_groups:
            group.update(flags)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            step(opt)
    opt.load_state_dict(opt.state_dict())
    opt.zero_grad()
    pickle.loads(pickle.dumps(opt))
