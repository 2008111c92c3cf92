"""bitsandbytes' 8-bit optimizers with its reference quantization."""

from __future__ import annotations

from typing import Any

import torch


def reference_rounding(monkeypatch: Any) -> None:
    """Make bitsandbytes' CPU optimizers quantize their state with its reference (pure-torch)
    rounding, which polyak follows, instead of its native library's approximate search."""
    try:
        import bitsandbytes.backends.cpu.ops as cpu_ops
    except ImportError:
        return
    quantize = torch.ops.bitsandbytes.quantize_blockwise.default
    reference = torch._C.DispatchKeySet("CompositeExplicitAutograd")

    def requantize(
        values: torch.Tensor,
        code: torch.Tensor,
        absmax: torch.Tensor,
        codes: torch.Tensor,
        block: int,
    ) -> None:
        new_codes, new_absmax = quantize.redispatch(reference, values, code, block)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)

    monkeypatch.setattr(cpu_ops, "_quant_blockwise_fp32_direct", requantize)
