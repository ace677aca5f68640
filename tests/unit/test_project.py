"""The project's promises about itself: the README's commands, CI, and the public API."""

from __future__ import annotations

import re
from pathlib import Path

import punchtrio

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return [line for line in block[1].splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_the_demo_and_test_commands() -> None:
    demo, tests = _readme_commands()
    assert demo.startswith("scripts/bootstrap && ")
    assert tests.startswith("scripts/bootstrap && ")
    assert "nox -s" in tests


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_public_names_are_exported_and_documented() -> None:
    for name in punchtrio.__all__:
        obj = getattr(punchtrio, name)
        if name != "__version__":
            assert obj.__doc__, name
            assert obj.__module__.startswith("punchtrio"), name


def test_each_connector_event_has_one_public_home() -> None:
    # The top-level names are the connector's events: an isinstance check against
    # ``punchtrio.PathChosen`` matches what ``Connector.events`` yields.
    from punchtrio import connect

    for name in ("PathChosen", "PathChanged", "PathLost", "PeerConnected", "PeerFailed"):
        assert getattr(punchtrio, name) is getattr(connect, name), name
    assert not hasattr(punchtrio, "PunchFailed")


def test_the_cli_imports_public_names_only() -> None:
    # The CLI is a client of the library like any other: what it needs is public, with a docstring.
    private = re.compile(r"^\s*from \.\.((\w+\.)*_\w+)(\.\w+)* import", re.M)
    found = [
        f"{path.name}: punchtrio.{m[1]}"
        for path in sorted((ROOT / "src" / "punchtrio" / "cli").glob("*.py"))
        for m in private.finditer(path.read_text())
    ]
    assert found == []
