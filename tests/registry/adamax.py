"""Adamax against torch.optim.Adamax."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry
from ._shared import betas_errors, lr_eps_decay_errors

ENTRY = Entry(
    cls=polyak.Adamax,
    reference=torch.optim.Adamax,
    configs=[
        {},
        {"maximize": True},
        {"weight_decay": 0.1, "maximize": True},
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
        {"lr": torch.tensor(0.01), "weight_decay": 0.1},
        {"lr": torch.tensor([0.005]), "maximize": True},
    ],
    errors=[*lr_eps_decay_errors(), *betas_errors()],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
    differentiable_lr=False,
    differentiable_steps=1,
    fused=False,
    flat=True,
)
