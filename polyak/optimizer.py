"""The optimizer base: parameter groups, state, the step driver, checkpoints and hooks.

It knows no optimizer by name. An algorithm subclass supplies its defaults and checks, and an
``update`` rule written over lists of tensors; everything else lives here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
import sys
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any, ClassVar, TypeAlias, TypeVar, cast, overload

import torch
import torch.optim
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer
from torch.utils.hooks import RemovableHandle

from polyak import _checks, _explain, _ops, functional
from polyak._state import OptimizerState, StateEntry
from polyak.strategies import StateLists, Strategy, Update, _native, choose, flat, loop

ParamsT: TypeAlias = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]
StateDict: TypeAlias = dict[str, Any]
_F = TypeVar("_F", bound=Callable[..., Any])

#: The top-level key under which checkpoints of earlier polyak versions saved the number of
#: completed ``step()`` calls. ``state_dict()`` writes torch's keys only; loading still reads it.
STEP_COUNT_KEY = "_step_count"


class _Required:
    """Marks a hyperparameter that every group must give: ``defaults={"lr": required}``."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _Required()


def _resolve(value: Any, as_number: bool) -> Any:
    if isinstance(value, tuple):
        return tuple(_resolve(v, as_number) for v in value)
    if isinstance(value, Tensor):
        if as_number:
            return value.item()
        if value.dim() != 0:
            return value.squeeze()
    return value


#: Python numbers, which state may hold (SparseAdam's step count).
_NUMBERS = frozenset({int, float})

#: Hyperparameter types taken as they are (tested first, by exact type: this runs per step).
_PLAIN = frozenset({float, int, bool, str, type(None)})
#: Tensors of torch's own types (no subclass): their ``.grad`` setter is torch's, which the
#: kernel can clear in one call, and a step is rehearsed on real stand-ins of them.
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


class Hyper:
    """A group's hyperparameters, frozen, as the update rule reads them: ``hp.lr``.

    One-element tensors are squeezed to 0-dim, as torch.optim does for a tensor ``lr``, or,
    with ``as_numbers`` (fused steps, whose kernels take numbers), read as Python numbers.
    """

    def __init__(self, group: Mapping[str, Any], as_numbers: bool = False) -> None:
        values = self.__dict__
        for key, value in group.items():
            if type(value) in _PLAIN:
                values[key] = value
            elif key not in ("params", "param_names"):
                values[key] = _resolve(value, as_numbers)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the group lacks.
        raise AttributeError(f"the parameter group has no hyperparameter {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("hyperparameters are read-only inside a step")

    def __repr__(self) -> str:
        return f"Hyper({self.__dict__})"


def _recorded(name: str) -> contextlib.AbstractContextManager[Any]:
    """torch's ``record_function(name)`` while a profiler runs; nothing otherwise, since
    entering it costs about 5 us per call, nor where dynamo traces (it ignores the record, and
    breaks the graph at the profiler's flag)."""
    if not torch.compiler.is_compiling() and torch._C._autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


#: The function torch's step calls after each step under a profiler. The profiler's Python
#: tracer knows it by its code object and reads the ``param_groups`` and ``state`` of the
#: optimizer it is called with; the memory profiler marks those state tensors as optimizer
#: state (``Category.OPTIMIZER_STATE``) in its timeline. Its body is empty.
_PROFILER_ENTRY = torch.optim.Optimizer._optimizer_step_code


def _with_step_hooks(step: _F) -> _F:
    """Wrap a ``step`` so that global and per-instance step hooks fire around it, as in torch.

    Hooks receive ``(optimizer, args, kwargs)`` where ``args`` starts with the optimizer, and a
    pre-hook may return replacement ``(args, kwargs)``. Under a profiler the step is recorded
    as ``Optimizer.step#<class>.step``, the name torch uses, and shows its optimizer to the
    profiler as torch's step does (see :data:`_PROFILER_ENTRY`).
    """

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self: Optimizer = args[0]
        if torch.compiler.is_compiling():
            if self.eager_under_compile:
                return _eagerly(run, self, args, kwargs)
            return _apart(run, self, args, kwargs)
        if not torch._C._autograd._profiler_enabled():
            return run(self, args, kwargs)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            out = run(self, args, kwargs)
            _PROFILER_ENTRY(self)
            return out

    def run(self: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        global_pre = _torch_optimizer._global_optimizer_pre_hooks
        if global_pre or self._optimizer_step_pre_hooks:
            for pre_hook in chain(global_pre.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{step} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
        out = step(*args, **kwargs)
        global_post = _torch_optimizer._global_optimizer_post_hooks
        if global_post or self._optimizer_step_post_hooks:
            for post_hook in chain(self._optimizer_step_post_hooks.values(), global_post.values()):
                post_hook(self, args, kwargs)
        return out

    wrapper.hooked = True  # type: ignore[attr-defined]
    return cast(_F, wrapper)


def _run_eagerly_under_compile(step: _F) -> _F:
    """Wrap a hooked ``step`` (see :func:`_with_step_hooks`) of a class whose step dynamo
    cannot trace (:attr:`Optimizer.eager_under_compile`) so that ``torch.compile`` treats it
    as it treats torch's such steps, which it wraps in ``torch.compiler.disable``: one graph
    break where a compiled function calls it, and the step, hooks and closure included, run
    eagerly.

    Breaking inside the hooked wrapper is not enough: dynamo breaks the caller's graph at the
    call, then compiles the wrapper's own frame when the call runs, a second break. Here the
    traced body skips its frame, which dynamo does without counting a break and remembers for
    this code object (so the code of :func:`_with_step_hooks`'s wrapper, shared by every step,
    is never skipped). The frame then runs as Python, and hands the step to :func:`_eagerly`
    wherever dynamo is loaded, so that nothing inside it is compiled; where it is not, nothing
    compiles, and the step does not load it (about a second).
    """

    def run(self: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return step(*args, **kwargs)

    @functools.wraps(step)
    def outside_dynamo(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            torch._dynamo.skip_frame()
        if "torch._dynamo" in sys.modules:
            return _eagerly(run, args[0], args, kwargs)
        return step(*args, **kwargs)

    outside_dynamo.hooked = True  # type: ignore[attr-defined]
    outside_dynamo.outside_dynamo = True  # type: ignore[attr-defined]
    return cast(_F, outside_dynamo)


@torch._disable_dynamo  # type: ignore[misc,attr-defined]
def _outside_dynamo(optimizer: Optimizer, set_to_none: bool) -> None:
    """:meth:`Optimizer.zero_grad`'s body, run outside dynamo as torch's zero_grad is."""
    optimizer._zero_grad(set_to_none)


@torch._disable_dynamo  # type: ignore[misc,attr-defined]
def _eagerly(
    run: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any],
    self: Optimizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``run(self, args, kwargs)`` outside dynamo: one graph break, as dynamo makes for the
    steps of torch's optimizers it cannot trace (SparseAdam's sparse gradients)."""
    return run(self, args, kwargs)


def _apart(
    run: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any],
    self: Optimizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``run(self, args, kwargs)`` in a graph of its own when ``torch.compile`` traces a step,
    as torch.optim's steps that take ``differentiable`` are: dynamo runs this function as
    Python (it cannot resume inside ``try``) and compiles ``run`` from its first line, in the
    step's grad mode, so that AOTAutograd compiles the update as an inference graph, which
    updates the parameters in place.

    torch's other steps (Adafactor's, Muon's) run under ``no_grad`` in the graph of their
    caller, and so do those of their polyak twins that step with the update rule. Dynamo loses
    assignments to the optimizer's attributes made there and would guard the graph on a count
    it reads, so the graph counts the step in a tensor, which :attr:`Optimizer._step_count`
    adds (made by :meth:`Optimizer._init_group`).
    """
    if "differentiable" not in self.defaults and type(self).step is Optimizer.step:
        with torch.no_grad():
            out = run(self, args, kwargs)
        self._compiled_steps.add_(1)
        return out
    previous = torch.is_grad_enabled()
    taken = self._step_count
    try:
        torch.set_grad_enabled(bool(self.defaults.get("differentiable", False)))
        torch._dynamo.graph_break()
        out = run(self, args, kwargs)
    finally:
        torch._dynamo.graph_break()
        torch.set_grad_enabled(previous)
    if self._step_count == taken:
        # A compiled step leaves the count to this function: dynamo loses assignments to an
        # optimizer's attributes in a frame that gathers its groups, and would guard the
        # graph on the count's value.
        self._step_count += 1
    return out


def _register(
    hooks: OrderedDict[int, Callable[..., Any]], hook: Callable[..., Any], prepend: bool = False
) -> RemovableHandle:
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


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

    #: Steps that compiled graphs counted (see :func:`_apart`), once one is traced.
    _compiled_steps: Tensor
    state_keys: ClassVar[tuple[str, ...]] = ()
    param_shaped_state: ClassVar[tuple[str, ...]] = ()
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
    #: The update is elementwise, so the flat kernel may run it; rules with per-tensor norms or
    #: matrix products set False and run on the other strategies.
    elementwise: ClassVar[bool] = True
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
        a compiled graph counted (see :func:`_apart`)."""
        counted: int = self.__dict__[STEP_COUNT_KEY]
        compiled: Tensor | None = self.__dict__.get("_compiled_steps")
        return counted if compiled is None else counted + int(compiled)

    @_step_count.setter
    def _step_count(self, value: int) -> None:
        self.__dict__[STEP_COUNT_KEY] = value
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        functional.register(cls)
        own_step = cls.__dict__.get("step")
        if own_step is not None and not getattr(own_step, "hooked", False):
            cls.step = _with_step_hooks(own_step)  # type: ignore[method-assign]
        if cls.eager_under_compile and not getattr(cls.step, "outside_dynamo", False):
            cls.step = _run_eagerly_under_compile(cls.step)  # type: ignore[method-assign]

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
            STEP_COUNT_KEY: self._step_count,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault(STEP_COUNT_KEY, 0)
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
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. Please use a list "
                "instead."
            )
        else:
            params = list(params)
        tensors, names = _checks.check_group_params(
            params, bool(self.defaults.get("differentiable", False))
        )
        filled: dict[str, Any] = {}
        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(
                    "parameter group didn't specify a value of required optimization "
                    f"parameter {name}"
                )
            if name not in param_group:
                filled[name] = default
        if len(tensors) != len(set(tensors)):
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; "
                "in future, this will cause an error; "
                "see github.com/pytorch/pytorch/issues/40967 for more information",
                stacklevel=3,
            )
        seen: set[Tensor] = set()
        for group in self.param_groups:
            seen.update(group["params"])
            if (names is not None) != ("param_names" in group):
                which = "with names" if names is not None else "without names"
                raise ValueError(
                    "all optimizer param groups should be with/without names. "
                    f"cannot add param group {which} to the optimizer"
                )
        if not seen.isdisjoint(tensors):
            raise ValueError("some parameters appear in more than one parameter group")
        # The constructor's checks of its numbers, on the group as it will be.
        self.check_hyperparameters({**param_group, **filled})

        # Checked: now change the caller's dict in place, as torch does, and keep it.
        param_group["params"] = tensors
        if names is not None:
            param_group["param_names"] = names
        param_group.update(filled)
        self.param_groups.append(param_group)

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
        batched = bool(self.defaults.get("foreach") or self.defaults.get("fused"))
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        with _recorded(f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"):
            # Only a kernel loaded already: clearing gradients starts no build (on a GPU, none
            # is needed). This body never runs traced (see zero_grad).
            vm = _native.loaded() if set_to_none else None
            if vm is not None and not torch._C._is_torch_function_mode_enabled():
                # One call clears plain tensors' gradients, at a few nanoseconds each rather
                # than the Python setter's hundred or so.
                for group in self.param_groups:
                    for p in vm.clear_grads(group["params"], _PLAIN_TENSORS):
                        p.grad = None
                return
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                        continue
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    if batched and not p.grad.is_sparse:
                        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
                    else:
                        p.grad.zero_()
            for grads in buckets.values():
                _ops.zero_(grads)

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
        if torch.compiler.is_compiling():
            return self._traced_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler hands optimizers that unscale in their step (``fused=True``, as in torch)
        # the scale and the inf flag as attributes; a step with infs is skipped whole.
        grad_scale: Tensor | None = self.__dict__.get("grad_scale")
        found_inf: Tensor | None = self.__dict__.get("found_inf")
        if found_inf is not None and bool(found_inf.item()):
            return loss
        # Groups are stepped in order (state may be shared across groups); those the flat
        # kernel steps need neither autograd's mode nor the machinery below.
        differentiable = bool(self.defaults.get("differentiable", False))
        # Under a dispatch mode (MemTracker, FlopCounterMode, DebugMode) the step runs torch's
        # operations, which the mode sees, and not the kernel, which it does not.
        runs_flat = self.elementwise and not torch._C._len_torch_dispatch_stack()
        for group in self.param_groups:
            rest: list[Tensor] | None = None  # the parameters left to step (None: all)
            if runs_flat and flat.eligible(group):
                ran = flat.step(self, group, grad_scale)
                if ran is False and group.get("fused") and flat.awaits_state(self, group):
                    # torch's fused kernels round as the flat kernel does, not as the reference
                    # path: the first step, too, runs flat, on the state made for it here.
                    self._make_state(group)
                    ran = flat.step(self, group, grad_scale)
                if ran is True:
                    continue
                _explain.warn_fallback(self, group)
                rest = ran or None
            enabled = torch.is_grad_enabled()
            if enabled is differentiable:
                self._step_group(group, grad_scale, rest)
                continue
            # The grad mode's own switch: torch.set_grad_enabled costs three times as much, which
            # a step of one small tensor (optimizer-in-backward) feels.
            torch._C._set_grad_enabled(differentiable)
            try:
                self._step_group(group, grad_scale, rest)
            finally:
                torch._C._set_grad_enabled(enabled)
        self.__dict__[STEP_COUNT_KEY] += 1  # the count in Python (see _step_count)
        return loss

    def _step_group(
        self, group: dict[str, Any], grad_scale: Tensor | None, only: list[Tensor] | None = None
    ) -> None:
        """Step the group's parameters that have gradients (of ``only``, where given)."""
        params = [p for p in (group["params"] if only is None else only) if p.grad is not None]
        if params:
            grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
            self._step_params(group, params, grads, grad_scale)

    def _make_state(self, group: dict[str, Any]) -> None:
        """Check a step of ``group`` and create the state of its parameters stepped for the
        first time, as the step would, without updating anything."""
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            self._gather(group, params, [p.grad for p in params])  # type: ignore[misc]

    def _step_params(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        grad_scale: Tensor | None = None,
    ) -> None:
        """Step ``params`` with ``grads`` under the hyperparameters of ``group``."""
        state, hp, strategy, entries = self._gather(group, params, grads)
        if grad_scale is None or not group.get("fused"):
            _run(strategy.run, type(self).update, params, grads, state, hp)
        elif len({id(g) for g in grads}) == len(grads):
            # Unscaled in place, as torch's fused kernels leave ``.grad``.
            _ops.div_(grads, grad_scale.to(grads[0].device))
            _run(strategy.run, type(self).update, params, grads, state, hp)
        else:
            # torch's fused kernels unscale and update parameter by parameter: a gradient that
            # several parameters hold is divided again for each, and each reads it as divided
            # so far.
            scale = grad_scale.to(grads[0].device)
            for i in range(len(params)):
                one = {key: values[i : i + 1] for key, values in state.items()}
                _ops.div_(grads[i : i + 1], scale)
                _run(strategy.run, type(self).update, params[i : i + 1], grads[i : i + 1], one, hp)
                for key, values in one.items():
                    state[key][i] = values[0]
        # State the update made (SGD's first momentum buffer) or replaced is stored.
        for key, values in state.items():
            for i, value in enumerate(values):
                old = entries[i].get(key)
                if value is None or old is value:
                    continue
                entry = entries[i] or self.state[params[i]]
                if type(entry) is StateEntry and type(old) in _NUMBERS and type(value) in _NUMBERS:
                    # A count kept as a Python number (SparseAdam's step) changes no tensor,
                    # so the state's version, which tells strategies that keep a group's
                    # tensors to look at them again, stays.
                    dict.__setitem__(entry, key, value)
                else:
                    entry[key] = value

    def _gather(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> tuple[StateLists, Hyper, Strategy, list[dict[str, Any]]]:
        """What a step of ``params`` under ``group`` runs on, checked and rehearsed, with the
        state of parameters stepped for the first time created and stored."""
        self.check_step(group, params, grads)
        if group.get("fused"):
            _checks.check_fused_grads(params, grads)
        hp, hp_layout = self._hyper(group, params)
        # Each parameter's state dict, created lazily; torch keeps no entry for a parameter
        # whose algorithm holds no state (SGD without momentum), and neither does polyak. New
        # entries are stored once the step is known to run.
        entries: list[dict[str, Any]] = []
        created: dict[Tensor, dict[str, Any]] = {}
        for p in params:
            entry = self.state.get(p) or created.get(p)
            if not entry:
                entry = self.init_state(p, hp)
                if entry:
                    created[p] = entry
            entries.append(entry)
        if len(entries) == 1:  # one parameter per optimizer, as in optimizer-in-backward
            entry = entries[0]
            state: StateLists = {key: [entry.get(key)] for key in self.state_keys}
        else:
            state = {key: [entry.get(key) for entry in entries] for key in self.state_keys}
        message = self.step_tensors_message
        if message is not None and not all(
            isinstance(t, Tensor) for t in state.get("step", ()) if t is not None
        ):
            raise RuntimeError(message)
        strategy = self._rehearse(group, params, grads, state, hp, entries, hp_layout)
        # Checked: from here on the step writes.
        if created:
            for p in created:
                self.state[p] = StateEntry(created[p])
            entries = [
                self.state[p] if p in created else e for p, e in zip(params, entries, strict=True)
            ]
        return state, hp, strategy, entries

    def _hyper(self, group: dict[str, Any], params: list[Tensor]) -> tuple[Hyper, list[Any]]:
        """``group``'s :class:`Hyper` for ``params`` and the layout of its values (see
        :func:`_layout`).

        Both are kept from the group's last step while its keys and values are the same
        objects (no scheduler changed a number) and all of them are numbers, flags or strings
        (or tuples of them), whose value an object fixes; a tensor may change in place. A class
        whose hyperparameters depend on the parameters (:meth:`hyperparameters` overridden)
        makes them afresh at every step.
        """
        keys, values = tuple(group), tuple(group.values())
        kept: dict[int, Any] = self.__dict__.setdefault("_hypers", {})
        last = kept.get(id(group))
        if last is not None and last[0] == keys and all(map(operator.is_, last[1], values)):
            return last[2], last[3]
        hp = self.hyperparameters(group, params)
        layout = _hyper_layout(vars(hp))
        own = type(self).hyperparameters is Optimizer.hyperparameters
        if own and all(map(_fixed, vars(hp).values())):
            kept[id(group)] = (keys, values, hp, layout)
        else:
            kept.pop(id(group), None)
        return hp, layout

    # ----------------------------------------------------------------- torch.compile

    def _traced_step(self, closure: Callable[[], Any] | None) -> Any:
        """:meth:`step` as ``torch.compile`` traces it, in one graph as torch.optim's step.

        The flat kernel is opaque to dynamo, so every group runs its update rule as tensor
        operations, one tensor at a time as torch's compiled CPU steps do, with the step
        counters kept as tensors (see :func:`polyak._ops.values`): the graph holds no
        ``item()`` and no guard on the step count or on a scheduled ``lr``. The checks, the
        rehearsal and the creation of state run in :meth:`_init_group`, which dynamo runs as
        Python; the groups are read here, so that dynamo knows where each comes from. The
        step is counted by :func:`_apart`, which runs as Python around it.

        A GradScaler's step with infs (``found_inf`` set) is skipped without reading the flag
        back, which would break the graph: what the step writes is put back where it is set.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        for group in self.param_groups:
            self._traced_group_step(group, grad_scale, found_inf)
        return loss

    def _traced_group_step(
        self, group: dict[str, Any], grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        values: list[Any] = []
        shared = self._init_group(group, params, grads, values)
        if not params:
            return
        n = len(params)
        state: StateLists = {
            key: values[k * n : (k + 1) * n] for k, key in enumerate(self.state_keys)
        }
        hp = self.hyperparameters(group, params)
        written = [*params, *grads, *(v for v in values if v is not None)]
        kept = [t.clone() for t in written] if found_inf is not None else []
        if grad_scale is not None and group.get("fused"):
            _ops.div_(grads, grad_scale.to(grads[0].device))
        _run(loop.in_turn if shared else _call, type(self).update, params, grads, state, hp)
        if found_inf is not None:
            for t, old in zip(written, kept, strict=True):
                t.copy_(torch.where(found_inf.to(t.device, torch.bool), old, t))
        for key, values in state.items():
            for p, value in zip(params, values, strict=True):
                if value is not None and self.state[p].get(key) is not value:
                    self.state[p][key] = value

    def _init_group(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`_gather_into` under the name that dynamo gives its place.

        Dynamo calls a method of this name as Python when it traces a step of a
        ``torch.optim.Optimizer`` (torch's own optimizers gather their groups this way), takes
        its result as a constant and guards the compiled graph on the groups and the state it
        finds; the checks and the rehearsal therefore run whenever the step is traced again.
        Its arguments are those of :meth:`_gather_into`; each torch optimizer has a signature
        of its own, which this one, taking any, stands in for.
        """
        _ops.trace_as_python()
        if "_compiled_steps" not in self.__dict__:
            # Where the graph counts a step that it compiles whole (see _apart), on the
            # parameters' device; a static address, as dynamo makes the state's, so that CUDA
            # graphs take it.
            first = next(chain.from_iterable(g["params"] for g in self.param_groups), None)
            counter = torch.zeros((), dtype=torch.int64, device=getattr(first, "device", None))
            torch._dynamo.mark_static_address(counter)
            self.__dict__["_compiled_steps"] = counter
        return self._gather_into(*args, **kwargs)

    def _gather_into(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], values: list[Any]
    ) -> bool:
        """Fill the empty lists ``params``, ``grads`` and ``values`` (the state, key after key in
        the order of ``state_keys``) for a step of ``group``, checked and rehearsed, creating
        the state of new parameters; return whether parameters or state tensors share memory,
        so that the parameters are updated in turn."""
        found = [p for p in group["params"] if p.grad is not None]
        if not found:
            return False
        found_grads = [cast(Tensor, p.grad) for p in found]
        state = self._gather(group, found, found_grads)[0]
        params.extend(found)
        grads.extend(found_grads)
        for key in self.state_keys:
            values.extend(state[key])
        return loop.shared(found, state)

    def _rehearse(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        state: StateLists,
        hp: Hyper,
        entries: list[dict[str, Any]],
        hp_layout: list[Any],
    ) -> Strategy:
        """Raise, before the step writes anything, any error the step would raise; return the
        strategy that runs the step (:func:`polyak.strategies.choose`'s, which the layout
        decides).

        The update runs first on stand-ins (see :func:`_stand_in`: small real tensors of the
        same dtypes, and copies of per-parameter counters) of one parameter of each kind (see
        :func:`_one_of_each_kind`), once for each new layout of the group: a state
        tensor replaced or removed by hand, a flag changed. Where it fails, it runs once more
        on copies of the real tensors so that the error is the one the step itself raises,
        with its wording. Differentiable steps and sparse gradients are not rehearsed; their
        state entries are checked at every step.
        """
        rehearsed = not group.get("differentiable") and not any(map(_SPARSE, grads))
        if rehearsed:
            # Gradients are in: autograd keeps them of their parameter's shape, dtype and
            # device, but ``.grad.data`` may be given anything.
            tensors = [*params, *grads, *chain.from_iterable(state.values())]
            layout = (hp_layout, _tensors_layout(tensors))
            done: dict[int, Any] = self.__dict__.setdefault("_rehearsed", {})
            last = done.get(id(group))
            if last is not None and last[0] == layout:
                return cast(Strategy, last[1])
        strategy = choose(group, params, grads, self.foreach_by_default)
        # A parameter's state is all or nothing, as torch.optim reads it: what init_state
        # makes must be there (torch raises KeyError from its dict). What it makes for each
        # kind of parameter is kept while the hyperparameters' layout is the same object (see
        # :meth:`_hyper`): steps that are not rehearsed check at every step.
        kept: dict[int, Any] = self.__dict__.setdefault("_needed", {})
        last = kept.get(id(group))
        needed: dict[tuple[Any, ...], list[str]] = (
            last[1] if last is not None and last[0] is hp_layout else {}
        )
        kept[id(group)] = (hp_layout, needed)
        for p, entry in zip(params, entries, strict=True):
            kind = (p.shape, p.dtype, p.device)
            if kind not in needed:
                with _unseen([p]):
                    needed[kind] = list(self.init_state(_key_template(p), hp))
            for key in needed[kind]:
                if key not in entry:
                    raise KeyError(key)
        if not rehearsed:
            return strategy
        update = type(self).update
        try:
            with torch.no_grad(), _unseen(tensors):
                kinds = _one_of_each_kind(params, grads, state)
                _run(strategy.run, update, *_stand_ins(kinds, _stand_in), hp)
        except Exception:
            with torch.no_grad(), _unseen(tensors):
                _run(strategy.run, update, *_stand_ins((params, grads, state), _copy), hp)
            raise
        done[id(group)] = (layout, strategy)
        return strategy

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
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        # Numbered as torch.optim numbers them: each parameter by its position counted across
        # the groups, a parameter listed twice in one group by its last position there.
        index: dict[int, int] = {}
        start = 0
        groups = []
        for group in self.param_groups:
            packed = {key: value for key, value in group.items() if key != "params"}
            index.update(
                {id(p): i for i, p in enumerate(group["params"], start) if id(p) not in index}
            )
            packed["params"] = [index[id(p)] for p in group["params"]]
            start += len(packed["params"])
            groups.append(packed)
        packed_state: dict[Any, Any] = {}
        others: dict[Any, Any] = {}
        for key, value in self.state.items():
            value = dict(value) if isinstance(value, dict) else value
            if isinstance(key, Tensor):
                packed_state[index[id(key)]] = value
            else:
                others[key] = value
        taken = set(index.values())
        for key, value in others.items():
            # State under an id no group lists, kept from a checkpoint, as torch.optim keeps it.
            if key in taken:
                warnings.warn(
                    f"optimizer.state holds state under id {key!r} that no parameter holds, "
                    "and that id is also the index of a parameter in this state_dict; it is "
                    "left out of the state_dict (it stays in optimizer.state)",
                    stacklevel=2,
                )
                continue
            packed_state[key] = value
        state_dict: StateDict = {"state": packed_state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a state_dict written by :meth:`state_dict` or by a ``torch.optim`` optimizer.

        Everything is checked before anything changes: on any mismatch this raises and the
        optimizer is exactly as it was. Floating-point state is cast to its parameter's dtype
        and device (``step`` counters keep theirs, as in torch) and copied, so stepping never
        writes into the dict that was loaded.

        Args:
            state_dict: the optimizer state, as returned by ``state_dict()``.
        """
        state_dict = dict(_checks.check_mapping("state_dict", state_dict))
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups, step_count = self._read_state_dict(state_dict)
        self.state = state
        self.param_groups = groups
        self._step_count = step_count
        flat.forget(self)
        # As torch.optim's loading does (through __setstate__): groups added later get them.
        for key, value in _SET_BY_LOADING.items():
            self.defaults.setdefault(key, value)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _read_state_dict(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[defaultdict[Any, Any], list[dict[str, Any]], int]:
        """Check ``state_dict`` against this optimizer and build what loading installs."""
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise KeyError(f"loaded state dict has no {key!r} entry")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(
                "Invalid param_groups: expected a list of dicts, but got "
                + torch.typename(saved_groups)
            )
        saved_state = _checks.check_mapping("state", state_dict["state"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for i, saved in enumerate(saved_groups):
            _checks.check_mapping(f"param_groups[{i}]", saved)
            if "params" not in saved:
                raise KeyError(f"loaded state dict's param_groups[{i}] has no 'params' entry")
            if not isinstance(saved["params"], (list, tuple)):
                raise TypeError(
                    f"Invalid param_groups[{i}]['params']: expected a list of ints, but got "
                    + torch.typename(saved["params"])
                )
        if any(
            len(g["params"]) != len(s["params"])
            for g, s in zip(self.param_groups, saved_groups, strict=True)
        ):
            raise ValueError(
                "loaded state dict contains a parameter group "
                "that doesn't match the size of optimizer's group"
            )

        # Ids are whatever the writer chose: indices from state_dict(), parameter names from
        # torch.distributed.checkpoint. Any hashable value serves, as in torch.optim.
        id_map: dict[Any, Tensor] = {}
        owner: dict[Any, int] = {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            for pid, p in zip(saved["params"], group["params"], strict=True):
                if pid in id_map and id_map[pid] is not p:
                    raise ValueError(f"loaded state dict lists parameter id {pid} more than once")
                id_map[pid] = p
                owner[pid] = g

        # Copied in one go, as torch.optim copies them: a value the groups share (a tensor lr
        # that add_param_group took from the defaults) stays shared.
        saved_copies = copy.deepcopy([dict(saved) for saved in saved_groups])
        groups = [
            self._read_group(i, saved, group)
            for i, (saved, group) in enumerate(zip(saved_copies, self.param_groups, strict=True))
        ]

        orphans = [pid for pid in saved_state if pid not in id_map]
        if orphans:
            stateless = [pid for pid in id_map if pid not in saved_state]
            if stateless:
                warnings.warn(
                    "loaded state dict has state under ids that no parameter group lists: "
                    f"{orphans!r}, while the parameters with ids {stateless!r} have none; the "
                    "state is kept under its ids, as torch.optim keeps it, and not used; check "
                    "that the checkpoint's ids match its param_groups",
                    stacklevel=3,
                )
        state = OptimizerState()
        copies: dict[int, tuple[Tensor, Any]] = {}  # the loaded 0-dim tensors' copies, by id
        for pid, value in saved_state.items():
            if pid not in id_map:
                # State of no parameter is kept as it is, as torch.optim does.
                state[pid] = value
                continue
            param = id_map[pid]
            group = groups[owner[pid]]
            entry = dict(_checks.check_mapping(f"state for parameter {pid}", value))
            if "step" in entry and "step" in self.state_keys:
                # Before an old format's number is made a tensor (a string would be parsed).
                _checks.check_state_step(entry["step"])
            self.upgrade_state(entry, group, param)
            if entry:
                # A parameter's state is all or nothing: what init_state makes must be there,
                # as a tensor of the shape it makes.
                for key, template in self.init_state(_state_template(param), Hyper(group)).items():
                    if entry.get(key) is None:
                        raise KeyError(f"loaded state for parameter {pid} has no {key!r} entry")
                    if not isinstance(template, Tensor):
                        continue  # a number the update keeps as such (SparseAdam's step)
                    if template.dim() == 0:
                        # A counter (Adam's step) may be any one-element tensor, as in torch.
                        _checks.check_state_scalar(pid, key, entry[key])
                    else:
                        _checks.check_state_tensor(pid, key, entry[key], template.shape)
            state[param] = StateEntry()
            for key, item in entry.items():
                # A counter that several parameters share (set by hand) stays shared, as in
                # torch, which loads it without a copy: one copy serves them all.
                shared = isinstance(item, Tensor) and item.dim() == 0
                if shared and id(item) in copies:
                    state[param][key] = copies[id(item)][1]
                    continue
                state[param][key] = self._read_state_value(pid, param, key, item, group)
                if shared:
                    copies[id(item)] = (item, state[param][key])

        if STEP_COUNT_KEY in state_dict:
            step_count = _checks.check_step_count(state_dict[STEP_COUNT_KEY])
        else:
            # A torch.optim state_dict has no step count; per-parameter ``step`` state, where
            # the algorithm keeps one, tells how many steps were taken.
            steps = [
                int(entry["step"])
                for key, entry in state.items()
                if isinstance(key, Tensor) and isinstance(entry.get("step"), (Tensor, int))
            ]
            step_count = max(steps, default=0)
        return state, groups, step_count

    def _read_group(
        self, i: int, saved: Mapping[str, Any], group: Mapping[str, Any]
    ) -> dict[str, Any]:
        new_group = dict(saved)
        new_group.update(self.fixed)
        # Only the optimizer's own hyperparameters are required: keys that others add to a
        # group (a scheduler's ``initial_lr``) are replaced by the saved group, as in torch.
        for key in self.defaults:
            if key in new_group:
                continue
            if key in self.backfill:
                new_group[key] = self.backfill[key]
            elif key not in _SET_BY_LOADING:
                raise KeyError(f"loaded state dict's param_groups[{i}] has no {key!r} entry")
        for key, value in new_group.items():
            if key not in group or key in ("params", "param_names"):
                continue
            if key in self.optional_strings and all(
                v is None or isinstance(v, str) for v in (group[key], value)
            ):
                continue
            _checks.check_same_kind(f"param_groups[{i}][{key!r}]", group[key], value)
        self.check_hyperparameters(new_group)
        self.check_loaded_group(new_group)
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in new_group:
            new_group["param_names"] = group["param_names"]
        return new_group

    def _read_state_value(
        self, pid: int, param: Tensor, key: Any, value: Any, group: Mapping[str, Any]
    ) -> Any:
        if key in self.param_shaped_state and value is not None:
            _checks.check_state_tensor(pid, key, value, param.shape)
            if value.is_complex() != param.is_complex():
                raise TypeError(
                    f"Invalid {key} for parameter {pid}: dtype {value.dtype} does not fit a "
                    f"parameter of dtype {param.dtype}"
                )
        return _cast_state(param, key, value, group)


#: Defaults that loading a state_dict (or unpickling) gives an optimizer that has none, as
#: torch.optim's ``__setstate__`` does; a loaded group may lack them.
_SET_BY_LOADING = {"differentiable": False}

#: Up to this many elements, a parameter's state templates are made on a real CPU tensor.
_REAL_STAND_IN_NUMEL = 1 << 20


def _state_template(param: Tensor) -> Tensor:
    """A tensor of ``param``'s shape and dtype on which ``init_state`` shows the state it makes.

    A small parameter gets a real CPU tensor: ``zeros_like`` on the meta device runs torch's
    Python meta kernel, which imports ``torch.fx``'s symbolic shapes and sympy, 0.3-1 s in a
    process's first ``load_state_dict``. A large one gets a meta tensor, which allocates nothing.
    """
    if param.numel() <= _REAL_STAND_IN_NUMEL:
        return torch.empty(param.shape, dtype=param.dtype)
    return torch.empty_like(param, device="meta")


def _key_template(param: Tensor) -> Tensor:
    """A tensor on which ``init_state`` shows which keys it makes for ``param``: a large plain
    parameter's has its shape shrunk as the rehearsal shrinks it (see :func:`_shrinking`),
    which keeps its dimensions and so the keys, without the imports a meta tensor costs."""
    if _small(param) or type(param) not in _PLAIN_TENSORS:
        return _state_template(param)
    return _stand_in(param, _shrinking([param]))


_LOW_PRECISION = (torch.float16, torch.bfloat16)


#: ``run(update, params, grads, state, hp)``: a strategy's way to run an update rule.
Runner: TypeAlias = Callable[[Update, list[Tensor], list[Tensor], StateLists, Any], None]


def _call(
    update: Update, params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Any
) -> None:
    update(params, grads, state, hp)


def _run(
    run: Runner,
    update: Update,
    params: list[Tensor],
    grads: list[Tensor],
    state: StateLists,
    hp: Hyper,
) -> None:
    if vars(hp).get("fused") and any(p.dtype in _LOW_PRECISION for p in params):
        _run_promoted(run, update, params, grads, state, hp)
    else:
        run(update, params, grads, state, hp)


def _layout(value: Any) -> Any:
    """What of ``value`` decides whether a step over it can fail: types, shapes, dtypes and
    devices of its tensors, and of its numbers whether they are zero (rules branch on that)."""
    kind = type(value)
    # The usual hyperparameters first, by exact type: this runs at every step.
    if kind is bool or kind is str or value is None:
        return value
    if kind is float or kind is int:
        return (kind, value == 0)
    if kind is dict:
        return tuple([(key, _layout(item)) for key, item in value.items()])
    if isinstance(value, Tensor):
        return (kind, value.shape, value.dtype, value.device, value.layout)
    if isinstance(value, dict):
        return tuple((key, _layout(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return (kind, *map(_layout, value))
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return (kind, value == 0)
    return kind


def _hyper_layout(values: dict[str, Any]) -> list[Any]:
    """:func:`_layout` of each hyperparameter, the usual types inline: this runs per step."""
    out: list[Any] = []
    for key, value in values.items():
        kind = type(value)
        if kind is float or kind is int:
            out.append((key, kind, value == 0))
        elif kind is bool or kind is str or value is None:
            out.append((key, value))
        else:
            out.append((key, _layout(value)))
    return out


_META = operator.attrgetter("shape", "dtype", "device")
_SPARSE = operator.attrgetter("is_sparse")
_PRESENT = functools.partial(operator.is_not, None)


def _tensors_layout(values: list[Any]) -> Any:
    """:func:`_layout` of a list of tensors and Nones, at C speed where all are tensors."""
    try:
        # The types say where the Nones are.
        return (tuple(map(type, values)), tuple(map(_META, filter(_PRESENT, values))))
    except AttributeError:  # a value that is not a tensor
        return _layout(values)


def _fixed(value: Any) -> bool:
    """Whether ``value`` is fixed by its object: a number, flag or string, or a tuple of them."""
    kind = type(value)
    return kind in _PLAIN or (kind is tuple and all(type(v) in _PLAIN for v in value))


def _one_of_each_kind(
    params: list[Tensor], grads: list[Tensor], state: StateLists
) -> tuple[list[Tensor], list[Tensor], StateLists]:
    """The step's lists cut to one parameter of each kind: the same layouts of parameter,
    gradient and state values, and the same per-parameter counters. An update rule treats
    each parameter on its own (the loop strategy runs it on one at a time), so a step that
    fails for one parameter fails for every parameter of its kind, and a rehearsal on one of
    each raises what a rehearsal on all would."""
    columns = list(state.values())
    first: dict[Any, int] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        kind = (_layout(p), _layout(g), *[_kind(column[i]) for column in columns])
        first.setdefault(kind, i)
    if len(first) == len(params):
        return params, grads, state
    picked = list(first.values())
    return (
        [params[i] for i in picked],
        [grads[i] for i in picked],
        {key: [values[i] for i in picked] for key, values in state.items()},
    )


def _kind(value: Any) -> Any:
    """What of a state value tells its parameter's kind: its layout, and a counter's value,
    which rules branch on."""
    if type(value) is Tensor and value.dim() == 0 and not value.is_meta:
        return (_layout(value), value.item())
    return _layout(value)


#: How a parameter's tensors are stood in for: ``None`` by real tensors of their shapes, a map
#: of dimension sizes by real tensors of the mapped (small) shapes, ``"meta"`` by meta tensors.
StandIn: TypeAlias = dict[int, int] | str | None


def _unseen(tensors: list[Any]) -> contextlib.AbstractContextManager[Any]:
    """Where a rehearsal of a step over ``tensors`` runs unseen by the dispatch modes active,
    and the state templates that tell which keys a parameter's state needs are made.

    These are polyak's own checks, which torch's step does not make: a mode that watches
    a step (MemTracker, which files what the step allocates as optimizer state; FlopCounterMode;
    DebugMode) would count its stand-ins and their operations as the step's. Where every tensor
    is a plain one, the modes are set aside while it runs; their stand-ins are plain too, and
    nothing of them outlives it. Tensor subclasses (DTensor, fake tensors) dispatch through the
    modes' key, which must stay: they are rehearsed as they are.
    """
    if not torch._C._len_torch_dispatch_stack():
        return contextlib.nullcontext()
    if not all(type(t) in _PLAIN_TENSORS for t in tensors if isinstance(t, Tensor)):
        return contextlib.nullcontext()
    return torch._C._DisableTorchDispatch()


def _stand_in(t: Tensor, how: StandIn) -> Tensor:
    """A tensor like ``t`` to rehearse a step on; per-parameter counters, which the update
    reads as numbers, are copied. Tensors of small parameters are real ones of their shapes,
    as in :func:`_state_template`; those of large plain ones real ones of shapes shrunk by
    :func:`_shrinking`; anything else a meta tensor, which allocates nothing but whose Python
    kernels import torch's reference operations and sympy on first use (over a second)."""
    if t.dim() == 0 or (t.numel() == 1 and type(t) in _PLAIN_TENSORS):
        # Counters are plain (a DTensor parameter's too); a one-element DTensor is state of
        # its parameter's layout (Adafactor's factors of an n x 1 matrix), stood in for as
        # the parameter's other tensors are.
        return t.detach().clone()
    if how is None and _small(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if isinstance(how, dict) and type(t) in _PLAIN_TENSORS:
        return torch.empty([how[n] for n in t.shape], dtype=t.dtype, device=t.device)
    return torch.empty_like(t.detach(), device="meta")


def _small(t: Tensor) -> bool:
    """Whether a rehearsal stands in for ``t`` by a real tensor of its own shape."""
    return t.numel() <= _REAL_STAND_IN_NUMEL and type(t) in _PLAIN_TENSORS


def _shrinking(tensors: list[Any]) -> StandIn:
    """How to stand in for a large parameter's tensors (itself, its gradient, its state): by
    real tensors whose dimension sizes are mapped onto small ones, keeping 0 and 1 and the
    order of the others, so that every size that equals, exceeds or broadcasts against
    another still does, and each stand-in of more than one element still has more than one.
    Meta tensors where one of them is not a plain tensor."""
    sizes: set[int] = set()
    for t in tensors:
        if isinstance(t, Tensor):
            if type(t) not in _PLAIN_TENSORS:
                return "meta"
            sizes.update(t.shape)
    larger = sorted(n for n in sizes if n > 1)
    return {0: 0, 1: 1, **{n: k + 2 for k, n in enumerate(larger)}}


def _copy(t: Tensor, how: StandIn) -> Tensor:
    return t.detach().clone()


def _stand_ins(
    lists: tuple[list[Tensor], list[Tensor], StateLists], make: Callable[[Tensor, StandIn], Tensor]
) -> tuple[list[Tensor], list[Tensor], StateLists]:
    """Stand-ins of a step's tensors. A large parameter's gradient and state are stood in for
    as the parameter is, so that state smaller than the parameter (Adafactor's row and column
    factors) keeps its relation to it."""
    params, grads, state = lists
    columns = list(state.values())
    hows: list[StandIn] = [
        None if _small(p) else _shrinking([p, g, *[column[i] for column in columns]])
        for i, (p, g) in enumerate(zip(params, grads, strict=True))
    ]
    return (
        [make(p, how) for p, how in zip(params, hows, strict=True)],
        [make(g, how) for g, how in zip(grads, hows, strict=True)],
        {
            key: [
                make(t, how) if isinstance(t, Tensor) else t
                for t, how in zip(values, hows, strict=True)
            ]
            for key, values in state.items()
        },
    )


def _run_promoted(
    run: Runner,
    update: Update,
    params: list[Tensor],
    grads: list[Tensor],
    state: StateLists,
    hp: Hyper,
) -> None:
    """Run ``update`` with half-precision tensors computed in float32, as fused kernels do.

    Parameters and state are stored back in their own dtype, rounded once per step.
    """

    def up(t: Tensor) -> Tensor:
        return t.float() if t.dtype in _LOW_PRECISION else t

    wide_params = [up(p.detach()) for p in params]
    wide_state: StateLists = {
        key: [None if t is None else up(t) for t in values] for key, values in state.items()
    }
    run(update, wide_params, [up(g) for g in grads], wide_state, hp)
    with torch.no_grad():
        for p, wide in zip(params, wide_params, strict=True):
            if wide.dtype != p.dtype:
                p.copy_(wide)
        for key, values in wide_state.items():
            for i, (old, new) in enumerate(zip(state[key], values, strict=True)):
                if new is None or new is old:
                    continue
                if old is not None:
                    old.copy_(new)
                elif new.is_floating_point() and params[i].dtype in _LOW_PRECISION:
                    # New state of a half-precision parameter is stored in its dtype.
                    state[key][i] = new.to(params[i].dtype)
                else:
                    state[key][i] = new


def _cast_state(param: Tensor, key: Any, value: Any, group: Mapping[str, Any]) -> Any:
    """Copy one loaded state value, placing its tensors as torch.optim does."""
    if isinstance(value, Tensor):
        if key == "step":
            # Step counters stay on the CPU in float32/64, unless a fused or capturable step
            # reads them on the device.
            if group.get("fused") or group.get("capturable"):
                return value.to(dtype=torch.float32, device=param.device, copy=True)
            return value.clone()
        if param.is_floating_point():
            return value.to(dtype=param.dtype, device=param.device, copy=True)
        return value.to(device=param.device, copy=True)
    if isinstance(value, dict):
        return {k: _cast_state(param, k, v, group) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_state(param, None, v, group) for v in value)
    return value
