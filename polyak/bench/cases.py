"""The sets of parameter shapes the benchmark steps (*cases*), and their tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Case:
    """A set of parameter shapes to optimize.

    Attributes:
        name: how the case is called on the command line and in the report.
        shapes: the shape of every parameter tensor.
        description: a few words on where the shapes come from.
        per_tensor: each tensor has an optimizer of its own, stepped on its own with grad
            mode off, as optimizer-in-backward steps each parameter in a hook as its gradient
            is ready; a timed step steps them all.
    """

    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str = ""
    #: How the parameters are held and stepped: ``""`` plain tensors; ``"dtensor"`` DTensor
    #: shards on a one-rank mesh, as FSDP2 holds them; ``"amp"`` each step through a
    #: GradScaler (scale 1, so the reused gradients stay as they are); ``"channels_last"``
    #: 4-D parameters and gradients in channels-last memory format.
    variant: str = ""
    per_tensor: bool = False

    @property
    def numel(self) -> int:
        """The total number of parameter elements."""
        return sum(math.prod(shape) for shape in self.shapes)


def _gpt2_shapes() -> tuple[tuple[int, ...], ...]:
    """The 148 parameter shapes of GPT-2 small (124M), in ``named_parameters`` order."""
    d, vocab, ctx = 768, 50257, 1024
    block = (
        (d,),
        (d,),
        (d, 3 * d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (d, 4 * d),
        (4 * d,),
        (4 * d, d),
        (d,),
    )
    return ((vocab, d), (ctx, d), *(block * 12), (d,), (d,))


def _convnet_shapes() -> tuple[tuple[int, ...], ...]:
    """48 ResNet-like shapes: 16 convolutions, 15 batch norms and a classifier, 12.5M in all."""
    convs = (
        (64, 3, 7, 7),
        (64, 64, 3, 3),
        (64, 64, 3, 3),
        (128, 64, 3, 3),
        (128, 128, 3, 3),
        (128, 64, 1, 1),
        (256, 128, 3, 3),
        (256, 256, 3, 3),
        (256, 256, 3, 3),
        (256, 128, 1, 1),
        (512, 256, 3, 3),
        (512, 512, 3, 3),
        (512, 512, 3, 3),
        (512, 512, 3, 3),
        (512, 256, 1, 1),
        (1536, 512, 1, 1),
    )
    shapes: list[tuple[int, ...]] = []
    for index, conv in enumerate(convs):
        shapes.append(conv)
        if index < len(convs) - 1:
            shapes += [(conv[0],), (conv[0],)]
    return (*shapes, (1000, 1536), (1000,))


#: The built-in cases, by name.
CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("small", ((1024,),) * 2000, "2000 tensors of 1024"),
        Case("mlp", ((1024, 1024), (1024,)) * 8, "8 Linear(1024, 1024) layers"),
        Case("convnet", _convnet_shapes(), "ResNet-like convolutions, batch norms, classifier"),
        Case("gpt2", _gpt2_shapes(), "GPT-2 small"),
        Case(
            "mlp-dtensor",
            ((1024, 1024), (1024,)) * 8,
            "the mlp set as DTensor shards (one-rank mesh, as FSDP2 holds them)",
            "dtensor",
        ),
        Case("mlp-amp", ((1024, 1024), (1024,)) * 8, "the mlp set, stepped by a GradScaler", "amp"),
        Case(
            "convnet-cl",
            _convnet_shapes(),
            "the convnet set in channels-last memory format",
            "channels_last",
        ),
        Case(
            "in-backward",
            ((64, 64), (64,)) * 20,
            "20 Linear(64, 64), an optimizer per tensor (optimizer-in-backward)",
            per_tensor=True,
        ),
    )
}

#: The cases a default run times.
DEFAULT_CASES = ("small", "mlp", "convnet", "gpt2", "in-backward")
#: Cases that ``quick`` mode leaves out because they take too long.
QUICK_SKIPS = ("gpt2",)


def resolve_cases(cases: Sequence[str | Case]) -> list[Case]:
    """Look up named cases; pass custom ones through.

    Raises:
        ValueError: a name that is not in :data:`CASES`.
    """
    resolved = []
    for case in cases:
        if isinstance(case, Case):
            resolved.append(case)
        elif case in CASES:
            resolved.append(CASES[case])
        else:
            raise ValueError(f"unknown case {case!r}; choose from {sorted(CASES)}")
    return resolved


def tensors(case: Case, seed: int) -> list[Tensor]:
    """Seeded standard-normal float32 tensors of the case's shapes (DTensors, sharded on their
    first dimension, for a ``dtensor`` case; 4-D ones in channels-last memory format, as a
    model's convolution weights and their gradients are after ``model.to(memory_format=
    torch.channels_last)``, for a ``channels_last`` case)."""
    generator = torch.Generator().manual_seed(seed)
    made = [torch.randn(shape, generator=generator) for shape in case.shapes]
    if case.variant == "channels_last":
        return [
            t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in made
        ]
    if case.variant != "dtensor":
        return made
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _one_rank_mesh()
    return [distribute_tensor(t, mesh, [Shard(0)]) for t in made]


def _one_rank_mesh() -> Any:
    """A device mesh of this process alone, made with the process group it needs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return init_device_mesh("cpu", (dist.get_world_size(),))
