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

from polyak.strategies import _native

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo is unavailable",
    ),
    pytest.mark.skipif(_native.load(wait=True) is None, reason="the flat kernel is unavailable"),
]


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
    entries = opt.__dict__.get("_flat_entries", {}).values()
    return any(e.plan is not None and e.local is not None for e in entries)


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
