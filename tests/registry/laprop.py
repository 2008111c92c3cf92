"""LaProp against heavyball 3.2.1's, run eagerly, in float32.

heavyball keeps its state in float32 (its ``storage_dtype``) also for float64 parameters,
whose state here has their dtype: float64 is compared with nothing. Its state is nested per
transform, in a layout torch's checkpoints do not hold: checkpoints do not interchange.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import polyak

from ._entry import Entry, ErrorCase


def eager(*args: Any, **kwargs: Any) -> Any:
    """heavyball's LaProp with its compilation turned off, as polyak's is compared with."""
    heavyball = pytest.importorskip("heavyball")
    heavyball.utils.compile_mode = None
    return heavyball.LaProp(*args, **kwargs)


ENTRY = Entry(
    cls=polyak.LaProp,
    reference="registry.laprop:eager",
    configs=[
        {},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "betas": (0.95, 0.999), "warmup_steps": 4, "eps": 1e-3},
        {"lr": 0.01, "weight_decay": 0.1, "cautious_weight_decay": True},
        {"lr": 0.01, "caution": True},
    ],
    errors=[ErrorCase({"foo": 1}, TypeError, r"^unknown keyword arguments: \['foo'\]$")],
    refusals=[
        ErrorCase({"mars": True}, ValueError, r"^Invalid mars value: True"),
        ErrorCase({"storage_dtype": "bfloat16"}, ValueError, r"^Invalid storage_dtype value"),
        ErrorCase({"gradient_clipping": "l2_clip_"}, ValueError, r"^Invalid gradient_clipping"),
        ErrorCase({"palm": True}, ValueError, r"^Invalid palm value: True"),
    ],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    dtypes=(torch.float32,),
    polyak_only=(),
    interchange=False,
    supports_complex=False,
    # The step's numbers are float32 tensor arithmetic (expm1, log1p) that the flat kernel's
    # scalar program cannot follow: the default step runs the loop.
    flat=False,
)
