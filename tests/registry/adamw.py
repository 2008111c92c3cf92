"""AdamW against torch.optim.AdamW."""

from __future__ import annotations

import torch

import polyak

from ._shared import adam_entry

ENTRY = adam_entry(
    polyak.AdamW, torch.optim.AdamW, decoupled=True, stateful={"lr": 0.01, "weight_decay": 0.05}
)
