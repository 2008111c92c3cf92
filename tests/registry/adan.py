"""Adan against timm 1.0.31's, and within rounding of torch-optimi 0.3.3's.

``timm`` imports torchvision at its top, which cannot be installed beside this torch: timm's
``optim/adan.py``, which needs only its sibling ``_helpers.py``, is loaded on its own (see
``registry.load``). optimi computes the same update with its bias corrections folded into the
betas, another order of operations: it agrees within rounding.
"""

from __future__ import annotations

import polyak

from ._entry import CrossCheck, Entry, ErrorCase

ENTRY = Entry(
    cls=polyak.Adan,
    reference="timm.optim.adan:Adan",
    configs=[
        {},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "betas": (0.9, 0.9, 0.999), "weight_decay": 0.1, "no_prox": True},
        {"lr": 0.01, "eps": 1e-6, "caution": True},
    ],
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value: -1\.0$"),
        ErrorCase(
            {"betas": (1.0, 0.92, 0.99)}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$"
        ),
        ErrorCase(
            {"betas": (0.9, 0.92, -0.1)}, ValueError, r"^Invalid beta parameter at index 2: -0\.1$"
        ),
    ],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    polyak_only=(),
    # The bias correction of the second moment takes a square root of a number, which the flat
    # kernel's scalar program cannot compute as Python does: the default step runs the loop.
    flat=False,
    # float32, 20 steps: within 2.4e-7 measured (one or two units in the last place).
    cross_checks=[
        CrossCheck(
            "optimi:Adan",
            [
                (
                    {"lr": 0.01, "weight_decay": 0.1},
                    {"lr": 0.01, "weight_decay": 0.1, "eps": 1e-8, "foreach": False},
                ),
                (
                    {"lr": 0.01, "betas": (0.9, 0.9, 0.999), "eps": 1e-6},
                    {"lr": 0.01, "betas": (0.9, 0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0},
                ),
            ],
            atol=1e-6,
            steps=20,
        )
    ],
)
