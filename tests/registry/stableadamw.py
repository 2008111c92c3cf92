"""StableAdamW against torch-optimi 0.3.3's, on both its paths: its for-loop path (its default
on the CPU, where it has no Triton kernel to run) and its foreach path, which compute the same
numbers.

optimi chooses its Triton kernels before it lists a group's parameters (it asks about an empty
list, which it finds all on a Triton device): where triton is installed its default step takes
them on the CPU, and fails. The tests give it the answer its check gives for CPU tensors."""

from __future__ import annotations

import importlib
from typing import Any

import polyak

from ._entry import Entry, ErrorCase


def _no_triton_on_the_cpu(monkeypatch: Any) -> None:
    try:
        # The module (``optimi.stableadamw`` names the function the package exports).
        module = importlib.import_module("optimi.stableadamw")
    except ImportError:
        return
    monkeypatch.setattr(module, "_default_to_triton", lambda params: False)


ENTRY = Entry(
    cls=polyak.StableAdamW,
    reference="optimi:StableAdamW",
    configs=[
        {"lr": 0.01},
        {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-8},
        {"lr": 0.01, "weight_decay": 0.0},
        # optimi warns of a fully decoupled decay >= 1e-3.
        {"lr": 0.01, "weight_decay": 1e-4, "decouple_lr": True},
        {"lr": 0.01, "weight_decay": 1e-4, "decouple_lr": True, "max_lr": 0.02},
    ],
    errors=[
        ErrorCase({}, TypeError, r"missing 1 required positional argument: 'lr'"),
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: lr=-0\.1$"),
        ErrorCase({"lr": 0.01, "betas": (1.0, 0.99)}, ValueError, r"^Invalid beta1 parameter"),
        ErrorCase({"lr": 0.01, "betas": (0.9, -0.1)}, ValueError, r"^Invalid beta2 parameter"),
        ErrorCase({"lr": 0.01, "eps": -1.0}, ValueError, r"^Invalid epsilon: eps=-1\.0$"),
        ErrorCase({"lr": 0.01, "weight_decay": -1.0}, ValueError, r"^Invalid weight decay"),
        ErrorCase({"lr": 0.01, "max_lr": -1.0}, ValueError, r"^Invalid maximum learning rate"),
    ],
    refusals=[
        ErrorCase(
            {"lr": 0.01, "gradient_release": True},
            ValueError,
            r"^Invalid gradient_release value: True",
        ),
    ],
    stateful={"lr": 0.01, "weight_decay": 0.1},
    supports_complex=False,
    elementwise=False,
    polyak_only=(),
    # The RMS of each tensor's update is a reduction, which the flat kernel does not run.
    flat=False,
    setup=_no_triton_on_the_cpu,
)
