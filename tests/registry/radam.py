"""RAdam against torch.optim.RAdam."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry
from ._shared import betas_errors, lr_eps_decay_errors

ENTRY = Entry(
    cls=polyak.RAdam,
    reference=torch.optim.RAdam,
    configs=[
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"weight_decay": 0.1, "maximize": True},
        # rho_t passes 5 at the sixth step: the reference runs both branches.
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True},
        {"lr": torch.tensor(0.01), "weight_decay": 0.1},
        {"lr": torch.tensor([0.01]), "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    errors=[*lr_eps_decay_errors(), *betas_errors()],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
    paths_agree=False,
    fused=False,
    flat=True,
)
