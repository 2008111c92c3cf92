"""The list primitives that take faster routes to torch's bits, against torch itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from polyak import _ops


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _layouts(shape: tuple[int, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(shape, generator=gen)
    wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen)
    rows_last = torch.randn(shape[::-1], generator=gen).permute(*reversed(range(len(shape))))
    return {
        "contiguous": x,
        "every other column": wide[..., ::2],
        "rows innermost": rows_last,
        "large": x * 3e18,
        "tiny": x * 1e-21,
    }


@pytest.mark.parametrize(
    "shape",
    [(300, 200), (64, 64, 3, 3), (16, 3, 7, 7), (3, 500), (2, 1000), (1, 300), (40, 3)],
    ids=str,
)
@pytest.mark.parametrize("dim", [-2, -1])
def test_norms_over_a_dimension_match_torch(shape: tuple[int, ...], dim: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, x in _layouts(shape, gen).items():
        (got,) = _ops.norms_over([x], dim)
        want = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert torch.equal(got, want), name


def test_norms_over_rows_with_zeros_infinities_and_nans() -> None:
    x = torch.randn(50, 300, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 0.0
    x[:, 1] = -0.0
    x[7, 2] = float("inf")
    x[9, 3] = float("-inf")
    x[11, 4] = float("nan")
    x[13, 5] = 1e30  # its square overflows
    (got,) = _ops.norms_over([x], -2)
    want = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_norms_over_rows_in_other_dtypes_match_torch(dtype: torch.dtype) -> None:
    x = torch.randn(30, 200, generator=torch.Generator().manual_seed(2)).to(dtype)
    (got,) = _ops.norms_over([x], -2)
    assert torch.equal(got, torch.linalg.vector_norm(x, dim=-2, keepdim=True))


def test_norms_over_rows_of_meta_tensors_keep_their_shape() -> None:
    """A step is rehearsed on meta tensors, which hold no numbers."""
    (got,) = _ops.norms_over([torch.empty(2000, 600, device="meta")], -2)
    assert got.shape == (1, 600) and got.is_meta


_NUMBERS = [0.9, -0.1, 1e-8, 3.0e38, 1e-40, 0.0, -0.0, float("inf"), float("nan"), 1, -3, 1 << 30]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(), (5, 7)], ids=["0-dim", "2-dim"])
def test_per_tensor_primitives_with_numbers_match_the_tensor_methods(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """Numbers that steps use again reach torch as held 0-dim tensors, with the same results
    as the numbers themselves: each is used three times (seen, held, reused)."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    cases = [
        (_ops.mul_, lambda x, s: x.mul_(s)),
        (_ops.div_, lambda x, s: x.div_(s)),
        (_ops.add_, lambda x, s: x.add_(s)),
    ]
    new = [
        (_ops.mul, lambda x, s: x * s),
        (_ops.div, lambda x, s: x / s),
        (_ops.add, lambda x, s: x + s),
    ]
    with torch.no_grad(), _ops.per_tensor():
        for s in _NUMBERS:
            for _ in range(3):
                for ours, theirs in cases:
                    a, b = x0.clone(), x0.clone()
                    ours([a], s)
                    theirs(b, s)
                    assert torch.equal(a.isnan(), b.isnan()), (s, ours)
                    assert torch.equal(a.nan_to_num(), b.nan_to_num()), (s, ours)
                    assert torch.equal(a.signbit(), b.signbit()), (s, ours)
                for ours_new, theirs_new in new:
                    (a,) = ours_new([x0], s)
                    b = theirs_new(x0, s)
                    assert a.dtype == b.dtype, (s, ours_new)
                    assert torch.equal(a.nan_to_num(), b.nan_to_num()), (s, ours_new)
                    assert torch.equal(a.signbit(), b.signbit()), (s, ours_new)
        steps = [torch.tensor(16777216.0, dtype=dtype)]
        for _ in range(3):
            _ops.increment_(steps)
        assert steps[0] == torch.tensor(16777216.0, dtype=dtype) + 1 + 1 + 1


def test_numbers_held_for_per_tensor_primitives_stay_few() -> None:
    """Numbers that change at every step (bias corrections) are not held without bound."""
    x = torch.ones(3)
    with torch.no_grad(), _ops.per_tensor():
        for i in range(3 * _ops._MOST_OPERANDS):
            for _ in range(2):
                _ops.mul_([x], 1.0 + i * 1e-6)
    assert len(_ops._OPERANDS) <= _ops._MOST_OPERANDS
