"""An update rule run by a strategy, with float16 and bfloat16 promoted where the step is fused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import torch
import torch.optim
from torch import Tensor

from polyak._hyper import Hyper
from polyak.strategies import StateLists, Update

_LOW_PRECISION = (torch.float16, torch.bfloat16)


#: ``run(update, params, grads, state, hp)``: a strategy's way to run an update rule.
Runner: TypeAlias = Callable[[Update, list[Tensor], list[Tensor], StateLists, Any], None]


def _call(
    update: Update, params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Any
) -> None:
    update(params, grads, state, hp)


def _run(
    run: Runner,
    update: Update,
    params: list[Tensor],
    grads: list[Tensor],
    state: StateLists,
    hp: Hyper,
) -> None:
    if vars(hp).get("fused") and any(p.dtype in _LOW_PRECISION for p in params):
        _run_promoted(run, update, params, grads, state, hp)
    else:
        run(update, params, grads, state, hp)


def _run_promoted(
    run: Runner,
    update: Update,
    params: list[Tensor],
    grads: list[Tensor],
    state: StateLists,
    hp: Hyper,
) -> None:
    """Run ``update`` with half-precision tensors computed in float32, as fused kernels do.

    Parameters and state are stored back in their own dtype, rounded once per step.
    """

    def up(t: Tensor) -> Tensor:
        return t.float() if t.dtype in _LOW_PRECISION else t

    wide_params = [up(p.detach()) for p in params]
    wide_state: StateLists = {
        key: [None if t is None else up(t) for t in values] for key, values in state.items()
    }
    run(update, wide_params, [up(g) for g in grads], wide_state, hp)
    with torch.no_grad():
        for p, wide in zip(params, wide_params, strict=True):
            if wide.dtype != p.dtype:
                p.copy_(wide)
        for key, values in wide_state.items():
            for i, (old, new) in enumerate(zip(state[key], values, strict=True)):
                if new is None or new is old:
                    continue
                if old is not None:
                    old.copy_(new)
                elif new.is_floating_point() and params[i].dtype in _LOW_PRECISION:
                    # New state of a half-precision parameter is stored in its dtype.
                    state[key][i] = new.to(params[i].dtype)
                else:
                    state[key][i] = new
