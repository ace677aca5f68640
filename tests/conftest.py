"""Shared test policy: root-only tests fail (never skip) when what they need is missing."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import settings

# Hypothesis's per-example deadline (200 ms) is a timing assertion: on a shared, loaded machine an
# example that normally takes a millisecond can take hundreds (a CI run failed that way), which
# says nothing about the code. Speed belongs in benchmarks, so no deadline; examples stay the same.
settings.register_profile("punchtrio", deadline=None)
settings.load_profile("punchtrio")


def require_root_and(*binaries: str) -> None:
    """Fail the calling test unless running as root with every binary in ``binaries`` on PATH.

    Root-only tests are selected by marker (``nox -s interop``); once selected, a missing component
    is a failure, so a green run always means the real component ran.
    """
    if os.geteuid() != 0:
        pytest.fail("this test needs root; run it through `nox -s interop` as root")
    missing = [name for name in binaries if shutil.which(name) is None]
    if missing:
        pytest.fail(f"missing from PATH: {', '.join(missing)} (run scripts/bootstrap)")
