"""IPv6 end to end: the puncher's same-family pairs and family tie-break, the connector's socket
per family, STUN per family, and IPv6-only and dual-stack peers connecting in netsim."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from punchtrio import netsim
from punchtrio.connect import (
    CandidatesGathered,
    MemoryInterface,
    PeerConnected,
    PeerFailed,
    TunnelConfig,
)
from punchtrio.connect._relay_choice import relay_server
from punchtrio.connect._sockets import (
    SocketSet,
    addresses_by_family,
    open_sockets,
    reachable_families,
    stun_servers,
)
from punchtrio.punch import (
    Candidate,
    CandidateError,
    CandidateType,
    PunchError,
    PunchSettings,
    ReflexiveGatherer,
    check_candidate_address,
)
from punchtrio.tunnel import TunnelError
from tests.packets import ipv4

from .test_connect_basic import INNER, KEYS, WAN, connector_for
from .test_connect_basic import World as ConnectWorld
from .test_punch_puncher import PUB, PUBLIC, World

PUBLIC6 = {"a": ("2a01:4f8::a", 5000), "b": ("2a01:4f8::b", 5000)}


def start_dual(w: World) -> None:
    for name, other in (("a", "b"), ("b", "a")):
        cands = [
            Candidate(CandidateType.SRFLX, *PUBLIC[other]),
            Candidate(CandidateType.SRFLX, *PUBLIC6[other]),
        ]
        w.punchers[name].start(PUB[other], cands, 0.0)


def connect6(w: World) -> None:
    w.links[("a", PUBLIC6["b"])] = ("b", PUBLIC6["a"])
    w.links[("b", PUBLIC6["a"])] = ("a", PUBLIC6["b"])


def test_ipv6_replaces_ipv4_at_an_equal_round_trip() -> None:
    """IPv4 works first; IPv6 starts working later at the same RTT and wins the tie."""
    w = World()
    w.connect_direct()
    start_dual(w)
    w.run(3.0)
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC["b"]]
    connect6(w)
    w.run(20.0)
    assert w.chosen("a")[-1].endpoint == PUBLIC6["b"]
    path = w.punchers["a"].path(PUB["b"])
    assert path is not None
    assert path.endpoint == PUBLIC6["b"]


def test_ipv4_does_not_replace_ipv6_at_an_equal_round_trip() -> None:
    w = World()
    connect6(w)
    start_dual(w)
    w.run(3.0)
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC6["b"]]
    w.connect_direct()
    w.run(20.0)
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC6["b"]]


def test_pairs_are_same_family_only() -> None:
    """A puncher whose socket reaches IPv6 alone never probes the IPv4 candidate."""
    w = World()
    w.punchers["a"].families = frozenset({6})
    connect6(w)  # no IPv4 links: an IPv6-only host receives nothing over IPv4
    start_dual(w)
    w.run(3.0)
    assert w.pings_to("a", PUBLIC["b"]) == 0
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC6["b"]]


def test_a_negative_family_margin_is_refused() -> None:
    with pytest.raises(PunchError, match="family_margin"):
        PunchSettings(family_margin=-0.001)


@pytest.mark.parametrize(
    ("address", "reason"),
    [("fe80::1", "link-local"), ("::1", "loopback"), ("::ffff:192.0.2.1", "IPv4-mapped")],
)
def test_bad_ipv6_candidates_are_refused_with_a_reason(address: str, reason: str) -> None:
    import ipaddress

    with pytest.raises(CandidateError, match=reason):
        check_candidate_address(ipaddress.ip_address(address))


# -- STUN per family (sans-IO) -----------------------------------------------------------------

S4, S4_OTHER = ("203.0.113.10", 3478), ("203.0.113.11", 3479)
S6, S6_OTHER = ("2001:db8:5::10", 3478), ("2001:db8:5::11", 3479)


def _success(request: bytes, mapped: tuple[str, int], other: tuple[str, int] | None) -> bytes:
    from punchtrio.stun import OtherAddress, StunMessage, XorMappedAddress, encode_message

    def family(ip: str) -> int:
        return 2 if ":" in ip else 1

    tid = int.from_bytes(request[8:20], "big")
    attrs: list[Any] = [XorMappedAddress(family=family(mapped[0]), ip=mapped[0], port=mapped[1])]
    if other is not None:
        attrs.append(OtherAddress(family=family(other[0]), ip=other[0], port=other[1]))
    return encode_message(StunMessage(msg_type=0x0101, transaction_id=tid, attributes=attrs))


def test_stun_servers_of_each_family_follow_their_own_other_address() -> None:
    """One server per family: each is asked again at its OTHER-ADDRESS, and the mappings of
    different families are never compared (a v4 and a v6 mapping always differ)."""
    g = ReflexiveGatherer([S4, S6], 0.0)
    requests = {dst: data for data, dst in g.datagrams_to_send(0.0)}
    assert set(requests) == {S4, S6}
    assert g.receive_datagram(_success(requests[S4], ("198.51.100.1", 5000), S4_OTHER), S4, 0.1)
    assert g.receive_datagram(_success(requests[S6], ("2001:db8:a::2", 5000), S6_OTHER), S6, 0.1)
    again = {dst: data for data, dst in g.datagrams_to_send(0.1)}
    assert set(again) == {S4_OTHER, S6_OTHER}
    g.receive_datagram(_success(again[S4_OTHER], ("198.51.100.1", 6000), None), S4_OTHER, 0.2)
    g.receive_datagram(_success(again[S6_OTHER], ("2001:db8:a::2", 5000), None), S6_OTHER, 0.2)
    assert g.done
    result = g.result()
    assert result.mapping_varies is True  # IPv4's verdict: the NAT maps per destination
    assert [c.endpoint for c in result.candidates] == [
        ("198.51.100.1", 5000),
        ("2001:db8:a::2", 5000),
        ("198.51.100.1", 6000),
    ]


def test_ipv6_alone_gives_its_own_verdict_and_ignores_an_ipv4_other_address() -> None:
    g = ReflexiveGatherer([S6], 0.0)
    [(request, dst)] = g.datagrams_to_send(0.0)
    g.receive_datagram(_success(request, ("2001:db8:a::2", 5000), S4_OTHER), dst, 0.1)
    assert g.done  # an OTHER-ADDRESS of the other family is no second opinion on this one
    assert g.result().mapping_varies is None
    g = ReflexiveGatherer([S6], 0.0)
    [(request, dst)] = g.datagrams_to_send(0.0)
    g.receive_datagram(_success(request, ("2001:db8:a::2", 5000), S6_OTHER), dst, 0.1)
    [(second, other)] = g.datagrams_to_send(0.1)
    assert other == S6_OTHER
    g.receive_datagram(_success(second, ("2001:db8:a::2", 5000), None), other, 0.2)
    assert g.result().mapping_varies is False


def test_the_hubs_stun_entries_resolve_per_family() -> None:
    hosts = {4: "192.0.2.9", 6: "2001:db8::9"}
    ip = ipaddress.ip_address
    entries = [(None, 3478, 4), (None, 3478, 6), (ip("203.0.113.5"), 3479, None)]
    assert stun_servers(entries, hosts) == [
        ("192.0.2.9", 3478),
        ("2001:db8::9", 3478),
        ("203.0.113.5", 3479),
    ]
    # An IPv6-only hub name: the IPv4 entry has no host; an untagged entry takes IPv6.
    assert stun_servers([(None, 3478, 4), (None, 3478, 6)], {6: "2001:db8::9"}) == [
        ("2001:db8::9", 3478)
    ]
    assert stun_servers([(None, 3478, None)], hosts) == [("192.0.2.9", 3478)]
    assert stun_servers([(None, 3478, None)], {6: "2001:db8::9"}) == [("2001:db8::9", 3478)]
    assert stun_servers([(None, 3478, None)], {}) == []


def test_addresses_by_family_of_literals_and_unresolvable_names() -> None:
    assert addresses_by_family("2001:db8::1") == {6: "2001:db8::1"}
    assert addresses_by_family("192.0.2.1") == {4: "192.0.2.1"}
    assert addresses_by_family("x" * 300 + ".invalid") == {}


def test_reachable_families_leave_out_a_family_without_an_address() -> None:
    ip = ipaddress.ip_address
    assert reachable_families((4, 6), [ip("2001:db8::2")]) == (6,)
    assert reachable_families((4, 6), [ip("10.0.0.2"), ip("fd00::2")]) == (4, 6)
    assert reachable_families((4,), [ip("10.0.0.2"), ip("fd00::2")]) == (4,)
    assert reachable_families((4, 6), []) == (4, 6)  # addresses unknown: every socket's family
    assert reachable_families((6,), [ip("10.0.0.2")]) == (6,)  # never none at all


# -- the socket per family ---------------------------------------------------------------------


class _Refusing:
    """A socket factory that refuses some families (``errno``), else makes real sockets."""

    def __init__(self, refused: dict[int, int], bind_refused: dict[int, int] | None = None):
        self.refused = refused
        self.bind_refused = bind_refused or {}
        self.made: list[Any] = []

    def __call__(self, family: int, type: int) -> Any:
        if family in self.refused:
            raise OSError(self.refused[family], "refused")
        sock = socket.socket(family, type)
        self.made.append(sock)
        if family in self.bind_refused:
            code = self.bind_refused[family]

            def bind(address: object) -> None:
                raise OSError(code, "refused")

            return _Wrapped(sock, bind)
        return sock


class _Wrapped:
    def __init__(self, sock: socket.socket, bind: Callable[[object], None]) -> None:
        self._sock, self.bind, self.family = sock, bind, sock.family

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_one_socket_per_family_on_one_port() -> None:
    sockets = open_sockets(socket.socket, 0)
    try:
        assert sockets.families == (4, 6)
        v4, v6 = sockets.socket_for(4), sockets.socket_for(6)
        assert v4 is not None
        assert v6 is not None
        assert v4.getsockname()[1] == v6.getsockname()[1] == sockets.port
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sockets.real
        # Each family's datagram leaves on its own socket.
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer:
            peer.bind(("::1", 0))
            sockets.sendto(b"six", peer.getsockname()[:2])
            assert peer.recvfrom(16)[1][1] == sockets.port
    finally:
        sockets.close()


def test_a_host_without_ipv4_runs_on_ipv6_alone() -> None:
    factory = _Refusing({socket.AF_INET: errno.EAFNOSUPPORT})
    sockets = open_sockets(factory, 0)
    try:
        assert sockets.families == (6,)
        with pytest.raises(OSError, match=r"no UDP socket for the family of 192\.0\.2\.1"):
            sockets.sendto(b"x", ("192.0.2.1", 5))
    finally:
        sockets.close()


def test_a_host_without_ipv6_runs_on_ipv4_alone() -> None:
    for factory in (
        _Refusing({socket.AF_INET6: errno.EAFNOSUPPORT}),
        _Refusing({}, {socket.AF_INET6: errno.EADDRNOTAVAIL}),  # IPv6 disabled
    ):
        sockets = open_sockets(factory, 0)
        assert sockets.families == (4,)
        sockets.close()
        assert all(s.fileno() == -1 for s in factory.made)  # the refused one is closed too


def test_no_family_or_a_port_taken_in_ipv6_is_one_line() -> None:
    with pytest.raises(TunnelError, match="neither IPv4 nor IPv6"):
        open_sockets(_Refusing({socket.AF_INET: errno.EAFNOSUPPORT, socket.AF_INET6: 97}), 0)
    factory = _Refusing({}, {socket.AF_INET6: errno.EADDRINUSE})
    with pytest.raises(TunnelError, match="UDP port 51820 is already in use"):
        open_sockets(factory, 51820)
    assert all(s.fileno() == -1 for s in factory.made)  # the IPv4 one is not left open
    with pytest.raises(ValueError, match="at least one socket"):
        SocketSet([])


# -- end to end in netsim ----------------------------------------------------------------------


def _world(alice: tuple[str, ...], bob: tuple[str, ...]) -> ConnectWorld:
    """alice and bob as public hosts with these addresses, and a STUN server of each family."""
    from punchtrio.rendezvous import MemoryHub

    net = netsim.Internet(seed=3)
    stun = net.add_host(S4[0], S4_OTHER[0], S6[0], S6_OTHER[0], name="stun")
    hosts = {
        "alice": net.add_host(*alice, name="alice", link=WAN),
        "bob": net.add_host(*bob, name="bob", link=WAN),
    }
    return ConnectWorld(net, MemoryHub(), hosts, stun)


async def _run(
    world: ConnectWorld,
    *,
    alice: dict[str, object] | None = None,
    bob: dict[str, object] | None = None,
    stun: tuple[tuple[str, int], ...] = (S4, S6),
    services: tuple[tuple[netsim.Host, Callable[..., Any]], ...] = (),
) -> dict[str, list[object]]:
    """Both connectors (``alice``/``bob``: extra options of each) until each connects or fails,
    then a ping alice -> bob through the tunnel (its arrival is "ping" in bob's events).
    ``services`` (a host and its ``serve``) start first."""
    events: dict[str, list[object]] = {"alice": [], "bob": []}
    ifaces = {name: MemoryInterface(name) for name in events}
    per_side = {"alice": alice or {}, "bob": bob or {}}
    connectors = {
        name: connector_for(world, name, ifaces[name], stun_servers=list(stun), **per_side[name])
        for name in events
    }
    try:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(netsim.serve_stun, world.stun, S4, S4_OTHER)
            await nursery.start(netsim.serve_stun, world.stun, S6, S6_OTHER)
            for host, serve in services:
                with host.activate():
                    await nursery.start(serve)
            for name, connector in connectors.items():
                with world.hosts[name].activate():
                    await nursery.start(connector.run)

            async def collect(name: str) -> None:
                async for event in connectors[name].events:
                    events[name].append(event)
                    if isinstance(event, (PeerConnected, PeerFailed)):
                        return

            async with trio.open_nursery() as inner:
                for name in events:
                    inner.start_soon(collect, name)
            if all(isinstance(e[-1], PeerConnected) for e in events.values()):
                packet = ipv4(INNER["alice"], INNER["bob"], b"ping over IPv6")
                await ifaces["alice"].send(packet)
                with trio.fail_after(10):
                    if await ifaces["bob"].receive() == packet:
                        events["bob"].append("ping")
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()
    return events


def _connected(events: list[object]) -> PeerConnected:
    found = [e for e in events if isinstance(e, PeerConnected)]
    assert found, events[-1]
    return found[-1]


def _gathered(events: list[object]) -> CandidatesGathered:
    return next(e for e in events if isinstance(e, CandidatesGathered))


async def test_ipv6_only_peers_connect_over_ipv6(autojump_clock: trio.testing.MockClock) -> None:
    world = _world(("2001:db8:a::2",), ("2001:db8:b::2",))
    events = await _run(world)
    assert events["bob"][-1] == "ping"
    connected = _connected(events["alice"])
    assert (connected.path, connected.endpoint) == ("direct", "[2001:db8:b::2]:51820")
    gathered = _gathered(events["alice"])
    assert gathered.stun_error is None
    assert {c.endpoint for c in gathered.candidates} == {("2001:db8:a::2", 51820)}
    # IPv4 was never tried: no address of that family, so no STUN timeouts to wait for.
    assert connected.elapsed_ms < 1000


async def test_an_ipv6_only_host_without_an_ipv4_stack_reaches_a_dual_stack_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = _world(("2001:db8:a::2",), ("192.0.2.7", "2001:db8:b::2"))
    made: list[int] = []

    def no_ipv4(family: int, type: int) -> Any:  # socket(AF_INET) fails on this host
        made.append(family)
        if family == socket.AF_INET:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return world.hosts["alice"].nonblocking_socket(family, type)

    events = await _run(world, alice={"socket_factory": no_ipv4})
    assert events["bob"][-1] == "ping"
    assert socket.AF_INET in made  # asked, refused, and left out without an error
    for name, endpoint in (("alice", "[2001:db8:b::2]:51820"), ("bob", "[2001:db8:a::2]:51820")):
        connected = _connected(events[name])
        assert (connected.path, connected.endpoint) == ("direct", endpoint), name
    # bob publishes both families; alice probes only what her socket reaches.
    assert {c.version for c in _gathered(events["bob"]).candidates} == {4, 6}


async def test_dual_stack_peers_prefer_ipv6_at_an_equal_round_trip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Both families work at the same RTT: IPv6 wins the family tie-break (family_margin)."""
    world = _world(("198.51.100.2", "2001:db8:a::2"), ("192.0.2.7", "2001:db8:b::2"))
    events = await _run(world)
    assert events["bob"][-1] == "ping"
    for name, endpoint in (("alice", "[2001:db8:b::2]:51820"), ("bob", "[2001:db8:a::2]:51820")):
        assert _connected(events[name]).endpoint == endpoint, name


async def test_stun_to_a_family_without_a_route_fails_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A host with unique-local IPv6 only: the kernel refuses to send to the IPv6 STUN server
    (ENETUNREACH), and gathering does not wait out its retransmissions."""
    from punchtrio.mux import Datagram
    from punchtrio.punch import gather_reflexive

    send, replies = trio.open_memory_channel[Datagram](10)
    sent: list[tuple[str, int]] = []

    class Sock:
        def sendto(self, data: bytes, address: tuple[str, int]) -> int:
            if ":" in address[0]:
                raise OSError(errno.ENETUNREACH, "Network is unreachable")
            sent.append(address)
            mapped = ("198.51.100.1", 5000)
            send.send_nowait(Datagram(_success(data, mapped, None), address, trio.current_time()))
            return len(data)

    result = await gather_reflexive(Sock(), replies, [S4, S4_OTHER, S6], rto=0.5, rc=3)
    assert trio.current_time() < 0.01  # not the 3.5 s of IPv6 retransmissions
    assert sent == [S4, S4_OTHER]
    assert result.failed == (S6,)
    assert result.mapping_varies is False
    assert [c.endpoint for c in result.candidates] == [("198.51.100.1", 5000)]


def test_an_unreachable_server_counts_as_failed_and_is_not_retried() -> None:
    g = ReflexiveGatherer([S4, S6], 0.0, rto=0.1, rc=3)
    assert {dst for _, dst in g.datagrams_to_send(0.0)} == {S4, S6}
    g.unreachable(S6)
    g.unreachable(("192.0.2.99", 1))  # not ours: nothing happens
    assert not g.done
    assert {dst for _, dst in g.datagrams_to_send(0.1)} <= {S4}
    for _ in range(20):  # S4 never answers: its retransmissions run out
        timer = g.get_timer()
        if timer is None:
            break
        g.datagrams_to_send(timer)
        g.handle_timer(timer)
    finished: bool = g.done  # (a fresh read of the property, not the narrowed one above)
    assert finished
    assert set(g.result().failed) == {S4, S6}


async def test_the_hub_host_is_taken_in_a_family_we_gather_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hub name with both families: the relay is reached at the address of the family its
    entry names (an untagged entry: IPv4)."""
    from punchtrio import Connector

    def resolve(name: str, *args: object) -> list[tuple[object, ...]]:
        v6 = (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("2001:db8::9", 0, 0, 0))
        return [v6, (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.9", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    connector = Connector(
        "alice", KEYS["alice"], "http://hub.example/", TunnelConfig("10.99.0.1/24")
    )
    hosts = await connector._hub_hosts()
    assert hosts == {4: "192.0.2.9", 6: "2001:db8::9"}
    assert relay_server([(None, 7778, None)], (4, 6), hosts) == (0, ("192.0.2.9", 7778))
    # An untagged relay entry is the hub host's IPv4 address: nothing for an IPv6-only peer.
    assert relay_server([(None, 7778, None)], (6,), hosts) is None
    assert relay_server([(None, 7778, 6)], (6,), hosts) == (0, ("2001:db8::9", 7778))


V4, V6 = ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("2001:db8::7")
HOSTS = {4: "192.0.2.9", 6: "2001:db8::9"}


@pytest.mark.parametrize(
    ("entries", "families", "hosts", "answered", "chosen"),
    [
        # A dual-stack relay: IPv4 first, unless STUN answered in IPv6 alone.
        ([(None, 1, 4), (None, 1, 6)], (4, 6), HOSTS, (), (0, ("192.0.2.9", 1))),
        ([(None, 1, 4), (None, 1, 6)], (4, 6), HOSTS, (6,), (1, ("2001:db8::9", 1))),
        ([(None, 1, 4), (None, 1, 6)], (4, 6), HOSTS, (4, 6), (0, ("192.0.2.9", 1))),
        # An IPv6-only peer takes the IPv6 entry wherever it is listed.
        ([(None, 1, 4), (None, 1, 6)], (6,), HOSTS, (), (1, ("2001:db8::9", 1))),
        ([(V4, 1, None), (V6, 1, None)], (6,), {}, (), (1, ("2001:db8::7", 1))),
        # An entry of a family the hub host has no address in is left out.
        ([(None, 1, 4), (None, 1, 6)], (4, 6), {4: "192.0.2.9"}, (6,), (0, ("192.0.2.9", 1))),
        # An untagged entry is the hub host's IPv4 address (IPv6 if it has no IPv4 one).
        ([(None, 1, None)], (6,), HOSTS, (), None),
        ([(None, 1, None)], (6,), {6: "2001:db8::9"}, (), (0, ("2001:db8::9", 1))),
        # Nothing reachable in our families.
        ([(V4, 1, None)], (6,), HOSTS, (), None),
        ([(None, 1, 6)], (4, 6), {4: "192.0.2.9"}, (), None),
        ([], (4, 6), HOSTS, (), None),
    ],
)
def test_the_relay_address_is_one_of_a_family_that_works(
    entries: list[tuple[object, int, int | None]],
    families: tuple[int, ...],
    hosts: dict[int, str],
    answered: tuple[int, ...],
    chosen: tuple[int, tuple[str, int]] | None,
) -> None:
    got = relay_server(entries, families, hosts, answered=answered)  # type: ignore[arg-type]
    assert got == chosen


def _sites(
    alice: dict[str, object], bob: dict[str, object]
) -> tuple[ConnectWorld, dict[str, netsim.NAT]]:
    """alice and bob each on their own site (``add_nat`` arguments: netsim's IPv6 sites), a
    dual-stack STUN server on the internet."""
    from punchtrio.rendezvous import MemoryHub

    net = netsim.Internet(seed=7)
    stun = net.add_host(S4[0], S4_OTHER[0], S6[0], S6_OTHER[0], name="stun")
    nats = {
        "alice": net.add_nat(link=WAN, name="site-alice", **alice),  # type: ignore[arg-type]
        "bob": net.add_nat(link=WAN, name="site-bob", **bob),  # type: ignore[arg-type]
    }
    hosts = {name: nat.lan.add_host(name=name) for name, nat in nats.items()}
    return ConnectWorld(net, MemoryHub(), hosts, stun, list(nats.values())), nats


async def test_dual_stack_sites_with_symmetric_ipv4_connect_direct_over_ipv6(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """netsim's dual-stack sites: IPv4 behind symmetric NATs (no direct IPv4 path, and no
    birthday punching: both map per destination), IPv6 behind stateful firewalls (the default
    ``Ipv6Firewall``, address-and-port-dependent): the simultaneous IPv6 pings open both."""
    from punchtrio.netsim import NatBehavior

    sym = NatBehavior.symmetric()
    world, nats = _sites(
        {"address": "198.51.100.1", "behavior": sym, "lan6": "2001:db8:1:1::/64"},
        {"address": "192.0.2.1", "behavior": sym, "lan6": "2001:db8:2:1::/64"},
    )
    events = await _run(world)
    assert events["bob"][-1] == "ping"
    for name, endpoint in (
        ("alice", "[2001:db8:2:1::2]:51820"),
        ("bob", "[2001:db8:1:1::2]:51820"),
    ):
        connected = _connected(events[name])
        assert (connected.path, connected.endpoint) == ("direct", endpoint), name
        assert _gathered(events[name]).mapping_varies is True  # the symmetric IPv4 NAT
    for nat in nats.values():
        assert nat.mappings(ip_version=6)  # the firewall's state for the tunnel


async def test_an_ipv6_only_site_reaches_a_dual_stack_site_over_ipv6(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from punchtrio.netsim import NatBehavior

    world, _ = _sites(
        {"lan": None, "address6": "2001:db8:3::1", "lan6": "2001:db8:3:1::/64"},
        {
            "address": "192.0.2.1",
            "behavior": NatBehavior.port_restricted_cone(),
            "lan6": "2001:db8:2:1::/64",
        },
    )
    events = await _run(world)
    assert events["bob"][-1] == "ping"
    assert _connected(events["alice"]).endpoint == "[2001:db8:2:1::2]:51820"
    assert _connected(events["bob"]).endpoint == "[2001:db8:3:1::2]:51820"
    gathered = _gathered(events["alice"])
    assert gathered.stun_error is None
    assert {c.version for c in gathered.candidates} == {6}  # no IPv4 tried, none published
    assert _connected(events["alice"]).elapsed_ms < 1000  # no IPv4 STUN timeout waited for


async def test_ipv6_only_sites_behind_firewalls_connect_over_ipv6(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world, nats = _sites(
        {"lan": None, "address6": "2001:db8:3::1", "lan6": "2001:db8:3:1::/64"},
        {"lan": None, "address6": "2001:db8:4::1", "lan6": "2001:db8:4:1::/64"},
    )
    events = await _run(world)
    assert events["bob"][-1] == "ping"
    assert _connected(events["alice"]).endpoint == "[2001:db8:4:1::2]:51820"
    assert _connected(events["bob"]).endpoint == "[2001:db8:3:1::2]:51820"
    assert all(nat.families == (6,) for nat in nats.values())


async def test_two_hosts_of_one_dual_stack_site_take_the_lan_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Both LAN prefixes count as shared: the path is "lan" (over IPv6, the near-tie's winner)."""
    from punchtrio.netsim import NatBehavior
    from punchtrio.rendezvous import MemoryHub

    net = netsim.Internet(seed=9)
    stun = net.add_host(S4[0], S4_OTHER[0], S6[0], S6_OTHER[0], name="stun")
    site = net.add_nat(
        "198.51.100.1", behavior=NatBehavior.symmetric(), lan6="2001:db8:1:1::/64", link=WAN
    )
    hosts = {name: site.lan.add_host(name=name) for name in ("alice", "bob")}
    events = await _run(ConnectWorld(net, MemoryHub(), hosts, stun, [site]))
    assert events["bob"][-1] == "ping"
    connected = _connected(events["alice"])
    assert (connected.path, connected.endpoint) == ("lan", "[2001:db8:1:1::3]:51820")


async def test_ipv6_only_peers_without_udp_relay_over_the_hub_relay_s_ipv6_tcp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two IPv6-only sites that drop all UDP: no STUN answer, no punch; the hub's relay on both
    families is reached at its IPv6 address over TCP (its IPv4 one is no use to them)."""
    from punchtrio import PrivateKey
    from punchtrio.connect import HubRelay
    from punchtrio.relay import HubRelayServer, HubRelayService
    from punchtrio.rendezvous import HubRelayAddress

    from .test_connect_basic import wall_clock

    world, _ = _sites(
        {"lan": None, "address6": "2001:db8:3::1", "lan6": "2001:db8:3:1::/64", "block_udp": True},
        {"lan": None, "address6": "2001:db8:4::1", "lan6": "2001:db8:4:1::/64", "block_udp": True},
    )
    v4, v6 = ("203.0.113.20", 7778), ("2001:db8:5::20", 7778)
    relay_host = world.net.add_host(v4[0], v6[0], name="relay")
    hub_key = PrivateKey(bytes(range(201, 233)))
    hub = world.hub

    def registered(key: bytes, network: str, wall: float) -> bool:
        return network == "" and any(r.public_key.raw == key for r in hub.records())

    server = HubRelayServer(hub_key, registered=registered, wall_clock=wall_clock)
    service = HubRelayService(server, v4, v6)
    relay = HubRelay(
        HubRelayAddress(ipaddress.ip_address(v4[0]), v4[1]),
        hub_key.public_key(),
        others=(HubRelayAddress(ipaddress.ip_address(v6[0]), v6[1]),),
    )
    events = await _run(
        world,
        alice={"hub_relay": relay},
        bob={"hub_relay": relay},
        services=((relay_host, service.serve),),
    )
    assert events["bob"][-1] == "ping"
    for name in ("alice", "bob"):
        connected = _connected(events[name])
        assert (connected.path, connected.relay) == ("relay", "hub/tcp"), name
        assert connected.endpoint == "[2001:db8:5::20]:7778", name
    assert server.counters["forwarded"] > 0
    assert service.counters["streams"] == 2
