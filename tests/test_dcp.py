"""Distributed checkpoints: torch.distributed.checkpoint's state_dict API, save and load, in one
process and across two gloo ranks under FSDP2, each against torch.optim doing the same."""

from __future__ import annotations

import copy
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as torch_mp
from conftest import assert_same
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

import polyak
from polyak.strategies import flat

pytestmark = pytest.mark.filterwarnings(
    # DCP without a process group says it assumes one process, which is the case here.
    "ignore:torch.distributed is disabled:UserWarning"
)

#: (name, polyak class, torch.optim class, arguments)
PAIRS: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("AdamW", polyak.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    ("SGD", polyak.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
]
OPTIONS = {
    "default": StateDictOptions(),
    "full_state_dict": StateDictOptions(full_state_dict=True),
    "cpu_offload": StateDictOptions(cpu_offload=True),
    "flatten": StateDictOptions(flatten_optimizer_state_dict=True),
}


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _train(model: nn.Module, opt: Any, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


def _full(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters as whole tensors (gathered where they are sharded)."""
    out = []
    for p in model.parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out.append(t.clone())
    return out


# ------------------------------------------------------------------------- one process


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize(("name", "cls", "ref_cls", "kwargs"), PAIRS, ids=[p[0] for p in PAIRS])
def test_state_dict_api_round_trip_as_torch(
    name: str, cls: Any, ref_cls: Any, kwargs: dict[str, Any], option: str
) -> None:
    options = OPTIONS[option]
    results = {}
    for which, opt_cls in (("polyak", cls), ("torch", ref_cls)):
        model = _model()
        opt = opt_cls(model.parameters(), **kwargs)
        _train(model, opt, 3, seed=1)
        saved = get_optimizer_state_dict(model, opt, options=options)
        resumed = _model(seed=5)
        resumed.load_state_dict(model.state_dict())
        resumed_opt = opt_cls(resumed.parameters(), **kwargs)
        set_optimizer_state_dict(resumed, resumed_opt, copy.deepcopy(saved), options=options)
        _train(resumed, resumed_opt, 2, seed=2)
        results[which] = (saved, _full(resumed), resumed_opt.state_dict())
    assert_same(results["polyak"], results["torch"])


def _save(model: nn.Module, opt: Any, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def _load(model: nn.Module, opt: Any, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _resume_in_one_process(cls: Any, kwargs: dict[str, Any], path: Path) -> Any:
    model = _model(seed=5)  # other weights: everything must come from the checkpoint
    opt = cls(model.parameters(), **kwargs)
    _load(model, opt, path)
    _train(model, opt, 2, seed=2)
    return _full(model), opt.state_dict()


@pytest.mark.parametrize(("name", "cls", "ref_cls", "kwargs"), PAIRS, ids=[p[0] for p in PAIRS])
def test_dcp_save_and_load_in_one_process(
    name: str, cls: Any, ref_cls: Any, kwargs: dict[str, Any], tmp_path: Path
) -> None:
    for which, opt_cls in (("polyak", cls), ("torch", ref_cls)):
        model = _model()
        opt = opt_cls(model.parameters(), **kwargs)
        _train(model, opt, 3, seed=1)
        _save(model, opt, tmp_path / which)
    expected = _resume_in_one_process(ref_cls, kwargs, tmp_path / "torch")
    for source in ("polyak", "torch"):
        assert_same(_resume_in_one_process(cls, kwargs, tmp_path / source), expected)
    assert_same(_resume_in_one_process(ref_cls, kwargs, tmp_path / "polyak"), expected)


# ----------------------------------------------------------------- two ranks under FSDP2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sharded(seed: int = 0) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: resume each optimizer from a one-process checkpoint and write the full state it
    reaches; and train each from scratch and save a two-rank checkpoint."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    out = Path(out_dir)
    try:
        for name, cls, ref_cls, kwargs in PAIRS:
            for which, opt_cls in (("polyak", cls), ("torch", ref_cls)):
                model = _sharded(seed=5)
                opt = opt_cls(model.parameters(), **kwargs)
                _load(model, opt, out / f"one-{name}-{which}")
                _train(model, opt, 2, seed=2)
                full = get_state_dict(
                    model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
                )
                if rank == 0:
                    torch.save(full, out / f"resumed-{name}-{which}.pt")

                model = _sharded()
                opt = opt_cls(model.parameters(), **kwargs)
                _train(model, opt, 3, seed=1)
                _save(model, opt, out / f"two-{name}-{which}")
                if which == "polyak" and rank == 0:
                    # Whether the flat kernel updated the shards (their local data).
                    entries = flat.entries(opt)
                    ran = any(e.plan is not None and e.local is not None for e in entries)
                    (out / f"flat-{name}").write_text(str(ran))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _gloo_available() -> bool:
    try:
        return bool(dist.is_available() and dist.is_gloo_available())
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is unavailable")
def test_fsdp2_checkpoints_move_between_one_and_two_ranks(tmp_path: Path) -> None:
    for name, cls, ref_cls, kwargs in PAIRS:
        for which, opt_cls in (("polyak", cls), ("torch", ref_cls)):
            model = _model()
            opt = opt_cls(model.parameters(), **kwargs)
            _train(model, opt, 3, seed=1)
            _save(model, opt, tmp_path / f"one-{name}-{which}")

    world_size = 2
    ctx = torch_mp.spawn(
        _fsdp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("FSDP workers did not finish within 180 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()

    for name, cls, ref_cls, kwargs in PAIRS:
        assert (tmp_path / f"flat-{name}").read_text() == "True"
        # Saved on one rank, loaded on two.
        mine = torch.load(tmp_path / f"resumed-{name}-polyak.pt", weights_only=True)
        theirs = torch.load(tmp_path / f"resumed-{name}-torch.pt", weights_only=True)
        assert_same(mine, theirs)
        assert len(theirs[1]["state"]) == 4  # the whole optimizer state, gathered
        # Saved on two ranks, loaded on one; torch.optim loads polyak's checkpoint too.
        expected = _resume_in_one_process(ref_cls, kwargs, tmp_path / f"two-{name}-torch")
        got = _resume_in_one_process(cls, kwargs, tmp_path / f"two-{name}-polyak")
        assert_same(got, expected)
        crossed = _resume_in_one_process(ref_cls, kwargs, tmp_path / f"two-{name}-polyak")
        assert_same(crossed, expected)
