"""Start-up cost: what ``import punchtrio`` and the CLI parser must not load (no timing).

``punchtrio up`` start-up dominates the lab's time to tunnel, so the simulator (and the
``trio.testing``/pytest it pulls), the hub server, pyroute2 and Scapy's protocol layers stay out
of the import graph until a command needs them. Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import punchtrio.rendezvous

# Modules (and their submodules) that neither ``import punchtrio`` nor building the parser may load.
HEAVY = (
    "_pytest",
    "hypercorn",
    "punchtrio.netsim",
    "punchtrio.rendezvous._hub",
    "punchtrio.rendezvous._serve",
    "pyroute2",
    "pytest",
    "redis",
    "rich",
    "scapy.contrib",
    "scapy.layers",
    "starlette",
    "trio.testing",
)

_PROBE = """
import json, sys
{code}
heavy = {heavy!r}
print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))))
"""


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(code=code, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    loaded: list[str] = json.loads(out.splitlines()[-1])  # after anything ``code`` printed
    return loaded


def test_import_punchtrio_loads_no_heavy_module() -> None:
    assert _loaded_after("import punchtrio") == []


def test_building_the_cli_parser_loads_no_heavy_module() -> None:
    code = "from punchtrio.cli._main import build_parser; build_parser()"
    assert _loaded_after(code) == []


def test_up_help_loads_no_heavy_module() -> None:
    code = (
        "from punchtrio.cli._main import main\n"
        "try:\n    main(['up', '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
    )
    assert _loaded_after(code) == []


def test_the_probe_sees_heavy_modules_when_they_are_loaded() -> None:
    loaded = _loaded_after("import punchtrio.netsim, punchtrio.rendezvous._serve")
    assert "punchtrio.netsim" in loaded
    assert "trio.testing" not in loaded  # the simulator imports it when an engine runs
    assert "hypercorn" in loaded
    assert "starlette" in loaded


def test_hub_server_names_are_still_exported_from_rendezvous() -> None:
    assert "create_app" in punchtrio.rendezvous.__all__
    assert "HubConfig" in punchtrio.rendezvous.__all__
    assert punchtrio.rendezvous.create_app.__module__ == "punchtrio.rendezvous._hub"
    assert punchtrio.rendezvous.HubConfig.__doc__
    with pytest.raises(AttributeError, match="no_such_name"):
        punchtrio.rendezvous.no_such_name  # noqa: B018
