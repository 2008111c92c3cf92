"""Sphinx configuration of polyak's documentation: the API reference, built from the
docstrings, and the Markdown pages beside it (design, compatibility, benchmarks).

Build it with ``python -m sphinx -E -W --keep-going docs build/docs`` from the repository
root; ``build/docs/index.html`` is the result.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective
from sphinx.util.parsing import nested_parse_to_nodes

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
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# Headings of the Markdown pages become link targets, as GitHub makes them.
myst_heading_anchors = 3

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


def _optimizer_names() -> list[str]:
    """The optimizer classes in ``polyak.__all__``, in alphabetical order."""
    names = [
        name
        for name in polyak.__all__
        if isinstance(getattr(polyak, name), type)
        and issubclass(getattr(polyak, name), polyak.Optimizer)
        and getattr(polyak, name) is not polyak.Optimizer
    ]
    return sorted(names, key=str.lower)


def _takes_closure(cls: type) -> bool:
    """Whether a class's ``step`` must be given a closure (then its ``step`` is documented)."""
    closure = inspect.signature(cls.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


class OptimizerList(SphinxDirective):
    """``.. optimizers::``: an ``autoclass`` of every optimizer in ``polyak.__all__`` but those
    that ``:exclude:`` names, so that a new optimizer needs no edit of the reference; a class
    whose ``step`` takes a required closure shows its ``step``."""

    option_spec: ClassVar[dict[str, Callable[[str], Any]]] = {"exclude": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        excluded = set(self.options.get("exclude", "").replace(",", " ").split())
        lines = []
        for name in _optimizer_names():
            if name in excluded:
                continue
            lines.append(f".. autoclass:: polyak.{name}")
            if _takes_closure(getattr(polyak, name)):
                lines.append("   :members: step")
            lines.append("")
        return nested_parse_to_nodes(self.state, "\n".join(lines), source="<polyak.__all__>")


def setup(app: Any) -> None:
    """Register the docstring hook and the optimizer list."""
    app.connect("autodoc-process-docstring", _typeset_math)
    app.add_directive("optimizers", OptimizerList)
