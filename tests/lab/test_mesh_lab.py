"""A mesh of three real ``punchtrio up --all-peers`` behind three port-restricted cone NATs of the
kernel lab, with a real ``punchtrio hub`` holding one private network.

No ``--peer`` is given: each ``up`` learns the other two from the hub's listing. All three pairs
ping through their tunnels (each ordered pair); then one side stops with SIGTERM (its record is
deleted at the hub) and the other two drop it: a ``peer_removed`` event, and their WireGuard
device no longer holds its key or its allowed IPs (``punchtrio status --json``), while the
remaining pair still pings.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs import discovery
from labs.scenarios.punch_matrix import HUB_URL, start_hub
from labs.scenarios.restart import Side, first_ping, ping_count
from labs.topology import Network, build

from punchtrio import PrivateKey
from punchtrio.connect import LEFT_REASON
from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

BINARIES = ("ip", "nft", "conntrack", "sysctl", "ss", "ping")
PING_WITHIN_S = 30.0
"""Each ordered pair's first ping must answer within this (all three start at once)."""
REMOVED_WITHIN_S = 10.0
"""After a side stops, the others must report it removed within this."""


class MeshSide(Side):
    """A :class:`Side` whose ``up`` runs ``--all-peers`` in the network of ``secret``."""

    secret: Path = Path()

    def start(self) -> None:
        argv = [
            *discovery.PUNCHTRIO, "up", "--hub", HUB_URL, "--name", self.name,
            "--key-file", str(self.key), "--address", self.address, "--all-peers",
            "--network-secret-file", str(self.secret), "--interface", self.interface, "--json",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = self.lab.lab.spawn(
            self.host.ns, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out = threading.Thread(target=self._collect, args=(self.proc,), daemon=True)
        err = threading.Thread(target=self._collect_err, args=(self.proc,), daemon=True)
        self._readers = [out, err]
        out.start()
        err.start()


def start_network_hub(net: Network, secret: Path, log: Path) -> subprocess.Popen[bytes]:
    """``punchtrio hub`` with one private network (``secret``), embedded STUN and its relay."""
    return start_hub(net, log, network_secret_file=secret)


def _status(interface: str) -> dict[str, object]:
    shown = subprocess.run(
        [*discovery.PUNCHTRIO, "status", "--json", interface],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    status: dict[str, object] = json.loads(shown.stdout)
    return status


@pytest.fixture
def mesh() -> Iterator[list[MeshSide]]:
    require_root_and(*BINARIES)
    with tempfile.TemporaryDirectory(prefix="pt-mesh-") as tmp, build(["port"] * 3) as net:
        workdir = Path(tmp)
        secret = workdir / "net.secret"
        secret.write_text("the mesh lab's network secret\n")
        secret.chmod(0o600)
        start_network_hub(net, secret, workdir / "hub.log")
        sides = []
        for index, nat in enumerate(net.requested):
            key = workdir / f"m{index}.key"
            PrivateKey.generate().write(key)
            side = MeshSide(
                nat.hosts[0],
                f"mesh-{index}",
                "",
                f"10.99.0.{index + 1}/24",
                key,
                f"{net.lab.prefix}mesh{index}",
                net,
            )
            side.secret = secret
            sides.append(side)
        for side in sides:
            side.start()
        try:
            yield sides
        finally:
            codes = {side.name: side.stop() for side in sides if side.running()}
            assert all(code == 0 for code in codes.values()), [s.stderr[-5:] for s in sides]


def test_three_all_peers_ups_ping_each_other_and_drop_the_one_that_leaves(
    mesh: list[MeshSide],
) -> None:
    for sender in mesh:
        for receiver in mesh:
            if sender is receiver:
                continue
            took = first_ping(sender.host, receiver.tunnel_ip, PING_WITHIN_S)
            assert took is not None, (
                f"{sender.name} -> {receiver.name}: no ping; {sender.stderr[-5:]} "
                f"{receiver.stderr[-5:]}"
            )
    for side in mesh:
        others = {s.name for s in mesh} - {side.name}
        for other in others:
            side.wait_for("peer_connected", 10, where=lambda e, o=other: e.get("peer") == o)
        connected = {str(e["peer"]) for e in side.named("peer_connected")}
        assert connected == others, " ".join(
            f"{e['event']}:{e.get('peer', '')}" for e in side.events
        )
    first, second, leaver = mesh
    leaver_key = str(PrivateKey.from_file(leaver.key).public_key())
    marks = {side.name: len(side.events) for side in (first, second)}
    assert leaver.stop() == 0, leaver.stderr[-5:]
    for side in (first, second):
        removed = side.wait_for(
            "peer_removed",
            REMOVED_WITHIN_S,
            since=marks[side.name],
            where=lambda e: e["peer"] == leaver.name,
        )
        assert removed is not None, side.events[marks[side.name] :]
        assert removed[0]["reason"] == LEFT_REASON
        status = _status(side.interface)
        peers = status["peers"]
        assert isinstance(peers, list)
        assert [p["name"] for p in peers] == [(second if side is first else first).name]
        assert leaver_key not in {p["public_key"] for p in peers}
    assert ping_count(first.host, second.tunnel_ip) > 0
    assert ping_count(second.host, first.tunnel_ip) > 0
    assert ping_count(first.host, leaver.tunnel_ip, count=2) == 0
