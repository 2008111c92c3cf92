"""Memory tools see polyak's optimizer state as they see torch.optim's: torch.profiler's memory
timeline (``Category.OPTIMIZER_STATE``) and ``MemTracker`` (``Optstate``), for a small MLP."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category

import polyak


def _setup(optimizer_cls: Any) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = optimizer_cls(model.parameters(), lr=0.01, weight_decay=0.1)
    x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))

    def train() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return model, opt, train


def _optimizer_state_in_timeline(optimizer_cls: Any, warm_up: int, tmp_path: Path) -> int:
    """The most bytes the memory timeline files as optimizer state over two steps, after
    ``warm_up`` steps taken before the profiler starts."""
    _, _, train = _setup(optimizer_cls)
    for _ in range(warm_up):
        train()
    with warnings.catch_warnings():
        # Memory allocated before the profiler started has no known size to it.
        warnings.simplefilter("ignore")
        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            for _ in range(2):
                train()
        path = tmp_path / f"{optimizer_cls.__module__}-{warm_up}.json"
        prof.export_memory_timeline(str(path), device="cpu")
    _, sizes = json.loads(path.read_text())
    column = _CATEGORY_TO_INDEX[Category.OPTIMIZER_STATE] + 1
    return max(row[column] for row in sizes)


@pytest.mark.parametrize("warm_up", [0, 1], ids=["state-made-in-profile", "state-made-before"])
def test_memory_timeline_shows_optimizer_state(warm_up: int, tmp_path: Path) -> None:
    theirs = _optimizer_state_in_timeline(torch.optim.AdamW, warm_up, tmp_path)
    ours = _optimizer_state_in_timeline(polyak.AdamW, warm_up, tmp_path)
    # exp_avg and exp_avg_sq of every parameter, and the step counters.
    assert theirs > 2 * 4 * (32 * 32 + 32 + 32 * 10 + 10)
    assert ours == theirs


@pytest.mark.parametrize("warm_up", [0, 1], ids=["state-made-tracked", "state-made-before"])
def test_mem_tracker_shows_optimizer_state(warm_up: int) -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    def current(optimizer_cls: Any) -> dict[str, int]:
        model, opt, train = _setup(optimizer_cls)
        for _ in range(warm_up):
            train()
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            train()
        snapshot = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        return {str(kind): size for kind, size in snapshot.items()}

    theirs, ours = current(torch.optim.AdamW), current(polyak.AdamW)
    opt_key = next(k for k in theirs if k.endswith("OPT"))
    assert theirs[opt_key] > 0
    assert ours == theirs


def _tracked_steps(optimizer_cls: Any, config: dict[str, Any]) -> tuple[list[Any], dict[str, int]]:
    """MemTracker's bytes by category after each of three steps of a small MLP taken inside
    it, the first making the state, and its peak over them."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def by_category(snapshot: dict[Any, int]) -> dict[str, int]:
        return {str(kind): size for kind, size in snapshot.items()}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = optimizer_cls(model.parameters(), **config)
    x = torch.randn(8, 16)
    after_steps = []
    with MemTracker() as tracker:
        tracker.track_external(model, opt)
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
            after_steps.append(by_category(tracker.get_tracker_snapshot()[torch.device("cpu")]))
            opt.zero_grad()
            tracker.reset_mod_stats()
        peak = by_category(tracker.get_tracker_snapshot("peak")[torch.device("cpu")])
    return after_steps, peak


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("Adam", {"lr": 1e-3}),
        ("AdamW", {"lr": 1e-3, "weight_decay": 0.1}),
        ("SGD", {"lr": 0.1, "momentum": 0.9}),
        ("Adam", {"lr": torch.tensor(1e-3)}),
    ],
    ids=["Adam", "AdamW", "SGD-momentum", "Adam-tensor-lr"],
)
def test_mem_tracker_counts_steps_as_torchs(name: str, config: dict[str, Any]) -> None:
    """MemTracker files what a step allocates while it runs as optimizer state. polyak's step
    also made what torch's does not: stand-ins to rehearse its first step on, the flat kernel's
    programs and probes, cached operands; MemTracker filed them as optimizer state, the
    programs and operands still held after the step. Under a dispatch mode polyak now steps
    by torch's operations, and rehearses unseen: after every step each category holds
    torch's bytes, and no step's peak exceeds torch's."""
    theirs, their_peak = _tracked_steps(getattr(torch.optim, name), config)
    ours, our_peak = _tracked_steps(getattr(polyak, name), config)
    opt_key = next(k for k in theirs[0] if k.endswith("OPT"))
    assert theirs[0][opt_key] > 0
    assert ours == theirs
    assert our_peak[opt_key] <= their_peak[opt_key], (our_peak, their_peak)
    assert our_peak["Total"] <= their_peak["Total"], (our_peak, their_peak)
