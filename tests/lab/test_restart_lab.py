"""Peers that restart, NATs that forget, a hub that dies, with real processes in the kernel lab.

Two `punchtrio up --hub` behind two port-restricted cone NATs and a real `punchtrio hub` (SQLite
state on disk, so it can be killed and started again). Side ``a`` has the lower public key, so it
starts the first WireGuard handshake; restarting ``a`` and restarting ``b`` cover both roles.
One lab and one hub serve the whole module.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labs.discovery import PUNCHTRIO
from labs.scenarios.restart import (
    Side,
    first_ping,
    forget_mappings,
    lookup,
    outage_around,
    pair,
    ping_count,
    start_state_hub,
)
from labs.topology import Network, build

from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

BINARIES = ("ip", "nft", "conntrack", "sysctl", "ss", "ping")
COLD_WITHIN_S = 20.0
"""The first ping of a fresh pair (both starting at once) must answer within this."""
RESTART_WITHIN_S = 30.0
"""After one side starts again, a ping through the tunnel must answer within this (Python's
start-up included, which takes seconds on a loaded machine)."""
UP_TO_PING_S = 2.0
"""...and within this of the restarted side's ``up`` event (its TUN is up): the signals and the
handshake, never WireGuard's rekey timers (5 s or more). The goal is 2 s from the restart; from
``up`` it takes 0.05-0.1 s (docs/benchmarks.md, restart), Python's start-up being the rest."""
OUTAGE_WITHIN_S = 5.0
"""The longest gap in ping replies allowed when a NAT forgets its mappings under traffic."""


@dataclass
class Lab:
    net: Network
    workdir: Path
    hub: list[subprocess.Popen[bytes]]
    hub_log: Path


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_root_and(*BINARIES)
    with tempfile.TemporaryDirectory(prefix="pt-restart-") as tmp, build(["port", "port"]) as net:
        workdir = Path(tmp)
        log = workdir / "hub.log"
        hub = start_state_hub(net, workdir / "hub-state", log)
        yield Lab(net, workdir, [hub], log)


@pytest.fixture
def sides(lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[Side, Side]]:
    """A connected pair (the first ping answered), stopped with SIGTERM at the end: both must
    exit 0 then."""
    lab.net.flush_conntrack()
    label = re.sub(r"[^a-z0-9]", "", request.node.name.lower())[-6:]
    a, b = (nat.hosts[0] for nat in lab.net.requested)
    alice, bob = pair(lab.net, label, a, b, lab.workdir)
    alice.start()
    bob.start()
    try:
        took = first_ping(alice.host, bob.tunnel_ip, COLD_WITHIN_S)
        assert took is not None, f"no first ping: {alice.stderr[-5:]} {bob.stderr[-5:]}"
        for side in (alice, bob):
            assert side.wait_for("peer_connected", 5.0) is not None, side.events
        yield alice, bob
    finally:
        codes = {side.name: side.stop() for side in (alice, bob) if side.proc is not None}
    assert codes == {alice.name: 0, bob.name: 0}, (alice.stderr[-5:], bob.stderr[-5:])


def _false_reasons(side: Side, since: int) -> list[dict[str, object]]:
    """Events since ``since`` that claim a failure (the peer's restart is not one of ours)."""
    return [e for e in side.events[since:] if e["event"] in ("peer_failed", "error")]


@pytest.mark.parametrize(
    ("restarted", "how"),
    [("a", signal.SIGTERM), ("a", signal.SIGKILL), ("b", signal.SIGTERM), ("b", signal.SIGKILL)],
    ids=["initiator-term", "initiator-kill", "responder-term", "responder-kill"],
)
def test_a_restarted_side_is_reached_again(
    sides: tuple[Side, Side], restarted: str, how: signal.Signals
) -> None:
    alice, bob = sides
    gone, stays = (alice, bob) if restarted == "a" else (bob, alice)
    mark = len(stays.events)
    code = gone.stop(how)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL), gone.stderr[-5:]
    if how == signal.SIGTERM:
        assert gone.events[-1]["event"] == "down", gone.events[-3:]
    time.sleep(1.0)  # the other side notices nothing yet, or that the record left
    gone_mark = len(gone.events)
    gone.start()
    took = first_ping(alice.host, bob.tunnel_ip, RESTART_WITHIN_S)
    assert took is not None, (
        f"no ping after the restart: {gone.events[gone_mark:]} {stays.events[mark:]}"
    )
    up = gone.wait_for("up", 0.0, since=gone_mark)
    since_up = None if up is None else gone.started + took - up[1]
    print(f"{restarted} {how.name}: first ping {took:.2f} s after the restart, {since_up} after up")
    assert since_up is not None
    assert since_up <= UP_TO_PING_S, (gone.events[gone_mark:], stays.events[mark:])
    assert stays.running(), stays.stderr[-5:]
    found = gone.wait_for("peer_connected", 5.0, since=gone_mark)
    assert found is not None, gone.events[gone_mark:]
    assert _false_reasons(stays, mark) == [], stays.events[mark:]
    assert _false_reasons(gone, gone_mark) == [], gone.events[gone_mark:]
    assert ping_count(alice.host, bob.tunnel_ip, 5) == 5


@pytest.mark.parametrize("which", ["initiator", "responder"])
def test_a_nat_that_forgets_its_mappings_under_traffic(
    lab: Lab, sides: tuple[Side, Side], which: str
) -> None:
    alice, bob = sides
    nat = alice.host.nat if which == "initiator" else bob.host.nat
    measured = outage_around(
        alice.host, bob.tunnel_ip, lambda: forget_mappings(nat, reboot=False), seconds=12
    )
    assert measured.replies_before, "no replies before the flush"
    assert measured.outage is not None, (
        f"the tunnel did not recover: {alice.events[-5:]} {bob.events[-5:]}"
    )
    gaps = measured.longest_gap
    print(
        f"conntrack -F on the {which}'s NAT: outage {measured.outage:.2f} s (longest gap {gaps:.2f} s)"
    )
    assert gaps <= OUTAGE_WITHIN_S
    assert alice.running()
    assert bob.running()


def test_a_killed_hub_leaves_tunnels_up_and_is_rejoined(lab: Lab, sides: tuple[Side, Side]) -> None:
    alice, bob = sides
    hub = lab.hub[-1]
    hub.kill()
    hub.wait()
    # The tunnel needs no hub: it keeps carrying pings while the hub is gone.
    assert ping_count(alice.host, bob.tunnel_ip, 10) == 10
    time.sleep(2.0)
    assert ping_count(alice.host, bob.tunnel_ip, 5) == 5
    assert alice.running()
    assert bob.running()
    assert _false_reasons(alice, 0) == _false_reasons(bob, 0) == []
    lab.hub.append(start_state_hub(lab.net, lab.workdir / "hub-state", lab.hub_log))
    # Same state directory: both records (and the names' keys) are there; both sides use the
    # hub again: each finds the other, and signals flow again, which a restart needs.
    for side, other in ((alice, bob), (bob, alice)):
        record = lookup(side.host, other.name, side.key)
        assert record is not None, f"{side.name} cannot look {other.name} up"
    mark = len(bob.events)
    assert alice.stop() == 0
    alice.start()
    took = first_ping(alice.host, bob.tunnel_ip, RESTART_WITHIN_S)
    print(f"restart after the hub came back: first ping {took} s")
    assert took is not None, f"no ping: {alice.events[-5:]} {bob.events[mark:]}"
    assert bob.running()
    assert _false_reasons(bob, mark) == [], bob.events[mark:]


DOWN_WITHIN_S = 35.0
"""A peer killed for good is reported down within this: the path's loss (4 to 9 s) plus
``PEER_DOWN_AFTER`` (20 s), and slack for a loaded machine."""


def test_a_killed_peer_is_reported_down_then_reached_when_it_returns(
    sides: tuple[Side, Side],
) -> None:
    alice, bob = sides
    mark = len(alice.events)
    killed = time.monotonic()
    assert bob.stop(signal.SIGKILL) == -signal.SIGKILL
    found = alice.wait_for("peer_failed", DOWN_WITHIN_S, since=mark)
    assert found is not None, f"never reported down: {alice.events[mark:]}"
    down, when = found
    print(f"kill -9 of the responder: reported down {when - killed:.1f} s later")
    assert (down["peer"], down["stage"]) == (bob.name, "established"), down
    assert "stopped answering" in str(down["reason"]), down
    assert down["retry_in"] is not None  # retried, and `up` goes on
    assert alice.running()
    shown = subprocess.run(
        [*PUNCHTRIO, "status", "--json", alice.interface],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    (peer,) = json.loads(shown.stdout)["peers"]
    assert peer["connected"] is False, peer
    # It comes back: the side that declared it down connects again by itself.
    again = len(alice.events)
    bob.start()
    took = first_ping(alice.host, bob.tunnel_ip, RESTART_WITHIN_S)
    print(f"back after being reported down: first ping {took} s after the start")
    assert took is not None, f"not reached again: {alice.events[again:]} {bob.events[-5:]}"
    assert alice.wait_for("peer_connected", 5.0, since=again) is not None
