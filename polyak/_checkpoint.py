"""Checkpoints: ``state_dict`` in torch's format, and a checked, all-or-nothing load."""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, TypeAlias

import torch
import torch.optim
from torch import Tensor

from polyak import _checks, _memo, _precision
from polyak._hyper import Hyper
from polyak._rehearsal import _state_template
from polyak._state import STEP_COUNT, OptimizerState, StateEntry

StateDict: TypeAlias = dict[str, Any]


#: Defaults that loading a state_dict (or unpickling) gives an optimizer that has none, as
#: torch.optim's ``__setstate__`` does; a loaded group may lack them.
_SET_BY_LOADING = {"differentiable": False}


def _cast_state(param: Tensor, key: Any, value: Any, group: Mapping[str, Any]) -> Any:
    """Copy one loaded state value, placing its tensors as torch.optim does."""
    if isinstance(value, Tensor):
        if key == "step":
            # Step counters stay on the CPU in float32/64, unless a fused or capturable step
            # reads them on the device.
            if group.get("fused") or group.get("capturable"):
                return value.to(dtype=torch.float32, device=param.device, copy=True)
            return value.clone()
        if param.is_floating_point():
            return value.to(dtype=param.dtype, device=param.device, copy=True)
        return value.to(device=param.device, copy=True)
    if isinstance(value, dict):
        return {k: _cast_state(param, k, v, group) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_state(param, None, v, group) for v in value)
    return value


def state_dict(opt: Any) -> StateDict:
    """The body of :meth:`polyak.Optimizer.state_dict`."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    # Numbered as torch.optim numbers them: each parameter by its position counted across
    # the groups, a parameter listed twice in one group by its last position there.
    index: dict[int, int] = {}
    start = 0
    groups = []
    for group in opt.param_groups:
        packed = {key: value for key, value in group.items() if key != "params"}
        index.update({id(p): i for i, p in enumerate(group["params"], start) if id(p) not in index})
        packed["params"] = [index[id(p)] for p in group["params"]]
        start += len(packed["params"])
        groups.append(packed)
    packed_state: dict[Any, Any] = {}
    others: dict[Any, Any] = {}
    for key, value in opt.state.items():
        value = dict(value) if isinstance(value, dict) else value
        if isinstance(key, Tensor):
            packed_state[index[id(key)]] = value
        else:
            others[key] = value
    taken = set(index.values())
    for key, value in others.items():
        # State under an id no group lists, kept from a checkpoint, as torch.optim keeps it.
        if key in taken:
            warnings.warn(
                f"optimizer.state holds state under id {key!r} that no parameter holds, "
                "and that id is also the index of a parameter in this state_dict; it is "
                "left out of the state_dict (it stays in optimizer.state)",
                stacklevel=2,
            )
            continue
        packed_state[key] = value
    state_dict: StateDict = {"state": packed_state, "param_groups": groups}
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_state_dict(opt: Any, state_dict: StateDict) -> None:
    """The body of :meth:`polyak.Optimizer.load_state_dict`: everything is checked before
    anything changes."""
    state_dict = dict(_checks.check_mapping("state_dict", state_dict))
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    state, groups, step_count = read_state_dict(opt, state_dict)
    opt.state = state
    opt.param_groups = groups
    opt._step_count = step_count
    _memo.forget(opt)
    # As torch.optim's loading does (through __setstate__): groups added later get them.
    for key, value in _SET_BY_LOADING.items():
        opt.defaults.setdefault(key, value)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def read_state_dict(
    opt: Any, state_dict: Mapping[str, Any]
) -> tuple[defaultdict[Any, Any], list[dict[str, Any]], int]:
    """Check ``state_dict`` against this optimizer and build what loading installs."""
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise KeyError(f"loaded state dict has no {key!r} entry")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)):
        raise TypeError(
            "Invalid param_groups: expected a list of dicts, but got "
            + torch.typename(saved_groups)
        )
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        # torch reads it with ``.items()``, and raises AttributeError.
        raise AttributeError(
            f"Invalid state: expected a dict, but got {torch.typename(saved_state)}"
        )
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for i, saved in enumerate(saved_groups):
        _checks.check_mapping(f"param_groups[{i}]", saved)
        if "params" not in saved:
            raise KeyError(f"loaded state dict's param_groups[{i}] has no 'params' entry")
    # The sizes first, as torch compares them (a string of ids has one): ValueError.
    if any(
        hasattr(s["params"], "__len__") and len(g["params"]) != len(s["params"])
        for g, s in zip(opt.param_groups, saved_groups, strict=True)
    ):
        raise ValueError(
            "loaded state dict contains a parameter group "
            "that doesn't match the size of optimizer's group"
        )
    for i, saved in enumerate(saved_groups):
        if not isinstance(saved["params"], (list, tuple)):
            raise TypeError(
                f"Invalid param_groups[{i}]['params']: expected a list of ints, but got "
                + torch.typename(saved["params"])
            )

    # Ids are whatever the writer chose: indices from state_dict(), parameter names from
    # torch.distributed.checkpoint. Any hashable value serves, as in torch.optim.
    id_map: dict[Any, Tensor] = {}
    owner: dict[Any, int] = {}
    for g, (saved, group) in enumerate(zip(saved_groups, opt.param_groups, strict=True)):
        for pid, p in zip(saved["params"], group["params"], strict=True):
            if pid in id_map and id_map[pid] is not p:
                raise ValueError(f"loaded state dict lists parameter id {pid} more than once")
            id_map[pid] = p
            owner[pid] = g

    # Copied in one go, as torch.optim copies them: a value the groups share (a tensor lr
    # that add_param_group took from the defaults) stays shared.
    saved_copies = copy.deepcopy([dict(saved) for saved in saved_groups])
    groups = [
        read_group(opt, i, saved, group)
        for i, (saved, group) in enumerate(zip(saved_copies, opt.param_groups, strict=True))
    ]

    orphans = [pid for pid in saved_state if pid not in id_map]
    if orphans:
        stateless = [pid for pid in id_map if pid not in saved_state]
        if stateless:
            warnings.warn(
                "loaded state dict has state under ids that no parameter group lists: "
                f"{orphans!r}, while the parameters with ids {stateless!r} have none; the "
                "state is kept under its ids, as torch.optim keeps it, and not used; check "
                "that the checkpoint's ids match its param_groups",
                stacklevel=3,
            )
    state = OptimizerState()
    copies: dict[int, tuple[Tensor, Any]] = {}  # the loaded 0-dim tensors' copies, by id
    for pid, value in saved_state.items():
        if pid not in id_map:
            # State of no parameter is kept as it is, as torch.optim does.
            state[pid] = value
            continue
        param = id_map[pid]
        group = groups[owner[pid]]
        entry = dict(_checks.check_mapping(f"state for parameter {pid}", value))
        if "step" in entry and "step" in opt.state_keys:
            # Before an old format's number is made a tensor (a string would be parsed).
            _checks.check_state_step(entry["step"])
        opt.upgrade_state(entry, group, param)
        if entry:
            # A parameter's state is all or nothing: what init_state makes must be there,
            # as a tensor of the shape it makes.
            for key, template in opt.init_state(_state_template(param), Hyper(group)).items():
                if entry.get(key) is None:
                    raise KeyError(f"loaded state for parameter {pid} has no {key!r} entry")
                if not isinstance(template, Tensor):
                    continue  # a number the update keeps as such (SparseAdam's step)
                if template.dim() == 0:
                    # A counter (Adam's step) may be any one-element tensor, as in torch.
                    _checks.check_state_scalar(pid, key, entry[key])
                elif not _is_codes(entry[key]):
                    _checks.check_state_tensor(pid, key, entry[key], template.shape)
        state[param] = StateEntry()
        for key, item in entry.items():
            # A counter that several parameters share (set by hand) stays shared, as in
            # torch, which loads it without a copy: one copy serves them all.
            shared = isinstance(item, Tensor) and item.dim() == 0
            if shared and id(item) in copies:
                state[param][key] = copies[id(item)][1]
                continue
            state[param][key] = read_state_value(opt, pid, param, key, item, group)
            if shared:
                copies[id(item)] = (item, state[param][key])
        for key in opt.param_shaped_state:
            value = state[param].get(key)
            if isinstance(value, Tensor) and value.dtype == torch.uint8:
                absmax = state[param].get(_precision.absmax_key(opt, key))
                if absmax is None:
                    raise ValueError(
                        f"loaded state for parameter {pid} holds {key!r} as codes without "
                        f"their {_precision.absmax_key(opt, key)!r}"
                    )
                why = _precision.check_codes(value, absmax, param)
                if why is not None:
                    raise ValueError(f"Invalid {key} for parameter {pid}: {why}")
        # Stored as this optimizer stores it, whatever the checkpoint's format.
        _precision.convert_entry(state[param], group, param, opt)

    if STEP_COUNT in state_dict:
        step_count = _checks.check_step_count(state_dict[STEP_COUNT])
    else:
        # A torch.optim state_dict has no step count; per-parameter ``step`` state, where
        # the algorithm keeps one, tells how many steps were taken.
        steps = [
            int(entry["step"])
            for key, entry in state.items()
            if isinstance(key, Tensor) and isinstance(entry.get("step"), (Tensor, int))
        ]
        step_count = max(steps, default=0)
    return state, groups, step_count


def read_group(
    opt: Any, i: int, saved: Mapping[str, Any], group: Mapping[str, Any]
) -> dict[str, Any]:
    new_group = dict(saved)
    new_group.update(opt.fixed)
    # Only the optimizer's own hyperparameters are required: keys that others add to a
    # group (a scheduler's ``initial_lr``) are replaced by the saved group, as in torch.
    for key in opt.defaults:
        if key in new_group:
            continue
        if key in opt.backfill:
            new_group[key] = opt.backfill[key]
        elif key not in _SET_BY_LOADING and key not in _precision.KEYWORDS:
            raise KeyError(f"loaded state dict's param_groups[{i}] has no {key!r} entry")
    for key, value in new_group.items():
        if key not in group or key in ("params", "param_names"):
            continue
        if key in opt.optional_strings and all(
            v is None or isinstance(v, str) for v in (group[key], value)
        ):
            continue
        _checks.check_same_kind(f"param_groups[{i}][{key!r}]", group[key], value)
    # How parameters and state are stored is the optimizer's, not the checkpoint's: loaded
    # state is converted.
    for key in _precision.KEYWORDS:
        if key in group:
            new_group[key] = group[key]
        else:
            new_group.pop(key, None)
    opt.check_hyperparameters(new_group)
    opt.check_loaded_group(new_group)
    new_group["params"] = group["params"]
    if "param_names" in group and "param_names" not in new_group:
        new_group["param_names"] = group["param_names"]
    return new_group


def _is_codes(value: Any) -> bool:
    """Whether ``value`` is a quantized state's codes (checked with its block maxima)."""
    return isinstance(value, Tensor) and value.dtype == torch.uint8


def read_state_value(
    opt: Any, pid: int, param: Tensor, key: Any, value: Any, group: Mapping[str, Any]
) -> Any:
    if key == _precision.COMPENSATION and value is not None:
        _checks.check_state_tensor(pid, key, value, param.shape)
    if key in {_precision.absmax_key(opt, k) for k in opt.param_shaped_state}:
        # A quantized state's block maxima, checked with its codes once both are read.
        if not isinstance(value, Tensor):
            raise TypeError(f"Invalid {key} for parameter {pid}: not a tensor")
        return value.to(device=param.device, copy=True)
    if key in opt.param_shaped_state and _is_codes(value):
        return value.to(device=param.device, copy=True)  # quantized codes, kept as codes
    if key in opt.param_shaped_state and value is not None:
        _checks.check_state_tensor(pid, key, value, param.shape)
        if value.is_complex() != param.is_complex():
            raise TypeError(
                f"Invalid {key} for parameter {pid}: dtype {value.dtype} does not fit a "
                f"parameter of dtype {param.dtype}"
            )
    return _cast_state(param, key, value, group)
