"""Sphinx configuration of polyak's API reference, built from the docstrings.

Build it with ``python -m sphinx -E -W --keep-going docs build/docs`` from the repository
root; ``build/docs/index.html`` is the result.
"""

from __future__ import annotations

import re
from typing import Any

import polyak

project = "polyak"
author = "the polyak authors"
copyright = "2026, the polyak authors"
release = polyak.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Google-style docstrings only; the class docstring documents the constructor's arguments.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autoclass_content = "class"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"

html_theme = "alabaster"
html_title = f"polyak {release}"


# A root over a parenthesised expression or over one symbol with an optional subscript.
_ROOT = re.compile(r"√(?:\(([^()]*)\)|(\w(?:_\w|_\{[^}]*\})?))")


def _typeset(line: str) -> str:
    """TeX for one line of plain-Unicode math: aligned at its arrow, with roots and max set."""
    line = line.replace("←", "&←", 1).replace("max(", r"\max(").replace("min(", r"\min(")
    line = line.replace("sign(", r"\operatorname{sign}(")
    return _ROOT.sub(lambda m: r"\sqrt{" + (m.group(1) or m.group(2)) + "}", line)


def _typeset_math(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Typeset each line of a docstring's ``.. math::`` blocks for the rendered page.

    The docstrings write one assignment per line, ``x_t ← ...``, in plain Unicode so that
    ``help()`` reads well; here each line gets the alignment mark, root bars and upright
    ``max`` of the rendered block.
    """
    block_indent = None
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if line.strip() == ".. math::":
            block_indent = indent
        elif block_indent is not None and line.strip():
            if indent <= block_indent:
                block_indent = None
            elif "&" not in line:
                lines[i] = _typeset(line)


def setup(app: Any) -> None:
    """Register the docstring hook."""
    app.connect("autodoc-process-docstring", _typeset_math)
