"""The optimizer base: parameter groups, state, the step driver, checkpoints and hooks.

It knows no optimizer by name. An algorithm subclass supplies its defaults and checks, and an
``update`` rule written over lists of tensors; everything else lives here.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeAlias, cast, overload

import torch
import torch.optim
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from polyak import (
    _checkpoint,
    _checks,
    _compile,
    _driver,
    _groups,
    _hyper,
    _precision,
    functional,
)
from polyak._checkpoint import _SET_BY_LOADING, StateDict
from polyak._hooks import _outside_dynamo, _register, _run_eagerly_under_compile, _with_step_hooks
from polyak._hyper import Hyper, required
from polyak._quant import dynamic_map
from polyak._state import STEP_COUNT, OptimizerState
from polyak.strategies import StateLists, Strategy, choose

#: Keys of ``defaults`` no group needs: those loading sets (see ``_SET_BY_LOADING``), and how
#: parameters and state are stored (``_precision.KEYWORDS``), whose absence means as given.
_OPTIONAL_KEYS = frozenset({*_SET_BY_LOADING, *_precision.KEYWORDS})

# What algorithms take from the base, all from here.
__all__ = [
    "Hyper",
    "Optimizer",
    "ParamsT",
    "StateDict",
    "StateLists",
    "dynamic_map",
    "required",
    "runs_foreach",
]


def runs_foreach(group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether a step of ``params`` under ``group``'s flags runs the foreach strategy, whose
    checks and messages some of torch's differ by (``capturable``'s, for one)."""
    return choose(group, params, grads) is Strategy.FOREACH


ParamsT: TypeAlias = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


class Optimizer(torch.optim.Optimizer):
    """Base class of polyak's optimizers, and of yours.

    An instance passes ``isinstance(opt, torch.optim.Optimizer)``, so torch's LR schedulers,
    ``GradScaler`` and training frameworks accept it, but every behaviour is implemented here:
    none of ``torch.optim.Optimizer``'s methods is called, but for the empty one through which
    torch's profiler finds an optimizer's state, called after a step under the profiler.

    Attributes:
        defaults: the hyperparameters given to the constructor, used for groups that omit them.
        state: per-parameter state, keyed by the parameter tensor itself.
        param_groups: the groups; each group's ``params`` are the model's very tensors.
        _step_count: the number of completed ``step()`` calls. It is kept by pickling; a
            state_dict, whose keys are torch's, does not hold it, and ``load_state_dict`` reads
            it back from the per-parameter ``step`` counts where the algorithm keeps them.

    A subclass sets ``defaults`` through ``__init__`` and supplies ``update(params, grads,
    state, hp)``, the update rule over lists, and optionally ``init_state(param, hp)``.
    ``state_keys`` names the state the update reads and writes; ``param_shaped_state`` the
    keys that must have the parameter's shape, which ``load_state_dict`` checks; ``backfill``
    the values of hyperparameters that old checkpoints lack.
    """

    #: Steps that compiled graphs counted (see :func:`_step_in_own_graph`), once one is traced.
    _compiled_steps: Tensor
    state_keys: ClassVar[tuple[str, ...]] = ()
    param_shaped_state: ClassVar[tuple[str, ...]] = ()
    #: Parameter-shaped state that is never negative (second moments): stored in 8 bits, it
    #: takes bitsandbytes' unsigned map, twice as fine as the signed one the others take.
    unsigned_state: ClassVar[tuple[str, ...]] = ()
    #: The state keys of 8-bit state's absmax, where not ``<key>_absmax`` (bitsandbytes'
    #: ``absmax1`` for its ``state1``).
    absmax_keys: ClassVar[dict[str, str]] = {}
    #: Hyperparameters that checkpoints of older torch versions may lack, with the value torch
    #: gives them when loading or unpickling such a checkpoint.
    backfill: ClassVar[dict[str, Any]] = {}
    #: Hyperparameters the class fixes, whatever a checkpoint or a pickle says (as torch.optim's
    #: AdamW does for ``decoupled_weight_decay``).
    fixed: ClassVar[dict[str, Any]] = {}
    #: Hyperparameters that hold None or a string (LBFGS's ``line_search_fn``): a checkpoint may
    #: hold either where the optimizer holds the other, and its value is taken, as in torch
    #: (``check_hyperparameters`` still refuses a string no constructor takes).
    optional_strings: ClassVar[tuple[str, ...]] = ()
    #: Keys of ``defaults`` that a step may find missing from a group, as torch's step does not
    #: read them (or reads them with a default); a group lacking any other raises KeyError.
    optional_keys: ClassVar[frozenset[str]] = frozenset()
    #: The update is elementwise, so the flat kernel may run it; rules with per-tensor norms or
    #: matrix products set False and run on the other strategies.
    elementwise: ClassVar[bool] = True
    #: Why a class that is not ``elementwise`` takes torch's operations, where it is not that
    #: its rule has reductions or matrix products (``polyak.explain`` says it).
    not_flat_reason: ClassVar[str] = ""
    #: Under torch.compile the step runs eagerly, one graph break, as torch's does where dynamo
    #: cannot trace it (SparseAdam's sparse gradients).
    eager_under_compile: ClassVar[bool] = False
    #: torch's message where a ``step`` in the state is not a tensor (its functional API's
    #: check, raised before anything changes); None where torch checks nothing.
    step_tensors_message: ClassVar[str | None] = None
    #: Without a ``foreach`` flag, accelerators take the foreach strategy, as torch.optim's
    #: default does; False where the torch twin keeps its per-tensor path (Adafactor, Muon).
    foreach_by_default: ClassVar[bool] = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self._init_hooks()
        self._step_count = 0
        groups = _checks.check_params_argument(params)
        self.state: defaultdict[Any, Any] = OptimizerState()
        self.param_groups: list[dict[str, Any]] = []
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(cast(dict[str, Any], group))

    @property
    def _step_count(self) -> int:
        """The number of completed ``step()`` calls: those counted in Python and those that
        a compiled graph counted (see :func:`_step_in_own_graph`)."""
        counted: int = self.__dict__[STEP_COUNT]
        compiled: Tensor | None = self.__dict__.get("_compiled_steps")
        return counted if compiled is None else counted + int(compiled)

    @_step_count.setter
    def _step_count(self, value: int) -> None:
        self.__dict__[STEP_COUNT] = value
        compiled: Tensor | None = self.__dict__.get("_compiled_steps")
        if compiled is not None:
            compiled.zero_()

    @property
    def _state_version(self) -> int:
        """How many times the state's tensors were created, replaced or removed, so that
        strategies which keep a group's tensors between steps know to look again; -1 where
        ``optimizer.state`` was replaced by a mapping that does not count its changes."""
        state = self.state
        return state.version if isinstance(state, OptimizerState) else -1

    #: Whether the class steps with the base's ``step`` and ``hyperparameters`` (set for each
    #: subclass as it is made), which the step's machinery may then take for granted.
    _base_step: ClassVar[bool] = True
    _base_hyperparameters: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        functional.register(cls)
        own_step = cls.__dict__.get("step")
        if own_step is not None and not getattr(own_step, "hooked", False):
            cls.step = _with_step_hooks(own_step)  # type: ignore[method-assign]
        if cls.eager_under_compile and not getattr(cls.step, "outside_dynamo", False):
            cls.step = _run_eagerly_under_compile(cls.step)  # type: ignore[method-assign]
        own_init = cls.__dict__.get("__init__")
        if (
            own_init is not None
            and cls.elementwise
            and cls.param_shaped_state
            and not getattr(own_init, "takes_state_dtype", False)
        ):
            # Every elementwise optimizer stores its state as ``state_dtype`` says.
            cls.__init__ = _precision.taking_state_dtype(own_init)  # type: ignore[method-assign]
        cls._base_step = cls.step is Optimizer.step
        cls._base_hyperparameters = cls.hyperparameters is Optimizer.hyperparameters

    def _init_hooks(self) -> None:
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )

    # ----------------------------------------------------------------- pickling and printing

    def __getstate__(self) -> dict[str, Any]:
        return {
            "defaults": self.defaults,
            "state": self.state,
            "param_groups": self.param_groups,
            STEP_COUNT: self._step_count,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault(STEP_COUNT, 0)
        if not isinstance(self.state, OptimizerState):
            self.state = OptimizerState(self.state)
        self._init_hooks()
        for key, value in _SET_BY_LOADING.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            for key, value in self.backfill.items():
                group.setdefault(key, value)
            group.update(self.fixed)

    def __repr__(self) -> str:
        text = type(self).__name__ + " ("
        for i, group in enumerate(self.param_groups):
            text += f"\nParameter Group {i}\n"
            text += "".join(
                f"    {key}: {group[key]}\n" for key in sorted(group) if key != "params"
            )
        return text + ")"

    # ------------------------------------------------------------------------------ hooks

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Call ``hook(optimizer, args, kwargs)`` before each ``step()``.

        The hook may return replacement ``(args, kwargs)`` for the step; ``args`` starts
        with the optimizer.
        """
        return _register(self._optimizer_step_pre_hooks, hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Call ``hook(optimizer, args, kwargs)`` after each ``step()``."""
        return _register(self._optimizer_step_post_hooks, hook)

    def register_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Call ``hook(optimizer)`` before ``state_dict()`` builds its result."""
        return _register(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Call ``hook(optimizer, state_dict)`` on ``state_dict()``'s result; a returned dict
        replaces it."""
        return _register(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Call ``hook(optimizer, state_dict)`` before loading; a returned dict is loaded
        instead. ``state_dict`` is a shallow copy of the caller's."""
        return _register(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Call ``hook(optimizer)`` after ``load_state_dict()`` has loaded."""
        return _register(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    # ----------------------------------------------------------------------------- groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters with its own hyperparameters.

        Missing hyperparameters are taken from ``defaults``. The group is checked whole before
        anything changes: on an error neither the optimizer nor ``param_group`` is modified.

        Args:
            param_group: ``{"params": tensors or (name, tensor) pairs, **hyperparameters}``.
        """
        _groups.add_param_group(self, param_group)

    # ------------------------------------------------------------------------------ steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters.

        Args:
            set_to_none: set each ``.grad`` to None instead of filling it with zeros; this
                saves memory, and a parameter with no gradient is skipped by ``step()``
                (default: True).
        """
        if "torch._dynamo" in sys.modules:
            # torch.compile may be tracing: as torch's, the body runs outside dynamo, so that a
            # compiled training step gets the graphs torch's gets (a traced zero_grad adds one,
            # and guards on each .grad). Where nothing loaded dynamo, nothing is compiling, and
            # the first call does not load it (about a second).
            return _outside_dynamo(self, set_to_none)
        return self._zero_grad(set_to_none)

    def _zero_grad(self, set_to_none: bool) -> None:
        return _driver.zero_grad(self, set_to_none)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @_with_step_hooks
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step over every group.

        Args:
            closure: re-evaluates the model and returns the loss; it runs with autograd
                enabled, before the update, and its loss is returned.
        """
        return _driver.step(self, closure)

    def _step_params(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        grad_scale: Tensor | None = None,
    ) -> None:
        return _driver.step_params(self, group, params, grads, grad_scale)

    # ----------------------------------------------------------------- torch.compile

    def _traced_step(self, closure: Callable[[], Any] | None) -> Any:
        return _compile.traced_step(self, closure)

    def _init_group(self, *args: Any, **kwargs: Any) -> Any:
        return _compile.init_group(self, *args, **kwargs)

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """Raise the constructor's error for hyperparameter values it refuses.

        The constructor checks its arguments with it, and ``load_state_dict`` checks every
        loaded group, so that a checkpoint cannot bring in values no constructor takes.
        """

    @staticmethod
    def check_loaded_group(group: Mapping[str, Any]) -> None:
        """Raise a ValueError for a loaded group's values that the constructor takes, as
        torch's does, but with which no step can run (torch loads them and fails in
        ``step()``), so that ``load_state_dict`` refuses them and changes nothing."""

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """Bring one parameter's state from an older format to the current one, in place."""

    def hyperparameters(self, group: Mapping[str, Any], params: list[Tensor]) -> Hyper:
        """The hyperparameters one step of ``group`` hands the update, for ``params`` (those
        with gradients); a subclass resolves here values that depend on them (Adafactor's
        ``eps=None``)."""
        return Hyper(group, as_numbers=bool(group.get("fused")))

    def missing_key(self, group: Mapping[str, Any]) -> str | None:
        """The first key of ``defaults`` (bar :attr:`optional_keys`) that ``group`` lacks, whose
        step raises KeyError as torch's reads ``group[key]``; None where it has them all."""
        return _hyper.missing_key(self.defaults, group, self.optional_keys | _OPTIONAL_KEYS)

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Raise, before anything changes, for parameters this step cannot update."""
        if group.get("fused"):
            for p in params:
                _checks.check_fused_param(p)

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """State created for ``param`` before its first update (none by default)."""
        return {}

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """The update rule, over lists. Subclasses that use the step driver define it."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> StateDict:
        """Return the optimizer's state in torch.optim's format.

        ``state`` maps each parameter's index (counted across groups in order) to its state;
        ``param_groups`` holds each group's hyperparameters with its ``params`` as indices.
        These are torch's keys, and the only ones. It holds only tensors and plain Python
        values, so ``torch.load(..., weights_only=True)`` reads it, and ``torch.optim``
        optimizers load it.
        """
        return _checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a state_dict written by :meth:`state_dict` or by a ``torch.optim`` optimizer.

        Everything is checked before anything changes: on any mismatch this raises and the
        optimizer is exactly as it was. Floating-point state is cast to its parameter's dtype
        and device (``step`` counters keep theirs, as in torch) and copied, so stepping never
        writes into the dict that was loaded.

        Args:
            state_dict: the optimizer state, as returned by ``state_dict()``.
        """
        return _checkpoint.load_state_dict(self, state_dict)
