"""What several algorithms share about their state: step counters and dense gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.optimizer import runs_foreach


def scalar_dtype() -> torch.dtype:
    """The dtype of step counters: float32, or float64 under a float64 default dtype, as in
    torch.optim."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def zero_step(param: Tensor, on_device: bool) -> Tensor:
    """A zero step counter: on the parameter's device when ``on_device`` (a capturable step),
    else on the CPU."""
    return torch.zeros((), dtype=scalar_dtype(), device=param.device if on_device else None)


def upgrade_step(entry: dict[str, Any], param: Tensor, on_device: bool) -> None:
    """Turn a step counter kept as a Python number (older torch checkpoints) into a tensor.

    Raises:
        ValueError: a step no training makes (see :func:`polyak._checks.check_state_step`).
    """
    step = entry.get("step")
    if step is not None:
        _checks.check_state_step(step)
    if step is not None and not torch.is_tensor(step):
        entry["step"] = torch.tensor(
            float(step), dtype=scalar_dtype(), device=param.device if on_device else None
        )


def check_dense(name: str, grads: list[Tensor]) -> None:
    """Refuse sparse gradients, with torch's message."""
    if any(g.is_sparse for g in grads):
        raise RuntimeError(f"{name} does not support sparse gradients")


def zeros_like(param: Tensor) -> Tensor:
    """A zero tensor shaped, typed and laid out as ``param``."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


def torch_foreach_path(hp: Any, params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether torch.optim steps this group on its foreach path, which orders some operations
    differently from its per-tensor path: a rule that copies each path's order asks here."""
    return runs_foreach(vars(hp), params, grads)


def decay_as_real(
    params: list[Tensor], grads: list[Tensor], weight_decay: Any, foreach_order: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """``g + weight_decay * param``, and the real views of complex tensors.

    torch's foreach path decays the real views, its per-tensor path the complex tensors, which
    rounds differently: ``foreach_order`` picks the one to copy.
    """
    if weight_decay != 0 and not foreach_order:
        grads = _ops.add_scaled(grads, params, weight_decay)
    params, grads = _ops.as_real(params), _ops.as_real(grads)
    if weight_decay != 0 and foreach_order:
        grads = _ops.add_scaled(grads, params, weight_decay)
    return params, grads


def number(value: Any) -> Any:
    """A tensor hyperparameter as the Python number torch's foreach paths read it."""
    return value.item() if isinstance(value, Tensor) else value


def check_capturable(
    state: Any,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    loop: tuple[str, bool] = ("params and state_steps must be", True),
    foreach: tuple[str, bool] = ("params and state_steps must be", True),
) -> None:
    """``capturable=True`` needs parameters and steps on an accelerator, with the wording of
    the torch path that runs: ``loop`` and ``foreach`` give each path's subject and whether
    its device list names ``xla``. torch's fused kernels read the step where it is and take
    ``capturable`` on any device, as a fused step here does."""
    if not group["capturable"] or group.get("fused"):
        return
    what, xla = foreach if runs_foreach(group, params, grads) else loop
    for p in params:
        entry = state.get(p)
        _checks.check_capturable_param(p, entry["step"] if entry else p, what, xla)


def upgrade_step_state(
    self: Any, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor
) -> None:
    """``upgrade_state`` of a rule whose only old-format state is its step: checkpoints of old
    torch versions kept it as a Python number (assigned as the class's ``upgrade_state``)."""
    upgrade_step(entry, param, group["capturable"])


def dense_and_capturable(
    name: str,
    loop: tuple[str, bool] = ("params and state_steps must be", True),
    foreach: tuple[str, bool] = ("params and state_steps must be", True),
) -> Any:
    """``check_step`` of a rule that takes dense gradients only, and whose ``capturable`` needs
    an accelerator, with torch's messages for ``name`` (see :func:`check_capturable` for
    ``loop`` and ``foreach``); assigned as the class's ``check_step``."""

    def check_step(
        self: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        check_dense(name, grads)
        check_capturable(self.state, group, params, grads, loop=loop, foreach=foreach)

    check_step.__doc__ = f"{name} takes dense gradients, and ``capturable`` needs an accelerator."
    return check_step


def upgrade_group_step_state(
    self: Any, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor
) -> None:
    """``upgrade_state`` of a rule whose reference package counts steps per group
    (``group["step"]``): a loaded parameter state without a ``step`` takes its group's count,
    and a count kept as a Python number becomes a tensor (assigned as the class's
    ``upgrade_state``)."""
    count = group.get("step")
    if entry and "step" not in entry and isinstance(count, int) and not isinstance(count, bool):
        entry["step"] = torch.tensor(float(count), dtype=scalar_dtype())
    upgrade_step(entry, param, False)


def with_group_steps(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """A ``state_dict`` post hook: each group's step count (its parameters' largest), as
    packages that count steps per group keep it, beside the per-parameter counts."""
    for group in state_dict["param_groups"]:
        counts = [
            int(state_dict["state"][i]["step"])
            for i in group["params"]
            if "step" in state_dict["state"].get(i, {})
        ]
        if counts:
            group["step"] = max(counts)
