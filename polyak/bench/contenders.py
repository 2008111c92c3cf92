"""Who takes part: torch.optim's paths, polyak's strategies and the peer libraries' classes,
each built with hyperparameters that make every contender perform the same update."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import polyak
from polyak.bench.measure import MEMORY, InPlaceAdd
from polyak.bench.optimizers import (
    CLASS_NAMES,
    HYPERPARAMETERS,
    TENSORS_MOVED,
    build,
    default,
)
from polyak.bench.results import PeerStatus, describe

#: The contender every other one is compared with.
REFERENCE = "torch fused=True"

#: Builds an optimizer over the given parameters.
OptimizerFactory = Callable[[list[Tensor]], Any]

#: The peer libraries, as ``(import name, pip distribution name)``.
PEER_LIBRARIES: tuple[tuple[str, str], ...] = (
    ("optimi", "torch-optimi"),
    ("heavyball", "heavyball"),
    ("pytorch_optimizer", "pytorch-optimizer"),
)

#: The optimizers the peer libraries are timed for, with hyperparameters matching torch's.
PEER_OPTIMIZERS = ("sgd", "adam", "adamw")

#: heavyball compiles its update with torch.compile over the whole list of tensors, unrolled
#: tensor by tensor, so compilation time grows with the number of tensors: on a shared 2-core
#: machine its first SGD step took about 20 s on 148 tensors and 220 s on the 2000 of ``small``.
#: Cases with more tensors than this leave heavyball out; None includes it everywhere.
HEAVYBALL_MAX_TENSORS: int | None = 1000


@dataclass(frozen=True)
class Contender:
    """One implementation of an optimizer, as it takes part in a benchmark.

    Attributes:
        label: the row label in the report.
        make: builds the optimizer over a list of parameters; None when unavailable.
        unavailable: why the contender cannot run, or None.
        max_tensors: the most parameter tensors the contender takes part with, or None for
            no limit; a case with more gets an n/a row saying so.
        why_max_tensors: the reason for ``max_tensors``, shown in that row.
    """

    label: str
    make: OptimizerFactory | None
    unavailable: str | None = None
    max_tensors: int | None = None
    why_max_tensors: str = ""


def import_peers(names: Sequence[tuple[str, str]] | None = None) -> dict[str, PeerStatus]:
    """Import the peer libraries that can be imported.

    Args:
        names: ``(import name, distribution name)`` pairs; None: :data:`PEER_LIBRARIES`.

    Returns:
        The status of each, by import name.
    """
    status = {}
    for name, distribution in PEER_LIBRARIES if names is None else names:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            status[name] = PeerStatus(name, distribution, None, describe(error))
        else:
            version = getattr(module, "__version__", None)
            if version is None:
                try:
                    from importlib.metadata import version as dist_version

                    version = dist_version(distribution)
                except Exception:
                    version = "?"
            status[name] = PeerStatus(name, distribution, str(version), None)
    return status


def _own_class(module: ModuleType, name: str) -> tuple[Any, str | None]:
    """A peer's class of that name, or why it does not count as the peer's own."""
    cls = getattr(module, name, None)
    if cls is None:
        return None, f"{module.__name__} has no {name}"
    if cls is getattr(torch.optim, name, None):
        return None, f"{module.__name__}.{name} is torch.optim.{name} re-exported"
    return cls, None


def _factory(cls: Any, **kwargs: Any) -> OptimizerFactory:
    """A factory that builds ``cls(params, **kwargs)`` (see :func:`build`)."""

    def make(params: list[Tensor]) -> Any:
        return build(cls, params, **kwargs)

    return make


def _peer_contender(optimizer: str, module: ModuleType) -> Contender:
    """A peer library's implementation of an optimizer, with hyperparameters matching
    torch.optim's so that every contender performs the same update."""
    name = module.__name__
    lr = HYPERPARAMETERS[optimizer]["lr"]
    momentum = default(optimizer, "momentum", 0.0)
    weight_decay = default(optimizer, "weight_decay", 0.0)
    adam = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    if name == "optimi":
        # optimi's defaults differ from torch's (betas (0.9, 0.99), eps 1e-6, a momentum buffer
        # starting at zero), so they are set to torch's; its AdamW decays by lr * weight_decay
        # like torch's. foreach and triton stay at their defaults: on CPU that is a for-loop.
        cls = getattr(module, CLASS_NAMES[optimizer])
        if optimizer == "sgd":
            make = _factory(cls, lr=lr, momentum=momentum, torch_init=True)
        else:
            make = _factory(cls, **adam)
        return Contender(f"optimi.{CLASS_NAMES[optimizer]}", make)
    if name == "heavyball":
        # heavyball has SGD with heavy-ball momentum and AdamW (decay by lr * weight_decay);
        # Adam without weight decay is its AdamW with weight_decay=0. It compiles its update
        # functions with torch.compile on first use, so its first step includes compilation.
        why = (
            "its torch.compile'd update unrolls over every tensor, so compiling for this many "
            "takes minutes (polyak.bench.contenders.HEAVYBALL_MAX_TENSORS sets the limit)"
        )
        if optimizer == "sgd":
            make = _factory(module.SGD, lr=lr, beta=momentum)
            label = "heavyball.SGD"
        else:
            make = _factory(module.AdamW, **adam)
            label = "heavyball.AdamW" + ("(weight_decay=0)" if optimizer == "adam" else "")
        return Contender(label, make, None, HEAVYBALL_MAX_TENSORS, why)
    if name == "pytorch_optimizer":
        # Its SGD, Adam and AdamW are torch.optim's classes re-exported; its own SGD is SGDW,
        # which with weight_decay=0 is SGD with momentum.
        class_name = "SGDW" if optimizer == "sgd" else CLASS_NAMES[optimizer]
        cls, reason = _own_class(module, class_name)
        label = f"pytorch_optimizer.{class_name}"
        if cls is None:
            return Contender(label, None, reason)
        if optimizer == "sgd":
            return Contender(label, _factory(cls, lr=lr, momentum=momentum, weight_decay=0.0))
        return Contender(label, _factory(cls, lr=lr, weight_decay=weight_decay))
    return Contender(name, None, "no recipe for this library")


def contenders_for(optimizer: str, peers: dict[str, PeerStatus] | None = None) -> list[Contender]:
    """Every contender for an optimizer: torch.optim, polyak and the peer libraries.

    Args:
        optimizer: a key of :data:`~polyak.bench.CLASS_NAMES`, e.g. ``"adam"``.
        peers: the peer libraries' import status, from :func:`import_peers`; None leaves the
            peers out.

    Returns:
        The contenders; those that cannot run carry the reason in ``unavailable``.

    Raises:
        ValueError: the optimizer is not one of the benchmarked ones.
    """
    if optimizer not in CLASS_NAMES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(CLASS_NAMES)}")
    name = CLASS_NAMES[optimizer]
    hyper = HYPERPARAMETERS[optimizer]
    polyak_cls = getattr(polyak, name, None)
    # An optimizer torch.optim lacks (Lion, Adan, ...) is timed against polyak's own paths.
    torch_cls = getattr(torch.optim, name, None)

    moved = TENSORS_MOVED[optimizer]

    def in_place_add(params: list[Tensor]) -> Any:
        return InPlaceAdd(moved * sum(p.numel() * p.element_size() for p in params))

    described = torch_cls if torch_cls is not None else polyak_cls
    takes = inspect.signature(described).parameters if described is not None else {}
    contenders = [Contender(MEMORY, in_place_add)]
    if torch_cls is not None and "foreach" in takes:
        contenders += [
            Contender("torch foreach=False", _factory(torch_cls, **hyper, foreach=False)),
            Contender("torch foreach=True", _factory(torch_cls, **hyper, foreach=True)),
        ]
    elif torch_cls is not None:
        # One path only (Muon, LBFGS, SparseAdam).
        contenders.append(Contender("torch (default)", _factory(torch_cls, **hyper)))
    fused = "fused" in takes and torch_cls is not None
    if fused:
        contenders.append(Contender(REFERENCE, _factory(torch_cls, **hyper, fused=True)))
    strategies: tuple[tuple[str, dict[str, bool]], ...] = (
        ("polyak foreach=False", {"foreach": False}),
        ("polyak foreach=True", {"foreach": True}),
    )
    polyak_flags: tuple[tuple[str, dict[str, bool]], ...] = (
        ("polyak (default)", {}),
        *(strategies if "foreach" in takes else ()),
        *((("polyak fused=True", {"fused": True}),) if fused else ()),
    )
    for label, flags in polyak_flags:
        if polyak_cls is None:
            contenders.append(Contender(label, None, f"polyak.{name} does not exist yet"))
        else:
            contenders.append(Contender(label, _factory(polyak_cls, **hyper, **flags)))
    for peer in (peers or {}).values():
        # A peer that cannot be imported is said once, in the run's header, not in every table.
        if peer.error is None and optimizer in PEER_OPTIMIZERS:
            contenders.append(_peer_contender(optimizer, importlib.import_module(peer.name)))
    return contenders
