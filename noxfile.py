"""Nox sessions: lint, the unit suite on every supported Python, root-only suites, benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
ROOT_MARKERS = "root or interop or lab"


def _activate_pyenv_pythons() -> None:
    """Make every installed pyenv 3.10-3.13 visible, so nox finds ``python3.X`` on PATH."""
    if "PYENV_VERSION" in os.environ or shutil.which("pyenv") is None:
        return
    bare = subprocess.run(
        ["pyenv", "versions", "--bare"], capture_output=True, text=True, check=False
    ).stdout.split()
    newest: dict[str, int] = {}
    for version in bare:
        match = re.fullmatch(r"(3\.(\d+))\.(\d+)", version)
        if match and 10 <= int(match[2]) <= 13:
            newest[match[1]] = max(newest.get(match[1], 0), int(match[3]))
    # The interpreter nox itself runs on (3.11) stays the default ``python``.
    ordered = sorted(newest, key=lambda minor: minor != "3.11")
    if ordered:
        os.environ["PYENV_VERSION"] = ":".join(f"{m}.{newest[m]}" for m in ordered)


_activate_pyenv_pythons()


def _require_root(session: nox.Session) -> None:
    if os.geteuid() != 0:
        session.error("this session needs root (network namespaces, TUN, nftables)")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check, mypy --strict on the package."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "src", "tests", "labs", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "labs", "benchmarks", "noxfile.py")
    session.run("mypy", "--strict", "src")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The unprivileged suite: sans-IO cores, vectors, hypothesis, in-process servers."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", f"not ({ROOT_MARKERS})", *session.posargs)


@nox.session(python="3.11")
def interop(session: nox.Session) -> None:
    """Root-only tests: TUN devices, namespaces, the NAT lab, real peers (wireguard-go, coturn...)."""
    _require_root(session)
    session.install("-e", ".[test]")
    session.run("pytest", "-m", ROOT_MARKERS, *session.posargs)


@nox.session(python="3.11")
def lab(session: nox.Session) -> None:
    """Only the NAT lab scenarios (root)."""
    _require_root(session)
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "lab", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks (root): each prints ratios measured in the same run and updates docs/benchmarks.md."""
    _require_root(session)
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks", *session.posargs)
