"""Every pair connects (netsim): the hub's relay carries what no punch can, direct wins where it can.

The world of ``test_connect_basic`` plus a hub relay host running the real relay service
(:class:`punchtrio.relay.HubRelayService` on the simulated UDP and TCP). Expectations come from
``punch_model`` (see ``test_connect_matrix``): where it predicts a direct path, both sides must end
on it; everywhere else, both must be relayed. A network that drops UDP reaches the relay over TCP.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
from collections.abc import Awaitable, Callable

import pytest
import trio

from punchtrio import PrivateKey, netsim
from punchtrio.connect import (
    DirectPathFailed,
    HubRelay,
    MemoryInterface,
    PathChanged,
    PeerConnected,
    PeerFailed,
    PeerState,
)
from punchtrio.netsim import Filtering, NatBehavior
from punchtrio.relay import HubRelayServer, HubRelayService
from punchtrio.rendezvous import HubRelayAddress, MemoryHub
from tests.packets import ipv4

from .test_connect_basic import (
    ALTERNATE,
    INNER,
    PRIMARY,
    WAN,
    World,
    connector_for,
    run_pair,
    start_world,
    wall_clock,
)
from .test_connect_matrix import KINDS, behavior, label, punch_model

RELAY = ("203.0.113.20", 7778)
HUB_KEY = PrivateKey(bytes(range(201, 233)))
HUB_RELAY = HubRelay(
    HubRelayAddress(ipaddress.ip_address(RELAY[0]), RELAY[1]), HUB_KEY.public_key()
)
SETTLE = 5.0
"""Virtual seconds both sides keep running after connecting, before their paths are read."""


def relay_world(
    a: NatBehavior, b: NatBehavior, *, seed: int, blocked: tuple[bool, bool] = (False, False)
) -> tuple[World, list[tuple[netsim.Host, Callable[..., Awaitable[object]]]], HubRelayServer]:
    """Alice and bob behind their own NATs (either may drop all UDP), a STUN server, and the
    hub's relay authorising the keys the memory hub holds records for."""
    net = netsim.Internet(seed=seed)
    stun = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    relay_host = net.add_host(RELAY[0], name="relay")
    nat_a = net.add_nat("198.51.100.1", behavior=a, link=WAN, name="nat-a", block_udp=blocked[0])
    nat_b = net.add_nat("192.0.2.1", behavior=b, link=WAN, name="nat-b", block_udp=blocked[1])
    hosts = {"alice": nat_a.lan.add_host(name="alice"), "bob": nat_b.lan.add_host(name="bob")}
    hub = MemoryHub()
    world = World(net, hub, hosts, stun, [nat_a, nat_b])

    def registered(key: bytes, network: str, wall: float) -> bool:
        return network == "" and any(r.public_key.raw == key for r in hub.records())

    server = HubRelayServer(HUB_KEY, registered=registered, wall_clock=wall_clock)
    service = HubRelayService(server, RELAY)
    return world, [(relay_host, service.serve)], server


async def run_relayed(
    a: NatBehavior,
    b: NatBehavior,
    *,
    seed: int,
    blocked: tuple[bool, bool] = (False, False),
) -> tuple[dict[str, list[object]], dict[str, PeerState], HubRelayServer]:
    world, services, server = relay_world(a, b, seed=seed, blocked=blocked)
    states: dict[str, PeerState] = {}
    events = await run_pair(
        world, services=services, settle=SETTLE, states=states, hub_relay=HUB_RELAY
    )
    return events, states, server


def check_connected(events: dict[str, list[object]]) -> None:
    assert events["bob"][-1] == "ping", events  # alice's packet crossed the tunnel
    for name, got in (("alice", events["alice"][-1]), ("bob", events["bob"][-2])):
        assert isinstance(got, PeerConnected), (name, got)


PAIRS = list(itertools.product(KINDS, repeat=2))


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{label(a)}-{label(b)}" for a, b in PAIRS])
async def test_every_pair_of_nats_connects(
    a: tuple[str, str], b: tuple[str, str], autojump_clock: trio.testing.MockClock
) -> None:
    events, states, server = await run_relayed(
        behavior(a), behavior(b), seed=KINDS.index(a) * 9 + KINDS.index(b)
    )
    check_connected(events)
    expected = "direct" if punch_model(a, b) else "relay"
    for name in ("alice", "bob"):
        assert states[name].path == expected, (name, states[name])
        if expected == "relay":
            assert states[name].relay == "hub/udp"
            assert states[name].endpoint == f"{RELAY[0]}:{RELAY[1]}"
    if expected == "relay":
        assert server.counters["forwarded"] > 0
        assert not any(server.dropped.values()), server.dropped


@pytest.mark.parametrize("blocked_side", ["alice", "bob"])
@pytest.mark.parametrize("kind", KINDS, ids=[label(k) for k in KINDS])
async def test_a_network_that_drops_udp_connects_over_the_relay_s_tcp(
    kind: tuple[str, str], blocked_side: str, autojump_clock: trio.testing.MockClock
) -> None:
    blocked = (blocked_side == "alice", blocked_side == "bob")
    events, states, _ = await run_relayed(
        behavior(kind), behavior(kind), seed=KINDS.index(kind), blocked=blocked
    )
    check_connected(events)
    other = "bob" if blocked_side == "alice" else "alice"
    assert states[blocked_side].path == states[other].path == "relay"
    assert states[blocked_side].relay == "hub/tcp"
    assert states[other].relay == "hub/udp"


async def test_without_a_relay_the_failure_says_so(autojump_clock: trio.testing.MockClock) -> None:
    world, _, _ = relay_world(behavior(("APD", "APD")), behavior(("APD", "APD")), seed=3)
    events = await run_pair(world)
    for name in ("alice", "bob"):
        failed = events[name][-1]
        assert isinstance(failed, PeerFailed)
        assert failed.stage == "punch"
        assert failed.reason.endswith(
            "no relay is available (the hub runs none; start it with --relay)"
        )


async def test_relayed_then_direct_when_the_firewall_opens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two NATs that map per destination (so birthday probing cannot help either), the one
    # filtering by port: no direct path at first. Then alice's NAT stops filtering (its mappings
    # stay): bob's upgrade retries get in, and both sides move to the direct path by themselves,
    # without a restart.
    world, services, _ = relay_world(behavior(("AD", "APD")), behavior(("AD", "AD")), seed=3)
    ifaces = {name: MemoryInterface(name) for name in ("alice", "bob")}
    connectors = {n: connector_for(world, n, ifaces[n], hub_relay=HUB_RELAY) for n in ifaces}
    changes: dict[str, list[tuple[float, PathChanged]]] = {"alice": [], "bob": []}
    direct_failed: dict[str, list[DirectPathFailed]] = {"alice": [], "bob": []}
    try:
        async with world.net, trio.open_nursery() as nursery:
            await start_world(nursery, world, connectors, services)

            async def collect(name: str) -> None:
                async for event in connectors[name].events:
                    if isinstance(event, PathChanged):
                        changes[name].append((trio.current_time(), event))
                    elif isinstance(event, DirectPathFailed):
                        direct_failed[name].append(event)

            for name in connectors:
                nursery.start_soon(collect, name)
            await trio.sleep(20)
            why = "both NATs map per destination so not even birthday probing reaches a direct path"
            for name, other in (("alice", "bob"), ("bob", "alice")):
                assert connectors[name].peers[other].path == "relay"
                # Each side says why it is relayed once; later rounds fail for the same reason.
                assert direct_failed[name] == [DirectPathFailed(other, why, 2.0)]
                assert connectors[name].peers[other].direct_error == why
            nat = world.nats[0]
            opened = trio.current_time()
            nat.behavior = nat.table.behavior = dataclasses.replace(
                nat.behavior, filtering=Filtering.ENDPOINT_INDEPENDENT
            )
            await trio.sleep(60)
            for name, other in (("alice", "bob"), ("bob", "alice")):
                assert connectors[name].peers[other].path == "direct"
                [(when, change)] = changes[name]
                assert (change.old, change.new, change.relay) == ("relay", "direct", None)
                assert connectors[name].peers[other].direct_error is None
                assert len(direct_failed[name]) == 1
                # The first upgrade retry after the opening finds it (retries back off from 2 s).
                assert when - opened < 20
            packet = ipv4(INNER["alice"], INNER["bob"], b"direct now")
            await ifaces["alice"].send(packet)
            with trio.fail_after(5):
                assert await ifaces["bob"].receive() == packet
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()
