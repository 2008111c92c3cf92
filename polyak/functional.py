"""Functional counterparts of the optimizers, for ``torch.distributed``.

Parts of ``torch.distributed`` hand the gradients to an optimizer's step instead of leaving
them in ``.grad``: ``torch.distributed.optim.utils.as_functional_optim``,
``DistributedDataParallel._register_fused_optim`` (which steps each parameter in DDP's
communication hook as soon as its bucket is reduced) and
``ZeroRedundancyOptimizer(overlap_with_ddp=True)``. They find the class that steps so in
``torch.distributed.optim.utils.functional_optim_map``, by the optimizer's class. Every
subclass of :class:`polyak.Optimizer` has one there, made from the class by
:func:`functional`: it takes the class's arguments, with the class's checks, and runs the
class's update rule.

Importing that map takes most of a second, which polyak's import does not spend: the classes
are entered when the map is first imported, or at once where it already is, and a class
defined later is entered when it is defined.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor

#: The module that holds torch's map from optimizer classes to functional ones.
MAP_MODULE = "torch.distributed.optim.utils"


class FunctionalOptimizer:
    """An optimizer stepped with gradients given to it, as ``torch.distributed`` steps one.

    Gradients are never read from, nor written to, ``.grad``. Each parameter is updated by
    the rule of :attr:`optimizer_class` on the path torch's functional optimizers take (one
    tensor at a time), with the hyperparameters of :attr:`param_group` at the time of the
    step, so a change made there (``ZeroRedundancyOptimizer`` copies its groups' values into
    it before each step) applies to the next one.

    Args:
        params: the parameters :meth:`step` updates; :meth:`step_param` takes any parameter.
        *args: the arguments of :attr:`optimizer_class` after ``params``.
        _allow_empty_param_list: allow no ``params`` (only :meth:`step_param` is used then),
            as torch's functional optimizers do (default: False).
        **kwargs: the keyword arguments of :attr:`optimizer_class`.

    Attributes:
        param_group: the one group :meth:`step` updates, with every hyperparameter.
        param_groups: ``[param_group]``.
    """

    #: The optimizer whose update rule this class runs.
    optimizer_class: ClassVar[type[Any]]

    def __init__(
        self,
        params: Iterable[Tensor],
        *args: Any,
        _allow_empty_param_list: bool = False,
        **kwargs: Any,
    ) -> None:
        params = list(params)
        if not params and not _allow_empty_param_list:
            raise ValueError("optimizer got an empty parameter list")
        # One group, which may be empty; the optimizer's own checks run on it.
        self._optimizer = self.optimizer_class([{"params": params}], *args, **kwargs)
        self.param_groups: list[dict[str, Any]] = self._optimizer.param_groups
        self.param_group: dict[str, Any] = self.param_groups[0]
        #: A group of one for each parameter stepped, so that each keeps what the machinery
        #: learns of its layout from step to step.
        self._singles: dict[Tensor, dict[str, Any]] = {}

    @property
    def state(self) -> Any:
        """Per-parameter state, keyed by the parameter, in the optimizer's format."""
        return self._optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        """The hyperparameters given to the constructor."""
        defaults: dict[str, Any] = self._optimizer.defaults
        return defaults

    def step_param(self, param: Tensor, grad: Tensor | None) -> None:
        """Update one parameter with ``grad``; nothing happens for a None gradient."""
        if grad is None:
            return
        _check_gradient(param, grad)
        single = self._singles.get(param)
        if single is None:
            single = self._singles[param] = {"params": [param]}
        for key, value in self.param_group.items():
            if key != "params":
                single[key] = value
        with torch.no_grad():
            self._optimizer._step_params(single, [param], [grad])

    def step(self, gradients: Sequence[Tensor | None]) -> None:
        """Update each parameter of :attr:`param_group` with the gradient at its position; a
        None gradient leaves its parameter as it is."""
        params = self.param_group["params"]
        if len(params) != len(gradients):
            raise ValueError(
                "the gradients passed in does not equal to the size of the parameters!"
                f"Params length: {len(params)}. Gradients length: {len(gradients)}"
            )
        # All are checked before any parameter changes.
        for param, grad in zip(params, gradients, strict=True):
            if grad is not None:
                _check_gradient(param, grad)
        for param, grad in zip(params, gradients, strict=True):
            self.step_param(param, grad)


def _check_gradient(param: Tensor, grad: Tensor) -> None:
    """Refuse a gradient that ``.grad`` would refuse, before anything changes."""
    if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
        raise RuntimeError(
            f"Invalid gradient for a parameter of shape {tuple(param.shape)}, {param.dtype} on "
            f"{param.device}: shape {tuple(grad.shape)}, {grad.dtype} on {grad.device} "
            "(expected the parameter's)"
        )


_made: dict[type, type[FunctionalOptimizer]] = {}


def functional(optimizer_class: type[Any]) -> type[FunctionalOptimizer]:
    """The functional counterpart of ``optimizer_class``, made once per class."""
    made = _made.get(optimizer_class)
    if made is None:
        name = optimizer_class.__name__
        made = _made[optimizer_class] = type(
            f"Functional{name}",
            (FunctionalOptimizer,),
            {
                "optimizer_class": optimizer_class,
                "__module__": __name__,
                "__qualname__": f"Functional{name}",
                "__doc__": f"{name}, stepped with gradients given to it (see "
                ":class:`FunctionalOptimizer`).",
            },
        )
    return made


def _subclasses(cls: type) -> Iterable[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _enter(utils: ModuleType, classes: Iterable[type]) -> None:
    for cls in classes:
        if cls not in utils.functional_optim_map:
            utils.register_functional_optim(cls, functional(cls))


def register(optimizer_class: type[Any]) -> None:
    """Enter ``optimizer_class`` in torch's map, where the map is loaded (when it is loaded
    later, every class is entered then)."""
    utils = sys.modules.get(MAP_MODULE)
    if utils is not None and hasattr(utils, "functional_optim_map"):
        _enter(utils, [optimizer_class])


#: The classes whose subclasses are entered in torch's map (see :func:`watch`).
_roots: list[type] = []


def _register_all(utils: ModuleType) -> None:
    for root in _roots:
        _enter(utils, _subclasses(root))


class _Loader(importlib.abc.Loader):
    """The map module's own loader, entering polyak's classes once the module has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_all(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Waits for the first import of :data:`MAP_MODULE`, then steps aside."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != MAP_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def watch(root: type) -> None:
    """Enter every subclass of ``root`` (polyak's :class:`~polyak.Optimizer`) in torch's map
    now if it is loaded, or when it is first imported; later subclasses are entered by
    :func:`register` as they are made."""
    if root not in _roots:
        _roots.append(root)
    utils = sys.modules.get(MAP_MODULE)
    if utils is not None:
        _register_all(utils)
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
