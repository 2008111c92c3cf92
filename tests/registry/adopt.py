"""ADOPT against torch-adopt 0.1.0's per-tensor path, its default on the CPU."""

from __future__ import annotations

import polyak

from ._entry import Entry, ErrorCase
from ._shared import betas_errors, lr_eps_decay_errors

ENTRY = Entry(
    cls=polyak.ADOPT,
    reference="adopt:ADOPT",
    configs=[
        {},
        {"lr": 0.01, "maximize": True},
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-4, "weight_decay": 0.1},
        {"lr": 0.01, "weight_decay": 0.1, "decouple": True, "maximize": True},
        {"lr": 0.01, "clip_lambda": None, "weight_decay": 0.05},
    ],
    errors=[
        *lr_eps_decay_errors(),
        *betas_errors(),
        ErrorCase({"fused": True}, RuntimeError, r"^`fused` is not currently supported$"),
    ],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    # Every strategy is compared with torch-adopt's per-tensor path: its foreach path computes
    # the clipping bound step ** 0.25 as a float32 tensor, and may round it differently.
    polyak_only=("foreach",),
)
