"""State stored in 4 bits (``state_dtype="4bit"``): torchao's ``AdamW4bit`` format (blocks of
128; its dynamic map of 3 exponent bits for signed state, a linear map without zero for state
never negative), and each step computing as torch's does with its state passed through that
rounding after every step."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from registry import Entry, ids
from test_precision import CASES, stepping_configs

import polyak
from polyak import _quant


def _torchao_state(values: torch.Tensor, signed: bool) -> Any:
    """torchao's 4-bit state holding ``values``."""
    subclass = pytest.importorskip("torchao.optim.subclass_4bit")
    state = subclass.OptimState4bit.zeros(values.shape, signed=signed, block_size=128)
    state.copy_(values)
    return state


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_maps_codes_and_values_are_torchaos(signed: bool) -> None:
    subclass = pytest.importorskip("torchao.optim.subclass_4bit")
    table = subclass.get_qmap_signed() if signed else subclass.get_qmap_unsigned()
    assert torch.equal(_quant.map_4bit(signed), torch.tensor(table, dtype=torch.float32))
    torch.manual_seed(0)
    for blocks in (1, 3, 300):
        values = torch.randn(blocks * 128) * 3
        if not signed:
            values = values**2
        values[:7] = 0
        state = _torchao_state(values, signed)
        packed, scale = _quant.quantize_4bit(values, signed)
        assert torch.equal(packed, state.codes)
        assert torch.equal(scale, state.scale)
        back = _quant.dequantize_4bit(packed, scale, signed, values.shape)
        assert torch.equal(back, state.dequantize())


SHAPES = [(16, 24), (256,), (300,), (7,)]  # (300,) and (7,): no whole blocks, kept in float32


def _round_trip(opt: Any, keys: tuple[str, ...], unsigned: tuple[str, ...]) -> None:
    """Pass ``opt``'s parameter-shaped state of whole 4-bit blocks through torchao's 4-bit
    state, in place."""
    for entry in opt.state.values():
        for key in keys:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() % 128 == 0:
                value.copy_(_torchao_state(value.float(), key not in unsigned).dequantize())


@pytest.mark.parametrize("flags", [{}, {"foreach": True}], ids=str)
@pytest.mark.parametrize("entry", CASES, ids=ids)
def test_four_bit_state_steps_as_torch_with_its_state_quantized_after_each_step(
    entry: Entry, flags: dict[str, Any]
) -> None:
    pytest.importorskip("torchao.optim.subclass_4bit")
    keys, unsigned = entry.cls.param_shaped_state, entry.cls.unsigned_state
    for config in stepping_configs(entry, flags)[:3]:
        torch.manual_seed(0)
        shapes = [(16, 24)] if entry.matrices_only else SHAPES
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ours = entry.cls(params, **copy.deepcopy(config), state_dtype="4bit", min_8bit_size=128)
        theirs = entry.reference(twins, **copy.deepcopy(config))
        _round_trip(theirs, keys, unsigned)
        for _ in range(3):
            for p, q in zip(params, twins, strict=True):
                g = torch.randn(p.shape)
                p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
            _round_trip(theirs, keys, unsigned)
        for p, q in zip(params, twins, strict=True):
            assert torch.equal(p, q), config
            for key in keys:
                if key not in theirs.state[q]:
                    continue
                mine = ours.state[p][key]
                if p.numel() % 128 == 0:
                    assert mine.dtype == torch.uint8 and mine.numel() * 2 == p.numel()
                    scale = ours.state[p][f"{key}_absmax"]
                    wide = _quant.dequantize_4bit(mine, scale, key not in unsigned, p.shape)
                    assert torch.equal(wide, theirs.state[q][key]), key
                else:
                    assert mine.dtype == p.dtype, key


def test_four_bit_state_costs_a_byte_and_a_sixteenth_per_parameter() -> None:
    p = torch.nn.Parameter(torch.randn(1 << 20))
    opt = polyak.AdamW([p], state_dtype="4bit")
    p.grad = torch.randn(1 << 20)
    opt.step()
    state = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    size = sum(v.numel() * v.element_size() for v in state)
    assert size / p.numel() == 1 + 2 * 4 / 128  # 1.0625 bytes per parameter


def test_a_checkpoint_moves_between_float32_eight_and_four_bits() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128))]
    wide = polyak.AdamW(params)
    params[0].grad = torch.randn(64, 128)
    wide.step()
    saved = wide.state_dict()
    four = polyak.AdamW([torch.nn.Parameter(params[0].detach().clone())], state_dtype="4bit")
    four.load_state_dict(saved)
    entry = four.state[four.param_groups[0]["params"][0]]
    packed, scale = _quant.quantize_4bit(wide.state[params[0]]["exp_avg"], True)
    assert torch.equal(entry["exp_avg"], packed) and torch.equal(entry["exp_avg_absmax"], scale)
    eight = polyak.AdamW([torch.nn.Parameter(params[0].detach().clone())], state_dtype="8bit")
    eight.load_state_dict(four.state_dict())
    entry8 = eight.state[eight.param_groups[0]["params"][0]]
    values = _quant.dequantize_4bit(packed, scale, True, params[0].shape)
    codes, absmax = _quant.quantize(values, True)
    assert torch.equal(entry8["exp_avg"], codes) and torch.equal(entry8["exp_avg_absmax"], absmax)
    back = polyak.AdamW([torch.nn.Parameter(params[0].detach().clone())])
    back.load_state_dict(four.state_dict())
    restored = back.state[back.param_groups[0]["params"][0]]["exp_avg"]
    assert restored.dtype == torch.float32 and torch.equal(restored, values)
    bad = copy.deepcopy(four.state_dict())
    bad["state"][0]["exp_avg_absmax"] = torch.ones(3)
    before = copy.deepcopy(four.state_dict())
    with pytest.raises(ValueError, match="block maxima"):
        four.load_state_dict(bad)
    after = four.state_dict()
    for key, value in before["state"][0].items():
        assert torch.equal(after["state"][0][key], value)
