"""What the Schedule-Free optimizers share: the averaging schedule kept in each group, and the
switch of the parameters between the point gradients are taken at (train mode) and the average
that is evaluated (eval mode)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from polyak import _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, StateDict

#: The group entries a step advances, as schedulefree keeps them: the count of steps ``k``, the
#: sum of the averaging weights, the largest learning rate so far and this step's learning rate.
SCHEDULE = ("k", "weight_sum", "lr_max", "scheduled_lr")

#: schedulefree's message for a step outside train mode.
NOT_IN_TRAIN_MODE = (
    "Optimizer was not in train mode when step is called. Please insert .train() and .eval() "
    "calls on the optimizer. See documentation for details."
)

# The base class's step without its hooks: a Schedule-Free step wraps it, and the hooks fire
# once, around the whole.
_base_step: Callable[..., Any] = Optimizer.step.__wrapped__  # type: ignore[attr-defined]


class TrainModeCheckpointWarning(UserWarning):
    """A Schedule-Free optimizer's ``state_dict()`` taken in train mode: the model's parameters
    then hold y, the point gradients are taken at, not the average x that is evaluated."""


def average_weight(k: Any, r: Any, lr_max: Any, weight_lr_power: Any) -> Any:
    """The weight of step ``k + 1`` in the average: (k + 1)^r · lr_max^weight_lr_power, as
    schedulefree computes it (in Python numbers)."""
    return ((k + 1) ** r) * (lr_max**weight_lr_power)


def average_coefficient(k: Any, r: Any, lr_max: Any, weight_lr_power: Any, weight_sum: Any) -> Any:
    """c_{k+1}, the weight of this step in the average x: its weight over the weights' sum (0
    where the sum is 0, as schedulefree makes it)."""
    weight = average_weight(k, r, lr_max, weight_lr_power)
    return weight / weight_sum if weight_sum != 0 else 0


def check_train_mode(group: Mapping[str, Any]) -> None:
    """``train_mode`` is a bool (a checkpoint's included)."""
    if not isinstance(group["train_mode"], bool):
        raise TypeError(f"train_mode must be a bool, not {type(group['train_mode']).__name__}")


class ScheduleFree(Optimizer):
    """The base of the Schedule-Free optimizers: ``train()``, ``eval()``, and a step that
    advances each group's schedule (:data:`SCHEDULE`) around the update rule.

    A subclass supplies the interpolation β its parameters are switched by
    (:meth:`interpolation`), and where it has no warmup, the learning rate of a group's next
    step (:meth:`next_lr`); its update reads the schedule from the group, advanced but for
    ``k``, which counts the steps before.
    """

    #: What ``state_dict()`` in train mode warns with, for filters of the user's.
    checkpoint_warning: ClassVar[type[UserWarning]] = TrainModeCheckpointWarning
    state_keys: ClassVar[tuple[str, ...]] = ("z",)
    param_shaped_state: ClassVar[tuple[str, ...]] = ("z",)

    def __init__(self, params: Any, defaults: dict[str, Any], foreach: bool | None) -> None:
        self.check_hyperparameters(defaults)
        # A setting of the optimizer: schedulefree's checkpoints hold its default, True, which
        # would keep their steps off the flat kernel here.
        self.fixed = {"foreach": foreach}  # type: ignore[misc]
        super().__init__(params, defaults)

    @staticmethod
    def interpolation(group: Mapping[str, Any]) -> float:
        """β, by which y lies between x and z: y = (1 - β) z + β x."""
        raise NotImplementedError

    @staticmethod
    def next_lr(group: Mapping[str, Any]) -> Any:
        """The learning rate of the group's next step, ``scheduled_lr``: ``lr``, warmed up
        linearly over ``warmup_steps``."""
        k, warmup = group["k"], group["warmup_steps"]
        return group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)

    def check_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Dense, real gradients only, stepped by :meth:`step`, which advances the schedule
        (torch.distributed's functional optimizers step the update rule alone)."""
        name = type(self).__name__
        if not self.__dict__.get("_in_step"):
            raise RuntimeError(f"{name} steps through its step() only, which advances its schedule")
        _common.check_dense(name, grads)
        if any(p.is_complex() for p in params):
            raise RuntimeError(f"{name} does not support complex parameters")

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """z starts at the parameter."""
        return {"z": torch.clone(param, memory_format=torch.preserve_format).detach()}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step over every group, in train mode only.

        Args:
            closure: re-evaluates the model and returns the loss; it runs with autograd
                enabled, before the update, and its loss is returned.

        Raises:
            RuntimeError: the optimizer is in eval mode (schedulefree raises an Exception with
                the same message).
        """
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(NOT_IN_TRAIN_MODE)
        kept = [{key: group[key] for key in SCHEDULE} for group in self.param_groups]
        for group in self.param_groups:
            lr = group["scheduled_lr"] = self.next_lr(group)
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = average_weight(group["k"], group["r"], lr_max, group["weight_lr_power"])
            group["weight_sum"] = group["weight_sum"] + weight
        self.__dict__["_in_step"] = True
        try:
            loss = _base_step(self, closure)
        except BaseException:
            # A step that fails changes nothing, its schedule included.
            for group, values in zip(self.param_groups, kept, strict=True):
                group.update(values)
            raise
        finally:
            self.__dict__["_in_step"] = False
        for group in self.param_groups:
            group["k"] = group["k"] + 1
        return loss

    @torch.no_grad()
    def eval(self) -> None:
        """Switch the parameters to x, the average to evaluate, in groups in train mode."""
        self._switch(False, lambda beta: 1 - 1 / beta)

    @torch.no_grad()
    def train(self) -> None:
        """Switch the parameters to y, where gradients are taken, in groups in eval mode."""
        self._switch(True, lambda beta: 1 - beta)

    def _switch(self, train_mode: bool, weight: Callable[[float], float]) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train_mode:
                continue
            params = [p for p in group["params"] if "z" in self.state.get(p, {})]
            zs = [self.state[p]["z"] for p in params]
            if any(not z.is_floating_point() for z in zs):
                raise RuntimeError(
                    f"{type(self).__name__} keeps z in 8 or 4 bits, from which the parameters "
                    "cannot be switched: store it in a floating-point dtype (state_dtype="
                    "{'exp_avg_sq': ...} leaves z in the parameter's)"
                )
            # z stored in another dtype (``state_dtype``) is read in the parameter's.
            zs = [z.to(device=p.device, dtype=p.dtype) for p, z in zip(params, zs, strict=True)]
            _ops.lerp_(params, zs, weight(self.interpolation(group)))
            group["train_mode"] = train_mode

    def state_dict(self) -> StateDict:
        """The optimizer's state, as :meth:`Optimizer.state_dict`; taken in train mode, it
        warns (:class:`TrainModeCheckpointWarning`), as schedulefree asks for checkpoints to be
        taken in eval mode."""
        if any(group["train_mode"] for group in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}.state_dict() in train mode: the parameters hold y, the "
                "point gradients are taken at, not the average x to evaluate. A checkpoint of "
                "both resumes exactly, but call optimizer.eval() before saving weights that are "
                "to be evaluated or deployed",
                self.checkpoint_warning,
                stacklevel=2,
            )
        return super().state_dict()
