"""Argument parsing and the error policy shared by every subcommand."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable, Sequence

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from .. import PunchtrioError

# Each module defines ``register(subparsers)``, which adds its subcommands and sets ``run`` on them:
# ``run(args) -> int`` returns the exit code.
_COMMAND_MODULES = ("_keys", "_up", "_status", "_stun", "_nat", "_hub", "_register", "_demo")


class UsageError(PunchtrioError):
    """A command line or an input file is wrong; the CLI exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Return the ``punchtrio`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="punchtrio",
        description="Connect machines behind NATs: STUN, rendezvous, hole punching, WireGuard.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``punchtrio`` command line and return its exit status.

    Errors that punchtrio raises on purpose print one line, ``punchtrio: error: ...``, and exit 1
    (2 for usage errors); Ctrl-C exits 130 after everything has been torn down.
    """
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_reporting(args.run, args)


def run_reporting(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Return ``run(args)``, or the exit status of what it raised after printing its one line
    (the policy of :func:`main`; ``hub --workers`` applies it in every worker)."""
    try:
        return int(run(args))
    except BaseException as raised:
        exc = _sole_exception(raised)
        if isinstance(exc, PunchtrioError):
            print(f"punchtrio: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, UsageError) else int(getattr(exc, "exit_code", 1))
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, BrokenPipeError):
            return 1
        raise


def _sole_exception(exc: BaseException) -> BaseException:
    """Unwrap exception groups that hold one exception: a Trio nursery wraps what its tasks raise,
    and a command that fails inside one still deserves its one-line error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
