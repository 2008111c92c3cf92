"""Muon against torch.optim.Muon."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import LR_TYPE_ERROR


def _muon_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Learning rate should be >= 0 but is: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"momentum": -0.5}, ValueError, r"^momentum should be >= 0 but is: -0\.5$"),
        ErrorCase(
            {"weight_decay": -1.0}, ValueError, r"^weight decay should be >= 0 but is: -1\.0$"
        ),
        ErrorCase(
            {"adjust_lr_fn": "arbitrary"},
            ValueError,
            r"^Adjust learning rate function arbitrary is not supported$",
        ),
        LR_TYPE_ERROR,
    ]


ENTRY = Entry(
    cls=polyak.Muon,
    reference=torch.optim.Muon,
    configs=[
        {},
        {"lr": 0.01},
        {"weight_decay": 0.2},
        {"momentum": 0.8},
        {"ns_steps": 6},
        {"ns_coefficients": (3.4, -4.7, 2.0)},
        {"nesterov": False, "weight_decay": 0.0},
        {"lr": 0.02, "adjust_lr_fn": "original"},
        {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw", "eps": 1e-3},
        {"lr": torch.tensor(0.001)},
        {"lr": torch.tensor([0.01]), "nesterov": False},
    ],
    errors=_muon_errors(),
    step_errors=[
        ErrorCase(
            {"ns_steps": 100},
            ValueError,
            r"^Number of steps must be less than 100 for computational efficiency$",
        ),
        ErrorCase(
            {"ns_coefficients": (3.4, -4.7)},
            ValueError,
            r"^Coefficients must be a tuple of exactly 3 values$",
        ),
    ],
    stateful={"lr": 0.01, "momentum": 0.9},
    matrices_only=True,
    supports_complex=False,
    fused=False,
    flat=False,
)
