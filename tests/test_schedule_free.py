"""Schedule-Free's train and eval modes against schedulefree's: the parameters switched between
y and x bit for bit, steps refused in eval mode, and the warning of a checkpoint taken in train
mode; and, with StableAdamW, whose step also keeps a count in its groups, the refusal of
torch.distributed's functional optimizers. The numbers of the steps are compared by the generic
peer tests (``test_peers.py``)."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch
from conftest import assert_same, make_params, set_grads, twin

import polyak

SHAPES = [(3, 4), (5,), (2, 2, 2)]
CLASSES = [polyak.AdamWScheduleFree, polyak.SGDScheduleFree, polyak.RAdamScheduleFree]
CONFIGS: dict[str, dict[str, Any]] = {
    "AdamWScheduleFree": {"lr": 0.01, "warmup_steps": 2},
    "SGDScheduleFree": {"lr": 0.1, "momentum": 0.8},
    "RAdamScheduleFree": {"lr": 0.01, "silent_sgd_phase": False},
}


def _reference(cls: type) -> Any:
    schedulefree = pytest.importorskip("schedulefree")
    return getattr(schedulefree, cls.__name__)


def _steps(opts: list[Any], params: list[list[torch.Tensor]], n: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        set_grads(params[0], params[1], gen)
        for opt in opts:
            opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_train_and_eval_switch_as_schedulefree(cls: type) -> None:
    """Both start in eval mode; each switch moves the parameters as schedulefree's, and a
    switch to the mode a group is in changes nothing."""
    params = make_params(SHAPES)
    ref_params = twin(params)
    config = CONFIGS[cls.__name__]
    opt, ref = cls(params, **config), _reference(cls)(ref_params, **config)
    assert opt.param_groups[0]["train_mode"] is False
    for o in (opt, ref):
        o.train()
        o.train()
    _steps([opt, ref], [params, ref_params], 3)
    for switch in ("eval", "eval", "train", "eval"):
        getattr(opt, switch)()
        getattr(ref, switch)()
        assert_same(params, ref_params)
        assert opt.param_groups[0]["train_mode"] is ref.param_groups[0]["train_mode"]
    # A step in eval mode raises schedulefree's message and changes nothing.
    before = opt.state_dict()
    with pytest.raises(RuntimeError, match=r"^Optimizer was not in train mode when step is"):
        opt.step()
    with pytest.raises(Exception, match=r"^Optimizer was not in train mode when step is"):
        ref.step()
    assert_same(opt.state_dict(), before)
    # Back in train mode, the steps go on together.
    opt.train()
    ref.train()
    _steps([opt, ref], [params, ref_params], 2, seed=2)
    assert_same(params, ref_params)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_checkpoint_in_train_mode_warns(cls: type) -> None:
    params = make_params(SHAPES)
    opt = cls(params, **CONFIGS[cls.__name__])
    opt.train()
    _steps([opt], [params, twin(params)], 2)
    with pytest.warns(
        polyak.AdamWScheduleFree.checkpoint_warning, match=r"state_dict\(\) in train mode"
    ):
        saved = opt.state_dict()
    assert saved["param_groups"][0]["train_mode"] is True
    assert saved["param_groups"][0]["k"] == 2
    opt.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.state_dict()["param_groups"][0]["train_mode"] is False


def test_failed_step_keeps_the_schedule() -> None:
    """A step refused by a check leaves the group's schedule as it was."""
    params = make_params(SHAPES)
    opt = polyak.AdamWScheduleFree(params, lr=0.01)
    opt.train()
    _steps([opt], [params, twin(params)], 2)
    group = dict(opt.param_groups[0])
    params[0].grad = torch.ones_like(params[0]).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == {
        k: v for k, v in group.items() if k != "params"
    }


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_narrower_state_and_keywords(cls: type) -> None:
    """The storage keywords of every elementwise optimizer, and z kept in bfloat16, which the
    switches read in the parameter's dtype."""
    names = inspect.signature(cls).parameters
    assert {"state_dtype", "kahan_sum", "bf16_stochastic_round"} <= set(names)
    params = make_params(SHAPES)
    opt = cls(params, **CONFIGS[cls.__name__], state_dtype=torch.bfloat16)
    opt.train()
    _steps([opt], [params, twin(params)], 2)
    assert opt.state[params[0]]["z"].dtype == torch.bfloat16
    opt.eval()
    opt.train()
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in params)


@pytest.mark.parametrize("cls", [*CLASSES, polyak.StableAdamW], ids=lambda c: c.__name__)
def test_functional_optimizers_are_refused(cls: type) -> None:
    """torch.distributed's functional optimizers run the update rule alone, without the
    group's schedule or count that ``step()`` advances: they are refused, and nothing moves."""
    params = make_params(SHAPES)
    before = twin(params)
    optimizer = polyak.functional.functional(cls)(params, lr=0.01)
    with pytest.raises(RuntimeError, match=r"steps through its step\(\) only"):
        optimizer.step([torch.ones_like(p) for p in params])
    assert_same([p.detach() for p in params], [p.detach() for p in before])
