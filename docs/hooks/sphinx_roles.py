"""A griffe extension for the API reference: Sphinx roles in docstrings become inline code.

punchtrio's docstrings name other objects with Sphinx roles (``:class:`PeerConnected```,
``:meth:`Connector.connect```), which Markdown would print as they are. This turns each role into
inline code, keeping only the last dotted part when the target starts with ``~`` (Sphinx's "short
name" marker). It does not invent cross-references: an unqualified name cannot be resolved
reliably, and a wrong link would be worse than none (the strict build would also fail on it).
Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|data|const|obj|mod|type):`([^`]+)`")


def _inline(match: re.Match[str]) -> str:
    target = match[1]
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def convert_roles(text: str) -> str:
    """Return ``text`` with every Sphinx cross-reference role replaced by inline code."""
    return _ROLE.sub(_inline, text)


class SphinxRoles(Extension):
    """Rewrite the roles of every docstring griffe loads, before mkdocstrings renders it."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        """Called by griffe for each object it loads (module, class, function, attribute)."""
        if obj.docstring is not None:
            obj.docstring.value = convert_roles(obj.docstring.value)
