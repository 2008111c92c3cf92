"""What several optimizers' entries share: errors torch raises for all of them, Adam's family's
configurations and errors."""

from __future__ import annotations

from typing import Any

import torch

import polyak

from ._entry import Entry, ErrorCase

#: Errors every optimizer that takes ``fused`` raises as torch does.
FUSED_ERRORS = [
    ErrorCase(
        {"fused": True, "differentiable": True},
        RuntimeError,
        r"^`fused` does not support `differentiable`$",
    ),
    ErrorCase(
        {"fused": True, "foreach": True},
        RuntimeError,
        r"^`fused` and `foreach` cannot be `True` together\.$",
    ),
]


#: Errors every optimizer here raises as torch does.
LR_TYPE_ERROR = ErrorCase({"lr": "0.1"}, TypeError, r"not supported between instances")


COMMON_ERRORS = [*FUSED_ERRORS, LR_TYPE_ERROR]


def adam_configs(decoupled: bool) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [
        {"lr": 0.01},
        {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "amsgrad": True},
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.01, "maximize": True},
        {"lr": torch.tensor(0.01), "weight_decay": 0.05},
        {"lr": 0.01, "betas": (torch.tensor(0.8), torch.tensor(0.99)), "weight_decay": 0.05},
        {"lr": 0.02, "eps": 0.0, "weight_decay": 0.0},
    ]
    if not decoupled:
        configs.append({"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True})
    return configs


def adam_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase(
            {"lr": torch.tensor(0.1), "foreach": True},
            ValueError,
            r"^lr as a Tensor is not supported for capturable=False and foreach=True$",
        ),
        ErrorCase({"eps": -1e-8}, ValueError, r"^Invalid epsilon value: -1e-08$"),
        ErrorCase(
            {"betas": (1.0, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$"
        ),
        ErrorCase(
            {"betas": (0.9, -0.1)}, ValueError, r"^Invalid beta parameter at index 1: -0\.1$"
        ),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
        ErrorCase(
            {"betas": (0.9, torch.tensor(0.99))},
            ValueError,
            r"^betas must be either both floats or both Tensors$",
        ),
        ErrorCase(
            {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
            ValueError,
            r"^betas\[0\] as a Tensor is not supported for capturable=False and foreach=True$",
        ),
        ErrorCase(
            {"betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.99))},
            RuntimeError,
            r"^Boolean value of Tensor with more than one value is ambiguous$",
        ),
        *COMMON_ERRORS,
    ]


ADAM_FUSED_TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def betas_errors() -> list[ErrorCase]:
    return [
        ErrorCase(
            {"betas": (1.0, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$"
        ),
        ErrorCase(
            {"betas": (0.9, -0.1)}, ValueError, r"^Invalid beta parameter at index 1: -0\.1$"
        ),
    ]


def lr_eps_decay_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value: -1\.0$"),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
        LR_TYPE_ERROR,
    ]


def adam_entry(
    cls: type[polyak.Optimizer],
    reference: type[torch.optim.Optimizer],
    decoupled: bool,
    stateful: dict[str, Any],
) -> Entry:
    """The entry of Adam or AdamW, which share their configurations and errors."""
    return Entry(
        cls=cls,
        reference=reference,
        configs=adam_configs(decoupled=decoupled),
        errors=adam_errors(),
        fused_tolerances=ADAM_FUSED_TOLERANCES,
        stateful=stateful,
        differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
        complex_foreach_tolerance=1e-6,
    )
