"""The record of one optimizer under test: what the generic tests run and compare against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import polyak


@dataclass(frozen=True)
class ErrorCase:
    """Constructor arguments that must raise ``error`` with a message matching ``match``."""

    kwargs: dict[str, Any]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class CrossCheck:
    """A second reference for a peer (see :attr:`Entry.reference`): each pair of constructor
    arguments, polyak's and its, must give parameters within ``atol`` over ``steps`` steps."""

    reference: str
    configs: list[tuple[dict[str, Any], dict[str, Any]]]
    atol: float = 0.0
    steps: int = 6


@dataclass(frozen=True)
class Entry:
    """An optimizer under test and its torch.optim twin, or, for an optimizer torch.optim
    lacks, the class of another package that it matches (a peer)."""

    cls: type[polyak.Optimizer]
    #: torch.optim's class; or, for a peer, ``"module:Class"``, imported by the tests that
    #: run it, which skip where it cannot be. Peers are left out of ``REGISTRY`` and its
    #: torch-only tests (torch's messages, flags and paths), and run ``test_peers.py``.
    reference: type[torch.optim.Optimizer] | str
    configs: list[dict[str, Any]]
    errors: list[ErrorCase]
    #: Absolute tolerance per dtype against torch's fused kernels, which may round differently.
    fused_tolerances: dict[torch.dtype, float] = field(default_factory=dict)
    #: A configuration whose steps create per-parameter state.
    stateful: dict[str, Any] = field(default_factory=lambda: {"lr": 0.01})
    #: A configuration for differentiating through steps (autograd w.r.t. ``lr``).
    differentiable: dict[str, Any] = field(default_factory=dict)
    #: torch differentiates the step with respect to a tensor ``lr`` (RMSprop, among others,
    #: takes ``lr`` only where it takes a number, and refuses one that requires grad).
    differentiable_lr: bool = True
    #: Steps before differentiating: torch's own step fails to differentiate through a second
    #: step for some optimizers (Adamax, NAdam and Rprop change in place state that autograd
    #: keeps).
    differentiable_steps: int = 2
    #: Absolute tolerance for complex parameters on torch's foreach path.
    complex_foreach_tolerance: float = 0.0
    elementwise: bool = True
    #: A parameter listed twice in a group is updated twice in turn, as torch does. Not yet
    #: for state kept as Python numbers (SparseAdam's step): the loop strategy hands the
    #: second occurrence the count from before the first update.
    duplicates_in_turn: bool = True
    #: Steps take sparse gradients only (SparseAdam): every generic test gives it sparse ones.
    sparse_grads: bool = False
    #: Configurations run with sparse gradients (an empty list: dense gradients only).
    sparse_configs: list[dict[str, Any]] = field(default_factory=list)
    supports_complex: bool = True
    #: torch's class takes ``fused``.
    fused: bool = True
    #: torch's per-tensor and foreach paths compute the same numbers (they differ in the last
    #: bit where they order operations differently, as NAdam's do).
    paths_agree: bool = True
    #: The constructor creates the state of its parameters, as torch's Adagrad does.
    eager_state: bool = False
    #: The default CPU step runs on the flat kernel for every configuration listed.
    flat: bool = True
    #: ``lr=0`` leaves the parameters unchanged (it does not where a step size is clamped
    #: from below, as in Rprop; SparseAdam refuses ``lr=0``).
    lr_zero_is_identity: bool = True
    #: A zero gradient with ``weight_decay=0`` leaves the parameters unchanged (it does not
    #: where the rule decays by other means, as ASGD does).
    zero_grad_is_identity: bool = True
    #: ``step`` needs a closure that re-evaluates the loss (LBFGS): the generic tests give it
    #: one whose gradient at the step's start is the gradient they set.
    step_closure: bool = False
    #: Steps in float16 compare with torch's (LBFGS's line search takes steps beyond float16's
    #: range on the tests' objective, and fails, in torch as here).
    float16: bool = True
    #: Parameters without elements are stepped (Adafactor's RMS divides by their count of
    #: zero and fails, in torch as here).
    empty_params: bool = True
    #: One parameter group only (LBFGS).
    one_group: bool = False
    #: 2-D parameters only (Muon): the generic tests make their shapes two-dimensional.
    matrices_only: bool = False
    #: Constructor arguments torch takes whose first step raises, as torch's does, before
    #: anything changes.
    step_errors: list[ErrorCase] = field(default_factory=list)
    #: A peer's other references, compared on the parameters.
    cross_checks: list[CrossCheck] = field(default_factory=list)
    #: The dtypes a peer's reference is compared in (float64 where the reference runs it).
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    #: Absolute tolerance of a peer against its reference, where its float32 operations
    #: cannot be followed bit for bit (the registry file says why).
    atol: float = 0.0
    #: A peer's constructor arguments that its reference is not given (the strategy flags).
    polyak_only: tuple[str, ...] = ("foreach",)
    #: A peer's state_dicts interchange with its reference's, in both directions.
    interchange: bool = True
    #: Arguments a peer's reference takes and polyak refuses (features it does not implement).
    refusals: list[ErrorCase] = field(default_factory=list)
    #: Prepares a peer's reference before each test (given pytest's ``monkeypatch``): where the
    #: reference's results depend on a backend, the one whose rounding polyak follows; where
    #: both step in a mode only (Schedule-Free's train mode), that mode.
    setup: Callable[[Any], None] | None = None

    @property
    def peer(self) -> bool:
        """The reference is another package's class, not torch.optim's."""
        return isinstance(self.reference, str)
