"""SparseAdam against torch.optim.SparseAdam."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import LR_TYPE_ERROR, betas_errors

ENTRY = Entry(
    cls=polyak.SparseAdam,
    reference=torch.optim.SparseAdam,
    configs=[
        {},
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
        {"lr": 0.01, "maximize": True},
        {"lr": torch.tensor(0.01)},
        {"lr": torch.tensor([0.005]), "maximize": True},
    ],
    errors=[
        ErrorCase({"lr": 0.0}, ValueError, r"^Invalid learning rate: 0\.0$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"eps": 0.0}, ValueError, r"^Invalid epsilon value: 0\.0$"),
        *betas_errors(),
        LR_TYPE_ERROR,
    ],
    stateful={"lr": 0.01},
    sparse_grads=True,
    sparse_configs=[{"lr": 0.1}, {"lr": 0.05, "maximize": True}],
    lr_zero_is_identity=False,
    duplicates_in_turn=False,
    supports_complex=False,
    fused=False,
    flat=False,
)
