"""SGDScheduleFree against schedulefree 1.4.1's, in train mode: its default foreach path and,
as a second reference, its per-tensor path (``foreach=False``), which compute the same numbers
on the CPU."""

from __future__ import annotations

import polyak

from ._entry import CrossCheck, Entry, ErrorCase
from ._schedulefree import in_train_mode

_REFERENCE = "schedulefree:SGDScheduleFree"

ENTRY = Entry(
    cls=polyak.SGDScheduleFree,
    reference=_REFERENCE,
    configs=[
        {},
        {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.1, "warmup_steps": 3},
        {"lr": 0.5, "r": 1.0, "weight_lr_power": 0.0},
    ],
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
        ErrorCase({"momentum": 0.0}, ValueError, r"^Momentum must be between 0 and 1 exclusive"),
        ErrorCase({"momentum": 1.0}, ValueError, r"^Momentum must be between 0 and 1 exclusive"),
    ],
    stateful={"lr": 0.1, "weight_decay": 0.1},
    supports_complex=False,
    # schedulefree's default foreach=True, which its checkpoints record; polyak's None lets it
    # choose (the flat kernel).
    polyak_only=("foreach",),
    cross_checks=[
        CrossCheck(_REFERENCE, [({"weight_decay": 0.1}, {"weight_decay": 0.1, "foreach": False})])
    ],
    setup=in_train_mode("polyak:SGDScheduleFree", _REFERENCE),
)
