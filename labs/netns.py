"""Network namespaces and veth pairs that are always torn down, even after a failed run.

The primitives live in the installed package (:mod:`punchtrio._netns`, which ``punchtrio demo``
also builds on); this module re-exports them under the names the lab, tests and benchmarks use.
"""

from __future__ import annotations

from punchtrio._netns import (
    Lab,
    LabError,
    Namespace,
    leftover_namespaces,
    require_binaries,
    require_root,
    run,
)

__all__ = [
    "Lab",
    "LabError",
    "Namespace",
    "leftover_namespaces",
    "require_binaries",
    "require_root",
    "run",
]
