"""Adagrad against torch.optim.Adagrad."""

from __future__ import annotations

from typing import Any

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import ADAM_FUSED_TOLERANCES, COMMON_ERRORS


def _adagrad_configs() -> list[dict[str, Any]]:
    return [
        {},
        {"weight_decay": 0.1, "maximize": True},
        {"initial_accumulator_value": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1},
        {"lr": 0.05, "eps": 1e-6, "lr_decay": 0.1, "maximize": True},
        {"lr": torch.tensor(0.01), "lr_decay": 0.1},
        {"lr": torch.tensor([0.001]), "weight_decay": 0.1},
    ]


ENTRY = Entry(
    cls=polyak.Adagrad,
    reference=torch.optim.Adagrad,
    configs=_adagrad_configs(),
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"lr_decay": -0.5}, ValueError, r"^Invalid lr_decay value: -0\.5$"),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
        ErrorCase(
            {"initial_accumulator_value": -1.0},
            ValueError,
            r"^Invalid initial_accumulator_value value: -1\.0$",
        ),
        ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value: -1\.0$"),
        *COMMON_ERRORS,
    ],
    fused_tolerances=ADAM_FUSED_TOLERANCES,
    stateful={"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.1},
    differentiable={"lr_decay": 0.1, "weight_decay": 0.1},
    differentiable_lr=False,
    sparse_configs=[{"lr": 0.1}, {"lr": 0.1, "lr_decay": 0.1, "maximize": True}],
    eager_state=True,
)
