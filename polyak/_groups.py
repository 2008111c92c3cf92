"""A parameter group checked whole, then added: on an error neither the optimizer nor the
caller's dict is changed."""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from polyak import _checks, _precision
from polyak._hyper import required


def add_param_group(opt: Any, param_group: dict[str, Any]) -> None:
    """Check ``param_group`` against ``opt``'s defaults and groups, fill in its missing
    hyperparameters from the defaults, and append it to ``opt.param_groups``; raise as torch
    does otherwise, before anything changes."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    params = param_group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but "
            "the ordering of tensors in sets will change between runs. Please use a list "
            "instead."
        )
    else:
        params = list(params)
    tensors, names = _checks.check_group_params(
        params, bool(opt.defaults.get("differentiable", False))
    )
    filled: dict[str, Any] = {}
    for name, default in opt.defaults.items():
        if default is required and name not in param_group:
            raise ValueError(
                f"parameter group didn't specify a value of required optimization parameter {name}"
            )
        if name not in param_group:
            filled[name] = default
    if len(tensors) != len(set(tensors)):
        warnings.warn(
            "optimizer contains a parameter group with duplicate parameters; "
            "in future, this will cause an error; "
            "see github.com/pytorch/pytorch/issues/40967 for more information",
            stacklevel=3,
        )
    seen: set[Tensor] = set()
    for group in opt.param_groups:
        seen.update(group["params"])
        if (names is not None) != ("param_names" in group):
            which = "with names" if names is not None else "without names"
            raise ValueError(
                "all optimizer param groups should be with/without names. "
                f"cannot add param group {which} to the optimizer"
            )
    if not seen.isdisjoint(tensors):
        raise ValueError("some parameters appear in more than one parameter group")
    # The constructor's checks of its numbers, on the group as it will be.
    opt.check_hyperparameters({**param_group, **filled})
    if getattr(type(opt).__init__, "takes_state_dtype", False):
        _precision.check_group(
            {**param_group, **filled}, opt.param_shaped_state, type(opt).__name__
        )

    # Checked: now change the caller's dict in place, as torch does, and keep it.
    param_group["params"] = tensors
    if names is not None:
        param_group["param_names"] = names
    param_group.update(filled)
    opt.param_groups.append(param_group)
