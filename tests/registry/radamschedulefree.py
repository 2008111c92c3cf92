"""RAdamScheduleFree against schedulefree 1.4.1's, in train mode: its default foreach path and,
as a second reference, its per-tensor path (``foreach=False``), which compute the same numbers
on the CPU. Six steps take β_2 = 0.999 past its silent first steps (ρ_t > 4 from the fifth).
schedulefree checks none of its arguments: there are no errors to compare."""

from __future__ import annotations

import polyak

from ._entry import CrossCheck, Entry
from ._schedulefree import in_train_mode

_REFERENCE = "schedulefree:RAdamScheduleFree"

ENTRY = Entry(
    cls=polyak.RAdamScheduleFree,
    reference=_REFERENCE,
    configs=[
        {},
        {"lr": 0.01, "weight_decay": 0.1},
        {
            "lr": 0.01,
            "betas": (0.8, 0.99),
            "silent_sgd_phase": False,
            "weight_decay": 0.1,
            "r": 0.5,
        },
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
            [({"weight_decay": 0.1}, {"weight_decay": 0.1, "foreach": False})],
            steps=8,
        )
    ],
    setup=in_train_mode("polyak:RAdamScheduleFree", _REFERENCE),
)
