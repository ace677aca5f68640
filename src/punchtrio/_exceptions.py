"""The root of punchtrio's exception tree."""

from __future__ import annotations


class PunchtrioError(Exception):
    """Base class of every exception punchtrio raises on purpose.

    Each subclass lives in the module that raises it. The CLI prints ``str(error)`` as one line and
    exits non-zero, so messages are written to be read on their own.
    """
