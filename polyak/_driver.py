"""One group's step off the flat path: gather the state, rehearse, run the strategy, store."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.optim
from torch import Tensor

from polyak import _checks, _explain, _memo, _ops, _precision
from polyak._hooks import _recorded
from polyak._hyper import _NUMBERS, _PLAIN_TENSORS, Hyper
from polyak._rehearsal import _hyper_layout, _immutable, rehearse
from polyak._runner import _run
from polyak._state import STEP_COUNT, StateEntry
from polyak.strategies import StateLists, Strategy, flat


def step(opt: Any, closure: Callable[[], Any] | None) -> Any:
    """One step over every group: the flat kernel for the groups it takes, the chosen
    strategy for the others."""
    if torch.compiler.is_compiling():
        return opt._traced_step(closure)
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    # GradScaler hands optimizers that unscale in their step (``fused=True``, as in torch)
    # the scale and the inf flag as attributes; a step with infs is skipped whole.
    grad_scale: Tensor | None = opt.__dict__.get("grad_scale")
    found_inf: Tensor | None = opt.__dict__.get("found_inf")
    if found_inf is not None and bool(found_inf.item()):
        return loss
    # Groups are stepped in order (state may be shared across groups); those the flat
    # kernel steps need neither autograd's mode nor the machinery below.
    differentiable = bool(opt.defaults.get("differentiable", False))
    # Under a dispatch mode (MemTracker, FlopCounterMode, DebugMode) the step runs torch's
    # operations, which the mode sees, and not the kernel, which it does not.
    runs_flat = opt.elementwise and not torch._C._len_torch_dispatch_stack()
    groups = opt.param_groups
    # A step that fails changes nothing: every group after the first is checked before the
    # first is stepped (the first checks itself as it steps).
    checked = check_groups(opt, groups[1:], runs_flat, grad_scale) if len(groups) > 1 else {}
    for group in groups:
        rest: list[Tensor] | None = None  # the parameters left to step (None: all)
        if runs_flat and flat.eligible(group):
            ran = checked.get(id(group))
            if ran is None or ran is True:
                ran = flat.step(opt, group, grad_scale, prechecked=ran is True)
            if ran is False and group.get("fused") and flat.awaits_state(opt, group):
                # torch's fused kernels round as the flat kernel does, not as the reference
                # path: the first step, too, runs flat, on the state made for it here.
                make_state(opt, group)
                ran = flat.step(opt, group, grad_scale)
            if ran is True:
                continue
            _explain.warn_fallback(opt, group)
            rest = ran or None
        enabled = torch.is_grad_enabled()
        if enabled is differentiable:
            step_group(opt, group, grad_scale, rest)
            continue
        # The grad mode's own switch: torch.set_grad_enabled costs three times as much, which
        # a step of one small tensor (optimizer-in-backward) feels.
        torch._C._set_grad_enabled(differentiable)
        try:
            step_group(opt, group, grad_scale, rest)
        finally:
            torch._C._set_grad_enabled(enabled)
    opt.__dict__[STEP_COUNT] += 1  # the count in Python (see _step_count)
    return loss


def check_groups(
    opt: Any, groups: list[dict[str, Any]], runs_flat: bool, grad_scale: Tensor | None
) -> dict[int, bool | list[Tensor]]:
    """Raise any error a step of ``groups`` would raise, writing nothing; return, by group,
    what the flat kernel's check answered (see :func:`flat.check`) for those it looked at."""
    answers: dict[int, bool | list[Tensor]] = {}
    for group in groups:
        rest: list[Tensor] | None = None
        if runs_flat and flat.eligible(group):
            ran = answers[id(group)] = flat.check(opt, group, grad_scale)
            if ran is True:
                continue
            rest = ran or None
        params = [p for p in (group["params"] if rest is None else rest) if p.grad is not None]
        if params:
            gather(opt, group, params, [p.grad for p in params], store=False)  # type: ignore[misc]
    return answers


def zero_grad(opt: Any, set_to_none: bool) -> None:
    batched = bool(opt.defaults.get("foreach") or opt.defaults.get("fused"))
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    with _recorded(f"Optimizer.zero_grad#{type(opt).__name__}.zero_grad"):
        # Only a kernel loaded already: clearing gradients starts no build (on a GPU, none
        # is needed). This body never runs traced (see zero_grad).
        kernel = flat.loaded_kernel() if set_to_none else None
        if kernel is not None and not torch._C._is_torch_function_mode_enabled():
            # One call clears plain tensors' gradients, at a few nanoseconds each rather
            # than the Python setter's hundred or so.
            for group in opt.param_groups:
                for p in kernel.clear_grads(group["params"], _PLAIN_TENSORS):
                    p.grad = None
            return
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                    continue
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                if batched and not p.grad.is_sparse:
                    buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
                else:
                    p.grad.zero_()
        for grads in buckets.values():
            _ops.zero_(grads)


def step_group(
    opt: Any, group: dict[str, Any], grad_scale: Tensor | None, only: list[Tensor] | None = None
) -> None:
    """Step the group's parameters that have gradients (of ``only``, where given)."""
    params = [p for p in (group["params"] if only is None else only) if p.grad is not None]
    if params:
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        step_params(opt, group, params, grads, grad_scale)


def make_state(opt: Any, group: dict[str, Any]) -> None:
    """Check a step of ``group`` and create the state of its parameters stepped for the
    first time, as the step would, without updating anything."""
    params = [p for p in group["params"] if p.grad is not None]
    if params:
        entries = gather(opt, group, params, [p.grad for p in params])[3]  # type: ignore[misc]
        if group.get(_precision.KEY) is not None:
            for entry, p in zip(entries, params, strict=True):
                _precision.convert_entry(entry, group, p, opt)


def step_params(
    opt: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    grad_scale: Tensor | None = None,
) -> None:
    """Step ``params`` with ``grads`` under the hyperparameters of ``group``."""
    state, hp, strategy, entries, wide = gather(opt, group, params, grads)
    if wide.params is not None:
        # 16-bit parameters rounded by the group's rule: the update computes in float32.
        params, grads = wide.wide_params, wide.grads
    if grad_scale is None or not group.get("fused"):
        _run(strategy.run, type(opt).update, params, grads, state, hp)
    elif len({id(g) for g in grads}) == len(grads):
        # Unscaled in place, as torch's fused kernels leave ``.grad``.
        if wide.params is not None:
            _ops.div_([p.grad for p in wide.params], grad_scale.to(grads[0].device))  # type: ignore[misc]
        _ops.div_(grads, grad_scale.to(grads[0].device))
        _run(strategy.run, type(opt).update, params, grads, state, hp)
    else:
        # torch's fused kernels unscale and update parameter by parameter: a gradient that
        # several parameters hold is divided again for each, and each reads it as divided
        # so far.
        scale = grad_scale.to(grads[0].device)
        for i in range(len(params)):
            one = {key: values[i : i + 1] for key, values in state.items()}
            _ops.div_(grads[i : i + 1], scale)
            _run(strategy.run, type(opt).update, params[i : i + 1], grads[i : i + 1], one, hp)
            for key, values in one.items():
                state[key][i] = values[0]
    if wide:
        owned = wide.params or params
        _precision.narrow(
            state, wide, [entry or opt.state[p] for entry, p in zip(entries, owned, strict=True)]
        )
        params = owned
    stores = group.get(_precision.KEY) is not None or wide.params is not None
    # State the update made (SGD's first momentum buffer) or replaced is stored.
    for key, values in state.items():
        for i, value in enumerate(values):
            old = entries[i].get(key)
            if value is None or old is value:
                continue
            if stores and key in opt.param_shaped_state:
                value = _precision.store(value, _precision.storage(group, key, params[i]))
            entry = entries[i] or opt.state[params[i]]
            if type(entry) is StateEntry and type(old) in _NUMBERS and type(value) in _NUMBERS:
                # A count kept as a Python number (SparseAdam's step) changes no tensor,
                # so the state's version, which tells strategies that keep a group's
                # tensors to look at them again, stays.
                dict.__setitem__(entry, key, value)
            else:
                entry[key] = value
    if stores:
        # State made by this step (in the parameter's dtype, as torch makes it) is stored
        # narrower once its first update is done.
        for entry, p in zip(entries, params, strict=True):
            # (State the update made for a parameter that had none is in ``opt.state`` only.)
            entry = entry or opt.state.get(p)
            if entry:
                _precision.convert_entry(entry, group, p, opt)


_NOTHING_WIDENED = _precision.Wide()


def gather(
    opt: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], store: bool = True
) -> tuple[StateLists, Hyper, Strategy, list[dict[str, Any]], _precision.Wide]:
    """What a step of ``params`` under ``group`` runs on, checked and rehearsed, with the
    state of parameters stepped for the first time created and (where ``store``) stored; and
    what of it the update computes on widened copies of (see :func:`_precision.widen`)."""
    opt.check_step(group, params, grads)
    if group.get("fused"):
        _checks.check_fused_grads(params, grads)
    hp, hp_layout = hyper(opt, group, params)
    # Each parameter's state dict, created lazily; torch keeps no entry for a parameter
    # whose algorithm holds no state (SGD without momentum), and neither does polyak. New
    # entries are stored once the step is known to run.
    entries: list[dict[str, Any]] = []
    created: dict[Tensor, dict[str, Any]] = {}
    for p in params:
        entry = opt.state.get(p) or created.get(p)
        if not entry:
            entry = opt.init_state(p, hp)
            if entry:
                created[p] = entry
        entries.append(entry)
    if len(entries) == 1:  # one parameter per optimizer, as in optimizer-in-backward
        entry = entries[0]
        state: StateLists = {key: [entry.get(key)] for key in opt.state_keys}
    else:
        state = {key: [entry.get(key) for entry in entries] for key in opt.state_keys}
    message = opt.step_tensors_message
    if message is not None and not all(
        isinstance(entry["step"], Tensor) for entry in entries if "step" in entry
    ):
        raise RuntimeError(message)
    # State stored narrower than the update computes, and 16-bit parameters that a group
    # rounds by its own rule: the update computes on widened copies.
    how = _precision.rounding(group)
    if how is None and group.get(_precision.KEY) is None:
        wide = _NOTHING_WIDENED
    else:
        wide = _precision.widen(state, params, grads, how, entries, opt)
    if wide.params is None:
        strategy = rehearse(opt, group, params, grads, state, hp, entries, hp_layout)
    else:
        strategy = rehearse(opt, group, wide.wide_params, wide.grads, state, hp, entries, hp_layout)
    # Checked: from here on the step writes.
    if created and store:
        for p in created:
            opt.state[p] = StateEntry(created[p])
        entries = [
            opt.state[p] if p in created else e for p, e in zip(params, entries, strict=True)
        ]
    return state, hp, strategy, entries, wide


def hyper(opt: Any, group: dict[str, Any], params: list[Tensor]) -> tuple[Hyper, list[Any]]:
    """``group``'s :class:`Hyper` for ``params`` and the layout of its values (see
    :func:`_layout`).

    Both are kept from the group's last step while its keys and values are the same
    objects (no scheduler changed a number) and all of them are numbers, flags or strings
    (or tuples of them), whose value an object fixes; a tensor may change in place. A class
    whose hyperparameters depend on the parameters (:meth:`hyperparameters` overridden)
    makes them afresh at every step.
    """
    keys, values = tuple(group), tuple(group.values())
    kept = _memo.memo(opt, group)
    last = kept.hypers
    if last is not None and last[0] == keys and all(map(operator.is_, last[1], values)):
        return last[2], last[3]
    missing = opt.missing_key(group)
    if missing is not None:
        raise KeyError(missing)
    hp = opt.hyperparameters(group, params)
    layout = _hyper_layout(vars(hp))
    own = type(opt)._base_hyperparameters
    if own and all(map(_immutable, vars(hp).values())):
        kept.hypers = (keys, values, hp, layout)
    else:
        kept.hypers = None
    return hp, layout
