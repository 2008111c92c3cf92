"""State stored in 8 bits, block-wise (``state_dtype="8bit"``): bitsandbytes' codes, and each
step computing as torch's does with its state quantized and dequantized after every step."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from registry import Entry, ids
from test_precision import CASES, stepping_configs

import polyak
from polyak import _quant

SHAPES = [(20, 30), (300,), (7,), ()]


def _bnb_ops() -> tuple[Any, Any, Any]:
    """bitsandbytes' reference (pure torch) quantization, its dequantization and its maps."""
    functional = pytest.importorskip("bitsandbytes.functional")
    quantize = torch.ops.bitsandbytes.quantize_blockwise.default
    reference = torch._C.DispatchKeySet("CompositeExplicitAutograd")

    def quant(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        code = functional.create_dynamic_map(signed=signed)
        return quantize.redispatch(reference, values, code, 256)  # type: ignore[no-any-return]

    def dequant(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
        code = functional.create_dynamic_map(signed=signed)
        return torch.ops.bitsandbytes.dequantize_blockwise.default(  # type: ignore[no-any-return]
            codes, absmax, code, 256, torch.float32
        )

    return quant, dequant, functional.create_dynamic_map


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_maps_codes_and_values_are_bitsandbytes(signed: bool) -> None:
    quant, dequant, create = _bnb_ops()
    assert torch.equal(_quant.dynamic_map(signed), create(signed=signed))
    torch.manual_seed(0)
    for n in (1, 255, 256, 257, 1000 * 256 + 77):
        values = torch.randn(n) * 3
        if not signed:
            values = values**2
        values[: min(n, 5)] = 0
        codes, absmax = _quant.quantize(values, signed)
        their_codes, their_absmax = quant(values, signed)
        assert torch.equal(codes, their_codes)
        assert torch.equal(absmax, their_absmax)
        assert torch.equal(_quant.dequantize(codes, absmax, signed), dequant(codes, absmax, signed))
    zeros = torch.zeros(300)
    assert all(
        torch.equal(a, b)
        for a, b in zip(_quant.quantize(zeros, signed), quant(zeros, signed), strict=True)
    )


def _round_trip(opt: Any, keys: tuple[str, ...], unsigned: tuple[str, ...], minimum: int) -> None:
    """Quantize and dequantize ``opt``'s parameter-shaped state of at least ``minimum`` elements
    with bitsandbytes' reference rounding, in place."""
    quant, dequant, _ = _bnb_ops()
    for entry in opt.state.values():
        for key in keys:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() >= minimum:
                signed = key not in unsigned
                codes, absmax = quant(value.float(), signed)
                value.copy_(dequant(codes, absmax, signed).view(value.shape))


@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"foreach": True}], ids=str)
@pytest.mark.parametrize("entry", CASES, ids=ids)
def test_eight_bit_state_steps_as_torch_with_its_state_quantized_after_each_step(
    entry: Entry, flags: dict[str, Any]
) -> None:
    _bnb_ops()
    keys, unsigned = entry.cls.param_shaped_state, entry.cls.unsigned_state
    for config in stepping_configs(entry, flags):
        torch.manual_seed(0)
        shapes = [(20, 30)] if entry.matrices_only else SHAPES
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ours = entry.cls(params, **copy.deepcopy(config), state_dtype="8bit", min_8bit_size=256)
        theirs = entry.reference(twins, **copy.deepcopy(config))
        _round_trip(theirs, keys, unsigned, 256)
        for _ in range(3):
            for p, q in zip(params, twins, strict=True):
                g = torch.randn(p.shape)
                p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
            _round_trip(theirs, keys, unsigned, 256)
        for p, q in zip(params, twins, strict=True):
            assert torch.equal(p, q), config
            for key in keys:
                if key not in theirs.state[q]:
                    continue
                mine, value = ours.state[p][key], theirs.state[q][key]
                if p.numel() >= 256:
                    assert mine.dtype == torch.uint8
                    absmax = ours.state[p][f"{key}_absmax"]
                    wide = _quant.dequantize(mine, absmax, key not in unsigned)
                    assert torch.equal(wide, value), key
                else:
                    assert mine.dtype == p.dtype and torch.equal(mine, value), key


def test_eight_bit_state_costs_two_bytes_and_a_thirty_second_per_parameter() -> None:
    p = torch.nn.Parameter(torch.randn(1 << 20))
    opt = polyak.AdamW([p], state_dtype="8bit")
    p.grad = torch.randn(1 << 20)
    opt.step()
    state = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    size = sum(v.numel() * v.element_size() for v in state)
    assert size / p.numel() == 2 + 2 * 4 / 256  # 2.03125 bytes per parameter


def test_small_tensors_keep_their_state_in_their_dtype() -> None:
    big, small = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(4095))
    opt = polyak.Adam([big, small], state_dtype={"exp_avg": "8bit"})
    big.grad, small.grad = torch.randn(4096), torch.randn(4095)
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[big]["exp_avg_sq"].dtype == torch.float32
    assert opt.state[small]["exp_avg"].dtype == torch.float32


def test_checkpoints_load_both_ways_and_bad_ones_are_refused_unchanged() -> None:
    torch.manual_seed(0)
    shapes = [(64, 64), (300,)]
    wide_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    wide = polyak.AdamW(wide_params)
    for _ in range(2):
        for p in wide_params:
            p.grad = torch.randn(p.shape)
        wide.step()
    narrow_params = [torch.nn.Parameter(p.detach().clone()) for p in wide_params]
    narrow = polyak.AdamW(narrow_params, state_dtype="8bit", min_8bit_size=256)
    narrow.load_state_dict(wide.state_dict())  # quantized at load
    for p, q in zip(wide_params, narrow_params, strict=True):
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = _quant.quantize(wide.state[p][key], signed)
            assert torch.equal(narrow.state[q][key], codes)
            assert torch.equal(narrow.state[q][f"{key}_absmax"], absmax)
    buffer = io.BytesIO()
    torch.save(narrow.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    back = polyak.AdamW([torch.nn.Parameter(p.detach().clone()) for p in wide_params])
    back.load_state_dict(saved)  # dequantized at load
    first = back.param_groups[0]["params"][0]
    codes = narrow.state[narrow_params[0]]["exp_avg"]
    absmax = narrow.state[narrow_params[0]]["exp_avg_absmax"]
    assert set(back.state[first]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(back.state[first]["exp_avg"], _quant.dequantize(codes, absmax, True))

    before = copy.deepcopy(narrow.state_dict())
    for damage in ("short absmax", "no absmax"):
        bad = copy.deepcopy(saved)
        if damage == "short absmax":
            bad["state"][0]["exp_avg_absmax"] = torch.ones(3)
        else:
            del bad["state"][0]["exp_avg_absmax"]
        with pytest.raises(ValueError):
            narrow.load_state_dict(bad)
        after = narrow.state_dict()
        for pid, entry in before["state"].items():
            for key, value in entry.items():
                assert torch.equal(after["state"][pid][key], value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"state_dtype": "2bit"}, "Invalid state_dtype"),
        ({"state_dtype": "8bit", "min_8bit_size": -1}, "Invalid min_8bit_size"),
        ({"state_dtype": "8bit", "min_8bit_size": 1.5}, "Invalid min_8bit_size"),
    ],
)
def test_bad_eight_bit_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        polyak.AdamW([torch.nn.Parameter(torch.randn(4))], **kwargs)


def test_against_bitsandbytes_native_rounding_the_difference_is_its_search() -> None:
    """bitsandbytes' native CPU library picks another code for a few elements (its approximate
    search): polyak's AdamW8bit stays within those elements' code steps of it, over 10 steps."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ours_p = [torch.nn.Parameter(torch.randn(64, 80))]
    their_p = [torch.nn.Parameter(ours_p[0].detach().clone())]
    ours = polyak.AdamW8bit(ours_p, lr=1e-2, min_8bit_size=256)
    theirs = bnb.optim.AdamW8bit(their_p, lr=1e-2, min_8bit_size=256)
    for _ in range(10):
        g = torch.randn(64, 80)
        ours_p[0].grad, their_p[0].grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    codes, their_codes = ours.state[ours_p[0]]["state1"], theirs.state[their_p[0]]["state1"]
    assert int((codes != their_codes).sum()) < codes.numel() // 20
    assert float((ours_p[0] - their_p[0]).abs().max()) < 0.05


def test_a_checkpoint_with_another_map_is_refused_unchanged() -> None:
    p = torch.nn.Parameter(torch.randn(300))
    opt = polyak.AdamW8bit([p], min_8bit_size=256)
    p.grad = torch.randn(300)
    opt.step()
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"step", "__bnb_optimizer_quant_state__"}
    before = copy.deepcopy(saved)
    bad = copy.deepcopy(saved)
    bad["state"][0]["__bnb_optimizer_quant_state__"]["qmap1"] = torch.linspace(-1, 1, 256)
    with pytest.raises(ValueError, match="qmap1"):
        opt.load_state_dict(bad)
    after = opt.state_dict()["state"][0]["__bnb_optimizer_quant_state__"]
    for key, value in before["state"][0]["__bnb_optimizer_quant_state__"].items():
        assert torch.equal(after[key], value)


def test_explain_says_why_bitsandbytes_classes_take_torchs_operations() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = polyak.AdamW8bit([p])
    p.grad = torch.randn(4)
    opt.step()
    reason = polyak.explain(opt).groups[0].reason
    assert "bitsandbytes' rule" in reason and "not elementwise" not in reason
