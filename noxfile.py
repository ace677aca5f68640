"""Nox sessions: lint, the unit suite on every supported Python, root-only suites, benchmarks."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

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


LINTED = ("src", "tests", "labs", "benchmarks", "docs/hooks", "noxfile.py")
# Material prints a notice about MkDocs 2 at every build; the pins in the docs extra keep MkDocs 1.
DOCS_ENV = {"NO_MKDOCS_2_WARNING": "1"}


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check, mypy --strict on the package, the docs site built --strict."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)
    session.run("mypy", "--strict", "src")
    # A broken link or anchor, a page missing from the nav, an unknown API target: each fails.
    site = Path(session.create_tmp()) / "site"
    session.run("mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site), env=DOCS_ENV)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ (``nox -s docs -- serve`` serves it instead)."""
    session.install("-e", ".[docs]")
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", "--strict", *session.posargs[1:], env=DOCS_ENV)
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs, env=DOCS_ENV)


@nox.session(python=PYTHONS)
def wheel(session: nox.Session) -> None:
    """Build the sdist and wheel, install the wheel alone in a fresh venv, run what a user runs.

    No editable install and no bootstrap: ``pip install`` of the built wheel must bring everything
    ``punchtrio --help``, ``keygen`` and the unprivileged ``demo --netsim`` need.
    """
    session.install("build")
    tmp = Path(session.create_tmp()).resolve()
    dist, clean = tmp / "dist", tmp / "clean"
    for stale in (dist, clean):
        shutil.rmtree(stale, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    (built,) = dist.glob("punchtrio-*.whl")
    with zipfile.ZipFile(built) as archive:
        names = archive.namelist()
    for packaged in ("punchtrio/py.typed", "punchtrio/punchtrio@.service"):
        if packaged not in names:
            session.error(f"the wheel lacks {packaged}")
    strays = [n for n in names if not n.startswith(("punchtrio/", "punchtrio-"))]
    if strays:
        session.error(f"the wheel holds files outside the package: {strays[:5]}")
    session.run("python", "-m", "venv", str(clean))
    python, command = str(clean / "bin" / "python"), str(clean / "bin" / "punchtrio")
    session.run(python, "-m", "pip", "install", "--quiet", str(built), external=True)
    where = session.run(
        python, "-c", "import punchtrio; print(punchtrio.__file__)", external=True, silent=True
    )
    if not str(where).strip().startswith(str(clean)):
        session.error(f"punchtrio imported from outside the fresh venv: {where}")
    session.run(command, "--help", external=True, silent=True)
    key = tmp / "k"
    key.unlink(missing_ok=True)
    session.run(command, "keygen", "--out", str(key), external=True)
    if stat.S_IMODE(key.stat().st_mode) != 0o600 or len(key.read_bytes()) != 45:
        session.error("keygen --out did not write a 0600 key file")
    demo = subprocess.run(
        [command, "demo", "--netsim", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=300,
        check=False,
    )
    session.log(demo.stderr.strip())
    if demo.returncode != 0:
        session.error(f"punchtrio demo --netsim failed with status {demo.returncode}")
    report = json.loads(demo.stdout)
    paths = [peer["path"] for peer in report["peers"]]
    if report["mode"] != "netsim" or len(paths) != 2 or None in paths:
        session.error(f"punchtrio demo --netsim did not connect both peers: {report}")
    session.log(f"demo --netsim: paths {paths}, time to tunnel {report['time_to_tunnel_s']} s")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The unprivileged suite: sans-IO cores, vectors, hypothesis, in-process servers.

    It runs on every core (pytest-xdist): nothing in it shares state between tests.
    """
    session.install("-e", ".[test]")
    session.run("pytest", "-n", "auto", "-m", f"not ({ROOT_MARKERS})", *session.posargs)


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
    # benchmarks/asgi_servers.py only: other ASGI servers, never punchtrio dependencies.
    session.install("uvicorn==0.54.0", "granian==2.8.7", "uvloop", "httptools")
    session.run("python", "-m", "benchmarks", *session.posargs)
