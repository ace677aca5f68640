"""The ``punchtrio`` command: one program, one subcommand per job."""

from ._main import main

__all__ = ["main"]
