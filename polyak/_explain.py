"""Which path an optimizer's steps take, and why: :func:`explain`.

polyak runs a group's step in one of a few ways (see ``polyak.strategies``): the flat kernel,
compiled for this machine or interpreted while its compiled form builds, or torch-style
tensor-by-tensor (``loop``) or ``foreach`` calls. Each is exact; they differ in speed by up to
an order of magnitude, and a group falls back from the fastest for reasons a user can act on
(a flag, a dtype, a device, a missing compiler). :func:`explain` says, per group, what the last
step ran and the first reason a faster path was not taken. With ``POLYAK_WARN_FALLBACK=1`` a
step warns once per group when it falls back.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

from polyak import _memo
from polyak.strategies import choose, flat

#: Where this variable is set (to anything but 0, false, off, no), fallbacks warn once per group.
WARN_VARIABLE = "POLYAK_WARN_FALLBACK"


@dataclass(frozen=True)
class GroupPath:
    """How one parameter group's last step ran.

    Attributes:
        index: the group's position in ``param_groups``.
        params: how many parameters the group holds.
        strategy: ``"flat, compiled"``, ``"flat, interpreted"``, ``"flat, triton"`` (a generated
            Triton kernel, on CUDA devices), ``"loop"``, ``"foreach"``, or
            ``"no step yet"``.
        reason: why a faster path was not taken, in words a user can act on (empty where the
            step ran the fastest path there is).
    """

    index: int
    params: int
    strategy: str
    reason: str

    @property
    def flat(self) -> bool:
        """Whether the last step ran the flat kernel (compiled or interpreted)."""
        return self.strategy.startswith("flat")


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` reports: each group's path and the kernel's state.

    Attributes:
        optimizer: the optimizer's class name.
        groups: one entry per parameter group, in order.
        kernel: the flat kernel's state: built, being built, turned off, or unavailable and why.
    """

    optimizer: str
    groups: tuple[GroupPath, ...]
    kernel: str

    def __str__(self) -> str:
        lines = [f"{self.optimizer}: flat kernel {self.kernel}"]
        for g in self.groups:
            head = f"  group {g.index} ({g.params} parameters): {g.strategy}"
            lines.append(head + (f" - {g.reason}" if g.reason else ""))
        return "\n".join(lines)


def explain(optimizer: Any) -> Explanation:
    """Report, for each parameter group of a polyak optimizer, the path its last step took and
    why not a faster one, and whether the flat kernel is built, building or unavailable.

    Example::

        >>> opt = polyak.AdamW(model.parameters(), foreach=True)
        >>> ...  # a step
        >>> print(polyak.explain(opt))
        AdamW: flat kernel built and loaded (...)
          group 0 (4 parameters): foreach - foreach=True asks for torch's foreach path ...

    Args:
        optimizer: a :class:`polyak.Optimizer`.

    Returns:
        An :class:`Explanation`; ``str()`` of it reads as a report.
    """
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        strategy, reason = _path(optimizer, group)
        groups.append(GroupPath(index, len(group["params"]), strategy, reason))
    return Explanation(type(optimizer).__name__, tuple(groups), flat.status())


def _path(optimizer: Any, group: dict[str, Any]) -> tuple[str, str]:
    params = group["params"]
    with_grads = [p for p in params if p.grad is not None] or list(params)
    grads = [p.grad if p.grad is not None else p for p in with_grads]
    reference = choose(group, with_grads, grads, optimizer.foreach_by_default).value
    if not optimizer.elementwise:
        return reference, optimizer.not_flat_reason or (
            f"{type(optimizer).__name__}'s update is not elementwise (per-tensor reductions or "
            "matrix products): torch's operations run it"
        )
    if not flat.eligible(group):
        return reference, flat.ineligible_reason(group)
    ran, compiled, why = flat.last_path(optimizer, group)
    if ran:
        if flat.runs_triton(group):
            return "flat, triton", ""
        if compiled:
            return "flat, compiled", ""
        if not flat.compiles():
            return "flat, interpreted", "POLYAK_COMPILE=0 keeps programs interpreted"
        return "flat, interpreted", (
            "the program's compiled form is being built (or cannot be): steps interpret the "
            "same program, with the same numbers"
        )
    if not why:
        return "no step yet", ""
    return reference, why


def warn_fallback(optimizer: Any, group: dict[str, Any]) -> None:
    """Where ``POLYAK_WARN_FALLBACK`` is set, warn once per group that its step fell back from
    the flat kernel, with the reason (a parameter's first step, which makes its state on the
    reference path by design, does not count)."""
    if os.environ.get(WARN_VARIABLE, "").strip().lower() in ("", "0", "false", "off", "no"):
        return
    _, _, why = flat.last_path(optimizer, group)
    if not why or why == flat.FIRST_STEP:
        return
    kept = _memo.memo(optimizer, group)
    if kept.warned:
        return
    kept.warned = True
    index = next((i for i, g in enumerate(optimizer.param_groups) if g is group), -1)
    warnings.warn(
        f"polyak: {type(optimizer).__name__} group {index} does not run the flat kernel: {why}",
        RuntimeWarning,
        stacklevel=3,
    )
