"""`punchtrio status --json` and `punchtrio ping` against a real `punchtrio up --hub` pair.

Two peers behind two port-restricted cone NATs of the kernel lab connect through a real hub; each
`up` serves its control socket, and the commands read it from outside the namespaces (the socket
directory is shared by all of them, never the network). Two peers behind two symmetric NATs are
relayed, and both say why no direct path answered.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs.discovery import PUNCHTRIO
from labs.scenarios.punch_matrix import LivePair, running_pair, start_hub
from labs.topology import Host, build

from punchtrio import PrivateKey
from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

BINARIES = ("ip", "nft", "conntrack", "sysctl", "ping", "wg")
HANDSHAKE_WITHIN_S = 60
"""`wg show`'s latest handshake must be this recent (seconds; the pair connected moments ago)."""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PUNCHTRIO, *args], capture_output=True, text=True, check=False, timeout=30
    )


def _wg(host: Host, *args: str) -> str:
    """Run the real `wg` tool in ``host``'s namespace; its stdout (a failure is an assertion)."""
    done = subprocess.run(
        host.ns.exec("wg", *args), capture_output=True, text=True, check=False, timeout=10
    )
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def _check_wg_show(host: Host, iface: str, peer_public: str, endpoint: str) -> None:
    """`wg show IFACE` and `wg show IFACE dump` name the peer, the endpoint that `punchtrio status`
    shows for it, and a handshake at most :data:`HANDSHAKE_WITHIN_S` old."""
    shown = _wg(host, "show", iface)
    assert f"interface: {iface}" in shown, shown
    assert f"peer: {peer_public}" in shown, shown
    assert f"endpoint: {endpoint}" in shown, shown
    assert "latest handshake:" in shown, shown
    lines = [line.split("\t") for line in _wg(host, "show", iface, "dump").splitlines()]
    (peer,) = lines[1:]
    public, _psk, shown_endpoint, _allowed, handshake, rx, tx, _keepalive = peer
    assert (public, shown_endpoint) == (peer_public, endpoint), peer
    assert 0 <= time.time() - int(handshake) < HANDSHAKE_WITHIN_S, peer
    assert int(rx) > 0, peer
    assert int(tx) > 0, peer


@contextlib.contextmanager
def _running(
    nats: list[str], label: str, tag: str
) -> Iterator[tuple[LivePair, tuple[str, str], Path]]:
    """A lab of ``nats`` with a real hub, and ``up`` on the first host behind each NAT, named
    ``<label>-a``/``-b`` on the TUN devices ``<prefix><tag>a``/``b``; yields once a ping crossed
    (the pair, the two interface names, the work directory)."""
    require_root_and(*BINARIES)
    with tempfile.TemporaryDirectory(prefix="pt-status-") as tmp, build(nats) as net:
        start_hub(net, Path(tmp) / "hub.log")
        a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
        ifaces = (f"{net.lab.prefix}{tag}a", f"{net.lab.prefix}{tag}b")
        with running_pair(net, label, a, b, Path(tmp), interfaces=ifaces) as pair:
            assert pair.result.seconds is not None, pair.result.stderr
            yield pair, ifaces, Path(tmp)


def test_status_and_ping_read_a_running_up_pair() -> None:
    with _running(["port", "port"], "st", "t") as (pair, ifaces, tmp):
        shown = _cli("status", "--json", ifaces[0])
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert (status["interface"], status["name"]) == (ifaces[0], "st-a")
        assert status["address"] == "10.99.0.1/24"
        (peer,) = status["peers"]
        assert (peer["name"], peer["stage"], peer["connected"]) == ("st-b", "established", True)
        assert peer["path"] == "direct"
        assert peer["endpoint"].startswith("203.0.113.")
        assert peer["rtt_ms"] is not None
        assert peer["last_handshake"] is not None
        assert peer["rx_bytes"] > 0
        assert peer["tx_bytes"] > 0
        assert peer["tunnel_ip"] == "10.99.0.2"
        b_public = str(PrivateKey.from_file(tmp / "st-b.key").public_key())
        assert peer["public_key"] == b_public
        _check_wg_show(pair.a, ifaces[0], b_public, peer["endpoint"])
        text = _cli("status", ifaces[1])
        assert text.returncode == 0, text.stderr
        assert "st-a  direct 203.0.113." in text.stdout
        pinged = _cli("ping", "--count", "2", "--json", "st-b")
        assert pinged.returncode == 0, pinged.stderr
        results = [json.loads(line) for line in pinged.stdout.splitlines()]
        assert len(results) == 2
        for result in results:
            assert (result["peer"], result["address"], result["path"]) == (
                "st-b",
                "10.99.0.2",
                "direct",
            )
            assert result["endpoint"] == peer["endpoint"]
            assert result["rtt_ms"] > 0
    assert pair.result.returncodes == {"st-a": 0, "st-b": 0}
    gone = _cli("status", ifaces[0])
    assert gone.returncode == 1
    assert f"/run/punchtrio/{ifaces[0]}.ctl does not exist" in gone.stderr


BOTH_HARD = "both NATs map per destination so not even birthday probing reaches a direct path"
DIRECT_FAILED_WITHIN_S = 40.0
"""From starting both ``up`` to each side's ``direct_path_failed``: the first round of direct
probes fails about 8.5 s after the punch starts; the rest is two interpreters starting."""


def test_a_relayed_pair_says_why_no_direct_path_answered() -> None:
    """Two ``masquerade fully-random`` NATs: no punch gets through, the hub's relay carries the
    tunnel, and each side says once, in its events and in ``punchtrio status``, that both NATs
    map per destination."""
    with _running(["sym", "sym"], "rl", "r") as (pair, ifaces, _):
        left = DIRECT_FAILED_WITHIN_S - (time.monotonic() - pair.started)
        for name, other in zip(pair.names, reversed(pair.names), strict=True):
            assert pair.result.path(name) == "relay", pair.events[name]
            found = pair.wait_for(name, "direct_path_failed", max(left, 1.0))
            assert found is not None, f"{name}: {pair.events[name]}"
            event, _ = found
            assert (event["peer"], event["reason"]) == (other, BOTH_HARD), event
            assert event["retry_in"] == 2.0, event
        shown = _cli("status", "--json", ifaces[0])
        assert shown.returncode == 0, shown.stderr
        (peer,) = json.loads(shown.stdout)["peers"]
        assert (peer["path"], peer["relay"]) == ("relay", "hub/udp"), peer
        assert peer["direct_error"] == BOTH_HARD, peer
        text = _cli("status", ifaces[1])
        assert text.returncode == 0, text.stderr
        assert f"no direct path: {BOTH_HARD}" in text.stdout, text.stdout
        # Later rounds fail for the same reason: nothing more is said about it.
        time.sleep(12)
        for name in pair.names:
            said = [e for e in pair.events[name] if e["event"] == "direct_path_failed"]
            assert len(said) == 1, said
    assert pair.result.returncodes == {"rl-a": 0, "rl-b": 0}
