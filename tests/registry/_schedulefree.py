"""Schedule-Free's train mode, in which its optimizers step."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any


def in_train_mode(*classes: str) -> Callable[[Any], None]:
    """A peer's ``setup`` (see :attr:`Entry.setup`): the classes named (``"module:Class"``),
    polyak's and schedulefree's, are put in train mode as they are made, as a training loop
    calls ``optimizer.train()`` before its first step. Those that cannot be imported are left
    alone (their tests skip)."""

    def setup(monkeypatch: Any) -> None:
        for name in classes:
            module, _, attribute = name.partition(":")
            try:
                cls = getattr(importlib.import_module(module), attribute)
            except ImportError:
                continue
            init = cls.__init__

            @functools.wraps(init)
            def made_in_train_mode(self: Any, *args: Any, init: Any = init, **kwargs: Any) -> None:
                init(self, *args, **kwargs)
                self.train()

            monkeypatch.setattr(cls, "__init__", made_in_train_mode)

    return setup
