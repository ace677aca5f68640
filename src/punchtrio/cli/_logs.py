"""Log levels and formats of the long-running commands (``up``, ``hub``) through :mod:`logging`.

``-v`` logs debug messages too, ``-q`` only warnings and errors (default: info and above);
``--log-format text`` (default) writes ``punchtrio COMMAND: message`` lines on stderr,
``--log-format json`` one JSON object per line (``time``, ``level``, ``logger``, ``message``, and
``event`` with its fields for progress events). Every line passes a filter that replaces the
command's own secrets (private key, preshared keys, network secret, TURN password) if one ever
reached a message.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from ._main import UsageError

LOG_FORMATS = ("text", "json")
"""The values of ``--log-format``."""

REDACTED = "[redacted]"
"""What replaces a secret in a log line."""

_ROOT = "punchtrio"


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """Add ``-v``/``--verbose``, ``-q``/``--quiet`` and ``--log-format text|json`` to ``parser``."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v", "--verbose", action="store_true", help="also log debug messages (on stderr)"
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only (no progress)"
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text lines (default) or JSON objects, one per line, on stderr",
    )


def timestamp(when: float | None = None) -> str:
    """Return ``when`` (Unix seconds; default now) as RFC 3339 UTC with milliseconds, as in
    ``2025-06-01T12:00:00.123Z``: the ``time`` of ``--json`` events and JSON log lines."""
    moment = (
        datetime.datetime.now(datetime.timezone.utc)
        if when is None
        else datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    )
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def secret_texts(*, keys: Iterable[bytes] = (), texts: Iterable[str] = ()) -> tuple[str, ...]:
    """Return the forms in which secrets could appear in a line: each of ``keys`` (raw bytes) as
    base64 (the ``wg`` form) and hex, and each of ``texts`` as given; empty ones are left out."""
    forms: list[str] = []
    for raw in keys:
        if raw:
            forms += [base64.b64encode(raw).decode(), raw.hex()]
    forms += [text for text in texts if text]
    return tuple(forms)


def configure_logging(
    args: argparse.Namespace, command: str, *, secrets: Iterable[str] = ()
) -> logging.Logger:
    """Set up the ``punchtrio`` logger for ``command`` from ``args`` and return
    ``punchtrio.COMMAND``'s logger.

    Replaces any handler an earlier call installed (tests run several commands in one process).
    Raises :class:`~punchtrio.cli._main.UsageError` for ``-v`` together with ``-q``.
    """
    verbose = bool(getattr(args, "verbose", False))
    quiet = bool(getattr(args, "quiet", False))
    if verbose and quiet:
        raise UsageError("give -v or -q, not both")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger(_ROOT)
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler(tuple(s for s in secrets if s))
    if (getattr(args, "log_format", None) or "text") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(f"punchtrio {command}"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return logging.getLogger(f"{_ROOT}.{command}")


class _StderrHandler(logging.Handler):
    """Write to the current ``sys.stderr`` (a progress spinner may have wrapped it), with every
    secret in ``secrets`` replaced by :data:`REDACTED`."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self._secrets = secrets

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            for secret in self._secrets:
                line = line.replace(secret, REDACTED)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _TextFormatter(logging.Formatter):
    """``PREFIX: message`` for info, ``PREFIX: warning: message`` and the like otherwise; debug
    lines name their logger."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " (" + " ".join(str(record.exc_info[1]).split()) + ")"
        if record.levelno == logging.INFO:
            return f"{self._prefix}: {message}"
        if record.levelno <= logging.DEBUG:
            return f"{self._prefix}: debug: {record.name}: {message}"
        return f"{self._prefix}: {record.levelname.lower()}: {message}"


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, and for
    progress events ``event`` and its fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = " ".join(str(record.exc_info[1]).split())
        event = getattr(record, "event", None)
        if isinstance(event, str):
            fields = getattr(record, "fields", {})
            entry = {**entry, "event": event, **{k: v for k, v in fields.items() if k not in entry}}
        return json.dumps(entry)


class LogReport:
    """A progress reporter (``report(event, fields)``) that logs each event at info level on
    ``logger``, with the event's name and fields attached for ``--log-format json``; a
    ``peer_failed`` at warning level, so that ``-q`` still shows why a peer is being retried."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        details = ", ".join(f"{k}={v}" for k, v in fields.items())
        level = logging.WARNING if event == "peer_failed" else logging.INFO
        self._logger.log(
            level,
            "%s",
            f"{event}: {details}" if details else event,
            extra={"event": event, "fields": fields},
        )

    def close(self) -> None:
        """Nothing to tear down (kept for the reporter interface)."""
