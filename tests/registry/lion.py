"""Lion against lion-pytorch 0.2.5, and bitsandbytes' 32-bit Lion."""

from __future__ import annotations

import polyak
from polyak.algorithms.lion import LionArgumentError

from ._entry import CrossCheck, Entry, ErrorCase

ENTRY = Entry(
    cls=polyak.Lion,
    reference="lion_pytorch:Lion",
    configs=[
        {},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "betas": (0.95, 0.98), "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"lr": 3e-3, "betas": (0.8, 0.9), "use_triton": False},
    ],
    # lion-pytorch asserts (AssertionError), bitsandbytes raises ValueError: Lion's error is
    # both.
    errors=[
        ErrorCase({"lr": 0.0}, AssertionError, r"^Invalid learning rate: 0\.0"),
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1"),
        ErrorCase({"betas": (1.5, 0.9)}, LionArgumentError, r"^Invalid beta parameter at index 0"),
        ErrorCase({"betas": (0.9, -0.1)}, AssertionError, r"^Invalid beta parameter at index 1"),
    ],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    supports_complex=False,
    lr_zero_is_identity=False,
    polyak_only=(),
    # bitsandbytes computes lion-pytorch's numbers, in float32, on its state ``state1``.
    cross_checks=[
        CrossCheck(
            "bitsandbytes.optim:Lion",
            [
                ({"lr": 0.01}, {"lr": 0.01}),
                (
                    {"lr": 0.01, "betas": (0.95, 0.98), "weight_decay": 0.1},
                    {"lr": 0.01, "betas": (0.95, 0.98), "weight_decay": 0.1, "optim_bits": 32},
                ),
            ],
        )
    ],
)
