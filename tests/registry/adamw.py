"""AdamW against torch.optim.AdamW."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry
from ._shared import ADAM_FUSED_TOLERANCES, adam_configs, adam_errors

ENTRY = Entry(
    cls=polyak.AdamW,
    reference=torch.optim.AdamW,
    configs=adam_configs(decoupled=True),
    errors=adam_errors(),
    fused_tolerances=ADAM_FUSED_TOLERANCES,
    stateful={"lr": 0.01, "weight_decay": 0.05},
    differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
    complex_foreach_tolerance=1e-6,
)
