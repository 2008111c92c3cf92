"""Which optimizers the benchmark times and how it drives each, read off the classes.

The optimizers are the :class:`polyak.Optimizer` classes in ``polyak.__all__``, keyed by their
lower-case names, each against the ``torch.optim`` class of the same name. What the benchmark
needs to know of each is found from the class itself: its learning rate is its default; its
step takes a closure where ``step``'s ``closure`` has no default; and one instance, built and
stepped on a small tensor, tells which tensors and gradients it takes and how many
parameter-sized tensors its state holds. Only :data:`SETTINGS` is written by hand, for the two
optimizers whose defaults would time something else than training does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import polyak
from polyak.bench.cases import Case
from polyak.bench.measure import state_bytes
from polyak.bench.results import describe

#: The arguments the benchmark gives an optimizer beyond its class's defaults: SGD's momentum
#: (plain SGD keeps no state), five LBFGS iterations a step with a history of 10 pairs (the
#: default 100 would hold 200 copies of the parameters), and StableAdamW's learning rate, which
#: torch-optimi's class requires.
SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9},
    "lbfgs": {"max_iter": 5, "history_size": 10},
    "stableadamw": {"lr": 1e-3},
}

#: Gradients of optimizers that take sparse ones (SparseAdam) hold one row in this many, as
#: an embedding's do.
SPARSE_ROW_EVERY = 8


def _classes() -> dict[str, type[polyak.Optimizer]]:
    """polyak's optimizer classes, by lower-case name, in name order."""
    found = {}
    for name in polyak.__all__:
        cls = getattr(polyak, name)
        if isinstance(cls, type) and issubclass(cls, polyak.Optimizer):
            if cls is not polyak.Optimizer:
                found[name.lower()] = cls
    return dict(sorted(found.items()))


_CLASSES = _classes()

#: The class name of each optimizer in torch.optim and polyak.
CLASS_NAMES: dict[str, str] = {key: cls.__name__ for key, cls in _CLASSES.items()}


def twin(optimizer: str) -> type[Any]:
    """The class the benchmark studies an optimizer through: ``torch.optim``'s of that name,
    whose steps start no build, or polyak's where torch has none."""
    name = CLASS_NAMES[optimizer]
    return getattr(torch.optim, name, None) or _CLASSES[optimizer]


def default(optimizer: str, argument: str, otherwise: Any = None) -> Any:
    """What an optimizer is built with for one argument: :data:`SETTINGS`' value, or the class's
    default, or ``otherwise`` where it has neither."""
    if argument in SETTINGS.get(optimizer, {}):
        return SETTINGS[optimizer][argument]
    parameter = inspect.signature(_CLASSES[optimizer]).parameters.get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return otherwise
    return parameter.default


#: The arguments each benchmarked optimizer is built with, as torch.optim spells them: its
#: class's default learning rate and :data:`SETTINGS`.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    key: {"lr": default(key, "lr"), **SETTINGS.get(key, {})} for key in CLASS_NAMES
}


def _takes_closure(cls: type[Any]) -> bool:
    """Whether a class's ``step`` must be given a closure."""
    closure = inspect.signature(cls.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


#: Optimizers whose step takes a closure (LBFGS): each evaluation sets the gradient of the
#: quadratic <g, θ - θ_0> + |θ - θ_0|^2 / 2 around the first parameters θ_0, with the case's
#: gradients g, and returns its value.
CLOSURE_STEPS = frozenset(key for key in CLASS_NAMES if _takes_closure(twin(key)))


def sparse_rows(grad: Tensor) -> Tensor:
    """A sparse gradient holding one row of ``grad`` in :data:`SPARSE_ROW_EVERY`, coalesced."""
    rows = torch.arange(0, grad.shape[0], SPARSE_ROW_EVERY)
    sparse = torch.sparse_coo_tensor(
        rows.unsqueeze(0), grad[rows], grad.shape, check_invariants=True
    )
    return sparse.coalesce()


def quadratic_closure(params: list[Tensor], grads: list[Tensor]) -> Callable[[], float]:
    """The closure of :data:`CLOSURE_STEPS`: the loss <g, θ - θ_0> + |θ - θ_0|^2 / 2 around
    the parameters θ_0 it is made at, and its gradient g + θ - θ_0 set as each ``.grad``."""
    anchors = [p.detach().clone() for p in params]

    def closure() -> float:
        loss = 0.0
        for p, g, p0 in zip(params, grads, anchors, strict=True):
            delta = p.detach() - p0
            p.grad = g + delta
            flat = delta.view(-1)
            loss += float(g.view(-1).dot(flat)) + 0.5 * float(flat.dot(flat))
        return loss

    return closure


@dataclass(frozen=True)
class Needs:
    """How the benchmark drives one optimizer, as stepping one instance found.

    Attributes:
        closure: its step takes a closure (:data:`CLOSURE_STEPS`).
        matrices: it takes 2-D tensors only (Muon): each case is reduced to its 2-D tensors.
        sparse: it takes sparse gradients only (SparseAdam): each case is reduced to its 2-D
            tensors, as an embedding's, with gradients from :func:`sparse_rows`.
        state_tensors: how many parameter-sized tensors its state holds (SGD's momentum buffer
            one, Adam's moments two, Adafactor's second moment of a vector one, LBFGS its
            direction, previous gradient and the pairs of its history that a step fills).
    """

    closure: bool
    matrices: bool
    sparse: bool
    state_tensors: int


#: The tensors an optimizer is tried on, in order, each as (shape, sparse gradient): the first
#: one that builds and steps says what it takes.
_TRIES: tuple[tuple[tuple[int, ...], bool], ...] = (
    ((4096,), False),
    ((4096,), True),
    ((64, 64), False),
    ((64, 64), True),
)
#: Steps taken before the state is counted, so that state made at a later step counts too.
_STEPS = 2


def build(cls: Any, params: list[Tensor], **kwargs: Any) -> Any:
    """``cls(params, **kwargs)``, in training mode where the optimizer has modes
    (Schedule-Free's ``train()``, without which it refuses to step)."""
    optimizer = cls(params, **kwargs)
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()
    return optimizer


def _stepped_state_bytes(optimizer: str, shape: tuple[int, ...], sparse: bool) -> int:
    """Build the optimizer over one seeded tensor, step it, and return its state's bytes."""
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(shape, generator=generator).requires_grad_()
    grad = torch.randn(shape, generator=generator)
    if sparse:
        grad = sparse_rows(grad)
    made = build(twin(optimizer), [param], **HYPERPARAMETERS[optimizer])
    closure = quadratic_closure([param], [grad]) if optimizer in CLOSURE_STEPS else None
    for _ in range(_STEPS):
        param.grad = grad
        if closure is None:
            made.step()
        else:
            made.step(closure)
    return state_bytes(made)


@functools.cache
def needs(optimizer: str) -> Needs:
    """What an optimizer takes and keeps, found by building and stepping one instance.

    Args:
        optimizer: a key of :data:`CLASS_NAMES`.

    Returns:
        How the benchmark drives it.

    Raises:
        ValueError: no tensor of :data:`_TRIES` steps.
    """
    errors = []
    for shape, sparse in _TRIES:
        try:
            held = _stepped_state_bytes(optimizer, shape, sparse)
        except Exception as error:
            errors.append(describe(error))
            continue
        return Needs(
            closure=optimizer in CLOSURE_STEPS,
            matrices=len(shape) == 2 and not sparse,
            sparse=sparse,
            state_tensors=round(held / (torch.Size(shape).numel() * 4)),
        )
    raise ValueError(f"the benchmark cannot step {CLASS_NAMES[optimizer]}: {errors[0]}")


class _Found(Mapping[str, int]):
    """A number per optimizer, from its :class:`Needs`, found on first use."""

    def __init__(self, number: Callable[[Needs], int]) -> None:
        self._number = number

    def __getitem__(self, optimizer: str) -> int:
        if optimizer not in CLASS_NAMES:
            raise KeyError(optimizer)
        return self._number(needs(optimizer))

    def __iter__(self) -> Iterator[str]:
        return iter(CLASS_NAMES)

    def __len__(self) -> int:
        return len(CLASS_NAMES)


class _Those(Set[str]):
    """The optimizers whose :class:`Needs` have a property, found on first use."""

    def __init__(self, which: Callable[[Needs], bool]) -> None:
        self._which = which

    def __contains__(self, optimizer: object) -> bool:
        return optimizer in CLASS_NAMES and self._which(needs(str(optimizer)))

    def __iter__(self) -> Iterator[str]:
        return (key for key in CLASS_NAMES if key in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: Parameter-sized state tensors each optimizer keeps (:attr:`Needs.state_tensors`).
STATE_TENSORS: Mapping[str, int] = _Found(lambda found: found.state_tensors)

#: Parameter-sized tensors one step must read plus those it must write: the parameter, its
#: gradient and the state are read, the parameter and the state written (SGD with momentum:
#: p, g, buf read and p, buf written; Adam: p, g, m, v read and p, m, v written).
TENSORS_MOVED: Mapping[str, int] = _Found(lambda found: 3 + 2 * found.state_tensors)

#: Optimizers of 2-D parameters only (Muon): each case is reduced to its 2-D tensors.
MATRICES_ONLY: Set[str] = _Those(lambda found: found.matrices)

#: Optimizers of sparse gradients (SparseAdam): each case is reduced to its 2-D tensors, as an
#: embedding's, whose gradients hold one row in :data:`SPARSE_ROW_EVERY`.
SPARSE_GRADIENTS: Set[str] = _Those(lambda found: found.sparse)


def case_for(optimizer: str, case: Case) -> Case:
    """The tensors of ``case`` an optimizer takes: the 2-D ones for :data:`MATRICES_ONLY` and
    :data:`SPARSE_GRADIENTS`, all of them otherwise."""
    found = needs(optimizer)
    if not (found.matrices or found.sparse):
        return case
    shapes = tuple(shape for shape in case.shapes if len(shape) == 2)
    what = f"its {len(shapes)} 2-D tensors"
    return Case(case.name, shapes, f"{case.description}; {what}" if case.description else what)
