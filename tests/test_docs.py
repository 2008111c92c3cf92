"""What ``help()`` shows of the public API: plain text, with the math readable as written."""

from __future__ import annotations

import pydoc

import pytest

import polyak

PUBLIC_CLASSES = [
    getattr(polyak, name) for name in polyak.__all__ if isinstance(getattr(polyak, name), type)
]


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda cls: cls.__name__)
def test_help_has_no_tex_markup(cls: type) -> None:
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    own = cls.__doc__ or ""
    assert own.strip()
    for markup in ("\\", ":math:", "&"):
        assert markup not in own, f"{cls.__name__}'s docstring has {markup!r}"
    assert own.splitlines()[0] in text


@pytest.mark.parametrize(
    "cls", [polyak.SGD, polyak.Adam, polyak.AdamW], ids=lambda cls: cls.__name__
)
def test_update_rule_is_one_assignment_per_line(cls: type) -> None:
    doc = cls.__doc__ or ""
    block = doc.split(".. math::", 1)[1].split("\n\n    where", 1)[0]
    rules = [line.strip() for line in block.splitlines() if line.strip()]
    assert len(rules) >= 3
    assert all(" ← " in rule for rule in rules), rules
