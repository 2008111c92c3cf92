"""What the steps of one parameter group keep between them, in one object per group.

A step keeps, per group, what it can reuse while the group stays as it was: the
hyperparameters it read (``_driver.hyper``), the layout its last rehearsal passed and the state
keys each kind of parameter needs (``_rehearsal``), the flat kernel's plan or the Triton plan
(``strategies.flat``), and whether a fallback was warned about (``_explain``). Each lives in
the group's :class:`GroupMemo`, which knows its group (so a new group that reuses a dead one's
``id`` starts afresh) and which :func:`forget` drops with all the others when the optimizer's
groups or state are replaced (``load_state_dict``).
"""

from __future__ import annotations

from typing import Any

#: Where an optimizer keeps its groups' memos, by ``id`` of the group.
_MEMOS = "_memos"


class GroupMemo:
    """One parameter group's memos (see the module's docstring); None where not made yet."""

    __slots__ = ("flat", "group", "hypers", "needed", "rehearsed", "triton", "warned")

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group
        #: (keys, values, Hyper, layout) of the last step's hyperparameters.
        self.hypers: tuple[Any, ...] | None = None
        #: (layout, strategy) of the last rehearsal that passed.
        self.rehearsed: tuple[Any, Any] | None = None
        #: (hyperparameters' layout, state keys by kind of parameter).
        self.needed: tuple[Any, Any] | None = None
        #: The flat kernel's entry for the group, under key 0 (a dict, as a group of several
        #: dtypes keeps one such dict per bucket).
        self.flat: dict[int, Any] = {}
        #: The Triton plan of a group on CUDA devices.
        self.triton: Any = None
        #: Whether a fallback from the flat kernel was warned about.
        self.warned = False


def memo(opt: Any, group: dict[str, Any]) -> GroupMemo:
    """``group``'s memo in ``opt``, made where it has none."""
    memos: dict[int, GroupMemo] | None = opt.__dict__.get(_MEMOS)
    if memos is None:
        memos = opt.__dict__[_MEMOS] = {}
    found = memos.get(id(group))
    if found is None or found.group is not group:
        found = memos[id(group)] = GroupMemo(group)
    return found


def peek(opt: Any, group: dict[str, Any]) -> GroupMemo | None:
    """``group``'s memo in ``opt``, or None where no step has made one."""
    memos: dict[int, GroupMemo] | None = opt.__dict__.get(_MEMOS)
    found = memos.get(id(group)) if memos is not None else None
    return found if found is not None and found.group is group else None


def memos(opt: Any) -> list[GroupMemo]:
    """Every memo ``opt`` holds."""
    return list((opt.__dict__.get(_MEMOS) or {}).values())


def forget(opt: Any) -> None:
    """Drop every memo of ``opt``, whose groups or state were replaced: they are made anew at
    the next step, and until then would keep the replaced state alive beside the new one."""
    opt.__dict__.pop(_MEMOS, None)
