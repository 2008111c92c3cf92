"""``optimizer.state``: torch's ``defaultdict`` of per-parameter dicts, counting its changes.

A strategy that keeps a group's state tensors between steps (the flat kernel) must learn when one
of them is replaced, as in ``opt.state[p]["momentum_buffer"] = torch.zeros_like(p)`` or when a
training framework moves state to another device. Every assignment, deletion or update of an
entry, or of a parameter's whole dict, adds one to ``version``; reading costs nothing.

A plain dict assigned as a parameter's state (``opt.state[p] = {...}``) is stored as it is, as
torch stores it, so that changes made later through the caller's reference are the optimizer's
too; as its changes are not counted, the flat kernel compares it with its plan at every step.
An ``optimizer.state`` replaced by another mapping is likewise used as it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

#: The name of the number of completed ``step()`` calls, in two places: the optimizer's
#: ``__dict__`` slot that holds the count made in Python (behind its ``_step_count`` property,
#: as torch names it), and the top-level key under which checkpoints of earlier polyak versions
#: saved the count (``state_dict()`` now writes torch's keys only; loading still reads it).
STEP_COUNT = "_step_count"


class StateEntry(dict[str, Any]):
    """One parameter's state; each change adds one to its optimizer state's version."""

    __slots__ = ("_edits",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._edits: list[int] | None = None

    def _changed(self) -> None:
        edits = getattr(self, "_edits", None)  # unset while unpickling
        if edits is not None:
            edits[0] += 1

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self._changed()
        return super().setdefault(key, default)

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._changed()
        return value

    def popitem(self) -> tuple[str, Any]:
        item = super().popitem()
        self._changed()
        return item

    def clear(self) -> None:
        super().clear()
        self._changed()

    def __ior__(self, other: Any) -> StateEntry:  # type: ignore[override,misc]
        super().__ior__(other)
        self._changed()
        return self


class OptimizerState(defaultdict[Any, Any]):
    """``optimizer.state``: a parameter's state dict by parameter, made empty on first access,
    as in torch; ``version`` counts the changes made to it and to the dicts it holds."""

    __slots__ = ("_edits",)

    def __init__(self, items: Any = ()) -> None:
        super().__init__(dict)
        self._edits = [0]
        for key, value in dict(items).items():
            self[key] = value

    @property
    def version(self) -> int:
        """How many changes the state and its dicts have seen."""
        return self._edits[0]

    def _adopt(self, value: Any) -> Any:
        # An entry that counts into another state (a copy's) is copied; a plain dict is kept.
        if isinstance(value, StateEntry) and value._edits not in (None, self._edits):
            value = StateEntry(value)
        if isinstance(value, StateEntry):
            value._edits = self._edits
        return value

    def __missing__(self, key: Any) -> StateEntry:
        entry = self[key] = StateEntry()
        return entry  # type: ignore[no-any-return]

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, self._adopt(value))
        self._edits[0] += 1

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._edits[0] += 1

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: Any, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._edits[0] += 1
        return value

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self._edits[0] += 1
        return item

    def clear(self) -> None:
        super().clear()
        self._edits[0] += 1

    def __ior__(self, other: Any) -> OptimizerState:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through __init__ and __setitem__, so that copies and unpickled states count
        # into their own version.
        items: Iterator[tuple[Any, Any]] = iter(self.items())
        return (type(self), (), None, None, items)

    def copy(self) -> OptimizerState:
        return type(self)(self)

    __copy__ = copy
