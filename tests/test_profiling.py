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
