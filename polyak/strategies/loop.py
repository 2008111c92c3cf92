"""The ``loop`` strategy: every primitive runs one tensor at a time.

The numbers are those of torch.optim's per-tensor path. Parameters are taken in chunks: a
large parameter alone, small neighbours together up to :data:`CHUNK_NUMEL` elements, so the
temporaries alive at once stay within the larger of one parameter and one chunk (torch's loop
holds one parameter's), while a model's many small tensors share one call of the update rule.

On the CPU, for every dtype but float16 and bfloat16, torch's ``_foreach_*`` kernels compute
exactly what the tensor methods compute (the reference tests check it per configuration), so a
chunk of such tensors runs them and saves a Python call per tensor and primitive. Elsewhere,
and for sparse gradients, tensor hyperparameters and differentiable steps, each primitive
calls the tensor method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from polyak import _ops
from polyak.strategies.buckets import run_on

#: The most elements a chunk of several parameters may hold.
CHUNK_NUMEL = 1 << 16


def chunks(params: list[Tensor], limit: int = CHUNK_NUMEL) -> Iterator[list[int]]:
    """Consecutive index runs of ``params`` whose sizes add up to at most ``limit``."""
    run: list[int] = []
    total = 0
    for i, p in enumerate(params):
        n = p.numel()
        if run and total + n > limit:
            yield run
            run, total = [], 0
        run.append(i)
        total += n
    if run:
        yield run


_PER_TENSOR_DTYPES = (torch.float16, torch.bfloat16)
_Lists = dict[str, list[Tensor | None]]


def _has_tensor(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return isinstance(value, Tensor)


def _batchable(
    params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor | None]], hp: Any
) -> bool:
    # Tensor hyperparameters enter tensor methods as tensors (lerp's weight, for one), which
    # the foreach kernels would read as numbers: such groups stay per tensor. So does state of
    # a dtype other than its parameter's (an integer step counter, a float64 buffer of a
    # float32 parameter), where foreach kernels and tensor methods promote differently, and
    # so do tensors written through a negative or conjugate view, which foreach kernels refuse,
    # and tensor subclasses.
    return (
        not torch.is_grad_enabled()
        and not any(_has_tensor(v) for v in vars(hp).values())
        and all(
            p.is_cpu and p.dtype not in _PER_TENSOR_DTYPES and not g.is_sparse and _direct(p)
            for p, g in zip(params, grads, strict=True)
        )
        and all(
            t is None
            or (
                isinstance(t, Tensor)
                and t.is_floating_point()
                and (t.dim() == 0 or t.dtype == p.dtype)
                and _direct(t)
            )
            for values in state.values()
            for t, p in zip(values, params, strict=True)
        )
    )


def _direct(t: Tensor) -> bool:
    # Subclasses (DTensor) may lack foreach kernels the tensor methods have.
    return type(t) in (Tensor, torch.nn.Parameter) and not (t.is_neg() or t.is_conj())


def _mode(
    params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor | None]], hp: Any
) -> contextlib.AbstractContextManager[None]:
    # One tensor (a large parameter's chunk) costs less through its tensor methods.
    batched = len(params) > 1 and _batchable(params, grads, state, hp)
    return contextlib.nullcontext() if batched else _ops.per_tensor()


def shared(params: list[Tensor], state: dict[str, list[Tensor | None]]) -> bool:
    """Whether parameters share memory, or several parameters share a state tensor."""
    tensors = [*params, *(t for values in state.values() for t in values if t is not None)]
    if len({id(t) for t in tensors}) != len(tensors):
        return True
    plain = [
        p
        for p in params
        if type(p) in (Tensor, torch.nn.Parameter) and p.layout == torch.strided and p.numel()
    ]
    # Subclasses (DTensor) hold no storage of their own to compare.
    return len({p.untyped_storage().data_ptr() for p in plain}) != len(plain)


def run(
    update: Any,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor | None]],
    hp: Any,
) -> None:
    """Call ``update`` chunk by chunk, writing back any state it creates."""
    if len(params) == 1:
        # One tensor (optimizer-in-backward steps one parameter per optimizer): the tensor
        # methods, which cost less per call than the foreach kernels and compute the same.
        with _ops.per_tensor():
            update(params, grads, state, hp)
        return
    if shared(params, state):
        with _ops.per_tensor():
            in_turn(update, params, grads, state, hp)
        return
    if sum(p.numel() for p in params) <= CHUNK_NUMEL:
        with _mode(params, grads, state, hp):
            update(params, grads, state, hp)
        return
    for idx in chunks(params):
        run_on(update, idx, params, grads, state, hp, lambda ps, gs, st: _mode(ps, gs, st, hp))


def in_turn(update: Any, params: list[Tensor], grads: list[Tensor], state: _Lists, hp: Any) -> None:
    """Call ``update`` on one parameter at a time, so that each update sees the one before.

    A parameter listed twice, or state shared by several parameters (a step counter assigned
    to each by hand), is updated so, as torch.optim's loop does.
    """
    for i in range(len(params)):
        run_on(update, [i], params, grads, state, hp)
