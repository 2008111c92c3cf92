"""ASGD against torch.optim.ASGD."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import LR_TYPE_ERROR

ENTRY = Entry(
    cls=polyak.ASGD,
    reference=torch.optim.ASGD,
    configs=[
        {},
        {"lambd": 0.1, "lr": 0.02},
        {"t0": 2, "weight_decay": 0.1},
        {"t0": 3, "alpha": 0.5, "maximize": True, "weight_decay": 0.1},
        {"lr": torch.tensor(0.01), "t0": 2, "lambd": 0.01},
        {"lr": torch.tensor([0.02]), "maximize": True},
    ],
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"weight_decay": -0.5}, ValueError, r"^Invalid weight_decay value: -0\.5$"),
        LR_TYPE_ERROR,
    ],
    stateful={"lr": 0.02, "t0": 2, "lambd": 0.01},
    differentiable={"t0": 1, "weight_decay": 0.1},
    differentiable_lr=False,
    paths_agree=False,
    zero_grad_is_identity=False,
    fused=False,
    flat=True,
)
