"""The connector end to end in netsim: STUN, rendezvous, signal, punch, WireGuard, data.

The helpers here (``World``, ``serve_stun``, ``start_world``, ``ipv4``) are shared by the other
``test_connect_*`` modules.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
import trio

from punchtrio import PrivateKey, netsim
from punchtrio.connect import (
    STAGES,
    CandidatesGathered,
    ConnectError,
    Connector,
    HandshakeCompleted,
    MemoryInterface,
    PathChosen,
    PeerConnected,
    PeerFailed,
    PeerFound,
    PeerState,
    PunchStarted,
    Registered,
    StageStarted,
    TunnelConfig,
    open_connector,
)
from punchtrio.netsim import NatBehavior
from punchtrio.rendezvous import MemoryHub
from tests.packets import ipv4

PRIMARY = ("203.0.113.10", 3478)
ALTERNATE = ("203.0.113.11", 3479)
WALL = 1.7e9
WAN = netsim.Link(latency=0.01)
KEYS = {
    "alice": PrivateKey(bytes(range(1, 33))),
    "bob": PrivateKey(bytes(range(101, 133))),
}
INNER = {"alice": "10.99.0.1", "bob": "10.99.0.2"}


def wall_clock() -> float:
    """Virtual Unix time: probe timestamps and TAI64N follow the mock clock."""
    return WALL + trio.current_time()


async def serve_stun(
    host: netsim.Host, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The STUN server on the server host's two addresses (:func:`punchtrio.netsim.serve_stun`)."""
    await netsim.serve_stun(host, PRIMARY, ALTERNATE, task_status=task_status)


@dataclass
class World:
    """A STUN server on the internet, a memory hub, and alice and bob behind their NATs."""

    net: netsim.Internet
    hub: MemoryHub
    hosts: dict[str, netsim.Host]
    stun: netsim.Host
    nats: list[netsim.NAT] = field(default_factory=list)


def build_world(
    a: NatBehavior,
    b: NatBehavior | None,
    *,
    seed: int = 1,
    link: netsim.Link = WAN,
    stun_link: netsim.Link | None = None,
) -> World:
    """Alice behind a NAT that behaves like ``a``; bob behind his own ``b``, or behind alice's NAT
    when ``b`` is None."""
    net = netsim.Internet(seed=seed)
    stun = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun", link=stun_link)
    nat_a = net.add_nat("198.51.100.1", behavior=a, link=link, name="nat-a")
    nats = [nat_a]
    if b is None:
        nat_b = nat_a
    else:
        nat_b = net.add_nat("192.0.2.1", behavior=b, link=link, name="nat-b")
        nats.append(nat_b)
    hosts = {"alice": nat_a.lan.add_host(name="alice"), "bob": nat_b.lan.add_host(name="bob")}
    return World(net, MemoryHub(), hosts, stun, nats)


def connector_for(
    world: World, name: str, interface: MemoryInterface, **options: object
) -> Connector:
    """A connector for ``name`` with the test settings (virtual wall clock, short timeouts)."""
    other = "bob" if name == "alice" else "alice"
    settings: dict[str, object] = {
        "peers": [other],
        "interface": interface,
        "stun_servers": [PRIMARY],
        "wall_clock": wall_clock,
        "wait_timeout": 30.0,
    }
    settings.update(options)
    key = KEYS[name]
    return Connector(
        name,
        key,
        world.hub.peer(name, key.public_key()),
        TunnelConfig(f"{INNER[name]}/24"),
        **settings,  # type: ignore[arg-type]
    )


async def start_world(
    nursery: trio.Nursery,
    world: World,
    connectors: dict[str, Connector],
    services: Sequence[tuple[netsim.Host, Callable[..., Awaitable[object]]]] = (),
) -> None:
    """Start the STUN server and ``services`` (each ``serve(task_status=...)`` on its host), then
    each connector on its own host (``world.hosts[name]``)."""
    await nursery.start(serve_stun, world.stun)
    for host, serve in services:
        with host.activate():
            await nursery.start(serve)
    for name, connector in connectors.items():
        with world.hosts[name].activate():
            await nursery.start(connector.run)


async def run_pair(
    world: World,
    times: dict[str, float] | None = None,
    *,
    services: Sequence[tuple[netsim.Host, Callable[..., Awaitable[object]]]] = (),
    settle: float = 0.0,
    states: dict[str, PeerState] | None = None,
    **options: object,
) -> dict[str, list[object]]:
    """Run both connectors until each reports PeerConnected or PeerFailed; ping alice -> bob when
    both connected. Returns each side's events (the ping's arrival as the string "ping"); the
    virtual time of each side's last event goes into ``times``. ``services`` start before the
    connectors (see :func:`start_world`); with ``settle``, both run that many more virtual seconds
    after connecting (path upgrades), and each side's final view of its peer goes into
    ``states``."""
    events: dict[str, list[object]] = {"alice": [], "bob": []}
    times = {} if times is None else times
    ifaces = {name: MemoryInterface(name) for name in events}
    connectors = {name: connector_for(world, name, ifaces[name], **options) for name in events}
    try:
        async with world.net, trio.open_nursery() as nursery:
            await start_world(nursery, world, connectors, services)

            async def collect(name: str) -> None:
                async for event in connectors[name].events:
                    events[name].append(event)
                    if isinstance(event, (PeerConnected, PeerFailed)):
                        times[name] = trio.current_time()
                        return

            async with trio.open_nursery() as inner:
                for name in events:
                    inner.start_soon(collect, name)
            if settle and all(isinstance(e[-1], PeerConnected) for e in events.values()):
                await trio.sleep(settle)
            if states is not None:
                for name, connector in connectors.items():
                    other = "bob" if name == "alice" else "alice"
                    states[name] = connector.peers[other]
            if all(isinstance(e[-1], PeerConnected) for e in events.values()):
                packet = ipv4(INNER["alice"], INNER["bob"], b"ping through the tunnel")
                await ifaces["alice"].send(packet)
                with trio.fail_after(10):
                    if await ifaces["bob"].receive() == packet:
                        events["bob"].append("ping")
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()
    return events


async def test_two_peers_behind_cone_nats_connect_and_carry_a_packet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cone = NatBehavior.port_restricted_cone()
    world = build_world(cone, cone)
    events = await run_pair(world)
    alice, bob = events["alice"], events["bob"]
    assert bob[-1] == "ping"
    connected = alice[-1]
    assert isinstance(connected, PeerConnected)
    assert (connected.peer, connected.path, connected.endpoint) == (
        "bob",
        "direct",
        "192.0.2.1:51820",
    )
    assert connected.elapsed_ms > 0
    # Every stage was announced, in order, and every fact reported once.
    stages = [e.stage for e in alice if isinstance(e, StageStarted)]
    assert stages == [s for s in STAGES if s != "established"]
    kinds = [type(e) for e in alice if not isinstance(e, StageStarted)]
    assert kinds == [
        CandidatesGathered,
        Registered,
        PeerFound,
        PunchStarted,
        PathChosen,
        HandshakeCompleted,
        PeerConnected,
    ]
    gathered = alice[1]
    assert isinstance(gathered, CandidatesGathered)
    assert gathered.mapping_varies is False
    assert [c.endpoint for c in gathered.candidates] == [
        ("10.0.0.2", 51820),
        ("198.51.100.1", 51820),
    ]
    # One mapping per NAT: STUN, probes and WireGuard shared the one socket.
    for nat in world.nats:
        assert [m.external.rsplit(":", 1)[1] for m in nat.mappings()] == ["51820"]


async def test_connect_returns_the_event_and_peer_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cone = NatBehavior.full_cone()
    world = build_world(cone, cone, seed=2)
    results: dict[str, PeerConnected] = {}
    with MemoryInterface() as ia, MemoryInterface() as ib:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)

            async def side(name: str, iface: MemoryInterface) -> None:
                other = "bob" if name == "alice" else "alice"
                with world.hosts[name].activate():
                    async with open_connector(
                        name,
                        KEYS[name],
                        world.hub.peer(name, KEYS[name].public_key()),
                        f"{INNER[name]}/24",
                        interface=iface,
                        stun_servers=[PRIMARY],
                        wall_clock=wall_clock,
                    ) as connector:
                        results[name] = await connector.connect(other)
                        state = connector.peers[other]
                        assert state.connected
                        assert state.public_key == KEYS[other].public_key()
                        assert connector.tunnel is not None

            async with trio.open_nursery() as both:
                both.start_soon(side, "alice", ia)
                both.start_soon(side, "bob", ib)
            nursery.cancel_scope.cancel()
    assert results["alice"].endpoint == "192.0.2.1:51820"
    assert results["bob"].endpoint == "198.51.100.1:51820"
    # Both left their scopes: nothing is registered any more.
    assert world.hub.records() == ()


async def test_a_peer_that_never_appears_fails_at_the_wait_stage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = build_world(NatBehavior.full_cone(), NatBehavior.full_cone(), seed=3)
    with MemoryInterface() as iface:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            with world.hosts["alice"].activate():
                async with open_connector(
                    "alice",
                    KEYS["alice"],
                    world.hub.peer("alice", KEYS["alice"].public_key()),
                    "10.99.0.1/24",
                    interface=iface,
                    stun_servers=[PRIMARY],
                    wait_timeout=20,
                ) as connector:
                    with pytest.raises(ConnectError) as caught:
                        await connector.connect("carol")
            nursery.cancel_scope.cancel()
    assert caught.value.stage == "wait"
    assert str(caught.value) == "wait: carol did not appear at the rendezvous within 20 s"


async def test_through_the_hub_app_with_the_stun_server_it_advertises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """HubClient against the real hub application (in process: netsim has no TCP); no
    ``stun_servers`` given, so the connector uses the one ``GET /v1/hub`` advertises."""
    import httpx

    from punchtrio.rendezvous import (
        HubClient,
        HubConfig,
        PeerNotFoundError,
        StunAddress,
        create_app,
    )

    app = create_app(
        HubConfig(
            key=PrivateKey(bytes(range(7, 39))),
            rate=0,
            stun=(StunAddress(ipaddress.ip_address(PRIMARY[0]), PRIMARY[1]),),
        )
    )

    def client(name: str) -> HubClient:
        return HubClient("http://hub.test", KEYS[name], name, transport=httpx.ASGITransport(app))

    world = build_world(NatBehavior.restricted_cone(), NatBehavior.symmetric(), seed=4)
    connected: dict[str, PeerConnected] = {}
    gathered: dict[str, CandidatesGathered] = {}
    with MemoryInterface() as ia, MemoryInterface() as ib:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)

            async def side(name: str, iface: MemoryInterface) -> None:
                other = "bob" if name == "alice" else "alice"
                async with client(name) as hub:
                    with world.hosts[name].activate():
                        async with open_connector(
                            name, KEYS[name], hub, f"{INNER[name]}/24", interface=iface
                        ) as connector:
                            connected[name] = await connector.connect(other)
                            async for event in connector.events:
                                if isinstance(event, CandidatesGathered):
                                    gathered[name] = event
                                    break

            async with trio.open_nursery() as both:
                both.start_soon(side, "alice", ia)
                both.start_soon(side, "bob", ib)
            async with client("alice") as check:
                with pytest.raises(PeerNotFoundError):
                    await check.lookup("bob")  # bob's connector unregistered as it ended
            nursery.cancel_scope.cancel()
    # One advertised server; its OTHER-ADDRESS gives the second destination to compare.
    assert gathered["alice"].mapping_varies is False
    assert gathered["bob"].mapping_varies is True
    assert ("198.51.100.1", 51820) in [c.endpoint for c in gathered["alice"].candidates]
    assert connected["alice"].path == "direct"
    assert connected["bob"].endpoint == "198.51.100.1:51820"


async def test_a_refused_registration_fails_every_peer_at_the_register_stage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = build_world(NatBehavior.full_cone(), NatBehavior.full_cone(), seed=5)
    await world.hub.peer("alice", KEYS["alice"].public_key()).register()
    impostor = PrivateKey(bytes(range(60, 92)))
    failed: list[PeerFailed] = []
    with MemoryInterface() as iface:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            with world.hosts["bob"].activate():
                async with open_connector(
                    "alice",
                    impostor,
                    world.hub.peer("alice", impostor.public_key()),
                    "10.99.0.9/24",
                    peers=["bob", "carol"],
                    interface=iface,
                    stun_servers=[PRIMARY],
                ) as connector:
                    with pytest.raises(ConnectError, match=r"^register: ") as caught:
                        await connector.connect("bob")
                    with pytest.raises(ValueError, match="peer name"):
                        await connector.connect("Not A Name")
                    async for event in connector.events:
                        if isinstance(event, PeerFailed):
                            failed.append(event)
                            if len(failed) == 2:
                                break
            nursery.cancel_scope.cancel()
    assert caught.value.reason == (
        "the rendezvous refused or could not be reached: name is registered to another key"
    )
    assert sorted((f.peer, f.stage) for f in failed) == [("bob", "register"), ("carol", "register")]
    # The rightful owner's record is untouched.
    assert [r.public_key for r in world.hub.records()] == [KEYS["alice"].public_key()]


async def test_after_a_nat_reboot_re_stun_re_registers_and_the_path_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from punchtrio.netsim import Mapping, PortAllocation

    random_ports = NatBehavior(
        mapping=Mapping.ENDPOINT_INDEPENDENT, port_allocation=PortAllocation.RANDOM
    )
    world = build_world(random_ports, NatBehavior.port_restricted_cone(), seed=9)
    nat_a = world.nats[0]
    events: dict[str, list[object]] = {"alice": [], "bob": []}
    with MemoryInterface() as ia, MemoryInterface() as ib:
        ifaces = {"alice": ia, "bob": ib}
        connectors = {
            name: connector_for(world, name, ifaces[name], restun_interval=20.0) for name in events
        }
        async with world.net, trio.open_nursery() as nursery:
            await start_world(nursery, world, connectors)

            async def collect(name: str) -> None:
                async for event in connectors[name].events:
                    events[name].append(event)

            for name in events:
                nursery.start_soon(collect, name)
            await connectors["alice"].connect("bob")
            await connectors["bob"].connect("alice")
            before = connectors["alice"].peers["bob"].endpoint
            old = [c.endpoint for c in connectors["alice"].candidates if c.type.value == "srflx"]
            nat_a.reset()  # alice's NAT reboots: her external port changes
            await trio.sleep(120)
            packet = ipv4(INNER["bob"], INNER["alice"], b"after the reboot")
            await ib.send(packet)
            with trio.fail_after(10):
                assert await ia.receive() == packet
            nursery.cancel_scope.cancel()
    new = [c.endpoint for c in connectors["alice"].candidates if c.type.value == "srflx"]
    assert new != old  # re-STUN saw the new mapping ...
    registered = [e for e in events["alice"] if isinstance(e, Registered)]
    assert len(registered) == 2  # ... and alice registered it
    assert before == "192.0.2.1:51820"
    lost = [e for e in events["bob"] if type(e).__name__ == "PathLost"]
    assert lost  # bob noticed the old path die
    final = connectors["bob"].peers["alice"]
    assert final.endpoint == f"{new[0][0]}:{new[0][1]}"  # and found alice at her new port


async def test_packets_cross_both_ways_across_the_first_rekey(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only one side initiates the first handshake, so both use one session, also once the
    initiator rekeys after 120 s (simultaneous initiations used to leave one direction dead)."""
    cone = NatBehavior.port_restricted_cone()
    world = build_world(cone, cone, seed=12)
    with MemoryInterface() as ia, MemoryInterface() as ib:
        ifaces = {"alice": ia, "bob": ib}
        connectors = {name: connector_for(world, name, ifaces[name]) for name in ifaces}
        async with world.net, trio.open_nursery() as nursery:
            await start_world(nursery, world, connectors)
            await connectors["alice"].connect("bob")
            await connectors["bob"].connect("alice")
            for delay in (1.0, 119.5, 0.6, 10.0):
                await trio.sleep(delay)
                for src, dst in (("bob", "alice"), ("alice", "bob")):
                    packet = ipv4(INNER[src], INNER[dst], f"{src} at {delay}".encode())
                    await ifaces[src].send(packet)
                    with trio.fail_after(5):
                        assert await ifaces[dst].receive() == packet
            nursery.cancel_scope.cancel()
    for connector in connectors.values():
        assert connector.core.device.counters["no_session"] == 0


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://[::1]/", "::1"),
        ("https://[2001:db8::1]:7777/v1", "2001:db8::1"),
        ("http://192.0.2.9:7777", "192.0.2.9"),
    ],
)
async def test_the_hub_host_for_advertised_stun_is_the_url_host(url: str, host: str) -> None:
    connector = Connector("alice", KEYS["alice"], url, TunnelConfig("10.99.0.1/24"))
    version = 6 if ":" in host else 4
    assert await connector._hub_hosts() == {version: host}


async def test_a_hub_name_is_resolved_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, int]] = []

    def resolve(name: str, *args: object) -> list[tuple[object, ...]]:
        asked.append((name, threading.get_ident()))
        if name == "gone.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        v6 = (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("2001:db8::9", 0, 0, 0))
        return [v6, (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.9", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    hub = Connector(
        "alice", KEYS["alice"], "http://Hub.Example:7777/", TunnelConfig("10.99.0.1/24")
    )
    assert await hub._hub_hosts() == {4: "192.0.2.9", 6: "2001:db8::9"}
    gone = Connector("alice", KEYS["alice"], "http://gone.example/", TunnelConfig("10.99.0.1/24"))
    assert await gone._hub_hosts() == {}  # unresolvable: no STUN server from the hub, no error
    assert [name for name, _ in asked] == ["hub.example", "gone.example"]
    assert all(thread != threading.get_ident() for _, thread in asked)
