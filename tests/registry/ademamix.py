"""AdEMAMix against pytorch-optimizer 4.1.0's, and within rounding of bitsandbytes' 32-bit
AdEMAMix, whose own schedules (``t_alpha``, ``t_beta3``, as Hugging Face passes them)
pytorch-optimizer lacks: configurations with them are compared with bitsandbytes only.

pytorch-optimizer raises its ``NegativeLRError`` (an Exception, not a ValueError) for a
negative ``lr``, and bitsandbytes a ValueError, which polyak raises: a refusal of polyak's,
not compared with pytorch-optimizer's."""

from __future__ import annotations

import polyak

from ._entry import CrossCheck, Entry, ErrorCase

ENTRY = Entry(
    cls=polyak.AdEMAMix,
    reference="pytorch_optimizer:AdEMAMix",
    configs=[
        {},
        {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True},
        {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True, "fixed_decay": True},
        {"lr": 0.01, "betas": (0.9, 0.99, 0.999), "alpha": 8.0, "t_alpha_beta3": 10, "eps": 1e-6},
    ],
    errors=[
        ErrorCase({"betas": (1.0, 0.999, 0.9999)}, ValueError, r"^beta1 must be in the range"),
        ErrorCase({"betas": (0.9, 0.999, 1.5)}, ValueError, r"^beta3 must be in the range"),
        ErrorCase({"alpha": -1.0}, ValueError, r"^alpha must be non-negative$"),
        ErrorCase({"t_alpha_beta3": -1}, ValueError, r"^t_alpha_beta3 must be non-negative$"),
        ErrorCase({"weight_decay": -0.1}, ValueError, r"^weight_decay must be non-negative$"),
        ErrorCase({"eps": -1e-8}, ValueError, r"^eps must be non-negative$"),
    ],
    refusals=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"t_beta3": -1}, ValueError, r"^t_beta3 must be non-negative$"),
        ErrorCase({"cautious": True}, ValueError, r"^Invalid cautious value: True"),
        ErrorCase({"stable_adamw": True}, ValueError, r"^Invalid stable_adamw value: True"),
        ErrorCase({"nesterov": True}, TypeError, r"unexpected keyword arguments: \['nesterov'\]"),
    ],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    polyak_only=(),
    supports_complex=False,
    # The bias correction takes a square root of a number, which the flat kernel's scalar
    # program cannot compute as Python does: the default step runs the loop.
    flat=False,
    # float32, 20 steps: within 2.4e-7 measured (bitsandbytes orders the operations otherwise).
    cross_checks=[
        CrossCheck(
            "bitsandbytes.optim:AdEMAMix",
            [
                ({"lr": 0.01}, {"lr": 0.01, "weight_decay": 0.0}),
                (
                    {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True},
                    {"lr": 0.01, "weight_decay": 0.1},
                ),
                (
                    {"lr": 0.01, "t_alpha": 10, "t_beta3": 15, "alpha": 6.0},
                    {"lr": 0.01, "t_alpha": 10, "t_beta3": 15, "alpha": 6.0, "weight_decay": 0.0},
                ),
            ],
            atol=1e-6,
            steps=20,
        )
    ],
)
