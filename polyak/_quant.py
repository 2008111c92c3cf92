"""8-bit block-wise quantization of optimizer state, in bitsandbytes' format.

A tensor is cut, in memory order, into blocks of :data:`BLOCK` elements (the last may be
shorter); each block keeps its largest magnitude (``absmax``, float32) and each element the
index (uint8) of the code nearest to its value divided by the block's absmax. The codes are
bitsandbytes' dynamic maps (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
ICLR 2022): a signed one for state of either sign, an unsigned one, twice as fine, for state
that is never negative (second moments).

The rounding is bitsandbytes' reference (pure torch, "default" backend) rule, element for
element: full blocks are scaled by the reciprocal of their absmax, the last short block divided
by its own (made at least 1e-38), the result clamped to [-1, 1], and the code is the number of
midpoints of neighbouring codes below the value (``torch.bucketize``'s answer, so a value on a
midpoint takes the lower code), found here by a table on the value's upper bits and one
comparison, which takes less than half the search's time. bitsandbytes' native CPU library,
where it loads, searches approximately and gives another code for about one element in 700
(some not the nearest); its CUDA kernels round as the rule does, and keep the sign of a value
whose nearest code is zero (polyak's signed map has a zero code, which a value rounds to from
either side, as the reference rule does).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: Elements per block, as bitsandbytes' 8-bit optimizers use.
BLOCK = 256

#: The marker of 8-bit block-wise storage, in ``state_dtype``.
EIGHT_BIT = "8bit"


@functools.cache
def dynamic_map(signed: bool, exponents: int = 7, bits: int = 8) -> Tensor:
    """bitsandbytes' dynamic quantization map (``create_dynamic_map(signed, exponents,
    bits)``): 2**bits sorted float32 codes in [-1, 1] (signed) or [0, 1]. For each decimal
    exponent e = 1 - exponents ... 0 the map holds the midpoints of float32 ``linspace(0.1, 1)``
    cut into 2**(k + f) (signed) or 2**(k + f + 1) parts, k = e + exponents - 1, f = bits - 1 -
    exponents, times float32 10**e (and their negatives when signed), then 0 and 1."""
    values: list[float] = []
    spare = bits - 1 - exponents
    for k in range(exponents):
        parts = 2 ** (k + spare) if signed else 2 ** (k + spare + 1)
        edges = torch.linspace(0.1, 1, parts + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = float(10 ** (k - exponents + 1)) * mids
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _midpoints(signed: bool) -> Tensor:
    code = dynamic_map(signed)
    return (code[:-1] + code[1:]) / 2


@functools.cache
def _lookup(signed: bool) -> tuple[Tensor, Tensor, int]:
    """A table that finds a value's code without a search: by the upper 16 bits of the value's
    float32 pattern (sign, exponent, 7 bits of fraction), how many midpoints lie below every
    value with those bits; the midpoints, padded; and how many midpoints at most lie among
    the values of one pattern (one, for bitsandbytes' maps), each one comparison more."""
    mid = _midpoints(signed)
    patterns = torch.arange(1 << 16, dtype=torch.int64) << 16
    ends = [
        (bits - (bits >= 1 << 31).long() * (1 << 32)).to(torch.int32).view(torch.float32)
        for bits in (patterns, patterns | 0xFFFF)
    ]
    low = torch.nan_to_num(torch.minimum(*ends).clamp(-1, 1), nan=0.0)
    high = torch.nan_to_num(torch.maximum(*ends).clamp(-1, 1), nan=0.0)
    below = torch.searchsorted(mid, low)
    inside = int((torch.searchsorted(mid, high) - below).max())
    padded = torch.cat([mid, torch.full((inside + 1,), float("inf"))])
    return below.to(torch.int32), padded, inside


def _codes(scaled: Tensor, signed: bool) -> Tensor:
    """The code of each value of ``scaled`` (float32 in [-1, 1]): the number of midpoints
    below it, as ``torch.bucketize(scaled, midpoints)`` counts them, found by :func:`_lookup`'s
    table."""
    below, padded, inside = _lookup(signed)
    base = below[(scaled.view(torch.int32) >> 16) & 0xFFFF]
    codes = base.clone()
    for k in range(inside):
        codes += scaled > padded[base + k]
    return codes.to(torch.uint8)


def blocks(numel: int) -> int:
    """How many blocks a tensor of ``numel`` elements takes."""
    return -(-numel // BLOCK)


def quantize(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``values`` (float32) as uint8 codes of its shape and the float32 absmax of each block."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    full = n - n % BLOCK
    head = flat[:full].view(-1, BLOCK)
    absmax = head.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        last = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return _codes(scaled, signed).view(values.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 values ``codes`` and ``absmax`` stand for (each code's value times its
    block's absmax)."""
    flat = dynamic_map(signed)[codes.reshape(-1).long()]
    n = flat.numel()
    full = n - n % BLOCK
    out = torch.empty_like(flat)
    out[:full] = (flat[:full].view(-1, BLOCK) * absmax[: full // BLOCK].view(-1, 1)).view(-1)
    if full < n:
        out[full:] = flat[full:] * absmax[-1]
    return out.view(codes.shape)


def quantize_into(values: Tensor, codes: Tensor, absmax: Tensor, signed: bool) -> None:
    """:func:`quantize` ``values`` into the stored ``codes`` and ``absmax``, in place."""
    new_codes, new_absmax = quantize(values, signed)
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


#: The marker of 4-bit block-wise storage, in ``state_dtype``, and its blocks.
FOUR_BIT = "4bit"
BLOCK_4BIT = 128


@functools.cache
def map_4bit(signed: bool) -> Tensor:
    """torchao's 4-bit maps (``AdamW4bit``): the dynamic map of 3 exponent bits for state of
    either sign, and for state never negative the 16 steps of a linear map without zero
    (``linspace(0, 1, 17)[1:]``)."""
    if signed:
        return dynamic_map(True, 3, 4)
    return torch.linspace(0, 1, 17, dtype=torch.float32)[1:].contiguous()


def fits_4bit(numel: int) -> bool:
    """Whether a tensor of ``numel`` elements can be stored in 4 bits: whole blocks only, as
    torchao requires (others keep their dtype)."""
    return numel > 0 and numel % BLOCK_4BIT == 0


def quantize_4bit(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``values`` (float32, a whole number of blocks of 128) as 4-bit codes packed two to a
    byte (the first in the high half) and the float32 scale of each block, as torchao's
    ``OptimState4bit`` stores them: each block divided by its absmax (made at least 1e-12),
    and each value given the highest code not above it, moved one up where it lies at least
    half way to the next (torchao's ``quantize_4bit_with_qmap``; a value below the map takes
    the first code)."""
    qmap = map_4bit(signed)
    flat = values.reshape(-1, BLOCK_4BIT).float()
    scale = flat.abs().amax(dim=1).clip(1e-12)
    scaled = (flat / scale.view(-1, 1)).reshape(-1)
    codes = (torch.searchsorted(qmap, scaled, right=True) - 1).clamp(min=0)
    up = (codes + 1).clip(max=15)
    down_value, up_value = qmap[codes], qmap[up]
    codes = torch.where(scaled - down_value >= (up_value - down_value) * 0.5, up, codes)
    codes = codes.to(torch.uint8)
    return (codes[::2] << 4) | codes[1::2], scale


def dequantize_4bit(packed: Tensor, scale: Tensor, signed: bool, shape: torch.Size) -> Tensor:
    """The float32 values of shape ``shape`` that 4-bit ``packed`` codes and their block
    ``scale`` stand for (each code's value times its block's scale)."""
    codes = torch.stack([packed >> 4, packed & 0b1111], dim=-1).reshape(-1)
    out = map_4bit(signed)[codes.long()].view(-1, BLOCK_4BIT) * scale.view(-1, 1)
    return out.view(shape)


def quantize_4bit_into(values: Tensor, packed: Tensor, scale: Tensor, signed: bool) -> None:
    """:func:`quantize_4bit` ``values`` into the stored ``packed`` codes and ``scale``."""
    new_packed, new_scale = quantize_4bit(values, signed)
    packed.copy_(new_packed)
    scale.copy_(new_scale)
