"""One entry per optimizer: what the generic tests run, and what they compare against."""

from __future__ import annotations

import inspect
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
class Entry:
    """An optimizer under test and its torch.optim twin."""

    cls: type[polyak.Optimizer]
    reference: type[torch.optim.Optimizer]
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


#: Errors every optimizer that takes ``fused`` raises as torch does.
_FUSED_ERRORS = [
    ErrorCase(
        {"fused": True, "differentiable": True},
        RuntimeError,
        r"^`fused` does not support `differentiable`$",
    ),
    ErrorCase(
        {"fused": True, "foreach": True},
        RuntimeError,
        r"^`fused` and `foreach` cannot be `True` together\.$",
    ),
]
#: Errors every optimizer here raises as torch does.
_LR_TYPE_ERROR = ErrorCase({"lr": "0.1"}, TypeError, r"not supported between instances")
_COMMON_ERRORS = [*_FUSED_ERRORS, _LR_TYPE_ERROR]


def _sgd_configs() -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [
        {"lr": 0.1},
        {"lr": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "maximize": True},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True, "weight_decay": 0.1},
        {"lr": torch.tensor(0.05), "momentum": 0.9},
        {"lr": torch.tensor([0.05]), "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": torch.tensor(0.01)},
    ]
    return configs


def _adam_configs(decoupled: bool) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [
        {"lr": 0.01},
        {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "amsgrad": True},
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
        {"lr": 0.01, "maximize": True},
        {"lr": torch.tensor(0.01), "weight_decay": 0.05},
        {"lr": 0.01, "betas": (torch.tensor(0.8), torch.tensor(0.99)), "weight_decay": 0.05},
        {"lr": 0.02, "eps": 0.0, "weight_decay": 0.0},
    ]
    if not decoupled:
        configs.append({"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True})
    return configs


def _adam_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase(
            {"lr": torch.tensor(0.1), "foreach": True},
            ValueError,
            r"^lr as a Tensor is not supported for capturable=False and foreach=True$",
        ),
        ErrorCase({"eps": -1e-8}, ValueError, r"^Invalid epsilon value: -1e-08$"),
        ErrorCase(
            {"betas": (1.0, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$"
        ),
        ErrorCase(
            {"betas": (0.9, -0.1)}, ValueError, r"^Invalid beta parameter at index 1: -0\.1$"
        ),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
        ErrorCase(
            {"betas": (0.9, torch.tensor(0.99))},
            ValueError,
            r"^betas must be either both floats or both Tensors$",
        ),
        ErrorCase(
            {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
            ValueError,
            r"^betas\[0\] as a Tensor is not supported for capturable=False and foreach=True$",
        ),
        ErrorCase(
            {"betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.99))},
            RuntimeError,
            r"^Boolean value of Tensor with more than one value is ambiguous$",
        ),
        *_COMMON_ERRORS,
    ]


_ADAM_FUSED_TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def _rmsprop_configs() -> list[dict[str, Any]]:
    return [
        {},
        {"lr": 1e-3, "weight_decay": 0.1},
        {"maximize": True, "weight_decay": 0.1},
        {"weight_decay": 0.1, "centered": True},
        {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True},
        {"momentum": 0.5, "alpha": 0.9, "eps": 1e-6},
        {"lr": torch.tensor(0.01), "momentum": 0.5},
        {"lr": torch.tensor([0.01]), "centered": True},
    ]


def _adagrad_configs() -> list[dict[str, Any]]:
    return [
        {},
        {"weight_decay": 0.1, "maximize": True},
        {"initial_accumulator_value": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1},
        {"lr": 0.05, "eps": 1e-6, "lr_decay": 0.1, "maximize": True},
        {"lr": torch.tensor(0.01), "lr_decay": 0.1},
        {"lr": torch.tensor([0.001]), "weight_decay": 0.1},
    ]


def _betas_errors() -> list[ErrorCase]:
    return [
        ErrorCase(
            {"betas": (1.0, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$"
        ),
        ErrorCase(
            {"betas": (0.9, -0.1)}, ValueError, r"^Invalid beta parameter at index 1: -0\.1$"
        ),
    ]


def _lr_eps_decay_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value: -1\.0$"),
        ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
        _LR_TYPE_ERROR,
    ]


REGISTRY: list[Entry] = [
    Entry(
        cls=polyak.SGD,
        reference=torch.optim.SGD,
        configs=_sgd_configs(),
        errors=[
            ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            ErrorCase({"momentum": -0.5}, ValueError, r"^Invalid momentum value: -0\.5$"),
            ErrorCase({"weight_decay": -1}, ValueError, r"^Invalid weight_decay value: -1$"),
            ErrorCase(
                {"nesterov": True},
                ValueError,
                r"^Nesterov momentum requires a momentum and zero dampening$",
            ),
            ErrorCase(
                {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
                ValueError,
                r"^Nesterov momentum requires a momentum and zero dampening$",
            ),
            *_COMMON_ERRORS,
        ],
        fused_tolerances={
            torch.float64: 1e-12,
            torch.float32: 1e-5,
            torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2,
        },
        stateful={"lr": 0.05, "momentum": 0.9},
        differentiable={"momentum": 0.9, "nesterov": True},
        sparse_configs=[{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}],
    ),
    *[
        Entry(
            cls=cls,
            reference=ref,
            configs=_adam_configs(decoupled),
            errors=_adam_errors(),
            fused_tolerances=_ADAM_FUSED_TOLERANCES,
            stateful=stateful,
            differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
            complex_foreach_tolerance=1e-6,
        )
        for cls, ref, decoupled, stateful in (
            (polyak.Adam, torch.optim.Adam, False, {"lr": 0.01, "amsgrad": True}),
            (polyak.AdamW, torch.optim.AdamW, True, {"lr": 0.01, "weight_decay": 0.05}),
        )
    ],
    Entry(
        cls=polyak.RMSprop,
        reference=torch.optim.RMSprop,
        configs=_rmsprop_configs(),
        errors=[
            ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value: -1\.0$"),
            ErrorCase({"momentum": -1.0}, ValueError, r"^Invalid momentum value: -1\.0$"),
            ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
            ErrorCase({"alpha": -0.5}, ValueError, r"^Invalid alpha value: -0\.5$"),
            _LR_TYPE_ERROR,
        ],
        stateful={"lr": 0.01, "momentum": 0.9, "centered": True},
        differentiable={"momentum": 0.9, "weight_decay": 0.1},
        differentiable_lr=False,
        fused=False,
        flat=True,
    ),
    Entry(
        cls=polyak.Adagrad,
        reference=torch.optim.Adagrad,
        configs=_adagrad_configs(),
        errors=[
            ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            ErrorCase({"lr_decay": -0.5}, ValueError, r"^Invalid lr_decay value: -0\.5$"),
            ErrorCase({"weight_decay": -1.0}, ValueError, r"^Invalid weight_decay value: -1\.0$"),
            ErrorCase(
                {"initial_accumulator_value": -1.0},
                ValueError,
                r"^Invalid initial_accumulator_value value: -1\.0$",
            ),
            ErrorCase({"eps": -1.0}, ValueError, r"^Invalid epsilon value: -1\.0$"),
            *_COMMON_ERRORS,
        ],
        fused_tolerances=_ADAM_FUSED_TOLERANCES,
        stateful={"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.1},
        differentiable={"lr_decay": 0.1, "weight_decay": 0.1},
        differentiable_lr=False,
        sparse_configs=[{"lr": 0.1}, {"lr": 0.1, "lr_decay": 0.1, "maximize": True}],
        eager_state=True,
    ),
    Entry(
        cls=polyak.Adamax,
        reference=torch.optim.Adamax,
        configs=[
            {},
            {"maximize": True},
            {"weight_decay": 0.1, "maximize": True},
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
            {"lr": torch.tensor(0.01), "weight_decay": 0.1},
            {"lr": torch.tensor([0.005]), "maximize": True},
        ],
        errors=[*_lr_eps_decay_errors(), *_betas_errors()],
        stateful={"lr": 0.01, "weight_decay": 0.1},
        differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
        differentiable_lr=False,
        differentiable_steps=1,
        fused=False,
        flat=True,
    ),
    Entry(
        cls=polyak.Adadelta,
        reference=torch.optim.Adadelta,
        configs=[
            {},
            {"lr": 0.01, "weight_decay": 0.1},
            {"weight_decay": 0.1, "maximize": True},
            {"rho": 0.95, "weight_decay": 0.9},
            {"rho": 0.5, "eps": 1e-4, "maximize": True},
            {"lr": torch.tensor(0.5), "weight_decay": 0.1},
            {"lr": torch.tensor([0.5]), "maximize": True},
        ],
        errors=[
            *_lr_eps_decay_errors(),
            ErrorCase({"rho": 1.1}, ValueError, r"^Invalid rho value: 1\.1$"),
            ErrorCase({"rho": -0.1}, ValueError, r"^Invalid rho value: -0\.1$"),
        ],
        stateful={"lr": 0.5, "weight_decay": 0.1},
        differentiable={"rho": 0.8, "weight_decay": 0.1},
        differentiable_lr=False,
        fused=False,
        flat=True,
    ),
    Entry(
        cls=polyak.NAdam,
        reference=torch.optim.NAdam,
        configs=[
            {},
            {"momentum_decay": 6e-3},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "momentum_decay": 6e-3, "maximize": True},
            {"weight_decay": 0.1, "momentum_decay": 6e-3, "decoupled_weight_decay": True},
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True},
            {"lr": torch.tensor(0.01), "weight_decay": 0.1},
            {"lr": torch.tensor([0.01]), "weight_decay": 0.1, "decoupled_weight_decay": True},
        ],
        errors=[
            *_lr_eps_decay_errors(),
            *_betas_errors(),
            ErrorCase(
                {"momentum_decay": -0.2}, ValueError, r"^Invalid momentum_decay value: -0\.2$"
            ),
        ],
        stateful={"lr": 0.01, "weight_decay": 0.1},
        differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
        differentiable_steps=1,
        paths_agree=False,
        fused=False,
        flat=True,
    ),
    Entry(
        cls=polyak.RAdam,
        reference=torch.optim.RAdam,
        configs=[
            {},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            {"weight_decay": 0.1, "maximize": True},
            # rho_t passes 5 at the sixth step: the reference runs both branches.
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True},
            {"lr": torch.tensor(0.01), "weight_decay": 0.1},
            {"lr": torch.tensor([0.01]), "weight_decay": 0.1, "decoupled_weight_decay": True},
        ],
        errors=[*_lr_eps_decay_errors(), *_betas_errors()],
        stateful={"lr": 0.01, "weight_decay": 0.1},
        differentiable={"betas": (0.8, 0.9), "weight_decay": 0.1},
        paths_agree=False,
        fused=False,
        flat=True,
    ),
    Entry(
        cls=polyak.ASGD,
        reference=torch.optim.ASGD,
        configs=[
            {},
            {"lambd": 0.1, "lr": 0.02},
            {"t0": 2, "weight_decay": 0.1},
            {"t0": 3, "alpha": 0.5, "maximize": True, "weight_decay": 0.1},
            {"lr": torch.tensor(0.01), "t0": 2, "lambd": 0.01},
            {"lr": torch.tensor([0.02]), "maximize": True},
        ],
        errors=[
            ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            ErrorCase({"weight_decay": -0.5}, ValueError, r"^Invalid weight_decay value: -0\.5$"),
            _LR_TYPE_ERROR,
        ],
        stateful={"lr": 0.02, "t0": 2, "lambd": 0.01},
        differentiable={"t0": 1, "weight_decay": 0.1},
        differentiable_lr=False,
        paths_agree=False,
        zero_grad_is_identity=False,
        fused=False,
        flat=True,
    ),
    Entry(
        cls=polyak.Rprop,
        reference=torch.optim.Rprop,
        configs=[
            {},
            {"lr": 2e-4},
            {"etas": (0.5, 1.5)},
            {"step_sizes": (2e-6, 100)},
            {"maximize": True},
            {"lr": 0.05, "etas": (0.3, 1.1), "step_sizes": (1e-3, 0.06), "maximize": True},
            {"lr": torch.tensor(0.01), "etas": (0.4, 1.3)},
            {"lr": torch.tensor([0.02])},
        ],
        errors=[
            ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            ErrorCase({"etas": (1.0, 0.5)}, ValueError, r"^Invalid eta values: 1\.0, 0\.5$"),
            ErrorCase({"etas": (0.5, 1.0)}, ValueError, r"^Invalid eta values: 0\.5, 1\.0$"),
            _LR_TYPE_ERROR,
        ],
        stateful={"lr": 0.01},
        differentiable={"etas": (0.4, 1.3)},
        differentiable_lr=False,
        differentiable_steps=1,
        lr_zero_is_identity=False,
        fused=False,
        flat=True,
    ),
    Entry(
        cls=polyak.SparseAdam,
        reference=torch.optim.SparseAdam,
        configs=[
            {},
            {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
            {"lr": 0.01, "maximize": True},
            {"lr": torch.tensor(0.01)},
            {"lr": torch.tensor([0.005]), "maximize": True},
        ],
        errors=[
            ErrorCase({"lr": 0.0}, ValueError, r"^Invalid learning rate: 0\.0$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            ErrorCase({"eps": 0.0}, ValueError, r"^Invalid epsilon value: 0\.0$"),
            *_betas_errors(),
            _LR_TYPE_ERROR,
        ],
        stateful={"lr": 0.01},
        sparse_grads=True,
        sparse_configs=[{"lr": 0.1}, {"lr": 0.05, "maximize": True}],
        lr_zero_is_identity=False,
        duplicates_in_turn=False,
        supports_complex=False,
        fused=False,
        flat=False,
    ),
]


def _adafactor_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Learning rate should be >= 0 but is: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"beta2_decay": 0.8}, ValueError, r"^beta2_decay should be <= 0 but is: 0\.8$"),
        ErrorCase({"eps": (-1e-30, 1e-3)}, ValueError, r"^epsilon1 should be >= 0 but is: -1e-30$"),
        ErrorCase({"eps": (None, -1.0)}, ValueError, r"^epsilon2 should be >= 0 but is: -1\.0$"),
        ErrorCase({"d": 0.0}, ValueError, r"^Clipping threshold d should be >= 1 but is: 0\.0$"),
        ErrorCase(
            {"weight_decay": -1.0}, ValueError, r"^weight_decay should be >= 0 but is: -1\.0$"
        ),
        _LR_TYPE_ERROR,
    ]


def _muon_errors() -> list[ErrorCase]:
    return [
        ErrorCase({"lr": -0.1}, ValueError, r"^Learning rate should be >= 0 but is: -0\.1$"),
        ErrorCase({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
        ErrorCase({"momentum": -0.5}, ValueError, r"^momentum should be >= 0 but is: -0\.5$"),
        ErrorCase(
            {"weight_decay": -1.0}, ValueError, r"^weight decay should be >= 0 but is: -1\.0$"
        ),
        ErrorCase(
            {"adjust_lr_fn": "arbitrary"},
            ValueError,
            r"^Adjust learning rate function arbitrary is not supported$",
        ),
        _LR_TYPE_ERROR,
    ]


REGISTRY += [
    Entry(
        cls=polyak.Adafactor,
        reference=torch.optim.Adafactor,
        configs=[
            {},
            {"weight_decay": 0.1, "lr": 0.01},
            {"weight_decay": 0.1, "maximize": True},
            {"beta2_decay": -1.0},
            {"d": 1.5},
            {"eps": (1e-15, 1e-3), "weight_decay": 0.1},
            {"lr": 0.5, "beta2_decay": -0.5, "d": 1.2, "eps": (1e-3, 1e-2), "maximize": True},
            {"lr": torch.tensor(0.01), "weight_decay": 0.1},
            {"lr": torch.tensor([0.02]), "maximize": True},
        ],
        errors=_adafactor_errors(),
        stateful={"lr": 0.01, "weight_decay": 0.1},
        paths_agree=False,
        empty_params=False,
        supports_complex=False,
        fused=False,
        flat=False,
    ),
    Entry(
        cls=polyak.Muon,
        reference=torch.optim.Muon,
        configs=[
            {},
            {"lr": 0.01},
            {"weight_decay": 0.2},
            {"momentum": 0.8},
            {"ns_steps": 6},
            {"ns_coefficients": (3.4, -4.7, 2.0)},
            {"nesterov": False, "weight_decay": 0.0},
            {"lr": 0.02, "adjust_lr_fn": "original"},
            {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw", "eps": 1e-3},
            {"lr": torch.tensor(0.001)},
            {"lr": torch.tensor([0.01]), "nesterov": False},
        ],
        errors=_muon_errors(),
        step_errors=[
            ErrorCase(
                {"ns_steps": 100},
                ValueError,
                r"^Number of steps must be less than 100 for computational efficiency$",
            ),
            ErrorCase(
                {"ns_coefficients": (3.4, -4.7)},
                ValueError,
                r"^Coefficients must be a tuple of exactly 3 values$",
            ),
        ],
        stateful={"lr": 0.01, "momentum": 0.9},
        matrices_only=True,
        supports_complex=False,
        fused=False,
        flat=False,
    ),
    Entry(
        cls=polyak.LBFGS,
        reference=torch.optim.LBFGS,
        configs=[
            {},
            {"lr": 0.01},
            {"tolerance_grad": 1e-6},
            {"line_search_fn": "strong_wolfe"},
            {"lr": 0.5, "max_iter": 7, "history_size": 3},
            {"line_search_fn": "strong_wolfe", "max_iter": 4, "max_eval": 3},
            {"lr": 0.1, "tolerance_change": 1e-3, "line_search_fn": "strong_wolfe"},
            {"lr": torch.tensor(0.001)},
            {"lr": torch.tensor([0.05]), "history_size": 2, "max_iter": 5},
        ],
        errors=[
            ErrorCase({"lr": -0.1}, ValueError, r"^Invalid learning rate: -0\.1$"),
            ErrorCase(
                {"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"
            ),
            _LR_TYPE_ERROR,
        ],
        step_errors=[
            ErrorCase(
                {"line_search_fn": "backtracking"},
                RuntimeError,
                r"^only 'strong_wolfe' is supported$",
            )
        ],
        stateful={"lr": 0.5, "max_iter": 5, "history_size": 4},
        step_closure=True,
        one_group=True,
        float16=False,
        # The line search divides by the step length, and fails at lr=0 as torch's does.
        lr_zero_is_identity=False,
        fused=False,
        flat=False,
    ),
]


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
