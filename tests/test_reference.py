"""polyak against torch.optim, stepped side by side from identical parameters and gradients."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import (
    as_grad,
    assert_same,
    clone_kwargs,
    make_params,
    params_for,
    step_both,
    twin,
)
from conftest import step as step_once
from registry import REGISTRY, Entry, ids, takes

import polyak
from polyak.strategies import flat

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FLAGS: list[dict[str, Any]] = [{}, {"foreach": False}, {"foreach": True}]


def _cases(fused: bool = False) -> list[Any]:
    return [
        pytest.param(entry, i, config, id=f"{ids(entry)}-{i}")
        for entry in REGISTRY
        if entry.fused or not fused
        for i, config in enumerate(entry.configs)
    ]


def _compare(
    entry: Entry,
    config: dict[str, Any],
    dtype: torch.dtype,
    steps: int = 6,
    atol: float | None = None,
) -> None:
    params = params_for(entry, dtype=dtype)
    ref_params = twin(params)
    try:
        ref = entry.reference(ref_params, **clone_kwargs(config))
    except (ValueError, RuntimeError) as error:
        # torch rejects this combination of flags: so must polyak, in the same words.
        with pytest.raises(type(error), match=re.escape(str(error))):
            entry.cls(params, **clone_kwargs(config))
        return
    opt = entry.cls(params, **clone_kwargs(config))
    step_both(opt, ref, params, ref_params, steps)
    tol = 0.0 if atol is None else atol
    assert_same(params, ref_params, tol)
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    assert_same(sd["state"], ref_sd["state"], tol)
    assert sd["param_groups"] == ref_sd["param_groups"] or _groups_equal(
        sd["param_groups"], ref_sd["param_groups"]
    )


def _groups_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    assert_same(a, b)
    return True


@pytest.mark.parametrize(("entry", "i", "config"), _cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=["default", "loop", "foreach"])
def test_matches_torch(
    entry: Entry, i: int, config: dict[str, Any], dtype: torch.dtype, flags: dict[str, Any]
) -> None:
    """Bit-identical to torch.optim with the same strategy flags, in every dtype."""
    if flags and not takes(entry, "foreach"):
        pytest.skip("one strategy only")
    if dtype is torch.float16 and not entry.float16:
        pytest.skip("float16 overflows, in torch as here")
    _compare(entry, {**config, **flags}, dtype, atol=0.0)


@pytest.mark.parametrize(("entry", "i", "config"), _cases(fused=True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_torch_fused(
    entry: Entry, i: int, config: dict[str, Any], dtype: torch.dtype
) -> None:
    """``fused=True`` is torch's fused kernel bit for bit where the flat kernel runs it (and
    within rounding where it cannot be built). torch's fused SGD does not step its vector body
    in the half types, and its Adagrad there keeps its sum unrounded: within rounding there."""
    exact = flat.kernel(wait=True) is not None and not (
        dtype.itemsize == 2 and entry.cls in (polyak.SGD, polyak.Adagrad)
    )
    atol = 0.0 if exact else entry.fused_tolerances[dtype]
    _compare(entry, {**config, "fused": True}, dtype, atol=atol)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if not e.one_group], ids=ids)
def test_several_groups_and_add_param_group_mid_training(entry: Entry) -> None:
    config = entry.configs[-1]
    params = params_for(entry, [(4, 3), (3,), (2, 5), (7,)])
    ref_params = twin(params)

    def build(cls: type[torch.optim.Optimizer], ps: list[torch.Tensor]) -> Any:
        return cls(
            [{"params": ps[:1], "lr": 0.01}, {"params": ps[1:2]}],
            **clone_kwargs({k: v for k, v in config.items()}),
        )

    opt, ref = build(entry.cls, params), build(entry.reference, ref_params)
    step_both(opt, ref, params[:2], ref_params[:2], 3)
    opt.add_param_group({"params": params[2:], "lr": 0.2})
    ref.add_param_group({"params": ref_params[2:], "lr": 0.2})
    step_both(opt, ref, params, ref_params, 4, seed=5)
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.supports_complex], ids=ids)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=["default", "loop", "foreach"])
def test_complex(entry: Entry, dtype: torch.dtype, flags: dict[str, Any]) -> None:
    """Complex parameters match torch: bit for bit on the per-tensor path, and within
    ``complex_foreach_tolerance`` on torch's foreach path, which rounds some complex
    arithmetic differently from its per-tensor path."""
    if flags and not takes(entry, "foreach"):
        pytest.skip("one strategy only")
    atol = entry.complex_foreach_tolerance if flags.get("foreach") else 0.0
    for config in entry.configs:
        _compare(entry, {**config, **flags}, dtype, steps=4, atol=atol)


def _sparse_cases() -> list[Any]:
    return [
        pytest.param(entry, config, id=f"{ids(entry)}-{i}")
        for entry in REGISTRY
        for i, config in enumerate(entry.sparse_configs)
    ]


@pytest.mark.parametrize(("entry", "config"), _sparse_cases())
@pytest.mark.parametrize("flags", FLAGS, ids=["default", "loop", "foreach"])
def test_sparse_gradients(entry: Entry, config: dict[str, Any], flags: dict[str, Any]) -> None:
    if flags and not takes(entry, "foreach"):
        pytest.skip("one strategy only")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4, sparse=True)
    ref_emb = torch.nn.Embedding(20, 4, sparse=True)
    ref_emb.load_state_dict(emb.state_dict())
    opt = entry.cls(emb.parameters(), **clone_kwargs({**config, **flags}))
    ref = entry.reference(ref_emb.parameters(), **clone_kwargs({**config, **flags}))
    for step in range(5):
        idx = torch.randint(0, 20, (6,), generator=torch.Generator().manual_seed(step))
        for module, o in ((emb, opt), (ref_emb, ref)):
            o.zero_grad()
            module(idx).pow(2).sum().backward()
            assert module.weight.grad is not None and module.weight.grad.is_sparse
            o.step()
    assert_same(emb.weight, ref_emb.weight)


@pytest.mark.parametrize(("entry", "config"), _sparse_cases())
@pytest.mark.parametrize("sparse_dim", [0, 1, 2, 3])
def test_sparse_gradients_of_every_sparse_dim(
    entry: Entry, config: dict[str, Any], sparse_dim: int
) -> None:
    """Sparse gradients with any number of sparse dimensions (the rest held as dense rows),
    uncoalesced ones among them, on a parameter stored transposed as well as on a plain one."""
    shape = (6, 5, 4)
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(shape, generator=gen)
    strided = torch.randn(shape[::-1], generator=gen).permute(2, 1, 0)
    params = [torch.nn.Parameter(plain), torch.nn.Parameter(strided)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = entry.cls(params, **clone_kwargs(config))
    ref = entry.reference(ref_params, **clone_kwargs(config))
    for step in range(4):
        for p, q in zip(params, ref_params, strict=True):
            g = torch.randn(shape, generator=gen)
            g[torch.rand(shape[0], generator=gen) < 0.5] = 0
            if sparse_dim == 0:
                no_index = torch.zeros(0, 1, dtype=torch.long)
                grad = torch.sparse_coo_tensor(no_index, g[None], shape, check_invariants=True)
            else:
                grad = g.to_sparse(sparse_dim)
                if step % 2:
                    # The entries listed twice, each with half of the value: uncoalesced.
                    idx, values = grad._indices(), grad._values() / 2
                    twice = values.repeat(2, *[1] * (values.dim() - 1))
                    grad = torch.sparse_coo_tensor(
                        idx.repeat(1, 2), twice, shape, check_invariants=True
                    )
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert_same(params, ref_params)
    # SGD's momentum of sparse gradients is sparse, as in torch.
    dense = torch.utils._pytree.tree_map_only(
        torch.Tensor,
        lambda t: t.to_dense() if t.is_sparse else t,
        [opt.state_dict()["state"], ref.state_dict()["state"]],
    )
    assert_same(*dense)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_larger_tensors_match_torch(entry: Entry) -> None:
    """Tensors with more elements than the generic tests' (a matrix with many columns, a
    convolution's 3 x 3 kernels), where some primitives take faster routes to torch's bits."""
    shapes = [(40, 160), (12, 8, 3, 3), (200,)]
    for flags in FLAGS if takes(entry, "foreach") else [{}]:
        params = params_for(entry, shapes)
        ref_params = twin(params)
        config = {**entry.stateful, **flags}
        opt = entry.cls(params, **clone_kwargs(config))
        ref = entry.reference(ref_params, **clone_kwargs(config))
        step_both(opt, ref, params, ref_params, 3)
        assert_same(params, ref_params)
        assert_same(opt.state_dict()["state"], ref.state_dict()["state"])


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_mixed_dtypes_in_one_group(entry: Entry) -> None:
    params = [
        *params_for(entry, [(3, 3), (4,)], dtype=torch.float32),
        *params_for(entry, [(2, 2)], dtype=torch.float64),
        *params_for(entry, [(5,)], dtype=torch.bfloat16),
    ]
    for flags in FLAGS if takes(entry, "foreach") else [{}]:
        mine, theirs = twin(params), twin(params)
        config = {**entry.configs[-1], **flags}
        opt = entry.cls(mine, **clone_kwargs(config))
        ref = entry.reference(theirs, **clone_kwargs(config))
        step_both(opt, ref, mine, theirs, 4)
        assert_same(mine, theirs)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_params_without_grad_are_skipped(entry: Entry) -> None:
    params = params_for(entry)
    before = twin(params)
    opt = entry.cls(params, **clone_kwargs(entry.configs[-1]))
    params[0].grad = as_grad(torch.ones_like(params[0]), entry.sparse_grads)
    step_once(opt)
    assert not torch.equal(params[0], before[0])
    assert_same(params[1:], before[1:])
    assert entry.eager_state or all(p not in opt.state for p in params[1:])


@pytest.mark.parametrize("entry", [e for e in REGISTRY if not e.sparse_grads], ids=ids)
def test_closure_runs_with_grad_and_returns_loss(entry: Entry) -> None:
    start = torch.tensor([[1.0, -2.0]] if entry.matrices_only else [1.0, -2.0])
    w, ref_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = entry.cls([w], lr=0.1)
    ref = entry.reference([ref_w], lr=0.1)
    seen: list[tuple[str, bool]] = []

    def closure_for(p: torch.Tensor, o: torch.optim.Optimizer, who: str) -> Any:
        def closure() -> torch.Tensor:
            seen.append((who, torch.is_grad_enabled()))
            o.zero_grad()
            loss = (p**2).sum()
            loss.backward()
            return loss

        return closure

    with torch.no_grad():
        loss = opt.step(closure_for(w, opt, "mine"))
        ref_loss = ref.step(closure_for(ref_w, ref, "theirs"))
    # Once per step, or as often as torch's step calls it (LBFGS evaluates several times).
    assert [s for s in seen if s[0] == "mine"] == [("mine", True)] * sum(
        who == "theirs" for who, _ in seen
    )
    assert all(enabled for _, enabled in seen)
    assert loss is not None and torch.equal(loss, ref_loss)
    assert torch.equal(w, ref_w)
    if entry.step_closure:
        with pytest.raises(TypeError) as mine:
            opt.step()  # type: ignore[call-arg]
        with pytest.raises(TypeError) as theirs:
            ref.step()  # type: ignore[call-arg]
        assert str(mine.value) == str(theirs.value)
    else:
        assert opt.step() is None


@pytest.mark.parametrize("entry", [e for e in REGISTRY if takes(e, "differentiable")], ids=ids)
def test_differentiable_step_matches_torch_gradients(entry: Entry) -> None:
    """Autograd runs through the step: d(loss after one step)/d(lr, params) equals torch's."""
    results = []
    for cls in (entry.cls, entry.reference):
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        leaf = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
        p = leaf.clone()
        opt = cls(
            [p],
            lr=lr if entry.differentiable_lr else 0.1,
            differentiable=True,
            **entry.differentiable,
        )
        p.grad = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64, requires_grad=True)
        opt.step()
        if entry.differentiable_steps == 2:
            p.grad = p.detach() * 0.5
            opt.step()
        loss = (p**2).sum()
        inputs = [lr, leaf] if entry.differentiable_lr else [leaf]
        results.append(torch.autograd.grad(loss, inputs))
    assert_same(list(results[0]), list(results[1]))
    assert results[0][0].abs().sum() > 0


def test_lr_zero_leaves_params_unchanged() -> None:
    params = make_params()
    before = twin(params)
    opt = polyak.SGD(params, lr=0.0, momentum=0.9, weight_decay=0.1)
    step_both(opt, polyak.SGD(twin(params), lr=0.0), params, twin(params), 3)
    assert_same(params, before)


def test_is_a_torch_optimizer() -> None:
    opt = polyak.SGD(make_params(), lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, polyak.Optimizer)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=str)
def test_state_after_construction_matches_torch(entry: Entry, dtype: torch.dtype) -> None:
    """Most optimizers create state at the first step; torch's Adagrad in its constructor."""
    if dtype.is_complex and not entry.supports_complex:
        pytest.skip("real parameters only")
    params = params_for(entry, dtype=dtype)
    opt = entry.cls(params, **clone_kwargs(entry.stateful))
    ref = entry.reference(twin(params), **clone_kwargs(entry.stateful))
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])
    assert bool(opt.state) == entry.eager_state


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_strided_parameters_match_torch(entry: Entry) -> None:
    """Parameters whose memory is not in row-major order (a transposed leaf)."""
    params = [
        torch.nn.Parameter(p.detach().t()) if p.dim() == 2 else p
        for p in params_for(entry, [(4, 3), (5,), (2, 6)])
    ]
    assert not params[0].is_contiguous()
    ref_params = [torch.nn.Parameter(p.detach().clone().t().contiguous().t()) for p in params]
    opt = entry.cls(params, **clone_kwargs(entry.stateful))
    ref = entry.reference(ref_params, **clone_kwargs(entry.stateful))
    step_both(opt, ref, params, ref_params, 3)
    assert_same(params, ref_params)
    assert_same(opt.state_dict()["state"], ref.state_dict()["state"])
