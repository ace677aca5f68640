"""A mesh in netsim: ten peers behind their own NATs, ``all_peers=True``, every ordered pair
carries an IP packet through its WireGuard tunnel; a peer that leaves is removed everywhere."""

from __future__ import annotations

import pytest
import trio

from punchtrio import PrivateKey, netsim
from punchtrio.connect import (
    ConnectError,
    Connector,
    MemoryInterface,
    PeerRemoved,
    TunnelConfig,
)
from punchtrio.netsim import NatBehavior
from punchtrio.rendezvous import MemoryHub
from tests.packets import ipv4

from .test_connect_basic import PRIMARY, WAN, serve_stun, wall_clock

COUNT = 10
NAMES = [f"peer{i:02d}" for i in range(COUNT)]
KEYS = {name: PrivateKey(bytes([i + 1]) * 32) for i, name in enumerate(NAMES)}
INNER = {name: f"10.99.0.{i + 1}" for i, name in enumerate(NAMES)}


async def until(condition: object, what: str, seconds: float = 120.0) -> None:
    """Wait (virtual time) until ``condition()`` holds; fail naming ``what``."""
    assert callable(condition)
    with trio.move_on_after(seconds) as scope:
        while not condition():  # noqa: ASYNC110 (state of ten connectors, virtual time)
            await trio.sleep(0.25)
    if scope.cancelled_caught:
        pytest.fail(f"{what} within {seconds:g} virtual seconds")


async def test_ten_peers_mesh_all_pairs_carry_packets_and_a_leaver_is_removed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet(seed=7)
    stun = net.add_host(PRIMARY[0], "203.0.113.11", name="stun")
    hub = MemoryHub()
    hosts = {}
    for i, name in enumerate(NAMES):
        # Alternate the two cone kinds: every pair has a direct path.
        behavior = NatBehavior.port_restricted_cone() if i % 2 else NatBehavior.full_cone()
        nat = net.add_nat(f"198.51.100.{i + 1}", behavior=behavior, link=WAN, name=f"nat{i}")
        hosts[name] = nat.lan.add_host(name=name)
    ifaces = {name: MemoryInterface(name) for name in NAMES}
    connectors = {
        name: Connector(
            name,
            KEYS[name],
            hub.peer(name, KEYS[name].public_key()),
            TunnelConfig(f"{INNER[name]}/24"),
            interface=ifaces[name],
            stun_servers=[PRIMARY],
            wall_clock=wall_clock,
            all_peers=True,
        )
        for name in NAMES
    }
    scopes = {name: trio.CancelScope() for name in NAMES}
    leaver = NAMES[3]
    try:
        async with net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, stun)

            async def run(name: str, *, task_status: trio.TaskStatus[None]) -> None:
                with scopes[name], hosts[name].activate():
                    await connectors[name].run(task_status=task_status)

            for name in NAMES:
                await nursery.start(run, name)

            def meshed() -> bool:
                return all(
                    sorted(c.peers) == sorted(set(NAMES) - {n})
                    and all(state.connected for state in c.peers.values())
                    for n, c in connectors.items()
                )

            await until(meshed, "every peer connected to the nine others")

            # Every ordered pair: a packet into one side's tunnel comes out of the other's.
            for sender in NAMES:
                for receiver in NAMES:
                    if sender == receiver:
                        continue
                    packet = ipv4(INNER[sender], INNER[receiver], f"{sender}>{receiver}".encode())
                    await ifaces[sender].send(packet)
                    with trio.fail_after(5):
                        assert await ifaces[receiver].receive() == packet

            # One leaves: its record is deleted, and every other peer forgets it (and its route).
            leaver_key = KEYS[leaver].public_key().raw
            scopes[leaver].cancel()
            others = {n: c for n, c in connectors.items() if n != leaver}

            def forgotten() -> bool:
                return all(
                    leaver not in c.peers and leaver_key not in c.core.device.peers()
                    for c in others.values()
                )

            await until(forgotten, f"every peer removed {leaver}", seconds=10.0)
            assert leaver not in {r.name for r in hub.records()}
            # The rest of the mesh still carries traffic.
            first, second = NAMES[0], NAMES[-1]
            packet = ipv4(INNER[first], INNER[second], b"after the leave")
            await ifaces[first].send(packet)
            with trio.fail_after(5):
                assert await ifaces[second].receive() == packet

            # It comes back (a new run, same key and name): everyone adds it afresh.
            connectors[leaver] = Connector(
                leaver,
                KEYS[leaver],
                hub.peer(leaver, KEYS[leaver].public_key()),
                TunnelConfig(f"{INNER[leaver]}/24"),
                interface=ifaces[leaver],
                stun_servers=[PRIMARY],
                wall_clock=wall_clock,
                all_peers=True,
            )
            scopes[leaver] = trio.CancelScope()
            await nursery.start(run, leaver)
            await until(meshed, f"every peer connected to {leaver} again", seconds=60.0)
            for other in (first, second):
                packet = ipv4(INNER[other], INNER[leaver], b"welcome back")
                await ifaces[other].send(packet)
                with trio.fail_after(5):
                    assert await ifaces[leaver].receive() == packet
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()


async def test_removal_is_reported_as_an_event(autojump_clock: trio.testing.MockClock) -> None:
    """``Connector.remove`` emits ``PeerRemoved`` and ``connect()`` waiting on it raises."""
    net = netsim.Internet(seed=3)
    hub = MemoryHub()
    nat = net.add_nat("198.51.100.1", behavior=NatBehavior.full_cone(), link=WAN, name="nat")
    host = nat.lan.add_host(name="alone")
    name = NAMES[0]
    with MemoryInterface() as iface:
        connector = Connector(
            name,
            KEYS[name],
            hub.peer(name, KEYS[name].public_key()),
            TunnelConfig(f"{INNER[name]}/24"),
            interface=iface,
            stun_servers=[],
            wall_clock=wall_clock,
            wait_timeout=1000.0,
        )
        async with net, trio.open_nursery() as nursery:
            with host.activate():
                await nursery.start(connector.run)

            async def remove_later() -> None:
                await trio.sleep(5.0)
                connector.remove("ghost", reason="no longer wanted")

            nursery.start_soon(remove_later)
            with pytest.raises(ConnectError, match="ghost was removed: no longer wanted"):
                await connector.connect("ghost")
            events = []
            while True:
                try:
                    events.append(connector.events.receive_nowait())
                except trio.WouldBlock:
                    break
            assert PeerRemoved("ghost", "no longer wanted") in events
            nursery.cancel_scope.cancel()


async def test_a_relayed_peer_that_leaves_loses_its_relayed_paths_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three peers behind symmetric NATs (only the hub's relay joins them): after one leaves,
    the others' relay links name no path to it, and a relay link update does not touch it."""
    from punchtrio.relay import HubRelayServer, HubRelayService

    from .test_connect_relay import HUB_KEY, HUB_RELAY, RELAY

    names = NAMES[:3]
    net = netsim.Internet(seed=11)
    stun = net.add_host(PRIMARY[0], "203.0.113.11", name="stun")
    relay_host = net.add_host(RELAY[0], name="relay")
    hub = MemoryHub()

    def registered(key: bytes, network: str, wall: float) -> bool:
        return any(r.public_key.raw == key for r in hub.records())

    service = HubRelayService(
        HubRelayServer(HUB_KEY, registered=registered, wall_clock=wall_clock), RELAY
    )
    hosts = {}
    for i, name in enumerate(names):
        nat = net.add_nat(
            f"198.51.100.{i + 1}", behavior=NatBehavior.symmetric(), link=WAN, name=f"nat{i}"
        )
        hosts[name] = nat.lan.add_host(name=name)
    ifaces = {name: MemoryInterface(name) for name in names}
    connectors = {
        name: Connector(
            name,
            KEYS[name],
            hub.peer(name, KEYS[name].public_key()),
            TunnelConfig(f"{INNER[name]}/24"),
            interface=ifaces[name],
            stun_servers=[PRIMARY],
            wall_clock=wall_clock,
            hub_relay=HUB_RELAY,
            all_peers=True,
        )
        for name in names
    }
    scopes = {name: trio.CancelScope() for name in names}
    leaver = names[2]
    leaver_key = KEYS[leaver].public_key().raw
    try:
        async with net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, stun)
            with relay_host.activate():
                await nursery.start(service.serve)

            async def run(name: str, *, task_status: trio.TaskStatus[None]) -> None:
                with scopes[name], hosts[name].activate():
                    await connectors[name].run(task_status=task_status)

            for name in names:
                await nursery.start(run, name)

            def relayed_mesh() -> bool:
                return all(
                    len(c.peers) == 2
                    and all(s.connected and s.path == "relay" for s in c.peers.values())
                    for c in connectors.values()
                )

            await until(relayed_mesh, "three peers connected through the relay")
            routes = {}
            for name in names[:2]:
                links = connectors[name]._links.links
                assert links, "no relay link"
                routes[name] = [link.virtual[leaver_key] for link in links]
                assert all(connectors[name]._muxed.routed(a) is not None for a in routes[name])
            scopes[leaver].cancel()

            def forgotten() -> bool:
                return all(leaver not in connectors[n].peers for n in names[:2])

            await until(forgotten, f"both peers removed {leaver}", seconds=10.0)
            for name in names[:2]:
                connectors[name]._links.update(trio.current_time())  # must not raise
                assert all(connectors[name]._muxed.routed(a) is None for a in routes[name])
            packet = ipv4(INNER[names[0]], INNER[names[1]], b"still relayed")
            await ifaces[names[0]].send(packet)
            with trio.fail_after(5):
                assert await ifaces[names[1]].receive() == packet
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()
