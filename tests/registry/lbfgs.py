"""LBFGS against torch.optim.LBFGS."""

from __future__ import annotations

import torch

import polyak

from ._entry import Entry, ErrorCase
from ._shared import LR_TYPE_ERROR

ENTRY = Entry(
    cls=polyak.LBFGS,
    reference=torch.optim.LBFGS,
    configs=[
        {},
        {"lr": 0.01},
        {"tolerance_grad": 1e-6},
        {"line_search_fn": "strong_wolfe"},
        {"lr": 0.5, "max_iter": 7, "history_size": 3},
        {"line_search_fn": "strong_wolfe", "max_iter": 4, "max_eval": 3},
        {"lr": 0.1, "tolerance_change": 1e-3, "line_search_fn": "strong_wolfe"},
        {"lr": torch.tensor(0.001)},
        {"lr": torch.tensor([0.05]), "history_size": 2, "max_iter": 5},
    ],
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        LR_TYPE_ERROR,
    ],
    step_errors=[
        ErrorCase(
            {"line_search_fn": "backtracking"},
            RuntimeError,
            r"^only 'strong_wolfe' is supported$",
        )
    ],
    stateful={"lr": 0.5, "max_iter": 5, "history_size": 4},
    step_closure=True,
    one_group=True,
    float16=False,
    # The line search divides by the step length, and fails at lr=0 as torch's does.
    lr_zero_is_identity=False,
    fused=False,
    flat=False,
)
