"""The step's wrappers: hooks, the profiler's record, and how ``torch.compile`` meets a step."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import OrderedDict
from collections.abc import Callable
from itertools import chain
from typing import Any, TypeVar, cast

import torch
import torch.optim
from torch.optim import optimizer as _torch_optimizer
from torch.utils.hooks import RemovableHandle

_F = TypeVar("_F", bound=Callable[..., Any])


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
        self: Any = args[0]
        if torch.compiler.is_compiling():
            if self.eager_under_compile:
                return _eagerly(run, self, args, kwargs)
            return _step_in_own_graph(run, self, args, kwargs)
        if not torch._C._autograd._profiler_enabled():
            return run(self, args, kwargs)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            out = run(self, args, kwargs)
            _PROFILER_ENTRY(self)
            return out

    def run(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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

    def run(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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
def _outside_dynamo(optimizer: Any, set_to_none: bool) -> None:
    """:meth:`Optimizer.zero_grad`'s body, run outside dynamo as torch's zero_grad is."""
    optimizer._zero_grad(set_to_none)


@torch._disable_dynamo  # type: ignore[misc,attr-defined]
def _eagerly(
    run: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any],
    self: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``run(self, args, kwargs)`` outside dynamo: one graph break, as dynamo makes for the
    steps of torch's optimizers it cannot trace (SparseAdam's sparse gradients)."""
    return run(self, args, kwargs)


def _step_in_own_graph(
    run: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any],
    self: Any,
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
    if "differentiable" not in self.defaults and type(self)._base_step:
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
