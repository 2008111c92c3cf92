"""Steps after hand edits: torch.optim's outcome, and a failing step that changes nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_same, heavy_imports_of, make_params, set_grads, twin

import polyak

STRATEGIES = [{}, {"foreach": False}, {"foreach": True}]
STRATEGY_IDS = ["default", "loop", "foreach"]

Edit = Callable[[torch.optim.Optimizer, list[torch.Tensor]], None]


def _set_state(key: str, make: Callable[[torch.Tensor], Any], which: int = -1) -> Edit:
    def edit(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        opt.state[params[which]][key] = make(opt.state[params[which]][key])

    return edit


def _del_state(key: str, which: int) -> Edit:
    def edit(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        del opt.state[params[which]][key]

    return edit


def _set_group(key: str, value: Callable[[], Any]) -> Edit:
    def edit(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        opt.param_groups[0][key] = value()

    return edit


ADAM = (polyak.Adam, torch.optim.Adam, {"lr": 0.01})
SGD = (polyak.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})

#: (name, optimizer pair and config, edit made by hand on both after two steps)
CASES: list[tuple[str, Any, Edit]] = [
    ("amsgrad switched on", ADAM, _set_group("amsgrad", lambda: True)),
    ("exp_avg removed", ADAM, _del_state("exp_avg", -1)),
    ("step removed", ADAM, _del_state("step", 1)),
    ("exp_avg of another shape", ADAM, _set_state("exp_avg", lambda t: torch.zeros(7))),
    ("exp_avg_sq of another dtype", ADAM, _set_state("exp_avg_sq", lambda t: t.double())),
    (
        "tensor betas",
        ADAM,
        _set_group("betas", lambda: (torch.tensor(0.9), torch.tensor(0.99))),
    ),
    ("int64 step", ADAM, _set_state("step", lambda t: t.to(torch.int64))),
    ("buffer of another shape", SGD, _set_state("momentum_buffer", lambda t: torch.zeros(7))),
    ("buffer of another dtype", SGD, _set_state("momentum_buffer", lambda t: t.double())),
    ("nesterov with a float64 buffer", SGD, _set_state("momentum_buffer", lambda t: t.double())),
]


def _snapshot(opt: Any, params: list[torch.Tensor]) -> Any:
    return copy.deepcopy(
        {
            "state": {i: dict(opt.state[p]) for i, p in enumerate(params) if opt.state.get(p)},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "params": [p.detach().clone() for p in params],
            "grads": [p.grad.clone() for p in params],
        }
    )


@pytest.mark.parametrize("shapes", [None, [(3, 4)] * 12], ids=["mixed", "twelve-alike"])
@pytest.mark.parametrize("flags", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize(("name", "pair", "edit"), CASES, ids=[c[0] for c in CASES])
def test_a_step_after_a_hand_edit_does_what_torch_does_or_fails_before_writing(
    name: str, pair: Any, edit: Edit, flags: dict[str, Any], shapes: Any
) -> None:
    """Among parameters alike, the one edited by hand is the one a step fails on before it
    writes anything (a step rehearses one parameter of each kind)."""
    cls, ref_cls, config = pair
    if name.startswith("nesterov"):
        config = {**config, "nesterov": True}
    params = make_params(shapes) if shapes else make_params()
    ref_params = twin(params)
    opt = cls(params, **config, **flags)
    ref = ref_cls(ref_params, **config, **flags)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        set_grads(params, ref_params, gen)
        opt.step()
        ref.step()
    edit(opt, params)
    edit(ref, ref_params)
    for _ in range(2):
        set_grads(params, ref_params, gen)
        before = _snapshot(opt, params)
        try:
            ref.step()
        except Exception as expected:
            with pytest.raises(type(expected)) as caught:
                opt.step()
            if not isinstance(expected, RuntimeError):
                assert str(caught.value) == str(expected)
            assert_same(_snapshot(opt, params), before)
            return
        opt.step()
        assert_same(params, ref_params)
        assert_same(opt.state_dict()["state"], ref.state_dict()["state"])


@pytest.mark.parametrize("flags", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.parametrize("shape", [(1000, 1100), (1, 1000), (1100, 1)], ids=str)
def test_a_large_parameters_state_of_another_shape_fails_before_writing(
    flags: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """A parameter of more than a million elements is rehearsed on small stand-ins whose sizes
    keep the order and equalities of its tensors' (a transposed or a broadcastable moment
    still fails); the step raises torch's error and writes nothing."""
    params = [torch.randn(1100, 1000), torch.randn(3)]
    ref_params = twin(params)
    opt = polyak.Adam(params, lr=0.01, **flags)
    ref = torch.optim.Adam(ref_params, lr=0.01, **flags)
    gen = torch.Generator().manual_seed(1)
    set_grads(params, ref_params, gen)
    opt.step()
    ref.step()
    for o, ps in ((opt, params), (ref, ref_params)):
        o.state[ps[0]]["exp_avg"] = torch.zeros(shape)
    set_grads(params, ref_params, gen)
    with pytest.raises(RuntimeError):
        ref.step()
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError):
        opt.step()
    assert_same(_snapshot(opt, params), before)


_LARGE_FIRST_STEP_SCRIPT = """
import sys
import torch
from registry import REGISTRY

for entry in REGISTRY:
    if entry.sparse_grads:
        continue
    params = [torch.randn(1100, 1000, requires_grad=True), torch.randn(5, 4, requires_grad=True)]
    opt = entry.cls(params, **entry.stateful)

    def closure():
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure) if entry.step_closure else (closure(), opt.step())
print(sorted(m for m in ("sympy", "torch.fx.experimental.symbolic_shapes") if m in sys.modules))
"""


def test_a_large_parameters_first_step_imports_no_symbolic_shapes() -> None:
    # Rehearsing a step on meta tensors ran torch's Python meta kernels, which import its
    # reference operations, symbolic shapes and sympy: over a second in a process's first step
    # of a model with a parameter of more than a million elements.
    assert heavy_imports_of(_LARGE_FIRST_STEP_SCRIPT) == "[]"


@pytest.mark.parametrize("flags", STRATEGIES, ids=STRATEGY_IDS)
def test_a_failing_first_step_creates_no_state(flags: dict[str, Any]) -> None:
    params = make_params()
    opt = polyak.Adam(params, lr=0.01, **flags)
    opt.param_groups[0]["betas"] = (torch.tensor(0.9), torch.tensor(0.99))
    for p in params:
        p.grad = torch.ones_like(p)
    if flags.get("foreach"):
        with pytest.raises(ValueError, match="beta1 as a Tensor is not supported"):
            opt.step()
        assert not opt.state
    else:
        opt.step()
        assert len(opt.state) == len(params)


@pytest.mark.parametrize("cls", [polyak.Adam, polyak.AdamW])
def test_a_differentiable_step_missing_state_fails_before_writing(cls: Any) -> None:
    results = []
    for opt_cls in (getattr(torch.optim, cls.__name__), cls):
        p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True).clone()
        opt = opt_cls([p], lr=0.1, differentiable=True)
        p.grad = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
        opt.step()
        opt.param_groups[0]["amsgrad"] = True
        before = copy.deepcopy((p.detach(), dict(opt.state[p])))
        with pytest.raises(KeyError) as caught:
            opt.step()
        results.append(str(caught.value))
        assert_same((p.detach(), dict(opt.state[p])), before)
    assert results[0] == results[1] == "'max_exp_avg_sq'"


def test_a_sparse_step_missing_state_fails_before_writing() -> None:
    """Steps of sparse gradients are not rehearsed: a state entry removed by hand after some
    steps is missed at the next, before anything is written, as torch misses it."""
    results = []
    for opt_cls in (torch.optim.SparseAdam, polyak.SparseAdam):
        p = torch.nn.Parameter(torch.ones(4, 3))
        opt = opt_cls([p], lr=0.1)
        grad = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0] * 3])
        for _ in range(3):
            p.grad = grad.to_sparse(1)
            opt.step()
        del opt.state[p]["exp_avg_sq"]
        p.grad = grad.to_sparse(1)
        before = copy.deepcopy((p.detach(), dict(opt.state[p])))
        with pytest.raises(KeyError) as caught:
            opt.step()
        results.append(str(caught.value))
        if isinstance(opt, polyak.Optimizer):
            assert_same((p.detach(), dict(opt.state[p])), before)
    assert results[0] == results[1] == "'exp_avg_sq'"


# ------------------------------------------------------------------------- bits of NaN


def _nan_bits(flags: dict[str, Any], where: str) -> list[list[int]]:
    all_ones = torch.tensor([-1], dtype=torch.int32).view(torch.float32)[0]
    out = []
    for cls in (torch.optim.Adam, polyak.Adam):
        p = torch.nn.Parameter(torch.ones(4))
        opt = cls([p], amsgrad=True, **flags)
        for _ in range(2):
            p.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
            opt.step()
        grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
        if where == "grad":
            grad[0] = all_ones
        else:
            opt.state[p][where][0] = all_ones
        p.grad = grad
        opt.step()
        out.append(
            [
                t.detach().view(torch.int32).tolist()
                for t in (p, opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg"])
            ]
        )
    return out


@pytest.mark.parametrize(
    "flags",
    [{}, {"foreach": False}, {"foreach": True}],
    ids=STRATEGY_IDS,
)
@pytest.mark.parametrize("where", ["grad", "exp_avg_sq", "max_exp_avg_sq"])
def test_amsgrad_writes_torchs_nan_bits(flags: dict[str, Any], where: str) -> None:
    theirs, mine = _nan_bits(flags, where)
    assert mine == theirs


# -------------------------------------------------------------- amsgrad, differentiable


@pytest.mark.parametrize(
    "grads",
    [
        [[0.3, 0.1, -0.2], [3.0, 1.0, 2.0], [0.01, 0.01, 0.01], [0.02, -0.01, 0.5]],
        [[1.0, 1.0, 1.0], [0.1, 0.1, 0.1]],
    ],
)
@pytest.mark.parametrize("cls", [polyak.Adam, polyak.AdamW])
def test_amsgrad_differentiable_steps_as_torch(cls: Any, grads: list[list[float]]) -> None:
    results = []
    for opt_cls in (cls, getattr(torch.optim, cls.__name__)):
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        leaf = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
        p = leaf.clone()
        # (Adam's coupled decay makes torch's own backward fail: a saved moment is changed in
        # place by the next step.)
        decay = 0.1 if cls is polyak.AdamW else 0.0
        opt = opt_cls([p], lr=lr, amsgrad=True, differentiable=True, weight_decay=decay)
        for g in grads:
            p.grad = torch.tensor(g, dtype=torch.float64, requires_grad=True)
            opt.step()
        loss = (p**2).sum()
        results.append([*torch.autograd.grad(loss, [lr, leaf]), p.detach()])
    assert_same(results[0], results[1])
