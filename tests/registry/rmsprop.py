"""RMSprop against torch.optim.RMSprop."""

from __future__ import annotations

from typing import Any

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import LR_TYPE_ERROR


def _rmsprop_configs() -> list[dict[str, Any]]:
    return [
        {},
        {"lr": 1e-3, "weight_decay": 0.1},
        {"maximize": True, "weight_decay": 0.1},
        {"weight_decay": 0.1, "centered": True},
        {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True},
        {"momentum": 0.5, "alpha": 0.9, "eps": 1e-6},
        {"lr": torch.tensor(0.01), "momentum": 0.5},
        {"lr": torch.tensor([0.01]), "centered": True},
    ]


ENTRY = Entry(
    cls=polyak.RMSprop,
    reference=torch.optim.RMSprop,
    configs=_rmsprop_configs(),
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value: -1\.0$"),
        ErrorCase({"momentum": -1.0}, ValueError, r"^Invalid momentum value: -1\.0$"),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
        ErrorCase({"alpha": -0.5}, ValueError, r"^Invalid alpha value: -0\.5$"),
        LR_TYPE_ERROR,
    ],
    stateful={"lr": 0.01, "momentum": 0.9, "centered": True},
    differentiable={"momentum": 0.9, "weight_decay": 0.1},
    differentiable_lr=False,
    fused=False,
    flat=True,
)
