"""SGD against torch.optim.SGD."""

from __future__ import annotations

from typing import Any

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import COMMON_ERRORS


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


ENTRY = Entry(
    cls=polyak.SGD,
    reference=torch.optim.SGD,
    configs=_sgd_configs(),
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
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
        *COMMON_ERRORS,
    ],
    fused_tolerances={
        torch.float64: 1e-12,
        torch.float32: 1e-5,
        torch.float16: 2e-3,
        torch.bfloat16: 1.6e-2,
    },
    stateful={"lr": 0.05, "momentum": 0.9},
    differentiable={"momentum": 0.9, "nesterov": True},
    sparse_configs=[{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}],
)
