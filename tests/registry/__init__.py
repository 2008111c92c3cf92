"""One entry per optimizer, each in a file of its own (``<name>.py``, defining ``ENTRY``): what
the generic tests run, and what they compare against. A new optimizer's file is found here
without any other edit."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from ._entry import CrossCheck, Entry, ErrorCase

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


_ALL: list[Entry] = _discover()

#: The optimizers with a torch.optim twin, which the generic tests compare with torch.
REGISTRY: list[Entry] = [entry for entry in _ALL if not entry.peer]

#: The optimizers whose reference is another package's class (``test_peers.py``).
PEERS: list[Entry] = [entry for entry in _ALL if entry.peer]


def load(reference: str) -> Any:
    """The class ``"module:Class"`` names; the calling test skips where it cannot be
    imported.

    A module whose package cannot be imported, though installed (timm's imports torchvision,
    which is not installed beside this torch), is loaded from its file with its package's
    other files, under a private name, without running the package's ``__init__``.
    """
    module, _, name = reference.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ImportError as error:
        loaded = _standalone(module)
        if loaded is None:
            pytest.skip(f"{module} cannot be imported: {error}")
    return getattr(loaded, name)


def _standalone(module: str) -> Any:
    """``module`` loaded from its package's folder under a private package name; None where
    the package is not installed or the module needs more than its siblings."""
    package, _, leaf = module.rpartition(".")
    top = package.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)), *package.split(".")[1:])
    private = "_standalone_" + package.replace(".", "_")
    if private not in sys.modules:
        holder = types.ModuleType(private)
        holder.__path__ = [str(folder)]
        sys.modules[private] = holder
    try:
        return importlib.import_module(f"{private}.{leaf}")
    except ImportError:
        return None


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
    "PEERS",
    "REGISTRY",
    "SPARSE_GRADIENTS",
    "CrossCheck",
    "Entry",
    "ErrorCase",
    "ids",
    "load",
    "takes",
]
