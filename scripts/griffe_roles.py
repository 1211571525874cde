"""Griffe extension for the API reference: the docstrings use Sphinx roles
(``:func:`promptalign.ot.sinkhorn```, ``:class:`Released```) and reST double-backtick literals;
Markdown renders the role as stray text. Each role becomes an inline code span, so one docstring
serves ``help()`` and the site."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


def rewrite(text: str) -> str:
    """``text`` with every Sphinx role as a Markdown code span."""
    return _ROLE.sub(lambda m: f"`{m.group(1).strip()}`", text)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
