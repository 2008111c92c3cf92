"""One entry per optimizer: what the generic tests run, and what they compare against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import polyak


@dataclass(frozen=True)
class ErrorCase:
    """Constructor arguments that must raise ``error`` with a message matching ``match``."""

    kwargs: dict[str, Any]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class Entry:
    """An optimizer under test and its torch.optim twin."""

    cls: type[polyak.Optimizer]
    reference: type[torch.optim.Optimizer]
    configs: list[dict[str, Any]]
    errors: list[ErrorCase]
    #: Absolute tolerance per dtype against torch's fused kernels, which may round differently.
    fused_tolerances: dict[torch.dtype, float] = field(default_factory=dict)
    elementwise: bool = True
    supports_sparse: bool = False
    supports_complex: bool = True


def _sgd_configs() -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [
        {"lr": 0.1},
        {"lr": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "maximize": True},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True, "weight_decay": 0.1},
        {"lr": torch.tensor(0.05), "momentum": 0.9},
        {"lr": torch.tensor([0.05]), "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": torch.tensor(0.01)},
    ]
    return configs


REGISTRY: list[Entry] = [
    Entry(
        cls=polyak.SGD,
        reference=torch.optim.SGD,
        configs=_sgd_configs(),
        errors=[
            ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            ErrorCase({"momentum": -0.5}, ValueError, r"^Invalid momentum value: -0\.5$"),
            ErrorCase({"weight_decay": -1}, ValueError, r"^Invalid weight_decay value: -1$"),
            ErrorCase(
                {"nesterov": True},
                ValueError,
                r"^Nesterov momentum requires a momentum and zero dampening$",
            ),
            ErrorCase(
                {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
                ValueError,
                r"^Nesterov momentum requires a momentum and zero dampening$",
            ),
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
            ErrorCase({"lr": "0.1"}, TypeError, r"not supported between instances"),
        ],
        fused_tolerances={
            torch.float64: 1e-12,
            torch.float32: 1e-5,
            torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2,
        },
        supports_sparse=True,
    ),
]


def ids(entry: Entry) -> str:
    return entry.cls.__name__
