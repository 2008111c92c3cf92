"""Adadelta against torch.optim.Adadelta."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import lr_eps_decay_errors

ENTRY = Entry(
    cls=polyak.Adadelta,
    reference=torch.optim.Adadelta,
    configs=[
        {},
        {"lr": 0.01, "weight_decay": 0.1},
        {"weight_decay": 0.1, "maximize": True},
        {"rho": 0.95, "weight_decay": 0.9},
        {"rho": 0.5, "eps": 1e-4, "maximize": True},
        {"lr": torch.tensor(0.5), "weight_decay": 0.1},
        {"lr": torch.tensor([0.5]), "maximize": True},
    ],
    errors=[
        *lr_eps_decay_errors(),
        ErrorCase({"rho": 1.1}, ValueError, r"^Invalid rho value: 1\.1$"),
        ErrorCase({"rho": -0.1}, ValueError, r"^Invalid rho value: -0\.1$"),
    ],
    stateful={"lr": 0.5, "weight_decay": 0.1},
    differentiable={"rho": 0.8, "weight_decay": 0.1},
    differentiable_lr=False,
    fused=False,
    flat=True,
)
