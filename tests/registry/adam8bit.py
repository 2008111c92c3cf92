"""Adam8bit against bitsandbytes 0.50.2's Adam8bit: AdamW8bit's entry (the same rule, with no
decay by default)."""

from __future__ import annotations

import dataclasses

import polyak

from .adamw8bit import ENTRY as ADAMW8BIT

ENTRY = dataclasses.replace(ADAMW8BIT, cls=polyak.Adam8bit, reference="bitsandbytes.optim:Adam8bit")
