"""Parameters and state that share memory, and state given memory of another shape: torch's
behaviour on every strategy."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import torch
from conftest import as_matrix, assert_same, step
from registry import DENSE, Entry, ids, takes

FLAGS = [{}, {"foreach": False}, {"foreach": True}]
FLAG_IDS = ["default", "loop", "foreach"]


def _stateful(entry: Entry, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The entry's stateful configuration with ``flags``; skips strategy flags where the
    optimizer has one strategy only."""
    if flags and not takes(entry, "foreach"):
        pytest.skip("one strategy only")
    return {**entry.stateful, **(flags or {})}


def _shape(entry: Entry, *shape: int) -> tuple[int, ...]:
    return as_matrix(shape) if entry.matrices_only else shape


def _run(
    make: Any, build: Any, steps: int, seed: int = 0
) -> tuple[list[torch.Tensor], Any, list[torch.Tensor]]:
    """Build parameters, step them with fixed gradients, return them and the optimizer."""
    params, keep = build()
    opt = make(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        step(opt)
    return params, opt, keep


@pytest.mark.parametrize("entry", DENSE, ids=ids)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_parameters_over_one_storage_are_updated_in_turn(
    entry: Entry, flags: dict[str, Any]
) -> None:
    """Two Parameters over one storage, and overlapping views of one base."""

    def build() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(1)
        a = torch.randn(40, 30, generator=gen)
        base = torch.randn(1000, generator=gen)
        params = [
            torch.nn.Parameter(a),
            torch.nn.Parameter(a),
            torch.nn.Parameter(base[:600].view(_shape(entry, 600))),
            torch.nn.Parameter(base[400:].view(_shape(entry, 600))),
        ]
        return params, [a, base]

    config = _stateful(entry, flags)
    _, _, ours = _run(lambda ps: entry.cls(ps, **config), build, 6)
    _, _, theirs = _run(lambda ps: entry.reference(ps, **config), build, 6)
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("entry", DENSE, ids=ids)
@pytest.mark.parametrize("flags", FLAGS[:2], ids=FLAG_IDS[:2])
def test_a_step_counter_shared_by_hand_advances_once_per_parameter(
    entry: Entry, flags: dict[str, Any]
) -> None:
    def build() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(2)
        params = [
            torch.nn.Parameter(torch.randn(_shape(entry, 5), generator=gen)) for _ in range(3)
        ]
        return params, params

    config = _stateful(entry, flags)

    def make(cls: Any) -> Any:
        def build_opt(params: list[torch.Tensor]) -> Any:
            opt = cls(params, **config)
            for p in params:
                p.grad = torch.ones_like(p)
            step(opt)
            shared = opt.state[params[0]].get("step")
            if isinstance(shared, torch.Tensor):
                for p in params[1:]:
                    opt.state[p]["step"] = shared
            return opt

        return build_opt

    ours, opt, _ = _run(make(entry.cls), build, 3)
    theirs, ref, _ = _run(make(entry.reference), build, 3)
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()
    for p, q in zip(ours, theirs, strict=True):
        assert_same(dict(opt.state.get(p, {})), dict(ref.state.get(q, {})))


@pytest.mark.parametrize("entry", DENSE, ids=ids)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_state_given_memory_of_another_shape_is_refused_as_torch_refuses_it(
    entry: Entry, flags: dict[str, Any]
) -> None:
    outcomes = []
    config = _stateful(entry, flags)
    for cls in (entry.cls, entry.reference):
        p = torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(3)))
        opt = cls([p], **config)
        p.grad = torch.ones(3, 5)
        step(opt)
        p.grad = torch.ones(3, 5)
        step(opt)
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.data = value.data.t().contiguous()
        try:
            step(opt)
            outcomes.append(None)
        except RuntimeError as error:
            outcomes.append(type(error))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("entry", DENSE, ids=ids)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_edits_through_a_replaced_state_mapping_are_seen_as_torch_sees_them(
    entry: Entry, flags: dict[str, Any]
) -> None:
    """``opt.state = mapping`` then edits through ``mapping``, and a plain dict assigned as a
    parameter's state then edited through the caller's reference."""
    results = []
    config = _stateful(entry, flags)
    shape = _shape(entry, 6)
    for cls in (entry.cls, entry.reference):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(3)]
        opt = cls(params, **config)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(shape, generator=gen)
            step(opt)
        mine = defaultdict(dict, {p: dict(opt.state[p]) for p in params})
        opt.state = mine
        for p in params:
            p.grad = torch.randn(shape, generator=gen)
        step(opt)
        plain = dict(mine[params[1]])
        opt.state[params[1]] = plain
        for key, value in list(plain.items()):
            if isinstance(value, torch.Tensor) and value.shape == params[1].shape:
                plain[key] = value * 0.5  # through the caller's reference
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                plain[key] = value + 3
        for key, value in list(mine[params[2]].items()):
            if isinstance(value, torch.Tensor) and value.shape == params[2].shape:
                mine[params[2]][key] = torch.zeros_like(value)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(shape, generator=gen)
            step(opt)
        results.append([p.detach().clone() for p in params])
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("entry", [e for e in DENSE if e.flat], ids=ids)
def test_state_held_as_a_negative_view_is_read_through_its_sign(entry: Entry) -> None:
    """A state tensor whose memory holds the negated values (a negative view) means what torch
    reads through it, not what its memory holds."""
    config = _stateful(entry)

    def run(cls: Any) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(7, 5, generator=gen)) for _ in range(3)]
        opt = cls(params, **config)
        for index in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            if index == 0:
                for p in params:
                    for key, value in opt.state[p].items():
                        if isinstance(value, torch.Tensor) and value.shape == p.shape:
                            opt.state[p][key] = torch._neg_view(-value.clone())
        return params, dict(opt.state[params[0]])

    ours, our_state = run(entry.cls)
    theirs, their_state = run(entry.reference)
    for state in (our_state, their_state):
        assert any(getattr(v, "is_neg", lambda: False)() for v in state.values())
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()
