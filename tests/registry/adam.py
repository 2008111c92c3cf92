"""Adam against torch.optim.Adam."""

from __future__ import annotations

import torch

import polyak

from ._shared import adam_entry

ENTRY = adam_entry(
    polyak.Adam, torch.optim.Adam, decoupled=False, stateful={"lr": 0.01, "amsgrad": True}
)
