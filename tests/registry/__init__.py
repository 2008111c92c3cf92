"""One entry per optimizer, each in a file of its own (``<name>.py``, defining ``ENTRY``): what
the generic tests run, and what they compare against. A new optimizer's file is found here
without any other edit."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from ._entry import Entry, ErrorCase

#: The entries in the order torch.optim lists its optimizers, then any other, by file name.
_ORDER = (
    "sgd",
    "adam",
    "adamw",
    "rmsprop",
    "adagrad",
    "adamax",
    "adadelta",
    "nadam",
    "radam",
    "asgd",
    "rprop",
    "sparseadam",
    "adafactor",
    "muon",
    "lbfgs",
)


def _discover() -> list[Entry]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    names.sort(key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))
    return [importlib.import_module(f"{__name__}.{name}").ENTRY for name in names]


REGISTRY: list[Entry] = _discover()


def takes(entry: Entry, argument: str) -> bool:
    """Whether the optimizer's constructor has ``argument`` (SparseAdam has no ``foreach``)."""
    return argument in inspect.signature(entry.cls).parameters


def ids(entry: Entry) -> str:
    return entry.cls.__name__


#: Optimizer classes (polyak's and torch's) that step on sparse gradients only.
SPARSE_GRADIENTS = {
    cls for entry in REGISTRY if entry.sparse_grads for cls in (entry.cls, entry.reference)
}


#: Optimizer classes (polyak's and torch's) whose ``step`` needs a closure (LBFGS).
CLOSURE_STEPS = {
    cls for entry in REGISTRY if entry.step_closure for cls in (entry.cls, entry.reference)
}

#: Optimizer classes (polyak's and torch's) that take 2-D parameters only (Muon).
MATRICES_ONLY = {
    cls for entry in REGISTRY if entry.matrices_only for cls in (entry.cls, entry.reference)
}


#: The optimizers that take dense gradients (all but SparseAdam).
DENSE = [entry for entry in REGISTRY if not entry.sparse_grads]


__all__ = [
    "CLOSURE_STEPS",
    "DENSE",
    "MATRICES_ONLY",
    "REGISTRY",
    "SPARSE_GRADIENTS",
    "Entry",
    "ErrorCase",
    "ids",
    "takes",
]
