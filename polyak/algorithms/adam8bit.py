"""bitsandbytes' 8-bit Adam and AdamW, with their checkpoints."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from polyak import _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists, dynamic_map

#: Where bitsandbytes' ``state_dict`` puts each parameter's quantization state.
QUANT_STATE = "__bnb_optimizer_quant_state__"
_QUANT_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")


class AdamW8bit(Optimizer):
    """AdamW with its moments stored in 8 bits, block-wise: bitsandbytes' ``AdamW8bit``.

    For each parameter θ with gradient g at step t (the moments m, v dequantized from their
    8-bit codes, and quantized again after the step):

    .. math::

        m_t ← β_1 m_{t-1} + (1 - β_1) g_t

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

        θ_{t-1} ← (1 - γ λ) θ_{t-1}

        θ_t ← θ_{t-1} - γ / (1 - β_1^t) · m_t / (√v_t / √(1 - β_2^t) + ε)

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps`` and λ = ``weight_decay``. Tensors
    under ``min_8bit_size`` elements keep float32 moments and step as bitsandbytes' 32-bit
    path does, θ_t ← θ_{t-1} - γ √(1 - β_2^t) / (1 - β_1^t) · m_t / (√v_t + ε √(1 - β_2^t)).

    Note:
        These are bitsandbytes 0.50's CPU numbers: its operation order, in float32, with the
        moments (``state1``, ``state2``) in its block-wise 8-bit format (``state_dtype="8bit"``:
        blocks of 256, the signed dynamic map for m, the unsigned one for v). The codes follow
        bitsandbytes' reference rounding (its pure-torch backend), element for element; its
        native CPU library, where it loads, gives another code for about one element in 700
        (see docs/design.md), so a step there differs in those elements' moments. The
        checkpoint is bitsandbytes': ``step`` as a number, ``state1``/``state2``,
        ``absmax1``/``absmax2`` and the maps ``qmap1``/``qmap2`` under
        ``__bnb_optimizer_quant_state__``; either loads the other's. ``optim_bits`` and
        ``is_paged`` are taken as bitsandbytes takes them (the state is 8-bit; nothing is
        paged on the CPU); ``args`` is not taken.

    Args:
        params: the parameters to optimize, or dicts defining parameter groups.
        lr: learning rate γ, >= 0 (default: 1e-3).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.999)).
        eps: ε, >= 0 (default: 1e-8).
        weight_decay: decoupled decay λ, >= 0 (default: 1e-2).
        amsgrad: must be False, as in bitsandbytes (default: False).
        optim_bits: must be 32, bitsandbytes' default (default: 32).
        args: must be None (default: None).
        min_8bit_size: tensors with fewer elements keep float32 moments (default: 4096).
        is_paged: accepted; no effect on the CPU (default: False).

    References:
        T. Dettmers, M. Lewis, S. Shleifer, L. Zettlemoyer. 8-bit Optimizers via Block-wise
        Quantization. ICLR 2022. https://arxiv.org/abs/2110.02861
    """

    state_keys = ("step", "state1", "state2")
    param_shaped_state = ("state1", "state2")
    unsigned_state = ("state2",)
    absmax_keys = {"state1": "absmax1", "state2": "absmax2"}  # noqa: RUF012 - read-only table
    foreach_by_default = False
    # Its own rule, tensor by tensor, with its own keyword set: not the flat kernel's, and no
    # state_dtype keyword (the state is 8-bit).
    elementwise = False
    not_flat_reason = (
        "bitsandbytes' rule, by tensor size (its 8-bit and 32-bit paths' orders), runs tensor "
        "by tensor on torch's operations; state_dtype='8bit' runs AdamW's on the flat kernel"
    )
    _default_decay = 1e-2

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
    ) -> None:
        name = type(self).__name__
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True")
        if optim_bits != 32:
            raise ValueError(
                f"{name} only supports optim_bits=32 (default value for compatibility)"
            )
        if args is not None:
            raise ValueError(f"{name} takes its settings as arguments, not as args")
        decay = self._default_decay if weight_decay is None else weight_decay
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": decay,
            "alpha": 0.0,
            "t_alpha": None,
            "t_beta3": None,
        }
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)
        # State in bitsandbytes' 8-bit format, for every group; its checkpoint layout.
        for group in self.param_groups:
            group.setdefault("state_dtype", "8bit")
            group.setdefault("min_8bit_size", min_8bit_size)
        self.register_state_dict_post_hook(_wrap_quant_state)
        self.register_load_state_dict_pre_hook(_unwrap_quant_state)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """bitsandbytes' checks of its numbers, in its order and wording."""
        if not 0.0 <= group["lr"]:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        for i, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Dense, real gradients."""
        _common.check_dense(type(self).__name__, grads)
        if any(p.is_complex() for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support complex parameters")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Any]:
        """A step count of zero and zero moments (float32, quantized after the first step)."""
        return {
            "step": 0,
            "state1": torch.zeros_like(param, dtype=torch.float32),
            "state2": torch.zeros_like(param, dtype=torch.float32),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one step to ``params`` given their ``grads``, as bitsandbytes' CPU path."""
        beta1, beta2 = hp.betas
        steps: list[Any] = state["step"]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            steps[i] += 1
            step = steps[i]
            m: Any = state["state1"][i]
            v: Any = state["state2"][i]
            g32 = [g.float() * 1.0]
            p32 = [p.detach().float()]
            _ops.mul_([m], beta1)
            _ops.add_scaled_([m], g32, 1.0 - beta1)
            _ops.mul_([v], beta2)
            _ops.addcmul_([v], g32, g32, 1.0 - beta2)
            correction1 = 1.0 - beta1**step
            correction2 = math.sqrt(1.0 - beta2**step)
            if p.numel() >= hp.min_8bit_size:
                # The 8-bit path's order.
                denom = _ops.div(_ops.sqrt([v]), correction2)
                _ops.add_(denom, hp.eps)
                if hp.weight_decay > 0.0:
                    _ops.mul_(p32, 1.0 - hp.lr * hp.weight_decay)
                _ops.addcdiv_(p32, [m], denom, -hp.lr / correction1)
            else:
                # The 32-bit path's.
                step_size = -hp.lr * correction2 / correction1
                if hp.weight_decay > 0.0:
                    _ops.mul_(p32, 1.0 - hp.lr * hp.weight_decay)
                denom = _ops.sqrt([v])
                _ops.add_(denom, hp.eps * correction2)
                _ops.add_scaled_(p32, _ops.div([m], denom), step_size * 1.0)
            with torch.no_grad():
                p.copy_(p32[0])


class Adam8bit(AdamW8bit):
    """Adam with its moments stored in 8 bits, block-wise: bitsandbytes' ``Adam8bit``, whose
    update is :class:`AdamW8bit`'s (its weight decay is decoupled too), with no decay by
    default."""

    _default_decay = 0.0

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged
        )


def _wrap_quant_state(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """bitsandbytes' layout: each parameter's 8-bit state, with its maps, in one dict."""
    for entry in state_dict["state"].values():
        if not isinstance(entry, dict):
            continue
        quant = {key: entry.pop(key) for key in _QUANT_KEYS if key in entry}
        if isinstance(quant.get("state1"), Tensor) and quant["state1"].dtype == torch.uint8:
            quant["qmap1"] = dynamic_map(True).clone()
            quant["qmap2"] = dynamic_map(False).clone()
        if quant:
            entry[QUANT_STATE] = quant
    return state_dict


def _unwrap_quant_state(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint in bitsandbytes' layout as the base loads it (the maps checked and
    dropped: polyak's are bitsandbytes' own)."""
    if not isinstance(state_dict.get("state"), Mapping):
        return state_dict  # the base refuses it, as torch does
    state_dict = {**state_dict, "state": dict(state_dict["state"])}
    for pid, entry in state_dict["state"].items():
        if not isinstance(entry, Mapping) or QUANT_STATE not in entry:
            continue
        # (A key both there and outside it is read outside, where the base checks it.)
        quant = entry[QUANT_STATE]
        if not isinstance(quant, Mapping):
            raise TypeError(f"loaded state for parameter {pid}: {QUANT_STATE} is not a dict")
        entry = {**quant, **entry}
        del entry[QUANT_STATE]
        for key, signed in (("qmap1", True), ("qmap2", False)):
            qmap = entry.pop(key, None)
            if qmap is not None and not torch.equal(qmap.cpu(), dynamic_map(signed)):
                raise ValueError(
                    f"loaded state for parameter {pid} has a {key} other than bitsandbytes' "
                    "dynamic map"
                )
        state_dict["state"][pid] = entry
    return state_dict
