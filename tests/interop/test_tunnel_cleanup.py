"""`punchtrio up` in a namespace: what it sets up, and that Ctrl-C, SIGTERM and errors leave nothing."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs.netns import Lab, Namespace
from labs.wireguard import PYTHON, ROOT, PunchtrioPeer, genkey, start_punchtrio

from tests.conftest import require_root_and

pytestmark = pytest.mark.root

PORT = 51999


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root_and("ip", "ss")
    with Lab() as built:
        yield built


@pytest.fixture
def ns(lab: Lab) -> Namespace:
    return lab.namespace("up")


def _config(path: Path, extra_interface: str = "") -> Path:
    private, _ = genkey()
    _, public = genkey()
    path.write_text(
        "[Interface]\n"
        f"PrivateKey = {private}\n"
        "Address = 10.30.0.1/24, fd30::1/64\n"
        f"ListenPort = {PORT}\n"
        "MTU = 1400\n"
        f"{extra_interface}"
        "\n[Peer]\n"
        f"PublicKey = {public}\n"
        "AllowedIPs = 10.30.0.2/32, 10.40.0.0/16, fd40::/64\n"
        "Endpoint = 192.0.2.1:51820\n"
    )
    return path


def _links(ns: Namespace) -> list[str]:
    return [link["ifname"] for link in json.loads(ns.run("ip", "-j", "link", "show"))]


def _udp_ports(ns: Namespace) -> str:
    return ns.run("ss", "-H", "-uln")


def _up(ns: Namespace, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.exec(PYTHON, "-m", "punchtrio.cli", "up", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        check=False,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_up_configures_the_interface_and_a_signal_removes_it(
    lab: Lab, ns: Namespace, tmp_path: Path, signum: signal.Signals
) -> None:
    config = _config(tmp_path / "pt7.conf")
    peer: PunchtrioPeer = start_punchtrio(lab, ns, config, "pt7")
    try:
        (link,) = json.loads(ns.run("ip", "-j", "addr", "show", "dev", "pt7"))
        assert link["mtu"] == 1400
        assert "UP" in link["flags"]
        addresses = {(a["local"], a["prefixlen"]) for a in link["addr_info"]}
        assert {("10.30.0.1", 24), ("fd30::1", 64)} <= addresses
        routes4 = ns.run("ip", "-4", "route", "show", "dev", "pt7")
        routes6 = ns.run("ip", "-6", "route", "show", "dev", "pt7")
        assert "10.40.0.0/16" in routes4
        assert "10.30.0.0/24" in routes4
        assert "fd40::/64" in routes6
        assert f"0.0.0.0:{PORT}" in _udp_ports(ns)
        assert f"[::]:{PORT}" in _udp_ports(ns)
        peer.proc.send_signal(signum)
        assert peer.proc.wait(timeout=10) == 0
    finally:
        peer.stop()
    assert [e["event"] for e in peer.seen][-2:] == ["down", "exited"]
    assert _links(ns) == ["lo"]
    assert "10.40.0.0" not in ns.run("ip", "-4", "route", "show")
    assert "fd40::" not in ns.run("ip", "-6", "route", "show")
    assert str(PORT) not in _udp_ports(ns)


def test_bad_config_is_one_line_exit_2_and_creates_nothing(ns: Namespace, tmp_path: Path) -> None:
    config = _config(tmp_path / "pt8.conf", extra_interface="SaveConfig = true\n")
    result = _up(ns, config)
    assert result.returncode == 2
    assert (
        result.stderr == f"punchtrio: error: {config}:6: SaveConfig is not supported by punchtrio\n"
    )
    assert _links(ns) == ["lo"]
    assert str(PORT) not in _udp_ports(ns)


def test_port_in_use_is_an_error_and_leaves_no_device(ns: Namespace, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        ns.exec(
            PYTHON,
            "-c",
            "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            f"s.bind(('0.0.0.0',{PORT}));print('bound',flush=True);sys.stdin.read()",
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "bound"
        result = _up(ns, _config(tmp_path / "pt9.conf"))
    finally:
        holder.communicate(timeout=10)
    assert result.returncode == 1
    assert result.stderr.startswith(f"punchtrio: error: cannot bind UDP port {PORT}")
    assert result.stderr.count("\n") == 1
    assert _links(ns) == ["lo"]


def test_interface_name_taken_is_an_error_and_closes_the_socket(
    ns: Namespace, tmp_path: Path
) -> None:
    ns.run("ip", "link", "add", "pt9", "type", "veth", "peer", "name", "pt9peer")
    result = _up(ns, _config(tmp_path / "pt9.conf"))
    assert result.returncode == 1
    assert result.stderr.startswith("punchtrio: error: cannot create TUN device pt9")
    assert result.stderr.count("\n") == 1
    assert sorted(_links(ns)) == ["lo", "pt9", "pt9peer"]
    assert str(PORT) not in _udp_ports(ns)
