"""Every argument check polyak makes, with its message.

Where torch.optim raises for the same condition, the type and wording are torch's, so code and
tests that match on them keep working. The checks run in torch's order, before any group exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

_LEAF_TYPES = (torch.Tensor, torch.nn.Parameter)


def check_lr(lr: float | Tensor) -> None:
    """Check a learning rate as torch.optim does: a float, or a one-element tensor, >= 0."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(name: str, value: float | Tensor) -> None:
    """Check ``value >= 0`` with torch's wording (``Invalid momentum value: -1``)."""
    if value < 0.0:
        raise ValueError(f"Invalid {name} value: {value}")


def check_at_least(what: str, value: Any, low: float = 0.0) -> None:
    """Check ``low <= value`` as most torch.optim optimizers do, so a value of the wrong type
    fails the comparison with torch's TypeError; ``what`` names it as torch does (``learning
    rate``, ``epsilon value``)."""
    if not low <= value:
        raise ValueError(f"Invalid {what}: {value}")


def check_between(what: str, value: Any, low: float, high: float) -> None:
    """Check ``low <= value <= high``, with torch's wording (``Invalid rho value: 1.1``)."""
    if not low <= value <= high:
        raise ValueError(f"Invalid {what}: {value}")


def check_tensor_lr(lr: float | Tensor) -> None:
    """A tensor learning rate holds one element."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_betas(betas: Any) -> None:
    """Check that each of two betas is in [0, 1), with torch's wording."""
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def check_nesterov(nesterov: bool, momentum: float, dampening: float) -> None:
    """Nesterov momentum needs a buffer to look ahead with, and no dampening."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def check_strategy_flags(foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
    """Reject combinations of torch's strategy flags that torch rejects, in torch's order."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def fused_devices() -> list[str]:
    """Device types on which torch.optim accepts ``fused=True``."""
    return ["mps", "cuda", "xpu", "hpu", "cpu", "mtia", torch._C._get_privateuse1_backend_name()]


def check_fused_param(p: Tensor) -> None:
    """``fused=True`` needs floating-point parameters on a device with fused kernels."""
    devices = fused_devices()
    if not (p.device.type in devices and torch.is_floating_point(p)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {devices} but {p.dtype} and {p.device.type}"
        )


def check_params_argument(params: Any) -> list[Any]:
    """Turn the ``params`` argument into a non-empty list, or raise as torch does."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be "
            "an iterable of Tensors or dicts, but got " + torch.typename(params)
        )
    groups = list(params)
    if len(groups) == 0:
        raise ValueError("optimizer got an empty parameter list")
    return groups


def check_group_params(
    params: list[Any], differentiable: bool
) -> tuple[list[Tensor], list[str] | None]:
    """Split a group's params into tensors and (optional) names, checking each as torch does."""
    tensors: list[Any] = []
    names: list[Any] = []
    for item in params:
        if isinstance(item, tuple):
            names.append(item[0])
            tensors.append(item[1])
        else:
            tensors.append(item)
    if names and len(names) != len(tensors):
        raise ValueError(
            "all optimizer params should be with/without names. Some param names are missing"
        )
    for p in tensors:
        if not isinstance(p, Tensor):
            raise TypeError(
                "optimizer can only optimize Tensors, but one of the params is " + torch.typename(p)
            )
        if not differentiable and not (p.is_leaf or p.retains_grad):
            raise ValueError("can't optimize a non-leaf Tensor")
    return tensors, (names or None)


def check_step_count(value: Any) -> int:
    """A saved step count is a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid _step_count value: {value!r} (expected a non-negative int)")
    if value < 0:
        raise ValueError(f"Invalid _step_count value: {value} (expected a non-negative int)")
    return value


def check_mapping(what: str, value: Any) -> Mapping[Any, Any]:
    """State dicts and their parts are mappings; say which part is not."""
    if not isinstance(value, Mapping):
        raise TypeError(f"Invalid {what}: expected a dict, but got {torch.typename(value)}")
    return value


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1):
        return "a number or a one-element Tensor"
    if isinstance(value, Tensor):
        return "a Tensor"
    if isinstance(value, (list, tuple)):
        return "a sequence"
    if isinstance(value, str):
        return "a str"
    return "other"


def check_state_step(step: Any) -> None:
    """A loaded step count is a real number >= 0 and finite, or a one-element real tensor of
    one: training makes no other, and torch loads others only to fail or compute nonsense in
    ``step()``.

    Raises:
        TypeError: a value that is neither a tensor, a string nor a real number (None, a
            list): torch's loading raises it, from the ``float(step)`` that reads an old
            format's number, with the same message.
        ValueError: naming the value.
    """
    number = isinstance(step, (int, float)) and not isinstance(step, bool)
    tensor = isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex()
    if (number or tensor) and math.isfinite(float(step)) and float(step) >= 0:
        return
    if not isinstance(step, (Tensor, str)):
        try:
            float(step)
        except TypeError as error:
            raise TypeError(str(error)) from None
    raise ValueError(f"Invalid step {step!r}: a step count is a finite number >= 0")


#: c10's names of the dtypes, which torch's kernels' messages use.
_SCALAR_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def check_fused_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    """torch's fused kernels take gradients of their parameters' dtype only, and raise its
    error otherwise (here before anything changes; torch's fused kernel raises after stepping
    the parameters before the one that fails)."""
    for p, g in zip(params, grads, strict=True):
        if g.dtype != p.dtype:
            expected = _SCALAR_NAMES.get(p.dtype, str(p.dtype))
            found = _SCALAR_NAMES.get(g.dtype, str(g.dtype))
            raise RuntimeError(f"expected scalar type {expected} but found {found}")


#: torch's functional optimizers' error for a ``step`` in the state that is not a tensor.
STEP_TENSORS = "API has changed, `state_steps` argument must contain a list of singleton tensors"

#: torch's message where its foreach and fused steps cannot group a parameter's tensors.
SAME_INDEX = (
    "Tensors of the same index must be on the same device and the same dtype except `step` "
    "tensors that can be CPU and float32/64, and optimizer states that can be bfloat16 for "
    "mixed-precision training"
)

_UNSET_ACCEPTS = (None, "a bool", "a number or a one-element Tensor")


def _equals_a_bool(value: Any) -> bool:
    """Whether a number or a one-element tensor equals False or True (0 or 1)."""
    if isinstance(value, Tensor) and value.is_complex():
        return False
    return float(value) in (0.0, 1.0)


def check_same_kind(what: str, current: Any, loaded: Any) -> None:
    """A loaded hyperparameter has the kind of value the optimizer holds for it.

    Numbers and one-element tensors are one kind (a scheduler may turn ``lr`` into a tensor),
    lists and tuples another. Where the optimizer holds None (a tri-state flag such as
    ``foreach``, or an unset number), None, a bool or a number is accepted; where it holds a
    bool, None too, and a number equal to a bool (``maximize=1``, ``tensor(True)``), which the
    constructors take and keep as given, and torch's steps read as that bool.
    """
    expected, got = _kind(current), _kind(loaded)
    if (
        expected == "a bool"
        and got == "a number or a one-element Tensor"
        and _equals_a_bool(loaded)
    ):
        return
    if expected is None:
        if got not in _UNSET_ACCEPTS:
            raise TypeError(f"Invalid {what} value: {loaded!r} (expected None, a bool or a number)")
        return
    if expected == "other" or (got is None and expected == "a bool"):
        return
    if expected != got:
        raise TypeError(f"Invalid {what} value: {loaded!r} (expected {expected})")
    if expected == "a sequence":
        if len(current) != len(loaded):
            raise ValueError(f"Invalid {what} value: {loaded!r} (expected {len(current)} elements)")
        for j, (c, v) in enumerate(zip(current, loaded, strict=True)):
            check_same_kind(f"{what}[{j}]", c, v)


def check_adam(
    lr: float | Tensor,
    betas: tuple[float | Tensor, float | Tensor],
    eps: float,
    weight_decay: float,
    foreach: bool | None,
    capturable: bool,
) -> None:
    """Adam's argument checks, in torch.optim's order and wording."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (
        (isinstance(betas[0], float) and isinstance(betas[1], float))
        or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
    ):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if not capturable and foreach:
                raise ValueError(
                    f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                )
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def capturable_devices(xla: bool = True) -> list[str]:
    """Device types on which torch.optim accepts ``capturable=True`` (some of its foreach
    paths leave out ``xla``)."""
    return ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name()] + (
        ["xla"] if xla else []
    )


def check_capturable_param(
    p: Tensor,
    step: Tensor,
    what: str = "params and state_steps must be",
    xla: bool = True,
) -> None:
    """A capturable step keeps parameters and step counters on an accelerator; ``what`` and
    ``xla`` give the wording of the torch.optim path being copied."""
    devices = capturable_devices(xla)
    if not (p.device.type == step.device.type and p.device.type in devices):
        raise AssertionError(f"If capturable=True, {what} on supported devices: {devices}.")


def check_state_tensor(pid: Any, key: Any, value: Any, shape: torch.Size) -> Tensor:
    """A loaded state entry that must be a tensor of ``shape``."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"Invalid {key} for parameter {pid}: expected a Tensor, but got "
            + torch.typename(value)
        )
    if value.shape != shape:
        raise ValueError(
            f"loaded state dict has a {key} of shape {tuple(value.shape)} for parameter {pid}, "
            f"expected {tuple(shape)}"
        )
    return value


def check_state_scalar(pid: Any, key: Any, value: Any) -> Tensor:
    """A loaded per-parameter counter: a one-element tensor of any shape."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"Invalid {key} for parameter {pid}: expected a Tensor, but got "
            + torch.typename(value)
        )
    if value.numel() != 1:
        raise ValueError(
            f"loaded state dict has a {key} of shape {tuple(value.shape)} for parameter {pid}, "
            "expected a one-element tensor"
        )
    return value


def check_lr_eps_betas_decay(group: Mapping[str, Any]) -> None:
    """The checks of ``lr``, ``eps``, ``betas`` and ``weight_decay`` that Adamax, NAdam and
    RAdam make, in torch.optim's order and wording."""
    check_tensor_lr(group["lr"])
    check_at_least("learning rate", group["lr"])
    check_at_least("epsilon value", group["eps"])
    check_betas(group["betas"])
    check_at_least("weight_decay value", group["weight_decay"])
