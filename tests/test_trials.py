"""Trials of polyak's guarantees, generated from the registry for every optimizer and strategy.

For each optimizer of :data:`registry.REGISTRY` and each strategy its class takes (the default,
``foreach=False``, ``foreach=True``, and ``fused=True`` where it takes ``fused``), polyak's
optimizer and its torch.optim twin are built in the same test over twin parameters (in two
groups, where the optimizer takes several) and put through these trials:

* checkpoints (:func:`test_fuzzed_checkpoints_load_as_torchs_or_are_refused_unchanged`): the
  trained twin's ``state_dict`` is mutated (state of another shape, dtype or device, missing and
  extra keys, ids shifted, repeated or of another type, groups added or removed, hyperparameters
  no constructor takes, ``step`` values no training makes) and loaded into both. Where torch
  refuses it, polyak refuses it with the same type of error. Where polyak refuses what torch
  loads, either the change is one polyak's load documents that it checks (a value of another
  kind or shape than the optimizer holds there, a key left out, an id listed twice, a ``step``
  no training makes: see :class:`Variant`), or torch's constructor refuses the checkpoint's
  hyperparameters (then with the constructor's ValueError, where it raises one), or torch's
  next step fails or gives a result that is not finite. A value equal to one of the kind held
  (``1`` or ``tensor(True)`` for ``True``) is not of another kind. A refusal leaves polyak's
  optimizer deeply unchanged (``state_dict()``, groups, parameters and gradients bit for bit,
  and the same objects); a checkpoint both load gives the same ``state_dict`` and steps as
  torch's.
* failing steps (:func:`test_failing_steps_raise_torchs_error_and_change_nothing`): a gradient
  of another shape, dtype or layout, state and hyperparameters edited by hand (removed, of
  another shape, dtype or device, not a tensor), a closure that raises. Where torch's step
  raises, polyak's raises the same type of error and changes nothing, and once the edit is
  undone its next step gives torch's numbers; where torch's steps, polyak's steps as it does.
  (A gradient on another device cannot be made on a machine without an accelerator: the wrong
  device is the state's, moved to the meta device by hand.)
* edge inputs (:func:`test_edge_inputs_step_as_torchs`): infinite and NaN gradients,
  parameters without elements and 0-dim ones, complex, float16, bfloat16 and float64
  parameters, a parameter in two groups, parameters sharing storage, non-contiguous gradients.
  Numbers are compared bit for bit (NaNs in the same places), errors by type.
* threads (:func:`test_threads_stepping_different_optimizers_at_once`): several optimizers,
  two of them of one class and strategy, stepped at once from threads, each with torch's
  numbers.

``fused=True`` is compared within the entry's ``fused_tolerances``, complex parameters under
``foreach=True`` within its ``complex_foreach_tolerance``. torch's fused kernels do not check
the sizes of what they are given (a buffer of 7 elements for a parameter of 12 is written 12
elements, out of bounds) and read a gradient's memory in order whatever its strides: torch's
fused step is not run where a size differs (polyak's may then raise or step, but not half-way),
and is given contiguous copies of non-contiguous gradients.

Running the trials
------------------
A default run takes a seeded sample of each case's trials (and of the thread trials): the
sample depends on nothing but the seed :data:`SEED` and the case's name, so every run tries the
same ones. ``POLYAK_TRIALS=exhaustive`` runs every trial, for every configuration of the
registry as well as its ``stateful`` one (about half an hour on two cores)::

    POLYAK_TRIALS=exhaustive python -m pytest -p no:cacheprovider tests/test_trials.py

A failing case lists each of its trials that failed, by a name that says what it changed.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import random
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import torch
from conftest import (
    as_grad,
    assert_same,
    clone_kwargs,
    needs_closure,
    params_for,
    quadratic_closure,
    set_grads,
    step,
)
from registry import REGISTRY, Entry, ids, takes
from torch import Tensor

#: ``POLYAK_TRIALS=exhaustive`` runs every trial; otherwise a seeded sample runs.
EXHAUSTIVE = os.environ.get("POLYAK_TRIALS", "").strip().lower() == "exhaustive"
#: The seed of the default run's sample.
SEED = 0
#: Trials a default run takes of each case, per suite.
CHECKPOINT_SAMPLE = 16
FAILING_SAMPLE = 10
EDGE_SAMPLE = 5
THREAD_SAMPLE = 3

#: The parameters' shapes (2-D where the optimizer takes matrices only: see ``params_for``).
SHAPES: list[tuple[int, ...]] = [(3, 4), (5,), (2, 2, 2)]
#: Steps of training before a trial, and steps compared after it.
TRAIN_STEPS = 2
CHECK_STEPS = 2

T = TypeVar("T")
Trial = tuple[str, Callable[[], None]]


# --------------------------------------------------------------------------- the cases


def strategies(entry: Entry) -> list[tuple[str, dict[str, Any]]]:
    """The strategies the entry's class takes: the default, then ``foreach=False`` and
    ``foreach=True`` where it takes ``foreach``, and ``fused=True`` where it takes ``fused``."""
    found: list[tuple[str, dict[str, Any]]] = [("default", {})]
    if takes(entry, "foreach"):
        found += [("loop", {"foreach": False}), ("foreach", {"foreach": True})]
    if takes(entry, "fused"):
        found.append(("fused", {"fused": True}))
    return found


@dataclass(frozen=True)
class Case:
    """One optimizer of the registry, on one strategy, under one configuration."""

    entry: Entry
    strategy: str
    flags: dict[str, Any]
    config_name: str = "stateful"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The case's test id: optimizer, strategy and configuration."""
        return f"{ids(self.entry)}-{self.strategy}-{self.config_name}"

    def kwargs(self) -> dict[str, Any]:
        """The constructor's arguments, a fresh copy for each optimizer."""
        return clone_kwargs({**self.config, **self.flags})


def _cases(every_config: bool) -> list[Case]:
    """Every case: each entry on each strategy, under its ``stateful`` configuration (and each
    of its ``configs`` where ``every_config``)."""
    cases = []
    for entry in REGISTRY:
        configs = [("stateful", entry.stateful)]
        if every_config:
            configs += [(f"config{i}", c) for i, c in enumerate(entry.configs)]
        for strategy, flags in strategies(entry):
            cases += [Case(entry, strategy, flags, name, config) for name, config in configs]
    return cases


CASES = _cases(EXHAUSTIVE)
CASE_PARAMS = [pytest.param(case, id=case.name) for case in CASES]


def sample(trials: Sequence[T], k: int, name: str) -> list[T]:
    """``k`` of ``trials``, chosen by the seed and ``name`` alone, in their order; all of them
    in the exhaustive mode."""
    if EXHAUSTIVE or len(trials) <= k:
        return list(trials)
    chosen = random.Random(f"{SEED}:{name}").sample(range(len(trials)), k)
    return [trials[i] for i in sorted(chosen)]


def run_trials(trials: list[Trial]) -> None:
    """Run every trial and fail with the list of those that failed (warnings, such as the
    one for state under ids that no group lists, are silenced)."""
    failures = []
    for name, trial in trials:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial()
        except Exception as error:
            message = str(error).split("\nassert ")[0]
            failures.append(f"{name}: {type(error).__name__}: {message}"[:1500])
    assert not failures, f"{len(failures)} of {len(trials)} trials failed:\n" + "\n".join(failures)


def attempt(fn: Callable[[], Any]) -> Exception | None:
    """The exception ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as error:
        return error
    return None


# ------------------------------------------------------------------- twin optimizers


@dataclass
class Pair:
    """polyak's optimizer and torch.optim's, each over its own copy of the parameters."""

    case: Case
    mine: Any
    ref: Any
    params: list[Tensor]
    ref_params: list[Tensor]
    atol: float
    #: Keys of the state torch keeps in the shape of each parameter (see :func:`sized_keys`).
    sized: frozenset[Any] = frozenset()

    @property
    def sparse(self) -> bool:
        """Whether the optimizer steps on sparse gradients only."""
        return self.case.entry.sparse_grads


def grouped(entry: Entry, params: list[Tensor], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Two groups, the second with half the learning rate where it is a number; one group for
    an optimizer that takes one only."""
    if entry.one_group or len(params) < 2:
        return [{"params": params}]
    lr = config.get("lr", inspect.signature(entry.cls).parameters["lr"].default)
    second: dict[str, Any] = {"params": params[2:] if len(params) > 2 else params[1:]}
    if isinstance(lr, (int, float)):
        second["lr"] = lr / 2
    return [{"params": params[: len(params) - len(second["params"])]}, second]


def flat_params(opt: Any) -> list[Tensor]:
    """The optimizer's parameters, group after group."""
    return [p for group in opt.param_groups for p in group["params"]]


def tolerance(case: Case, dtype: torch.dtype) -> float:
    """How far from torch's numbers polyak's may be: the fused kernels' rounding, and torch's
    foreach path's for complex numbers."""
    if case.flags.get("fused"):
        return case.entry.fused_tolerances.get(dtype, 0.0)
    if dtype.is_complex and case.flags.get("foreach"):
        return case.entry.complex_foreach_tolerance
    return 0.0


def build(
    case: Case,
    dtype: torch.dtype = torch.float32,
    shapes: list[tuple[int, ...]] | None = None,
    make: Callable[[], list[Tensor]] | None = None,
    copies: int = 2,
) -> list[Any] | None:
    """Optimizers of the case over identical parameters: polyak's, then ``copies - 1`` of
    torch's, as ``[(optimizer, params), ...]``. Where torch's constructor refuses the case,
    polyak's must refuse it with the same type of error, and None is returned.

    ``make`` builds the parameters (it is called once for each optimizer, and must return the
    same values each time); by default they are seeded ones of ``shapes`` and ``dtype``.
    """
    entry = case.entry

    def new_params() -> list[Tensor]:
        if make is not None:
            return make()
        return params_for(entry, shapes or SHAPES, dtype=dtype)

    built = []
    for k in range(copies):
        cls = entry.cls if k == 0 else entry.reference
        params = new_params()
        try:
            opt = cls(grouped(entry, params, case.config), **case.kwargs())
        except Exception as error:
            if k == 0:
                expected = attempt(
                    lambda: entry.reference(
                        grouped(entry, new_params(), case.config), **case.kwargs()
                    )
                )
                assert type(expected) is type(error), (
                    f"polyak's constructor raised {error!r}, torch's {expected!r}"
                )
                return None
            raise AssertionError(f"torch's constructor raised {error!r}, polyak's not") from error
        built.append((opt, params))
    return built


def sized_keys(opt: Any) -> frozenset[Any]:
    """The keys of the optimizer's state whose tensors have the shape of their parameter."""
    return frozenset(
        key
        for p in flat_params(opt)
        for key, value in opt.state.get(p, {}).items()
        if isinstance(value, Tensor) and value.shape == p.shape and value.numel() > 1
    )


def pair_of(case: Case, built: list[Any], dtype: torch.dtype = torch.float32) -> Pair:
    """The first two optimizers of :func:`build` (polyak's and torch's) as a :class:`Pair`."""
    (mine, params), (ref, ref_params) = built[:2]
    return Pair(case, mine, ref, params, ref_params, tolerance(case, dtype), sized_keys(ref))


def train(built: list[Any], sparse: bool, steps: int = TRAIN_STEPS, seed: int = 1) -> None:
    """Step every optimizer of ``built`` with the same seeded gradients."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        give_grads([params for _, params in built], gen, sparse)
        for opt, _ in built:
            step(opt)


def give_grads(param_lists: list[list[Tensor]], gen: torch.Generator, sparse: bool) -> None:
    """The same seeded gradients for each list of parameters, each its own tensor (torch's
    steps may change a gradient in place: its foreach Nesterov momentum does)."""
    first, second = param_lists[0], param_lists[1]
    set_grads(first, second, gen, sparse)
    for p, q in zip(first, second, strict=True):
        if q.grad is p.grad:
            q.grad = p.grad.clone()
    for params in param_lists[2:]:
        for p, q in zip(first, params, strict=True):
            q.grad = None if p.grad is None else p.grad.clone()


def trained(case: Case, copies: int = 2) -> list[Any]:
    """:func:`build` then :func:`train`; the case is skipped where torch refuses it."""
    built = build(case, copies=copies)
    if built is None:
        pytest.skip("torch's constructor refuses this configuration (and polyak's alike)")
    train(built, case.entry.sparse_grads)
    return built


def contiguous_fused_grads(opt: Any) -> None:
    """Give torch's fused groups contiguous copies of non-contiguous gradients: its fused
    kernels read a gradient's memory in order, whatever its strides (a transposed gradient is
    applied to the wrong elements), where polyak's, as torch's other paths, follow them."""
    for group in opt.param_groups:
        if isinstance(group, dict) and group.get("fused"):
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse and not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()


def unsafe_fused_step(opt: Any, sized: frozenset[Any]) -> str | None:
    """Why a step of torch's fused kernels would read or write out of bounds, if it would:
    they do not check the sizes of the gradients and of the state they are given (a momentum
    buffer of 7 elements for a parameter of 12 is written 12 elements)."""
    for group in opt.param_groups:
        if not isinstance(group, dict) or not group.get("fused"):
            continue
        for p in group["params"]:
            g = p.grad
            if g is not None and not g.is_sparse and g.numel() != p.numel():
                return f"a gradient of {g.numel()} elements for a parameter of {p.numel()}"
            entry = opt.state.get(p)
            for key in sized if isinstance(entry, dict) else ():
                value = entry.get(key)
                if isinstance(value, Tensor) and value.numel() != p.numel():
                    return f"a {key!r} of {value.numel()} elements for a parameter of {p.numel()}"
    return None


# ------------------------------------------------------------------------- comparisons


def _dense(tree: Any) -> Any:
    """``tree`` with sparse tensors made dense."""
    return torch.utils._pytree.tree_map_only(
        Tensor, lambda t: t.to_dense() if t.is_sparse else t, tree
    )


def assert_close(a: Any, b: Any, atol: float) -> None:
    """As :func:`conftest.assert_same` (bit for bit, NaNs in the same places), or within
    ``atol`` where it is not zero; tensors on the meta device by dtype and shape."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), (a, b)
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), (a, b)
        if a.device.type == "meta":
            return
        if atol == 0.0:
            assert_same(a, b)
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, equal_nan=True)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a, b)
        for key in a:
            assert_close(a[key], b[key], atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, atol)
    else:
        assert_same(a, b)


def assert_like(mine: Any, params: list[Tensor], ref: Any, ref_params: list[Tensor], atol: float):
    """polyak's parameters and ``state_dict`` are torch's."""
    assert_close([p.detach() for p in params], [q.detach() for q in ref_params], atol)
    sd, ref_sd = mine.state_dict(), ref.state_dict()
    assert_close(_dense(sd["state"]), _dense(ref_sd["state"]), atol)
    assert_same(sd["param_groups"], ref_sd["param_groups"])


def assert_like_torch(pair: Pair) -> None:
    """:func:`assert_like` for the pair."""
    assert_like(pair.mine, pair.params, pair.ref, pair.ref_params, pair.atol)


def _copied(tree: Any) -> Any:
    """A deep copy of ``tree``, its tensors detached (a state tensor that requires grad and
    is not a leaf cannot be deep-copied)."""
    return copy.deepcopy(torch.utils._pytree.tree_map_only(Tensor, lambda t: t.detach(), tree))


def _key(key: Any) -> Any:
    """A state key as a snapshot records it: a parameter by its identity."""
    return ("tensor", id(key)) if isinstance(key, Tensor) else ("id", repr(key))


def snapshot(opt: Any) -> dict[str, Any]:
    """Everything a refused load or a failed step must leave as it was: the ``state_dict``,
    the groups, the parameters and their gradients, and which objects hold them."""
    params = flat_params(opt)
    state = opt.state
    return {
        "state_dict": _copied(opt.state_dict()),
        "groups": _copied(
            [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        ),
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "step_count": getattr(opt, "_step_count", None),
        "objects": [
            id(state),
            id(opt.param_groups),
            [id(group) for group in opt.param_groups],
            [id(p) for p in params],
            [id(p.grad) for p in params],
            [
                (
                    _key(key),
                    id(entry),
                    sorted((repr(k), id(v)) for k, v in entry.items())
                    if isinstance(entry, dict)
                    else None,
                )
                for key, entry in state.items()
            ],
        ],
    }


def _bits(t: Tensor) -> Tensor:
    """The bytes of ``t``, to compare bit for bit (NaN payloads and signed zeros included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` are the same, tensors bit for bit, of the same dtype and device."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        assert (a.dtype, a.shape, a.device, a.layout) == (b.dtype, b.shape, b.device, b.layout), (
            where,
            a,
            b,
        )
        if a.device.type == "meta":
            return
        if a.is_sparse:
            assert_identical(a._indices(), b._indices(), where)
            assert_identical(a._values(), b._values(), where)
        else:
            assert torch.equal(_bits(a), _bits(b)), (where, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, a, b)
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), (where, a, b)
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def assert_unchanged(opt: Any, before: dict[str, Any], what: str) -> None:
    """The optimizer is as :func:`snapshot` saw it in ``before``; ``what`` names the refusal
    or failure that must have left it so."""
    try:
        assert_identical(snapshot(opt), before)
    except AssertionError as error:
        raise AssertionError(f"{what} changed polyak's optimizer: {error}") from None


def same_step(
    mine: Any,
    ref: Any,
    take_step: Callable[[Any], Any] = step,
    sized: frozenset[Any] = frozenset(),
) -> bool | None:
    """Step both: where torch's steps, polyak's steps too (True is returned); where torch's
    raises, polyak's raises the same type of error and changes nothing (False). Where torch's
    fused kernels would step out of bounds, its outcome is undefined: torch's is not stepped,
    polyak's may step or raise, but not half-way (None)."""
    before = snapshot(mine)
    if unsafe_fused_step(ref, sized) is not None:
        got = attempt(lambda: take_step(mine))
        if got is not None:
            assert_unchanged(mine, before, f"a step failing with {got!r}")
        return None
    contiguous_fused_grads(ref)
    expected = attempt(lambda: take_step(ref))
    got = attempt(lambda: take_step(mine))
    if expected is not None:
        assert type(got) is type(expected), f"torch's step raised {expected!r}, polyak's {got!r}"
        assert_unchanged(mine, before, f"a step failing with {got!r}")
        return False
    assert got is None, f"polyak's step raised {got!r}, torch's stepped"
    return True


def step_alike(pair: Pair, steps: int = CHECK_STEPS, seed: int = 7) -> None:
    """Steps with the same gradients on both, compared after each: where torch's fails,
    polyak's fails alike, unchanged, and the trial ends."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        give_grads([pair.params, pair.ref_params], gen, pair.sparse)
        if not same_step(pair.mine, pair.ref, sized=pair.sized):
            return
        assert_like_torch(pair)


def fails_or_diverges(pair: Pair) -> bool:
    """Whether torch's next steps raise, would go out of bounds, or give a parameter or state
    that is not finite or has no value (on the meta device)."""
    opt, params = pair.ref, pair.ref_params
    gen = torch.Generator().manual_seed(11)
    for _ in range(CHECK_STEPS):
        dummies = [p.detach().clone().requires_grad_() for p in params]
        give_grads([params, dummies], gen, pair.sparse)
        if unsafe_fused_step(opt, pair.sized) is not None:
            return True
        if attempt(lambda: step(opt)) is not None:
            return True
        tensors = [p.detach() for p in params] + [
            t
            for entry in opt.state.values()
            if isinstance(entry, dict)
            for t in entry.values()
            if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())
        ]
        if any(t.device.type == "meta" for t in tensors):
            return True
        if not all(bool(torch.isfinite(_dense(t)).all()) for t in tensors):
            return True
    return False


# ------------------------------------------------------------------------- checkpoints

Mutation = Callable[[dict[str, Any]], None]
_NAN, _INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Variant:
    """A value that may replace one in a checkpoint. ``refusable``: polyak documents that its
    load refuses it where torch's loads it (a value of another kind or shape than the
    optimizer holds there, or a ``step`` no training makes), so a refusal needs no failure of
    torch's step to justify it."""

    label: str
    make: Callable[[], Any]
    refusable: bool = False


@dataclass(frozen=True)
class CheckpointMutation:
    """A named change of a checkpoint; ``refusable`` as for :class:`Variant`."""

    name: str
    mutate: Mutation
    refusable: bool = False


def _tensor_variants(v: Tensor, step_key: bool) -> list[Variant]:
    """Values a saved state tensor may be replaced with."""
    variants: list[Variant] = []
    if v.dim() > 0:
        variants += [
            Variant("of shape (7,)", lambda: torch.zeros(7, dtype=v.dtype), True),
            Variant("with a leading unit dim", lambda: v.unsqueeze(0).clone(), True),
            Variant("one element short", lambda: v.reshape(-1)[1:].clone(), True),
            Variant("0-dim", lambda: v.reshape(-1)[0].clone(), True),
        ]
        if v.dim() == 2 and v.shape[0] != v.shape[1]:
            variants.append(Variant("transposed", lambda: v.t().contiguous(), True))
    else:
        variants += [
            Variant("1-dim", lambda: v.reshape(1).clone()),
            Variant("of two elements", lambda: v.reshape(1).repeat(2), True),
        ]
    variants += [
        Variant("float64", lambda: v.double()),
        Variant("float16", lambda: v.half()),
        Variant("bfloat16", lambda: v.bfloat16()),
        Variant("int64", lambda: v.long()),
        Variant("bool", lambda: v.bool()),
        Variant("on the meta device", lambda: v.to("meta")),
        Variant("a list", lambda: v.tolist(), True),
        Variant("None", lambda: None, True),
        Variant("a string", lambda: "x", True),
        Variant("NaN", lambda: torch.full_like(v, _NAN), step_key),
        Variant("infinite", lambda: torch.full_like(v, _INF), step_key),
        Variant("negative", lambda: -v.abs() - 1, step_key),
    ]
    if v.is_floating_point():
        variants += [
            Variant("complex", lambda: v.to(torch.complex64), True),
            Variant("requiring grad", lambda: v.detach().clone().requires_grad_()),
        ]
    if step_key:
        variants += [
            Variant("a Python int", lambda: int(v.item())),
            Variant("a Python float", lambda: float(v.item())),
            Variant("a string of a number", lambda: str(int(v.item())), True),
            Variant("complex (2+1j)", lambda: torch.tensor(2 + 1j), True),
            Variant("-1", lambda: torch.tensor(-1.0), True),
            Variant("1e7", lambda: torch.tensor(1e7)),
            Variant("zero", lambda: torch.tensor(0.0)),
            Variant("an int64 tensor", lambda: torch.tensor(3)),
        ]
    return variants


def _number_variants(v: Any) -> list[Variant]:
    """Values a number (a hyperparameter, or a count in the state) may be replaced with."""
    variants = [
        Variant("negative", lambda: type(v)(-abs(v) - 1)),
        Variant("zero", lambda: type(v)(0)),
        Variant("doubled", lambda: v * 2),
        Variant("NaN", lambda: _NAN),
        Variant("infinite", lambda: _INF),
        Variant("a 0-dim tensor", lambda: torch.tensor(float(v))),
        Variant("a string", lambda: str(v), True),
        Variant("None", lambda: None, True),
        Variant("a 2-element tensor", lambda: torch.tensor([float(v), float(v)]), True),
        Variant("complex", lambda: complex(v, 1), True),
        Variant("a bool", lambda: True, True),
    ]
    if isinstance(v, int):
        variants.append(Variant("a float", lambda: v + 0.5))
    return variants


def _sequence_variants(v: Sequence[Any]) -> list[Variant]:
    """Values a tuple or list (``betas``, LBFGS's history) may be replaced with."""
    kind = type(v)
    variants = [Variant("None", lambda: None, True), Variant("a string", lambda: "x", True)]
    if v:
        variants += [
            Variant(
                "a list" if kind is tuple else "a tuple",
                lambda: (list if kind is tuple else tuple)(v),
            ),
            Variant("one short", lambda: kind(v[:-1]), True),
            Variant("one more", lambda: kind([*v, v[-1]]), True),
            Variant("a string first", lambda: kind(["x", *v[1:]]), True),
        ]
        first = v[0]
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            variants += [
                Variant("first negated", lambda: kind([-abs(first) - 1, *v[1:]])),
                Variant("first NaN", lambda: kind([_NAN, *v[1:]])),
                Variant("first a tensor", lambda: kind([torch.tensor(float(first)), *v[1:]])),
            ]
    return variants


def value_variants(value: Any, step_key: bool = False) -> list[Variant]:
    """Values that may replace ``value`` in a checkpoint, by the kind of value it is. A value
    equal to one of the kind held (``1`` for ``True``, ``tensor(True)``) is not of another
    kind."""
    v = value
    if isinstance(v, Tensor):
        return _tensor_variants(v, step_key)
    if isinstance(v, bool):
        return [
            Variant("flipped", lambda: not v),
            Variant("an int", lambda: int(v)),
            Variant("a tensor", lambda: torch.tensor(v)),
            Variant("None", lambda: None),
            Variant("0.5", lambda: 0.5, True),
            Variant("a string", lambda: "yes", True),
        ]
    if isinstance(v, (int, float)):
        return _number_variants(v)
    if v is None:
        return [
            Variant("True", lambda: True),
            Variant("False", lambda: False),
            Variant("1", lambda: 1),
            Variant("0.5", lambda: 0.5),
            Variant("a string", lambda: "x", True),
        ]
    if isinstance(v, str):
        return [
            Variant("unknown", lambda: "no such"),
            Variant("None", lambda: None),
            Variant("a number", lambda: 1, True),
        ]
    if isinstance(v, (tuple, list)):
        return _sequence_variants(v)
    return [Variant("None", lambda: None, True), Variant("a string", lambda: "x", True)]


def _walk(sd: dict[str, Any], path: tuple[Any, ...]) -> Any:
    """The value at ``path`` in ``sd``."""
    target: Any = sd
    for part in path:
        target = target[part]
    return target


def _setter(path: tuple[Any, ...], make: Callable[[], Any]) -> Mutation:
    """A mutation setting the value at ``path`` to ``make()``."""

    def mutate(sd: dict[str, Any]) -> None:
        _walk(sd, path[:-1])[path[-1]] = make()

    return mutate


def _remover(path: tuple[Any, ...]) -> Mutation:
    """A mutation removing the value at ``path``."""

    def mutate(sd: dict[str, Any]) -> None:
        del _walk(sd, path[:-1])[path[-1]]

    return mutate


def _map_ids(fn: Callable[[Any], Any], groups: bool = True, state: bool = True) -> Mutation:
    """A mutation mapping the ids through ``fn``, in the groups, in the state, or both."""

    def mutate(sd: dict[str, Any]) -> None:
        if groups:
            for group in sd["param_groups"]:
                group["params"] = [fn(pid) for pid in group["params"]]
        if state:
            sd["state"] = {fn(pid): value for pid, value in sd["state"].items()}

    return mutate


def _group_ids(g: int, edit: Callable[[list[Any]], Any]) -> Mutation:
    """A mutation replacing group ``g``'s ids with ``edit(ids)``."""

    def mutate(sd: dict[str, Any]) -> None:
        group = sd["param_groups"][g]
        group["params"] = edit(list(group["params"]))

    return mutate


def _groups_edit(edit: Callable[[list[Any]], Any]) -> Mutation:
    """A mutation replacing the list of groups with ``edit(groups)``."""

    def mutate(sd: dict[str, Any]) -> None:
        sd["param_groups"] = edit(sd["param_groups"])

    return mutate


def _state_mutations(sd: dict[str, Any]) -> list[CheckpointMutation]:
    """Changes of the state of the first and the last parameter that have state."""
    M = CheckpointMutation
    state = sd["state"]
    pids = list(state)
    found: list[CheckpointMutation] = []
    for pid in dict.fromkeys(pids[:1] + pids[-1:]):
        at = ("state", pid)
        for key, value in state[pid].items():
            where = f"state[{pid!r}][{key!r}]"
            # A missing key: polyak's load checks that each parameter's state is whole.
            found.append(M(f"{where} removed", _remover((*at, key)), True))
            for v in value_variants(value, step_key=key == "step"):
                found.append(M(f"{where} {v.label}", _setter((*at, key), v.make), v.refusable))
        found += [
            M(f"state[{pid!r}] removed", _remover(at)),
            M(f"state[{pid!r}] emptied", _setter(at, dict)),
            M(f"state[{pid!r}] a list", _setter(at, lambda: [1]), True),
            M(f"state[{pid!r}] a number", _setter(at, lambda: 3), True),
            M(
                f"state[{pid!r}] with an extra tensor",
                _setter((*at, "extra"), lambda: torch.zeros(3)),
            ),
            M(f"state[{pid!r}] with an extra number", _setter((*at, "extra"), lambda: 1.5)),
        ]
    if pids:
        first = state[pids[0]]
        found.append(
            M(
                "state under an id no group lists",
                _setter(("state", 999), lambda: copy.deepcopy(first)),
            )
        )
    return found


def _id_mutations(sd: dict[str, Any]) -> list[CheckpointMutation]:
    """Changes of the ids, the groups and the top level."""
    M = CheckpointMutation
    found = [
        M("ids shifted by 100", _map_ids(lambda pid: pid + 100)),
        M("ids made strings", _map_ids(str)),
        M("ids made floats", _map_ids(float)),
        M("group ids shifted, state's not", _map_ids(lambda pid: pid + 100, state=False)),
        M("state's ids shifted, groups' not", _map_ids(lambda pid: pid + 100, groups=False)),
        M("first two ids swapped", _group_ids(0, lambda ps: [*ps[:2][::-1], *ps[2:]])),
        # polyak's load refuses an id listed twice (documented: it checks the ids).
        M("an id repeated in a group", _group_ids(0, lambda ps: [ps[0], *ps[:-1]]), True),
        M("an id a list", _group_ids(0, lambda ps: [[ps[0]], *ps[1:]])),
        M("an id None", _group_ids(0, lambda ps: [None, *ps[1:]])),
        M("a group one id short", _group_ids(0, lambda ps: ps[:-1])),
        M("a group one id long", _group_ids(0, lambda ps: [*ps, 999])),
        M("a group's ids a tuple", _group_ids(0, tuple)),
        M("a group's ids a string", _setter(("param_groups", 0, "params"), lambda: "0")),
        M("a group without ids", _remover(("param_groups", 0, "params"))),
        M("an extra group", _groups_edit(lambda gs: [*gs, copy.deepcopy(gs[-1])])),
        M("the last group removed", _groups_edit(lambda gs: gs[:-1])),
        M("groups reversed", _groups_edit(lambda gs: gs[::-1])),
        M("param_groups a tuple", _groups_edit(tuple)),
        M("param_groups a dict", _groups_edit(lambda gs: dict(enumerate(gs)))),
        M("a group a number", _setter(("param_groups", 0), lambda: 3)),
        M("no state", _remover(("state",))),
        M("no param_groups", _remover(("param_groups",))),
        M("an extra top-level key", _setter(("extra",), lambda: 1)),
        M("state a list", _setter(("state",), lambda: [1])),
    ]
    if len(sd["param_groups"]) > 1:
        found.append(
            M(
                "an id repeated across groups",
                _groups_edit(
                    lambda gs: [
                        gs[0],
                        {**gs[1], "params": [gs[0]["params"][0], *gs[1]["params"][1:]]},
                        *gs[2:],
                    ]
                ),
                True,
            )
        )
    return found


def _group_mutations(sd: dict[str, Any]) -> list[CheckpointMutation]:
    """Changes of the first group's hyperparameters."""
    M = CheckpointMutation
    found = []
    for key, value in sd["param_groups"][0].items():
        if key in ("params", "param_names"):
            continue
        at = ("param_groups", 0, key)
        where = f"param_groups[0][{key!r}]"
        found.append(M(f"{where} removed", _remover(at), True))
        for v in value_variants(value):
            found.append(M(f"{where} {v.label}", _setter(at, v.make), v.refusable))
    found.append(M("an extra group key", _setter(("param_groups", 0, "extra_key"), lambda: 1)))
    return found


def checkpoint_mutations(sd: dict[str, Any]) -> list[CheckpointMutation]:
    """Every mutation of the checkpoint ``sd``: its state, ids, groups and top level."""
    return [*_state_mutations(sd), *_id_mutations(sd), *_group_mutations(sd)]


def constructor_refuses(entry: Entry, sd: dict[str, Any]) -> Exception | None:
    """The error torch's constructor raises for a checkpoint group's hyperparameters, if any
    group has values it refuses."""
    groups = sd.get("param_groups")
    if not isinstance(groups, (list, tuple)):
        return None
    names = set(inspect.signature(entry.reference).parameters) - {"params"}
    for group in groups:
        if not isinstance(group, dict):
            continue
        kwargs = copy.deepcopy({k: v for k, v in group.items() if k in names})
        error = attempt(lambda kwargs=kwargs: entry.reference(params_for(entry, SHAPES), **kwargs))
        if error is not None:
            return error
    return None


def checkpoint_trial(case: Case, mutation: CheckpointMutation) -> None:
    """Load the mutated checkpoint of a trained twin into both, and check the outcome."""
    pair = pair_of(case, trained(case))
    bad = copy.deepcopy(pair.ref.state_dict())
    mutation.mutate(bad)
    before = snapshot(pair.mine)
    expected = attempt(lambda: pair.ref.load_state_dict(copy.deepcopy(bad)))
    got = attempt(lambda: pair.mine.load_state_dict(copy.deepcopy(bad)))
    if got is not None:
        assert_unchanged(pair.mine, before, f"a refused load ({got!r})")
        if expected is not None:
            assert type(got) is type(expected), f"torch refused with {expected!r}, polyak {got!r}"
            return
        if mutation.refusable:
            return
        refused = constructor_refuses(case.entry, bad)
        if refused is not None:
            # Refused with the constructor's ValueError, where the constructor checks a value.
            if isinstance(refused, ValueError):
                assert (type(got), str(got)) == (ValueError, str(refused)), (
                    f"polyak refused with {got!r}, the constructor with {refused!r}"
                )
            return
        assert fails_or_diverges(pair), (
            f"polyak refused with {got!r} a checkpoint torch loads and steps with finite numbers"
        )
        return
    assert expected is None, f"torch refused with {expected!r}, polyak loaded the checkpoint"
    assert_like_torch(pair)
    step_alike(pair)


#: Trials that find defects still open (issue 19), by test and case: each is expected to fail,
#: strictly, so that a fix shows here and its entry goes.
KNOWN_DEFECTS: dict[str, tuple[str, frozenset[str]]] = {
    "test_fuzzed_checkpoints_load_as_torchs_or_are_refused_unchanged": (
        "a malformed checkpoint refused with another error type than torch's (TypeError where "
        "torch raises ValueError or AttributeError), or a value torch loads refused (an int or "
        "a tensor for a flag)",
        frozenset(
            {
                "SGD-fused-stateful",
                "Adam-fused-stateful",
                "Adadelta-foreach-stateful",
                "NAdam-foreach-stateful",
                "RAdam-foreach-stateful",
                "Rprop-loop-stateful",
                "LBFGS-default-stateful",
            }
        ),
    ),
    "test_failing_steps_raise_torchs_error_and_change_nothing": (
        "hand-edited state or gradients that torch's foreach or fused step refuses and "
        "polyak's steps (a state tensor or gradient of another dtype), or that both refuse "
        "with other error types (None, a list or a string for a state tensor); LBFGS's "
        "counters and SparseAdam's state, which no rehearsal covers, change before the error",
        frozenset(
            {
                "SGD-default-stateful",
                "SGD-fused-stateful",
                "Adam-loop-stateful",
                "AdamW-fused-stateful",
                "RMSprop-foreach-stateful",
                "Adagrad-default-stateful",
                "Adagrad-fused-stateful",
                "NAdam-default-stateful",
                "NAdam-foreach-stateful",
                "RAdam-default-stateful",
                "Rprop-loop-stateful",
                "Rprop-foreach-stateful",
                "SparseAdam-default-stateful",
                "Adafactor-default-stateful",
                "Adafactor-foreach-stateful",
                "LBFGS-default-stateful",
            }
        ),
    ),
    "test_edge_inputs_step_as_torchs": (
        "overlapping views of one storage under fused=True: torch's fused kernel reads memory "
        "it has already written",
        frozenset(
            {
                "AdamW-fused-stateful",
            }
        ),
    ),
}


@pytest.fixture(autouse=True)
def _known_defects(request: pytest.FixtureRequest) -> None:
    """Marks the cases of :data:`KNOWN_DEFECTS` as expected to fail, with the reason."""
    found = KNOWN_DEFECTS.get(request.node.originalname)
    callspec = getattr(request.node, "callspec", None)
    if found is not None and callspec is not None and callspec.id in found[1]:
        request.node.add_marker(pytest.mark.xfail(reason=found[0], strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_fuzzed_checkpoints_load_as_torchs_or_are_refused_unchanged(case: Case) -> None:
    """Mutated checkpoints of a trained torch twin: see :func:`checkpoint_trial`."""
    probe = trained(case)[1][0]
    mutations = checkpoint_mutations(copy.deepcopy(probe.state_dict()))
    chosen = sample(mutations, CHECKPOINT_SAMPLE, f"checkpoint:{case.name}")
    run_trials([(m.name, lambda m=m: checkpoint_trial(case, m)) for m in chosen])


# ------------------------------------------------------------------------ failing steps

Undo = Callable[[], None]
Edit = Callable[[Any, list[Tensor]], Undo]


class ClosureError(Exception):
    """Raised by the trials' closures."""


@dataclass(frozen=True)
class StepEdit:
    """An edit made alike on both optimizers before a step, and how that step is taken."""

    name: str
    apply: Edit
    take_step: Callable[[Any], Any] = step


_REMOVE = object()


def _state_edit(i: int, key: Any, make: Any) -> Edit:
    """Set parameter ``i``'s state entry ``key`` to ``make(old)``, or remove it."""

    def apply(opt: Any, params: list[Tensor]) -> Undo:
        entry = opt.state[params[i]]
        saved = dict(entry)
        if make is _REMOVE:
            del entry[key]
        else:
            entry[key] = make(entry[key])

        def undo() -> None:
            entry.clear()
            entry.update(saved)

        return undo

    return apply


def _group_edit(key: str, make: Any) -> Edit:
    """Set the first group's ``key`` to ``make(old)``, or remove it."""

    def apply(opt: Any, params: list[Tensor]) -> Undo:
        group = opt.param_groups[0]
        saved = dict(group)
        if make is _REMOVE:
            del group[key]
        else:
            group[key] = make(group[key])

        def undo() -> None:
            group.clear()
            group.update(saved)

        return undo

    return apply


def _grad_edit(i: int, make: Callable[[Tensor], Tensor], through_data: bool) -> Edit:
    """Give parameter ``i`` the gradient ``make(grad)``: through ``.grad.data`` (which
    autograd does not check), or assigned."""

    def apply(opt: Any, params: list[Tensor]) -> Undo:
        p = params[i]
        old = p.grad
        assert old is not None
        if through_data:
            p.grad = old.detach().clone()
            p.grad.data = make(old)
        else:
            p.grad = make(old)

        def undo() -> None:
            p.grad = old

        return undo

    return apply


def _nothing(opt: Any, params: list[Tensor]) -> Undo:
    """No edit (the trial is in how the step is taken)."""
    return lambda: None


def _raising_closure(at_call: int) -> Callable[[Any], Any]:
    """A step whose closure raises at its ``at_call``-th call (before, it re-evaluates the
    loss as :func:`conftest.quadratic_closure` does)."""

    def take_step(opt: Any) -> Any:
        inner = quadratic_closure(opt) if needs_closure(opt) else (lambda: torch.zeros(()))
        calls = [0]

        def closure() -> Any:
            calls[0] += 1
            if calls[0] == at_call:
                raise ClosureError(f"call {at_call}")
            return inner()

        return opt.step(closure)

    return take_step


def _grad_variants(g: Tensor, sparse: bool) -> list[tuple[str, Callable[[Tensor], Tensor], bool]]:
    """Wrong gradients for a parameter whose gradient is ``g``: (name, make, through .data)."""
    shape = tuple(g.shape)

    def like(t: Tensor) -> Tensor:
        return as_grad(t, sparse)

    def dense(old: Tensor) -> Tensor:
        return old.to_dense() if old.is_sparse else old

    variants: list[tuple[str, Callable[[Tensor], Tensor], bool]] = [
        ("of another shape", lambda old: like(torch.ones(g.numel() + 1, dtype=g.dtype)), True),
        ("of one element", lambda old: like(torch.ones([1] * g.dim(), dtype=g.dtype)), True),
        ("float64", lambda old: old.double(), True),
        ("float16", lambda old: old.half(), True),
        ("int64", lambda old: like(dense(old).long()), True),
        ("bool", lambda old: like(dense(old).bool()), True),
        (
            "sparse" if not sparse else "dense",
            lambda old: old.to_dense() if sparse else old.to_sparse(),
            False,
        ),
    ]
    if len(shape) > 1:
        variants.append(("flattened", lambda old: like(dense(old).reshape(-1)), True))
    if not g.is_complex():
        variants.append(("complex", lambda old: like(dense(old).to(torch.complex64)), True))
    if len(shape) == 2 and not sparse:
        variants.append(("non-contiguous", lambda old: old.t().contiguous().t(), False))
    return variants


def _state_value_variants(v: Any) -> list[tuple[str, Any]]:
    """Values a hand edit may give a state entry (a function of the old value)."""
    variants: list[tuple[str, Any]] = [
        ("removed", _REMOVE),
        ("None", lambda old: None),
        ("a string", lambda old: "3"),
    ]
    if isinstance(v, Tensor):
        variants += [
            ("of shape (7,)", lambda old: torch.zeros(7, dtype=old.dtype)),
            ("with a leading unit dim", lambda old: old.unsqueeze(0).clone()),
            ("float64", lambda old: old.double()),
            ("float16", lambda old: old.half()),
            ("int64", lambda old: old.long()),
            ("on the meta device", lambda old: old.to("meta")),
            ("a list", lambda old: old.tolist()),
            ("scaled", lambda old: old * 0.5),
        ]
        if v.is_floating_point():
            variants.append(("complex", lambda old: old.to(torch.complex64)))
        if v.dim() == 0:
            variants.append(("a Python float", lambda old: float(old.item())))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        variants += [("negative", lambda old: -abs(old) - 1), ("NaN", lambda old: _NAN)]
    return variants


def step_edits(pair: Pair) -> list[StepEdit]:
    """Every edit of a failing-step trial, for the optimizers of ``pair``."""
    entry = pair.case.entry
    edits: list[StepEdit] = []
    last = len(pair.params) - 1
    for i in dict.fromkeys([0, last]):
        g = pair.params[i].grad
        assert g is not None
        for label, make, through_data in _grad_variants(g, pair.sparse):
            edits.append(StepEdit(f"grad[{i}] {label}", _grad_edit(i, make, through_data)))
        # The state torch keeps: its keys, and the kind of value it holds under each.
        entry_state = pair.ref.state.get(pair.ref_params[i], {})
        for key, value in entry_state.items():
            for label, make in _state_value_variants(value):
                edits.append(StepEdit(f"state[{i}][{key!r}] {label}", _state_edit(i, key, make)))
    for key, value in pair.ref.param_groups[0].items():
        if key in ("params", "param_names"):
            continue
        edits.append(StepEdit(f"param_groups[0][{key!r}] removed", _group_edit(key, _REMOVE)))
        if isinstance(value, bool) or value is None:
            changes = [("flipped", lambda old: not old), ("a string", lambda old: "yes")]
        elif isinstance(value, (int, float, Tensor)):
            changes = [
                ("a string", lambda old: "0.1"),
                ("None", lambda old: None),
                ("a 2-element tensor", lambda old: torch.tensor([0.1, 0.2])),
                ("negative", lambda old: -abs(float(old)) - 1),
            ]
        else:
            changes = [("None", lambda old: None), ("a string", lambda old: "x")]
        for label, make in changes:
            edits.append(StepEdit(f"param_groups[0][{key!r}] {label}", _group_edit(key, make)))
    calls = [1, 2, 3] if entry.step_closure else [1]
    for k in calls:
        edits.append(StepEdit(f"a closure raising at call {k}", _nothing, _raising_closure(k)))
    return edits


def failing_step_trial(case: Case, pick: Callable[[Pair], StepEdit]) -> None:
    """Make the edit on polyak's optimizer and on a third, torch's, twin of both, and step."""
    built = trained(case, copies=3)
    pair = pair_of(case, built)
    probe, probe_params = built[2]
    gen = torch.Generator().manual_seed(2)
    give_grads([pair.params, pair.ref_params, probe_params], gen, pair.sparse)
    edit = pick(pair)
    edit.apply(probe, probe_params)
    undo = edit.apply(pair.mine, pair.params)
    stepped = same_step(pair.mine, probe, edit.take_step, pair.sized)
    if stepped is None:
        return
    if stepped:
        assert_like(pair.mine, pair.params, probe, probe_params, pair.atol)
        return
    # Undone, polyak's optimizer steps as torch's twin that was never edited.
    undo()
    assert same_step(pair.mine, pair.ref), "the step failed again once the edit was undone"
    assert_like_torch(pair)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_failing_steps_raise_torchs_error_and_change_nothing(case: Case) -> None:
    """Edits before a step: see :func:`failing_step_trial`."""
    built = trained(case)
    pair = pair_of(case, built)
    give_grads([pair.params, pair.ref_params], torch.Generator().manual_seed(2), pair.sparse)
    names = [edit.name for edit in step_edits(pair)]
    chosen = sample(names, FAILING_SAMPLE, f"failing:{case.name}")

    def by_name(name: str) -> Callable[[Pair], StepEdit]:
        return lambda p: next(e for e in step_edits(p) if e.name == name)

    run_trials(
        [(name, lambda name=name: failing_step_trial(case, by_name(name))) for name in chosen]
    )


# -------------------------------------------------------------------------- edge inputs


def _poke_non_finite(params: list[Tensor], values: Sequence[float]) -> None:
    """Write ``values`` (infinities, NaNs) at the first elements of each gradient."""
    for p in params:
        g = p.grad
        assert g is not None
        stored = g._values() if g.is_sparse else g
        flat = stored.view(-1) if stored.is_contiguous() else stored.reshape(-1)
        n = min(len(values), flat.numel())
        flat[:n] = torch.tensor(values[:n], dtype=torch.float64).to(flat.dtype)


def _non_finite_trial(case: Case, values: Sequence[float], only_last: bool) -> None:
    """A step whose gradients hold ``values`` (infinities, NaNs) at their first elements (of
    the last parameter only, where ``only_last``), then ordinary steps."""
    built = build(case)
    if built is None:
        return
    pair = pair_of(case, built)
    train(built, pair.sparse)
    gen = torch.Generator().manual_seed(3)
    give_grads([pair.params, pair.ref_params], gen, pair.sparse)
    for params in (pair.params, pair.ref_params):
        _poke_non_finite(params[-1:] if only_last else params, values)
    if same_step(pair.mine, pair.ref):
        assert_like_torch(pair)
        step_alike(pair)


def _shaped_trial(case: Case, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> None:
    """Steps of parameters of ``shapes`` and ``dtype``, or the same error as torch's."""
    built = build(case, dtype=dtype, shapes=shapes)
    if built is None:
        return
    step_alike(pair_of(case, built, dtype), steps=3)


def _shared_storage_trial(case: Case, overlapping: bool) -> None:
    """Parameters that are views of one storage: overlapping slices, or one storage seen in
    two shapes."""
    matrices = case.entry.matrices_only

    def make() -> list[Tensor]:
        gen = torch.Generator().manual_seed(5)
        if matrices:
            base = torch.randn(6, 4, generator=gen)
            views = [base[:4], base[2:]] if overlapping else [base, base.view(4, 6)]
        else:
            base = torch.randn(12, generator=gen)
            views = [base[:8], base[4:]] if overlapping else [base, base.view(3, 4)]
        other = torch.randn((3, 2) if matrices else (5,), generator=gen)
        return [torch.nn.Parameter(v) for v in [*views, other]]

    built = build(case, make=make)
    if built is None:
        return
    step_alike(pair_of(case, built), steps=3)


def _two_groups_trial(case: Case) -> None:
    """A parameter in two groups is refused as torch refuses it: at construction, and by
    ``add_param_group`` after some steps, which changes nothing."""
    entry = case.entry
    shared = params_for(entry, [(3, 4)])[0]
    expected = attempt(
        lambda: entry.reference([{"params": [shared]}, {"params": [shared]}], **case.kwargs())
    )
    got = attempt(lambda: entry.cls([{"params": [shared]}, {"params": [shared]}], **case.kwargs()))
    assert type(got) is type(expected), (got, expected)
    built = build(case)
    if built is None:
        return
    pair = pair_of(case, built)
    train(built, pair.sparse)
    before = snapshot(pair.mine)
    expected = attempt(lambda: pair.ref.add_param_group({"params": [pair.ref_params[0]]}))
    got = attempt(lambda: pair.mine.add_param_group({"params": [pair.params[0]]}))
    assert expected is not None and type(got) is type(expected), (got, expected)
    assert_unchanged(pair.mine, before, f"a refused add_param_group ({got!r})")
    step_alike(pair)


def _non_contiguous_grads_trial(case: Case) -> None:
    """Steps whose 2-D gradients are transposed in memory (the same values)."""
    built = build(case)
    if built is None:
        return
    pair = pair_of(case, built)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        give_grads([pair.params, pair.ref_params], gen, pair.sparse)
        for p in (*pair.params, *pair.ref_params):
            assert p.grad is not None
            if p.grad.dim() == 2 and not p.grad.is_sparse:
                p.grad = p.grad.t().contiguous().t()
        if not same_step(pair.mine, pair.ref):
            return
        assert_like_torch(pair)


def edge_trials(case: Case) -> list[Trial]:
    """Every edge-input trial of the case."""
    inf, nan = _INF, _NAN
    trials: list[Trial] = [
        ("infinite and NaN gradients", lambda: _non_finite_trial(case, [inf, -inf, nan], False)),
        ("a NaN gradient in the last parameter", lambda: _non_finite_trial(case, [nan], True)),
        ("an infinite gradient", lambda: _non_finite_trial(case, [inf], True)),
        (
            "parameters without elements",
            lambda: _shaped_trial(case, [(0,), (3, 0), (4,)], torch.float32),
        ),
        ("0-dim parameters", lambda: _shaped_trial(case, [(), (3,), ()], torch.float32)),
        ("a parameter in two groups", lambda: _two_groups_trial(case)),
        ("overlapping views of one storage", lambda: _shared_storage_trial(case, True)),
        ("one storage in two shapes", lambda: _shared_storage_trial(case, False)),
        ("non-contiguous gradients", lambda: _non_contiguous_grads_trial(case)),
    ]
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.complex128):
        trials.append(
            (
                str(dtype).removeprefix("torch."),
                lambda dtype=dtype: _shaped_trial(case, SHAPES, dtype),
            )
        )
    return trials


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_edge_inputs_step_as_torchs(case: Case) -> None:
    """Edge inputs: see :func:`edge_trials`."""
    run_trials(sample(edge_trials(case), EDGE_SAMPLE, f"edge:{case.name}"))


# ------------------------------------------------------------------------------ threads


def _thread_groups() -> list[list[Case]]:
    """Every default-configured case, shuffled by the seed into groups of four, each with its
    first case twice (two optimizers of one class and strategy)."""
    cases = [case for case in _cases(False)]
    random.Random(SEED).shuffle(cases)
    groups = [cases[i : i + 4] for i in range(0, len(cases), 4)]
    return [[*group, group[0]] for group in groups]


THREAD_GROUPS = _thread_groups()


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param(group, id="+".join(case.name for case in group))
        for group in sample(THREAD_GROUPS, THREAD_SAMPLE, "threads")
    ],
)
def test_threads_stepping_different_optimizers_at_once(cases: list[Case]) -> None:
    """Each thread steps its own optimizer, all at once; each ends as torch's twin stepped
    alone with the same gradients."""
    steps = 12
    pairs, grads = [], []
    for k, case in enumerate(cases):
        built = build(case)
        assert built is not None
        pair = pair_of(case, built)
        gen = torch.Generator().manual_seed(100 + k)
        gs = []
        for _ in range(steps):
            give_grads([pair.params, pair.ref_params], gen, pair.sparse)
            gs.append([p.grad for p in pair.params])
        pairs.append(pair)
        grads.append(gs)
    start = threading.Barrier(len(pairs))
    errors: list[BaseException] = []

    def run(pair: Pair, gs: list[list[Tensor]]) -> None:
        try:
            start.wait()
            for step_grads in gs:
                for p, g in zip(pair.params, step_grads, strict=True):
                    p.grad = g.clone()
                step(pair.mine)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=pg) for pg in zip(pairs, grads, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    assert not errors, errors
    for pair, gs in zip(pairs, grads, strict=True):
        for step_grads in gs:
            for q, g in zip(pair.ref_params, step_grads, strict=True):
                q.grad = g.clone().to(q.dtype)
            step(pair.ref)
        assert_like_torch(pair)
