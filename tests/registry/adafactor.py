"""Adafactor against torch.optim.Adafactor."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import LR_TYPE_ERROR


def _adafactor_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Learning rate should be >= 0 but is: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"beta2_decay": 0.8}, ValueError, r"^beta2_decay should be <= 0 but is: 0\.8$"),
        ErrorCase({"eps": (-1e-30, 1e-3)}, ValueError, r"^epsilon1 should be >= 0 but is: -1e-30$"),
        ErrorCase({"eps": (None, -1.0)}, ValueError, r"^epsilon2 should be >= 0 but is: -1\.0$"),
        ErrorCase({"d": 0.0}, ValueError, r"^Clipping threshold d should be >= 1 but is: 0\.0$"),
        ErrorCase(
            {"weight_decay": -1.0}, ValueError, r"^weight_decay should be >= 0 but is: -1\.0$"
        ),
        LR_TYPE_ERROR,
    ]


ENTRY = Entry(
    cls=polyak.Adafactor,
    reference=torch.optim.Adafactor,
    configs=[
        {},
        {"weight_decay": 0.1, "lr": 0.01},
        {"weight_decay": 0.1, "maximize": True},
        {"beta2_decay": -1.0},
        {"d": 1.5},
        {"eps": (1e-15, 1e-3), "weight_decay": 0.1},
        {"lr": 0.5, "beta2_decay": -0.5, "d": 1.2, "eps": (1e-3, 1e-2), "maximize": True},
        {"lr": torch.tensor(0.01), "weight_decay": 0.1},
        {"lr": torch.tensor([0.02]), "maximize": True},
    ],
    errors=_adafactor_errors(),
    stateful={"lr": 0.01, "weight_decay": 0.1},
    paths_agree=False,
    empty_params=False,
    supports_complex=False,
    fused=False,
    flat=False,
)
