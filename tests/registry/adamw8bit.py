"""AdamW8bit against bitsandbytes 0.50.2's AdamW8bit."""

from __future__ import annotations

import torch

import polyak

from ._bnb import reference_rounding
from ._entry import Entry, ErrorCase

ENTRY = Entry(
    cls=polyak.AdamW8bit,
    reference="bitsandbytes.optim:AdamW8bit",
    configs=[
        {},
        {"lr": 0.01, "min_8bit_size": 256},
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "min_8bit_size": 256},
        {"weight_decay": 0.0, "min_8bit_size": 0},
    ],
    errors=[
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1"),
        ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value"),
        ErrorCase({"betas": (1.0, 0.9)}, ValueError, r"^Invalid beta parameter at index 0"),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value"),
        ErrorCase({"amsgrad": True}, ValueError, r"does not support amsgrad=True"),
        ErrorCase({"optim_bits": 8}, ValueError, r"only supports optim_bits=32"),
    ],
    stateful={"lr": 0.01, "min_8bit_size": 256},
    supports_complex=False,
    lr_zero_is_identity=False,
    dtypes=(torch.float32,),
    polyak_only=(),
    flat=False,
    # bitsandbytes' native CPU library, which quantizes its steps here, searches the codes
    # approximately (about one element in 700 takes another code than its reference rounding,
    # see docs/design.md): the reference runs with its reference rounding, which polyak follows.
    setup=reference_rounding,
)
