"""Rprop against torch.optim.Rprop."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import LR_TYPE_ERROR

ENTRY = Entry(
    cls=polyak.Rprop,
    reference=torch.optim.Rprop,
    configs=[
        {},
        {"lr": 2e-4},
        {"etas": (0.5, 1.5)},
        {"step_sizes": (2e-6, 100)},
        {"maximize": True},
        {"lr": 0.05, "etas": (0.3, 1.1), "step_sizes": (1e-3, 0.06), "maximize": True},
        {"lr": torch.tensor(0.01), "etas": (0.4, 1.3)},
        {"lr": torch.tensor([0.02])},
    ],
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"etas": (1.0, 0.5)}, ValueError, r"^Invalid eta values: 1\.0, 0\.5$"),
        ErrorCase({"etas": (0.5, 1.0)}, ValueError, r"^Invalid eta values: 0\.5, 1\.0$"),
        LR_TYPE_ERROR,
    ],
    stateful={"lr": 0.01},
    differentiable={"etas": (0.4, 1.3)},
    differentiable_lr=False,
    differentiable_steps=1,
    lr_zero_is_identity=False,
    fused=False,
    flat=True,
)
