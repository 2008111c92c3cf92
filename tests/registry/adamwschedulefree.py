"""AdamWScheduleFree against schedulefree 1.4.1's, in train mode: its default foreach path and,
as a second reference, its per-tensor path (``foreach=False``), which compute the same numbers
on the CPU. schedulefree checks none of its arguments: there are no errors to compare."""

from __future__ import annotations

import polyak

from ._entry import CrossCheck, Entry
from ._schedulefree import in_train_mode

_REFERENCE = "schedulefree:AdamWScheduleFree"

ENTRY = Entry(
    cls=polyak.AdamWScheduleFree,
    reference=_REFERENCE,
    configs=[
        {},
        {"lr": 0.01, "weight_decay": 0.1, "warmup_steps": 3},
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "r": 1.0, "weight_lr_power": 1.0},
    ],
    errors=[],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    supports_complex=False,
    # schedulefree's default foreach=True, which its checkpoints record; polyak's None lets it
    # choose (the flat kernel).
    polyak_only=("foreach",),
    cross_checks=[
        CrossCheck(
            _REFERENCE,
            [
                ({}, {"foreach": False}),
                (
                    {"lr": 0.01, "weight_decay": 0.1},
                    {"lr": 0.01, "weight_decay": 0.1, "foreach": False},
                ),
            ],
        )
    ],
    setup=in_train_mode("polyak:AdamWScheduleFree", _REFERENCE),
)
