"""The NAT lab builder's one home (punchtrio.natlab), without root: what the lab and demo share."""

from __future__ import annotations

import subprocess
import sys

import pytest

import punchtrio.natlab
from punchtrio.natlab import _topology


def test_labs_topology_re_exports_the_installed_builder() -> None:
    from labs import topology

    for name in punchtrio.natlab.__all__:
        assert getattr(topology, name) is getattr(punchtrio.natlab, name), name


def test_the_demo_and_the_builder_never_import_the_repository_labs() -> None:
    # labs/ is not in the wheel: the root demo must work from the installed package alone.
    code = (
        "import sys, punchtrio.cli._demo_lab, punchtrio.natlab; "
        "print(sorted(m for m in sys.modules if m == 'labs' or m.startswith('labs.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "[]"


def test_the_demo_builds_the_labs_kinds() -> None:
    from punchtrio.cli import _demo_lab

    assert set(_demo_lab.NATS.values()) | set(_demo_lab.ACT2.values()) <= set(_topology.KINDS)


class _Recorder:
    def __init__(self) -> None:
        self.commands: list[tuple[str, ...]] = []

    def run(self, *argv: str, **_: object) -> str:
        self.commands.append(argv)
        return ""


@pytest.mark.parametrize("loaded", [True, False])
def test_bridge_netfilter_is_turned_off_only_where_the_module_exists(
    monkeypatch: pytest.MonkeyPatch, loaded: bool
) -> None:
    seen: list[str] = []

    def exists(path: str) -> bool:
        seen.append(path)
        return loaded

    monkeypatch.setattr("os.path.exists", exists)
    ns = _Recorder()
    _topology._bridges_skip_netfilter(ns)  # type: ignore[arg-type]
    assert seen == [f"/proc/sys/net/bridge/bridge-nf-call-{t}" for t in ("iptables", "ip6tables")]
    expected = (
        [
            ("sysctl", "-q", "-w", f"net.bridge.bridge-nf-call-{t}=0")
            for t in ("iptables", "ip6tables")
        ]
        if loaded
        else []
    )
    assert ns.commands == expected


def test_build_checks_its_binaries_before_touching_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(punchtrio.natlab.Lab, "__enter__", lambda self: self)
    monkeypatch.setenv("PATH", "/nonexistent")
    with (
        pytest.raises(punchtrio.natlab.LabError, match="missing from PATH: ip, nft, conntrack"),
        punchtrio.natlab.build(["port"], prefix="ptzz"),
    ):
        pass
