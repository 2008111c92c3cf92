"""Functional counterparts for torch.distributed: ``as_functional_optim``,
``DistributedDataParallel._register_fused_optim`` and
``ZeroRedundancyOptimizer(overlap_with_ddp=True)`` run polyak's optimizers, computing what they
compute with torch.optim's (over two gloo ranks for the last two)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same, make_params, params_for, run_ranks, twin
from registry import REGISTRY, Entry, ids
from torch import nn

import polyak
from polyak.functional import FunctionalOptimizer

with warnings.catch_warnings():
    # torch scripts its own functional optimizers when the module loads, and TorchScript says
    # it is deprecated.
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.distributed.optim.utils import as_functional_optim, functional_optim_map

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: Arguments torch's functional optimizers take, by class name.
TORCH_FUNCTIONAL = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "Adam": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adadelta": {"lr": 0.5, "weight_decay": 0.1},
    "Rprop": {"lr": 0.01},
    "Adamax": {"lr": 0.01, "weight_decay": 0.1},
}


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_every_optimizer_has_a_functional_counterpart(entry: Entry) -> None:
    made = functional_optim_map[entry.cls]
    assert issubclass(made, FunctionalOptimizer)
    assert made.optimizer_class is entry.cls
    assert isinstance(as_functional_optim(entry.cls, **entry.stateful), made)


def test_subclasses_get_one_when_defined() -> None:
    class Halved(polyak.SGD):
        """SGD at half the learning rate."""

    assert functional_optim_map[Halved].optimizer_class is Halved


def test_registered_when_the_map_is_imported_after_polyak() -> None:
    code = (
        "import sys, polyak\n"
        "assert 'torch.distributed.optim.utils' not in sys.modules\n"
        "from torch.distributed.optim.utils import functional_optim_map as m\n"
        "assert m[polyak.AdamW].optimizer_class is polyak.AdamW\n"
        "assert m[polyak.NAdam].optimizer_class is polyak.NAdam\n"
    )
    env = {**os.environ, "POLYAK_NATIVE": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("name", list(TORCH_FUNCTIONAL))
def test_steps_match_torch_functional(name: str) -> None:
    """``step(gradients)`` and ``step_param`` compute what torch's functional optimizers do."""
    kwargs = TORCH_FUNCTIONAL[name]
    ours_params = make_params()
    theirs_params = twin(ours_params)
    ours = functional_optim_map[getattr(polyak, name)](ours_params, **kwargs)
    theirs = functional_optim_map[getattr(torch.optim, name)](theirs_params, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ours_params]
        ours.step(grads)
        theirs.step([g.clone() for g in grads])
    assert_same(ours_params, theirs_params)
    if hasattr(theirs, "step_param"):
        for p, q in zip(ours_params, theirs_params, strict=True):
            g = torch.randn(p.shape, generator=gen)
            ours.step_param(p, g)
            theirs.step_param(q, g.clone())
        assert_same(ours_params, theirs_params)
    assert all(p.grad is None for p in ours_params)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if not e.step_closure], ids=ids)
def test_steps_match_the_optimizer(entry: Entry) -> None:
    """A functional step equals a step of the optimizer itself with the same gradients; a None
    gradient leaves its parameter alone, as a parameter without ``.grad`` is left."""
    params = params_for(entry)
    reference = twin(params)
    made = functional_optim_map[entry.cls](params, **entry.stateful)
    opt = entry.cls(reference, **entry.stateful)
    gen = torch.Generator().manual_seed(2)
    for i in range(3):
        grads: list[torch.Tensor | None] = []
        for j, p in enumerate(reference):
            g = torch.randn(p.shape, generator=gen)
            if entry.sparse_grads:
                g = g.to_sparse()
            grads.append(None if j == i else g)
            p.grad = None if j == i else g.clone()
        made.step(grads)
        opt.step()
    assert_same(params, reference)
    for p, q in zip(params, reference, strict=True):
        assert_same(dict(made.state[p]), dict(opt.state[q]))


def test_hyperparameters_are_read_at_each_step() -> None:
    """A change to ``param_group`` (ZeroRedundancyOptimizer copies its groups into it) applies
    to the next step, of ``step`` and of ``step_param`` alike."""
    params = make_params([(4,)])
    made = functional_optim_map[polyak.SGD](params, lr=0.1)
    made.param_group["lr"] = 0.0
    before = params[0].detach().clone()
    made.step([torch.ones(4)])
    made.step_param(params[0], torch.ones(4))
    assert torch.equal(params[0], before)


def test_errors_as_torch_functional() -> None:
    with pytest.raises(ValueError, match=r"^optimizer got an empty parameter list$"):
        functional_optim_map[polyak.Adam]([], lr=0.1)
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -0\.1$"):
        functional_optim_map[polyak.Adam]([], lr=-0.1, _allow_empty_param_list=True)
    params = make_params()
    made = functional_optim_map[polyak.Adam](params, lr=0.1)
    with pytest.raises(ValueError, match="does not equal to the size of the parameters"):
        made.step([None])
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"^Invalid gradient for a parameter of shape \(3, 4\)"):
        made.step_param(params[0], torch.ones(4, 3))
    with pytest.raises(RuntimeError, match="float64"):
        made.step([torch.ones_like(params[0]), torch.ones(5, dtype=torch.float64), None])
    assert_same(params, before)
    assert not made.state


# -------------------------------------------------------------- two gloo ranks, overlapped


def _gloo_available() -> bool:
    return dist.is_available() and bool(dist.is_gloo_available())


STEPS = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _train(ddp: nn.Module, rank: int, step: Any = None) -> None:
    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(STEPS):
        x = torch.randn(4, 6, generator=gen)
        ddp(x).pow(2).sum().backward()
        if step is not None:
            step()


def _overlap_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import ddp_zero_hook
    from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=30))
    try:
        results: dict[str, Any] = {}
        for label, cls in (("polyak", polyak.AdamW), ("torch", torch.optim.AdamW)):
            # DDP steps each parameter in its communication hook.
            model = _model()
            ddp = DistributedDataParallel(model)
            ddp._register_fused_optim(cls, lr=0.01, weight_decay=0.1)
            _train(ddp, rank)
            results[f"fused-{label}"] = [p.detach().clone() for p in model.parameters()]
            # ZeRO shards the state and steps each rank's shard in the hook.
            model = _model()
            ddp = DistributedDataParallel(model, bucket_cap_mb=1e-4)
            zero = ZeroRedundancyOptimizer(
                ddp.parameters(), optimizer_class=cls, overlap_with_ddp=True, lr=0.01
            )
            # torch refuses gloo here for fear of hangs (pytorch/pytorch#62300); these few
            # steps of a small model run, and the test has a deadline.
            real_backend = ddp_zero_hook.dist.get_backend
            ddp_zero_hook.dist.get_backend = lambda *a: "nccl"
            try:
                ddp.register_comm_hook(None, hook_with_zero_step(allreduce_hook, ddp, zero))
            finally:
                ddp_zero_hook.dist.get_backend = real_backend
            _train(ddp, rank, zero.step)
            results[f"zero-{label}"] = [p.detach().clone() for p in model.parameters()]
            results[f"zero-{label}-local"] = type(zero.optim).__name__
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is unavailable")
def test_ddp_fused_optim_and_zero_overlap_gloo(tmp_path: Path) -> None:
    world_size = 2
    run_ranks(_overlap_worker, world_size, str(tmp_path), 90)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    start = [p.detach() for p in _model().parameters()]
    for res in ranks:
        assert res["zero-polyak-local"] == "FunctionalAdamW"
        for kind in ("fused", "zero"):
            assert_same(res[f"{kind}-polyak"], res[f"{kind}-torch"])
            assert_same(res[f"{kind}-polyak"], ranks[0][f"{kind}-polyak"])
            assert not torch.equal(res[f"{kind}-polyak"][0], start[0])
