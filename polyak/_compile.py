"""The step as ``torch.compile`` traces it: in one graph, as torch.optim's step."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any, cast

import torch
import torch.optim
from torch import Tensor

from polyak import _ops
from polyak._driver import gather
from polyak._runner import _call, _run
from polyak.strategies import StateLists, loop


def traced_step(opt: Any, closure: Callable[[], Any] | None) -> Any:
    """:meth:`step` as ``torch.compile`` traces it, in one graph as torch.optim's step.

    The flat kernel is opaque to dynamo, so every group runs its update rule as tensor
    operations, one tensor at a time as torch's compiled CPU steps do, with the step
    counters kept as tensors (see :func:`polyak._ops.values`): the graph holds no
    ``item()`` and no guard on the step count or on a scheduled ``lr``. The checks, the
    rehearsal and the creation of state run in :meth:`_init_group`, which dynamo runs as
    Python; the groups are read here, so that dynamo knows where each comes from. The
    step is counted by :func:`_step_in_own_graph`, which runs as Python around it.

    A GradScaler's step with infs (``found_inf`` set) is skipped without reading the flag
    back, which would break the graph: what the step writes is put back where it is set.
    """
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    grad_scale: Tensor | None = getattr(opt, "grad_scale", None)
    found_inf: Tensor | None = getattr(opt, "found_inf", None)
    for group in opt.param_groups:
        traced_group_step(opt, group, grad_scale, found_inf)
    return loss


def traced_group_step(
    opt: Any, group: dict[str, Any], grad_scale: Tensor | None, found_inf: Tensor | None
) -> None:
    params: list[Tensor] = []
    grads: list[Tensor] = []
    values: list[Any] = []
    shared = opt._init_group(group, params, grads, values)
    if not params:
        return
    n = len(params)
    state: StateLists = {key: values[k * n : (k + 1) * n] for k, key in enumerate(opt.state_keys)}
    hp = opt.hyperparameters(group, params)
    written = [*params, *grads, *(v for v in values if v is not None)]
    kept = [t.clone() for t in written] if found_inf is not None else []
    if grad_scale is not None and group.get("fused"):
        _ops.div_(grads, grad_scale.to(grads[0].device))
    _run(loop.in_turn if shared else _call, type(opt).update, params, grads, state, hp)
    if found_inf is not None:
        for t, old in zip(written, kept, strict=True):
            t.copy_(torch.where(found_inf.to(t.device, torch.bool), old, t))
    for key, values in state.items():
        for p, value in zip(params, values, strict=True):
            if value is not None and opt.state[p].get(key) is not value:
                opt.state[p][key] = value


def init_group(opt: Any, *args: Any, **kwargs: Any) -> Any:
    """:meth:`_gather_into` under the name that dynamo gives its place.

    Dynamo calls a method of this name as Python when it traces a step of a
    ``torch.optim.Optimizer`` (torch's own optimizers gather their groups this way), takes
    its result as a constant and guards the compiled graph on the groups and the state it
    finds; the checks and the rehearsal therefore run whenever the step is traced again.
    Its arguments are those of :meth:`_gather_into`; each torch optimizer has a signature
    of its own, which this one, taking any, stands in for.
    """
    _ops.trace_as_python()
    if "_compiled_steps" not in opt.__dict__:
        # Where the graph counts a step that it compiles whole (see _step_in_own_graph), on the
        # parameters' device; a static address, as dynamo makes the state's, so that CUDA
        # graphs take it.
        first = next(chain.from_iterable(g["params"] for g in opt.param_groups), None)
        counter = torch.zeros((), dtype=torch.int64, device=getattr(first, "device", None))
        torch._dynamo.mark_static_address(counter)
        opt.__dict__["_compiled_steps"] = counter
    return gather_into(opt, *args, **kwargs)


def gather_into(
    opt: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], values: list[Any]
) -> bool:
    """Fill the empty lists ``params``, ``grads`` and ``values`` (the state, key after key in
    the order of ``state_keys``) for a step of ``group``, checked and rehearsed, creating
    the state of new parameters; return whether parameters or state tensors share memory,
    so that the parameters are updated in turn."""
    found = [p for p in group["params"] if p.grad is not None]
    if not found:
        return False
    found_grads = [cast(Tensor, p.grad) for p in found]
    state, _, _, _, wide = gather(opt, group, found, found_grads)
    if wide:
        raise NotImplementedError(
            "a step traced by torch.compile does not yet take state stored narrower than the "
            "update computes (state_dtype, kahan_sum, bf16_stochastic_round); step that "
            "optimizer outside the compiled function"
        )
    params.extend(found)
    grads.extend(found_grads)
    for key in opt.state_keys:
        values.extend(state[key])
    return loop.shared(found, state)
