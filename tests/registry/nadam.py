"""NAdam against torch.optim.NAdam."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import betas_errors, lr_eps_decay_errors

ENTRY = Entry(
    cls=polyak.NAdam,
    reference=torch.optim.NAdam,
    configs=[
        {},
        {"momentum_decay": 6e-3},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "momentum_decay": 6e-3, "maximize": True},
        {"weight_decay": 0.1, "momentum_decay": 6e-3, "decoupled_weight_decay": True},
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True},
        {"lr": torch.tensor(0.01), "weight_decay": 0.1},
        {"lr": torch.tensor([0.01]), "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    errors=[
        *lr_eps_decay_errors(),
        *betas_errors(),
        ErrorCase({"momentum_decay": -0.2}, ValueError, r"^Invalid momentum_decay value: -0\.2$"),
    ],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
    differentiable_steps=1,
    paths_agree=False,
    fused=False,
    flat=True,
)
