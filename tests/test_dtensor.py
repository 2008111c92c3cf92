"""Distributed tensors (DTensor, as FSDP2 shards parameters): the flat kernel updates each
rank's local data, with torch's numbers, and the state stays distributed as torch makes it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same, clone_kwargs, has_tensor
from registry import DENSE, Entry

from polyak.strategies import flat

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)
#: The tests of the flat kernel's steps of local data; the others run without it too.
needs_kernel = pytest.mark.skipif(
    flat.kernel(wait=True) is None, reason="the flat kernel is unavailable"
)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    """A one-rank mesh in this process."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _params(mesh: Any, placement: Any, seed: int = 0) -> list[torch.Tensor]:
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 6), (10,), (4, 3, 2)]
    return [
        torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, [placement]))
        for s in shapes
    ]


def _step(opt: Any, params: list[torch.Tensor], mesh: Any, placement: Any, seed: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    for p in params:
        grad = torch.randn(p.shape, generator=gen)
        p.grad = distribute_tensor(grad, mesh, [placement])
    opt.step()


def _cases() -> list[Any]:
    return [
        pytest.param(entry, config, id=f"{entry.cls.__name__}-{i}")
        for entry in DENSE
        if entry.flat
        for i, config in enumerate(entry.configs)
        if not has_tensor(config) and not config.get("differentiable")
    ]


def _versions(opt: Any, params: list[torch.Tensor]) -> list[int]:
    """The version counters of the parameters and their state tensors, as autograd sees them."""
    versions = [p._version for p in params]
    for p in params:
        state = opt.state.get(p, {})
        versions += [state[k]._version for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    return versions


def _ran_flat(opt: Any) -> bool:
    entries = flat.entries(opt)
    return any(e.plan is not None and e.local is not None for e in entries)


@needs_kernel
@pytest.mark.parametrize(("entry", "config"), _cases())
@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
def test_local_data_runs_flat_with_torchs_numbers(
    mesh: Any, entry: Entry, config: dict[str, Any], fused: bool
) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if fused and not entry.fused:
        pytest.skip("torch has no fused step for it")
    extra = {"fused": True} if fused else {}
    # torch's fused kernels take no DTensor for some optimizers (SGD): the fused step is
    # compared with torch's default one, within the rounding the fused kernels differ by.
    for placement in (Shard(0), Replicate()):
        params = _params(mesh, placement)
        ref_params = _params(mesh, placement)
        opt = entry.cls(params, **clone_kwargs({**config, **extra}))
        ref = entry.reference(ref_params, **clone_kwargs(config))
        for seed in range(4):
            before = _versions(opt, params), _versions(ref, ref_params)
            _step(opt, params, mesh, placement, seed)
            try:
                _step(ref, ref_params, mesh, placement, seed)
            except RuntimeError as error:
                # Rprop's per-tensor path indexes in place, which sharded DTensors refuse.
                assert "placement" in str(error)
                pytest.skip(f"torch's own step fails on {placement}")
        assert _ran_flat(opt)
        # The distributed tensors' version counters advance, as torch's in-place operations
        # on them advance them, for the tensors torch writes.
        ours = [a != b for a, b in zip(before[0], _versions(opt, params), strict=True)]
        theirs = [a != b for a, b in zip(before[1], _versions(ref, ref_params), strict=True)]
        assert ours == theirs
        atol = entry.fused_tolerances[torch.float32] if fused else 0.0
        assert_same([p.full_tensor() for p in params], [p.full_tensor() for p in ref_params], atol)
        for p, q in zip(params, ref_params, strict=True):
            ours, theirs = opt.state[p], ref.state[q]
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                assert type(ours[key]) is type(value), key
                if isinstance(value, DTensor):
                    assert ours[key].placements == value.placements
                    assert_same(ours[key].full_tensor(), value.full_tensor(), atol)


def test_gradients_placed_unlike_their_parameters_take_the_reference_path(mesh: Any) -> None:
    """A gradient replicated where its parameter is sharded is redistributed, as torch does."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import polyak

    results = []
    for cls in (polyak.Adam, torch.optim.Adam):
        params = _params(mesh, Shard(0))
        opt = cls(params, lr=0.01)
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, [Replicate()])
            opt.step()
        results.append([p.full_tensor() for p in params])
    assert_same(results[0], results[1])


def _adafactor_configs() -> list[Any]:
    from registry import REGISTRY

    (entry,) = [e for e in REGISTRY if e.cls.__name__ == "Adafactor"]
    return [pytest.param(config, id=str(i)) for i, config in enumerate(entry.configs)]


@pytest.mark.parametrize("config", _adafactor_configs())
@pytest.mark.parametrize("foreach", [None, True], ids=["per-tensor", "foreach"])
def test_adafactor_steps_distributed_parameters(
    mesh: Any, config: dict[str, Any], foreach: bool | None
) -> None:
    """Adafactor's factors are norms over a parameter's rows and columns: on a parameter sharded
    by rows (``Shard(0)``, as FSDP2 shards), the column norms are partial over the shards, and
    DTensor refuses the in-place operations that torch's step runs on them. polyak's step
    failed otherwise, on sharded and replicated parameters alike: it read its norms with
    ``tolist``, which no DTensor has. It now makes each partial reduction whole before going
    on, and steps distributed parameters with the numbers of its step of the full tensors,
    which are torch's; on replicated ones, where torch's step runs, its state is laid out as
    torch's."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    import polyak

    kwargs = {**config, "foreach": foreach}
    for placement in (Shard(0), Replicate()):
        params = _params(mesh, placement)
        full = [p.full_tensor().detach().clone().requires_grad_() for p in params]
        opt = polyak.Adafactor(params, **clone_kwargs(kwargs))
        ref = torch.optim.Adafactor(full, **clone_kwargs(kwargs))
        for seed in range(4):
            _step(opt, params, mesh, placement, seed)
            gen = torch.Generator().manual_seed(seed)
            for p in full:
                p.grad = torch.randn(p.shape, generator=gen)
            ref.step()
        assert_same([p.full_tensor() for p in params], [p.detach() for p in full])
        for p, q in zip(params, full, strict=True):
            ours, theirs = opt.state[p], ref.state[q]
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                mine = ours[key]
                assert_same(mine.full_tensor() if isinstance(mine, DTensor) else mine, value)
        if placement == Replicate():
            # torch's own step of the distributed parameters: the state's types and placements.
            twins = _params(mesh, placement)
            theirs_distributed = torch.optim.Adafactor(twins, **clone_kwargs(kwargs))
            _step(theirs_distributed, twins, mesh, placement, 0)
            for p, q in zip(params, twins, strict=True):
                for key, value in theirs_distributed.state[q].items():
                    assert type(opt.state[p][key]) is type(value), key
                    if isinstance(value, DTensor):
                        assert opt.state[p][key].placements == value.placements, key


#: Shapes of the two-rank test: matrices and vectors whose sharded dimension (the first) is
#: split unevenly, or smaller than the mesh, and matrices of a single row or column.
_RANK_SHAPES = [(8, 6), (10,), (4, 3, 2), (3, 5), (7, 1), (1, 7), (1, 1), (1, 3, 4), (5, 1, 4)]


def _adafactor_ranks_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: Adafactor steps of parameters sharded by rows, or replicated, over the ranks,
    and of the same parameters whole; rank 0 saves both."""
    import os
    from datetime import timedelta
    from pathlib import Path

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import polyak

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        results = {}
        for foreach in (None, True):
            for placement in (Shard(0), Replicate()):
                gen = torch.Generator().manual_seed(0)
                values = [torch.randn(s, generator=gen) for s in _RANK_SHAPES]
                params = [
                    torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [placement]))
                    for v in values
                ]
                whole = [v.clone().requires_grad_() for v in values]
                kwargs = {"lr": 0.01, "weight_decay": 0.1, "foreach": foreach}
                opt = polyak.Adafactor(params, **kwargs)
                ref = polyak.Adafactor(whole, **kwargs)
                for seed in range(3):
                    gen = torch.Generator().manual_seed(seed)
                    for p, q in zip(params, whole, strict=True):
                        g = torch.randn(q.shape, generator=gen)
                        p.grad = distribute_tensor(g.clone(), mesh, [placement])
                        q.grad = g
                    opt.step()
                    ref.step()
                layout = "replicated" if placement.is_replicate() else "sharded"
                results[f"{foreach}-{layout}"] = (
                    [p.full_tensor() for p in params],
                    [q.detach() for q in whole],
                )
        if rank == 0:
            torch.save(results, Path(out_dir) / "adafactor.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_adafactor_steps_parameters_sharded_over_two_ranks(tmp_path: Any) -> None:
    """Over two ranks, where the norms and means over a sharded dimension are reduced across
    them: sharded parameters step to those of the step of the whole tensors, within the
    rounding in which a sum over two shards differs from the sum over the whole; replicated
    ones to them exactly."""
    from conftest import run_ranks

    run_ranks(_adafactor_ranks_worker, 2, str(tmp_path), 120)
    results = torch.load(tmp_path / "adafactor.pt")
    assert len(results) == 4
    for name, (ours, whole) in results.items():
        atol = 0.0 if name.endswith("replicated") else 1e-6
        assert_same(ours, whole, atol)
