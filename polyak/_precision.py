"""How a group stores its state: ``state_dtype``, the one switch every elementwise optimizer
takes, and what a step does with state stored narrower than it computes.

A group whose ``state_dtype`` is set keeps its parameter-shaped state (Adam's moments, SGD's
momentum buffer) in that dtype, for all its state keys or, given a mapping, for the keys it
names. Each step then computes exactly as with state of the parameter's dtype and rounds what it
writes back to nearest even::

    s = state.to(param.dtype); <the update, on s>; state.copy_(s)

The flat kernel does this in registers; the reference paths do it with a widened copy of each
state tensor (see :func:`widen` and :func:`narrow`). Scalar state (step counters) is not
affected.

Parameters of 16 bits can be stepped without float32 master weights by one of two roundings of
the parameter a step writes: ``kahan_sum`` (a compensation buffer of the parameter's dtype,
state key ``kahan_comp``, as torch-optimi keeps it) or ``bf16_stochastic_round`` (rounding up
or down at random, in proportion, as torchao's ``_fp32_to_bf16_sr`` does). With either, the
update computes in float32: parameters, gradients and state are widened to float32 for it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polyak import _quant
from polyak._quant import EIGHT_BIT, FOUR_BIT

#: The group key, and the constructor's keyword.
KEY = "state_dtype"

#: The group keys of the two roundings of 16-bit parameters.
KAHAN = "kahan_sum"
STOCHASTIC = "bf16_stochastic_round"
#: The state key of the compensation buffer.
COMPENSATION = "kahan_comp"
_HALVES = (torch.bfloat16, torch.float16)

#: The dtypes state may be stored in, and 8-bit and 4-bit block-wise codes (``_quant.py``).
STORAGE_DTYPES = (
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    EIGHT_BIT,
    FOUR_BIT,
)
_CODES = (EIGHT_BIT, FOUR_BIT)
#: The group key of the smallest tensor whose state is stored in 8 bits (bitsandbytes' name
#: and default: smaller ones keep their state in their own dtype).
MIN_8BIT = "min_8bit_size"
MIN_8BIT_DEFAULT = 4096
#: The state key of a block-wise state's absmax, after the key of its codes.
ABSMAX = "{}_absmax"


def check(value: Any, keys: tuple[str, ...], owner: str) -> None:
    """Raise, as a constructor does, for a ``state_dtype`` that is not None, a storage dtype, or
    a mapping from some of ``keys`` (the optimizer's parameter-shaped state) to storage
    dtypes."""
    if value is None:
        return
    if isinstance(value, (torch.dtype, str)):
        items: list[tuple[Any, Any]] = [("state_dtype", value)]
    elif isinstance(value, Mapping):
        unknown = [key for key in value if key not in keys]
        if unknown:
            raise ValueError(
                f"{owner} keeps no parameter-shaped state named {unknown[0]!r}: state_dtype "
                f"takes {', '.join(repr(k) for k in keys) or 'none'}"
            )
        items = [(f"state_dtype[{key!r}]", dtype) for key, dtype in value.items()]
    else:
        raise TypeError(
            f"state_dtype must be a torch.dtype, '8bit', or a mapping of state keys to them, not "
            f"{type(value).__name__}"
        )
    for name, dtype in items:
        if dtype not in STORAGE_DTYPES:
            names = [repr(d) if isinstance(d, str) else str(d)[6:] for d in STORAGE_DTYPES]
            raise ValueError(f"Invalid {name}: {dtype!r}; state is stored in {', '.join(names)}")


def storage(group: Mapping[str, Any], key: str, param: Tensor | None = None) -> Any:
    """The dtype ``group`` stores its state ``key`` in (or :data:`EIGHT_BIT`, :data:`FOUR_BIT`);
    None for the dtype it is made in. A group that rounds its parameters by its own rule (the
    update computing in float32) stores state in ``param``'s dtype unless ``state_dtype`` says
    otherwise; a parameter smaller than the group's ``min_8bit_size`` keeps its state in its
    own dtype where ``state_dtype`` says 8 or 4 bits, as does one of no whole number of 4-bit
    blocks."""
    value = group.get(KEY)
    if isinstance(value, Mapping):
        value = value.get(key)
    if value in _CODES and param is not None:
        if param.numel() < group.get(MIN_8BIT, MIN_8BIT_DEFAULT) or not param.is_floating_point():
            return None
        if value == FOUR_BIT and not _quant.fits_4bit(param.numel()):
            return None
    if value is None and param is not None and rounding(group) is not None:
        return param.dtype
    return value


def store(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` as a group that stores its state in ``dtype`` keeps it (rounded to nearest)."""
    if dtype is None or isinstance(dtype, str) or not isinstance(value, Tensor):
        return value
    if value.dtype == dtype:
        return value
    if not value.is_floating_point() or value.dim() == 0:
        return value
    return value.to(dtype)


def absmax_key(owner: Any, key: str) -> str:
    """The state key of the absmax of ``owner``'s (an optimizer's) 8-bit state ``key``:
    ``<key>_absmax``, or a name of the optimizer's own (``absmax_keys``: bitsandbytes'
    ``absmax1`` for its ``state1``)."""
    return owner.absmax_keys.get(key) or ABSMAX.format(key)  # type: ignore[no-any-return]


def quantized(entry: Mapping[str, Any], key: str, owner: Any) -> bool:
    """Whether ``entry`` holds its state ``key`` as 8-bit codes and their absmax."""
    value = entry.get(key)
    return (
        isinstance(value, Tensor) and value.dtype == torch.uint8 and absmax_key(owner, key) in entry
    )


def convert_entry(
    entry: dict[str, Any], group: Mapping[str, Any], param: Tensor, owner: Any
) -> None:
    """Store ``entry``'s parameter-shaped state (``owner``'s, an optimizer's
    ``param_shaped_state``) as the group says, in place: rounded to a dtype, quantized to 8
    bits (the unsigned map for ``owner.unsigned_state``, whose values are never negative), or,
    where the group stores it in a dtype and the entry holds 8-bit codes (a loaded
    checkpoint), dequantized."""
    unsigned = owner.unsigned_state
    for key in owner.param_shaped_state:
        if key not in entry:
            continue
        target = storage(group, key, param)
        signed = key not in unsigned
        if quantized(entry, key, owner):
            if target == code_format(entry[key], param):
                continue
            codes, absmax = entry[key], entry.pop(absmax_key(owner, key))
            wide = dequantize(codes, absmax, signed, param.shape)
            entry[key] = wide.to(param.dtype)
        if target in _CODES:
            value = entry[key]
            if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
                quantize = _quant.quantize if target == EIGHT_BIT else _quant.quantize_4bit
                entry[key], entry[absmax_key(owner, key)] = quantize(value.float(), signed)
        elif target is not None:
            entry[key] = store(entry[key], target)


def code_format(codes: Tensor, param: Tensor) -> str:
    """:data:`EIGHT_BIT` for codes of their parameter's shape, :data:`FOUR_BIT` for packed
    ones (half as many bytes as elements)."""
    return EIGHT_BIT if codes.shape == param.shape else FOUR_BIT


def dequantize(codes: Tensor, absmax: Tensor, signed: bool, shape: torch.Size) -> Tensor:
    """The float32 values of a parameter of ``shape`` that 8-bit or 4-bit ``codes`` and their
    blocks' ``absmax`` stand for."""
    if codes.shape == shape:
        return _quant.dequantize(codes, absmax, signed)
    return _quant.dequantize_4bit(codes, absmax, signed, shape)


def check_codes(codes: Tensor, absmax: Tensor, param: Tensor) -> str | None:
    """Why stored ``codes`` and ``absmax`` cannot be a parameter's 8-bit or 4-bit state (its
    shape, or half its elements packed; one float32 per block), or None."""
    n = param.numel()
    if codes.shape == param.shape:
        blocks = _quant.blocks(n)
    elif codes.dim() == 1 and _quant.fits_4bit(n) and codes.numel() * 2 == n:
        blocks = n // _quant.BLOCK_4BIT
    else:
        return f"codes of shape {tuple(codes.shape)} fit no {tuple(param.shape)} parameter"
    if absmax.dtype != torch.float32 or absmax.shape != (blocks,):
        return f"{blocks} float32 block maxima are needed, not {tuple(absmax.shape)} {absmax.dtype}"
    return None


class Wide:
    """What :func:`widen` replaced for one step: by position in the state lists, the stored
    tensors (for 8-bit state: its codes, its absmax and whether its map is signed); and, where
    the step computes in float32 on 16-bit parameters, the parameters and the widened
    parameters and gradients the update runs on."""

    __slots__ = ("grads", "params", "rounding", "state", "wide_params")

    def __init__(self) -> None:
        self.state: dict[tuple[str, int], Any] = {}
        self.params: list[Tensor] | None = None
        self.wide_params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.rounding: str | None = None

    def __bool__(self) -> bool:
        return bool(self.state) or self.params is not None


def rounding(group: Mapping[str, Any]) -> str | None:
    """:data:`KAHAN` or :data:`STOCHASTIC` where ``group`` rounds its 16-bit parameters so."""
    if group.get(KAHAN):
        return KAHAN
    if group.get(STOCHASTIC):
        return STOCHASTIC
    return None


def widen(
    state: dict[str, list[Any]],
    params: list[Tensor],
    grads: list[Tensor],
    how: str | None,
    entries: Sequence[Mapping[str, Any]],
    owner: Any,
) -> Wide:
    """Replace, in ``state``'s lists, each state tensor stored in another floating dtype than
    the update computes in, or as 8-bit codes (in ``entries``), by a copy in that dtype; where
    ``how`` rounds 16-bit parameters, the update computes in float32 on widened copies of them
    and of their gradients."""
    wide = Wide()
    halves = [p.dtype in _HALVES for p in params] if how is not None else []
    if any(halves):
        wide.params, wide.rounding = params, how
        wide.wide_params = [
            p.detach().float() if h else p for p, h in zip(params, halves, strict=True)
        ]
        wide.grads = [g.float() if h else g for g, h in zip(grads, halves, strict=True)]
    computes = wide.wide_params or params
    for key, values in state.items():
        for i, value in enumerate(values):
            dtype = computes[i].dtype
            if (
                isinstance(value, Tensor)
                and value.dtype == torch.uint8
                and quantized(entries[i], key, owner)
            ):
                absmax = entries[i][absmax_key(owner, key)]
                signed = key not in owner.unsigned_state
                wide.state[(key, i)] = (value, absmax, signed)
                values[i] = dequantize(value, absmax, signed, params[i].shape).to(dtype)
            elif (
                isinstance(value, Tensor)
                and value.dtype != dtype
                and value.dim() > 0
                and value.is_floating_point()
                and dtype.is_floating_point
            ):
                wide.state[(key, i)] = value
                values[i] = value.to(dtype)
    return wide


def narrow(state: dict[str, list[Any]], wide: Wide, entries: list[dict[str, Any]]) -> None:
    """Write what the update computed on :func:`widen`'s copies back into the stored tensors
    (state rounded to nearest even, parameters as the group's rounding says), and put those
    back in ``state``'s lists."""
    for (key, i), kept in wide.state.items():
        value = state[key][i]
        if isinstance(kept, tuple):
            codes, absmax, signed = kept
            if codes.shape == value.shape:
                _quant.quantize_into(value, codes, absmax, signed)
            else:
                _quant.quantize_4bit_into(value, codes, absmax, signed)
            state[key][i] = codes
        elif value is not kept:
            kept.copy_(value)
            state[key][i] = kept
    if wide.params is None:
        return
    for i, (p, w) in enumerate(zip(wide.params, wide.wide_params, strict=True)):
        if p is w:
            continue
        with torch.no_grad():
            if wide.rounding == STOCHASTIC:
                p.copy_(stochastic_round(w) if p.dtype == torch.bfloat16 else w)
            else:
                comp = entries[i].get(COMPENSATION)
                if not isinstance(comp, Tensor) or comp.shape != p.shape:
                    comp = entries[i][COMPENSATION] = torch.zeros_like(p)
                kahan_add(p, w, comp)


def kahan_add(p: Tensor, new: Tensor, comp: Tensor) -> None:
    """Move ``p`` (16 bits) towards ``new`` (float32) by the step ``new - p``, compensated as
    torch-optimi's ``kahan_sum`` compensates its updates: the step is added to the
    compensation ``comp``, the compensation to the parameter, and what the parameter's
    rounding lost is kept in ``comp``; each in the parameter's dtype, rounded to nearest."""
    old = p.float()
    comp.add_(new - old)  # c ← c + u
    before = p.clone()
    p.add_(comp)  # p ← p + c
    comp.add_(before.sub_(p))  # c ← c + (p_old - p)


def stochastic_round(x: Tensor) -> Tensor:
    """``x`` (float32) rounded to bfloat16 up or down at random, away from zero with the
    probability of the 16 bits that bfloat16 drops, read as a fraction: the rounding of
    torchao's ``_fp32_to_bf16_sr``, which draws the same bits from torch's default generator
    (``torch.randint(0, 2**16)``, int32, of ``x``'s shape)."""
    bits = x.contiguous().view(torch.int32)
    chance = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32)
    kept = bits & -65536  # the upper 16 bits: rounded towards zero
    up = torch.where(chance < (bits & 0xFFFF), kept + 0x10000, kept)
    return up.view(torch.float32).bfloat16()


def check_group(group: Mapping[str, Any], keys: tuple[str, ...], owner: str) -> None:
    """Raise for a group's storage settings that a constructor would refuse."""
    check(group.get(KEY), keys, owner)
    for flag in (KAHAN, STOCHASTIC):
        value = group.get(flag, False)
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, not {type(value).__name__}")
    size = group.get(MIN_8BIT, MIN_8BIT_DEFAULT)
    if type(size) is not int or size < 0:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (a whole number of elements, >= 0)")
    if group.get(KAHAN) and group.get(STOCHASTIC):
        raise ValueError(
            "kahan_sum and bf16_stochastic_round are two ways to round the same update: choose one"
        )


#: The constructor's keywords, with their defaults.
KEYWORDS: dict[str, Any] = {
    KEY: None,
    KAHAN: False,
    STOCHASTIC: False,
    MIN_8BIT: MIN_8BIT_DEFAULT,
}


def install(opt: Any, settings: Mapping[str, Any]) -> None:
    """Give ``opt`` (just constructed) the storage settings its constructor was called with
    (``state_dtype``, ``kahan_sum``, ``bf16_stochastic_round``): checked, as the defaults of
    its groups (a group's own values stay), and applied to state the constructor made
    (Adagrad's)."""
    keys: tuple[str, ...] = opt.param_shaped_state
    owner = type(opt).__name__
    check_group(settings, keys, owner)
    for group in opt.param_groups:
        check_group({**settings, **group}, keys, owner)
    for name, value in settings.items():
        if value != KEYWORDS[name]:
            opt.defaults[name] = value
            for group in opt.param_groups:
                group.setdefault(name, value)
    for group in opt.param_groups:
        if group.get(KEY) is None:
            continue
        for p in group["params"]:
            entry = opt.state.get(p)
            if entry:
                convert_entry(entry, group, p, opt)


def taking_state_dtype(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (an optimizer's constructor) taking the keywords of :data:`KEYWORDS` besides
    its own arguments."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        settings = {name: kwargs.pop(name, default) for name, default in KEYWORDS.items()}
        init(self, *args, **kwargs)
        install(self, settings)

    signature = inspect.signature(init)
    annotations = {
        KEY: "torch.dtype | str | dict[str, torch.dtype | str] | None",
        KAHAN: "bool",
        STOCHASTIC: "bool",
        MIN_8BIT: "int",
    }
    extra = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotations[name]
        )
        for name, default in KEYWORDS.items()
    ]
    parameters = list(signature.parameters.values())
    tail = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*head, *extra, *tail]
    )
    __init__.takes_state_dtype = True  # type: ignore[attr-defined]
    return __init__
