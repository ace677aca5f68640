"""Relay -> direct upgrade with real kernel NATs: a blocked direct path that opens later.

Two `punchtrio up --hub` behind two port-restricted cone NATs, whose direct path exists but is
blocked at first (the lab's internet drops UDP between the two NATs' public addresses, never to
the hub). They must connect through the hub's relay; once the block is lifted, both must move to
the direct path by themselves (`path_changed` relay -> direct) while the tunnel keeps carrying
pings, and SIGTERM must still end both cleanly.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs.scenarios.punch_matrix import RELAY_PORT, running_pair, start_hub
from labs.topology import Host, Network, build, udp_blocked_between

from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

UPGRADE_WITHIN_S = 30.0
"""How long after the block is lifted both sides must report the direct path."""
BLOCKED_FOR = {
    "while-probing": 5.0,
    "after-probes-failed": 15.0,
}
"""How long the tunnel runs over the relay before the direct path opens: while the first round of
direct probes (about 8.5 s) still runs, and after it failed, when only the puncher's upgrade retry
(2 s after the failure, then 4, 8 ... s) can find the path."""
BINARIES = ("ip", "nft", "conntrack", "sysctl", "ss", "ping")


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Network, Path]]:
    require_root_and(*BINARIES)
    with tempfile.TemporaryDirectory(prefix="pt-upgrade-") as tmp, build(["port", "port"]) as net:
        start_hub(net, Path(tmp) / "hub.log")
        yield net, Path(tmp)


def _tun_devices(host: Host) -> str:
    return host.ns.run("ip", "-o", "link", "show", "type", "tun")


@pytest.mark.parametrize("when", BLOCKED_FOR)
def test_relayed_pair_moves_to_direct_when_the_path_opens(
    lab: tuple[Network, Path], when: str
) -> None:
    require_root_and(*BINARIES)
    net, workdir = lab
    nat_a, nat_b = net.requested
    a, b = nat_a.hosts[0], nat_b.hosts[0]
    net.flush_conntrack()
    with contextlib.ExitStack() as block:
        block.enter_context(udp_blocked_between(net, nat_a, nat_b))
        with running_pair(net, f"up-{when}", a, b, workdir) as pair:
            result = pair.result
            assert result.seconds is not None, f"no ping over the relay: {result.stderr}"
            for name in pair.names:
                connected = result.connected(name)
                assert connected is not None, f"{name}: no peer_connected: {pair.events[name]}"
                assert connected["path"] == "relay", connected
                assert connected["relay"] == "hub/udp", connected
                assert connected["endpoint"] == f"203.0.113.1:{RELAY_PORT}", connected
            # The relay carries the tunnel for a while; nothing direct can work yet.
            assert pair.wait_for(pair.names[0], "path_changed", BLOCKED_FOR[when]) is None
            assert not [e for e in pair.events[pair.names[1]] if e["event"] == "path_changed"]
            assert pair.ping() == 3
            block.close()  # the direct path opens
            public = {pair.names[0]: nat_b.public_ip, pair.names[1]: nat_a.public_ip}
            lifted = time.monotonic()
            for name in pair.names:
                found = pair.wait_for(name, "path_changed", UPGRADE_WITHIN_S)
                assert found is not None, f"{name}: no path_changed: {pair.events[name]}"
                changed, arrived = found
                print(f"{when}: {name} moved to direct {arrived - lifted:.2f} s after the lift")
                assert changed["peer"] == pair.names[1 - pair.names.index(name)]
                assert (changed["from"], changed["to"]) == ("relay", "direct"), changed
                assert str(changed["endpoint"]).startswith(public[name] + ":"), changed
                assert "relay" not in changed, changed
                assert isinstance(changed["elapsed_ms"], float)
            # The tunnel keeps working over the direct path, with no gap worth a lost ping.
            assert pair.ping(count=5) == 5
    for name in pair.names:
        assert result.returncodes[name] == 0, result.stderr[name]
        assert pair.events[name][-1]["event"] == "down", pair.events[name][-3:]
    assert _tun_devices(a) == _tun_devices(b) == ""
