"""`punchtrio up --hub --tunnel wireguard-go` through the kernel NAT lab, with a real hub.

punchtrio punches, relays and decides; the Debian wireguard-go moves the packets. Every path kind
the connector offers is exercised: direct through two port-restricted cone NATs, LAN behind one
NAT, the hub's relay over UDP (two symmetric NATs) and over TCP (a site that drops UDP), and a
pair where only one side runs wireguard-go. The real `wg` tool reads wireguard-go's own UAPI
socket; the steering rules exist while `up` runs and are gone with everything else after it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs.discovery import PUNCHTRIO
from labs.scenarios.punch_matrix import RELAY_PORT, LivePair, running_pair, start_hub
from labs.topology import Host, NatSpec, Network, build

from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

BINARIES = ("ip", "nft", "conntrack", "sysctl", "ping", "wg", "wireguard-go")
SPECS = ("port", "port", NatSpec("port", hosts=2), "sym", "sym", NatSpec("full", block_udp=True))
WG_GO = ("--tunnel", "wireguard-go")
RECOVERY_S = 15.0
"""Seconds a pair may take to carry pings again after wireguard-go was killed."""


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Network, Path]]:
    require_root_and(*BINARIES)
    with tempfile.TemporaryDirectory(prefix="pt-wghub-") as tmp, build(SPECS) as net:
        start_hub(net, Path(tmp) / "hub.log")
        yield net, Path(tmp)


def _wg(host: Host, *args: str) -> str:
    done = subprocess.run(
        host.ns.exec("wg", *args), capture_output=True, text=True, check=False, timeout=10
    )
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def _peer_dump(host: Host, iface: str) -> list[str]:
    """The one peer line of `wg show IFACE dump`, split."""
    lines = _wg(host, "show", iface, "dump").splitlines()
    assert len(lines) == 2, lines
    return lines[1].split("\t")


def _tables(host: Host) -> str:
    return host.ns.run("nft", "list", "tables")


def _ping(host: Host, address: str, count: int = 3) -> int:
    done = subprocess.run(
        host.ns.exec("ping", "-c", str(count), "-i", "0.2", "-W", "1", address),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return sum("bytes from" in line for line in done.stdout.splitlines())


def _wireguard_go_pid(host: Host, iface: str) -> int | None:
    done = subprocess.run(
        ["pgrep", "-f", f"wireguard-go -f {iface}$"], capture_output=True, text=True, check=False
    )
    pids = [int(p) for p in done.stdout.split()]
    return pids[0] if pids else None


def _check_gone(pair: LivePair, hosts: tuple[Host, ...], ifaces: tuple[str, ...]) -> None:
    assert set(pair.result.returncodes.values()) == {0}, pair.result.stderr
    for host, iface in zip(hosts, ifaces, strict=True):
        assert iface not in host.ns.run("ip", "-o", "link", "show")
        assert "punchtrio_steer" not in _tables(host)
        assert not Path(f"/var/run/wireguard/{iface}.sock").exists()
        assert _wireguard_go_pid(host, iface) is None


def _connected(pair: LivePair, name: str) -> dict[str, object]:
    connected = pair.result.connected(name)
    assert connected is not None, pair.result.stderr
    return connected


def test_direct_through_two_nats_with_wg_show(lab: tuple[Network, Path]) -> None:
    net, tmp = lab
    net.flush_conntrack()
    a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
    ifaces = (f"{net.lab.prefix}da", f"{net.lab.prefix}db")
    with running_pair(net, "wd", a, b, tmp, interfaces=ifaces, extra=WG_GO) as pair:
        assert pair.result.seconds is not None, pair.result.stderr
        up = pair.events["wd-a"][0]
        assert (up["event"], up["tunnel"], up["listen_port"]) == ("up", "wireguard-go", 51820)
        assert up["wireguard_port"] != 51820
        assert f"listening port: {up['wireguard_port']}" in _wg(a, "show", ifaces[0])
        for host, iface, other in ((a, ifaces[0], b), (b, ifaces[1], a)):
            assert _connected(pair, f"wd-{'a' if host is a else 'b'}")["path"] == "direct"
            # wireguard-go sends from the shared port: the peer sees the NAT's mapping of 51820.
            _key, _psk, endpoint, allowed, handshake, rx, tx, keepalive = _peer_dump(host, iface)
            assert endpoint == f"{other.nat.public_ip}:51820", endpoint
            assert 0 <= time.time() - int(handshake) < 60
            assert int(rx) > 0
            assert int(tx) > 0
            assert keepalive == "25"
            assert allowed == ("10.99.0.2/32" if host is a else "10.99.0.1/32")
            assert "punchtrio_steer" in _tables(host)
        status = subprocess.run(
            [*PUNCHTRIO, "status", "--json", ifaces[0]], capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0, status.stderr
        (peer,) = json.loads(status.stdout)["peers"]
        assert (peer["name"], peer["path"], peer["connected"]) == ("wd-b", "direct", True)
        assert peer["last_handshake"] is not None
        assert _ping(b, "10.99.0.1") == 3
    _check_gone(pair, (a, b), ifaces)


@pytest.mark.parametrize("kind", ["lan", "relay-udp", "relay-tcp"])
def test_every_path_kind(lab: tuple[Network, Path], kind: str) -> None:
    net, tmp = lab
    net.flush_conntrack()
    nats = net.requested
    a, b = {
        "lan": (nats[2].hosts[0], nats[2].hosts[1]),
        "relay-udp": (nats[3].hosts[0], nats[4].hosts[0]),
        "relay-tcp": (nats[5].hosts[0], nats[0].hosts[0]),
    }[kind]
    label = {"lan": "wl", "relay-udp": "wu", "relay-tcp": "wt"}[kind]
    ifaces = (f"{net.lab.prefix}{label}a", f"{net.lab.prefix}{label}b")
    with running_pair(net, label, a, b, tmp, interfaces=ifaces, extra=WG_GO) as pair:
        assert pair.result.seconds is not None, pair.result.stderr
        first = _connected(pair, f"{label}-a")
        _psk_key, _psk, endpoint, *_rest = _peer_dump(a, ifaces[0])
        if kind == "lan":
            assert first["path"] == "lan"
            assert endpoint.split(":")[0] in {str(ip) for ip in nats[2].lan_net}
        else:
            assert first["path"] == "relay"
            assert first["endpoint"] == f"203.0.113.1:{RELAY_PORT}"
            assert first["relay"] == ("hub/tcp" if kind == "relay-tcp" else "hub/udp")
            # A relayed path reaches wireguard-go through punchtrio's loopback proxy.
            assert endpoint.startswith("127.0.0.1:"), endpoint
        assert _ping(b, "10.99.0.1") == 3
    _check_gone(pair, (a, b), ifaces)


def test_wireguard_go_on_one_side_userspace_on_the_other(lab: tuple[Network, Path]) -> None:
    net, tmp = lab
    net.flush_conntrack()
    a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
    ifaces = (f"{net.lab.prefix}ma", f"{net.lab.prefix}mb")
    with running_pair(net, "wm", a, b, tmp, interfaces=ifaces, extra_a=WG_GO) as pair:
        assert pair.result.seconds is not None, pair.result.stderr
        assert _connected(pair, "wm-a")["path"] == "direct"
        assert _wireguard_go_pid(a, ifaces[0]) is not None
        assert _wireguard_go_pid(b, ifaces[1]) is None  # punchtrio's own WireGuard there
        assert _ping(b, "10.99.0.1") == 3
    _check_gone(pair, (a,), ifaces[:1])


def test_killed_wireguard_go_is_restarted_and_carries_again(lab: tuple[Network, Path]) -> None:
    net, tmp = lab
    net.flush_conntrack()
    a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
    ifaces = (f"{net.lab.prefix}ka", f"{net.lab.prefix}kb")
    with running_pair(net, "wk", a, b, tmp, interfaces=ifaces, extra=WG_GO) as pair:
        assert pair.result.seconds is not None, pair.result.stderr
        pid = _wireguard_go_pid(a, ifaces[0])
        assert pid is not None
        subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)
        deadline = time.monotonic() + RECOVERY_S
        while _ping(a, "10.99.0.2", count=1) != 1:
            assert time.monotonic() < deadline, f"no ping {RECOVERY_S} s after the kill"
        restarted = _wireguard_go_pid(a, ifaces[0])
        assert restarted not in (None, pid)
        assert "punchtrio_steer" in _tables(a)
    _check_gone(pair, (a, b), ifaces)
