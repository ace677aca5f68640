"""RFC 4787 behaviour of netsim NATs, observed through ordinary sockets in virtual time."""

from __future__ import annotations

import pytest
import trio

from punchtrio import netsim
from punchtrio.netsim import Filtering, Mapping, NatBehavior, PortAllocation, Verdict

SERVER_A = "203.0.113.10"
SERVER_B = "203.0.113.11"


async def reflector(
    sock: netsim.UDPSocket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer every datagram with the source address it came from, as ``ip:port``."""
    task_status.started()
    while True:
        _, src = await sock.recvfrom(2048)
        await sock.sendto(f"{src[0]}:{src[1]}".encode(), src)


async def start_reflectors(
    nursery: trio.Nursery, server: netsim.Host, endpoints: list[tuple[str, int]]
) -> list[netsim.UDPSocket]:
    socks = []
    for endpoint in endpoints:
        sock = server.udp_socket()
        await sock.bind(endpoint)
        await nursery.start(reflector, sock)
        socks.append(sock)
    return socks


async def mapped_address(sock: netsim.UDPSocket, server: tuple[str, int]) -> str:
    """Send to a reflector and return the source endpoint it saw."""
    await sock.sendto(b"who am i", server)
    with trio.fail_after(5):
        data, src = await sock.recvfrom(2048)
    assert src == server
    return data.decode()


def build(behavior: NatBehavior) -> tuple[netsim.Internet, netsim.Host, netsim.NAT, netsim.Host]:
    net = netsim.Internet(seed=7)
    server = net.add_host(SERVER_A, SERVER_B, name="server")
    nat = net.add_nat("198.51.100.1", behavior=behavior, name="nat")
    client = nat.lan.add_host("10.0.0.2", name="client")
    return net, server, nat, client


@pytest.mark.parametrize(
    ("mapping", "same_address_other_port", "other_address"),
    [
        (Mapping.ENDPOINT_INDEPENDENT, True, True),
        (Mapping.ADDRESS_DEPENDENT, True, False),
        (Mapping.ADDRESS_AND_PORT_DEPENDENT, False, False),
    ],
)
async def test_mapping_behaviour_decides_when_the_external_port_is_reused(
    autojump_clock: trio.testing.MockClock,
    mapping: Mapping,
    same_address_other_port: bool,
    other_address: bool,
) -> None:
    net, server, nat, client = build(NatBehavior(mapping=mapping))
    async with net, trio.open_nursery() as nursery:
        await start_reflectors(
            nursery, server, [(SERVER_A, 3478), (SERVER_A, 3479), (SERVER_B, 3478)]
        )
        sock = client.udp_socket()
        await sock.bind(("", 5000))
        first = await mapped_address(sock, (SERVER_A, 3478))
        second = await mapped_address(sock, (SERVER_A, 3479))
        third = await mapped_address(sock, (SERVER_B, 3478))
        assert first == "198.51.100.1:5000"  # preserving allocation keeps the first port
        assert (second == first) is same_address_other_port
        assert (third == first) is other_address
        assert len({first, second, third}) == len(nat.mappings())
        expected_destination = {
            Mapping.ENDPOINT_INDEPENDENT: None,
            Mapping.ADDRESS_DEPENDENT: SERVER_A,
            Mapping.ADDRESS_AND_PORT_DEPENDENT: f"{SERVER_A}:3478",
        }[mapping]
        assert nat.mappings()[0].destination == expected_destination
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("filtering", "admitted"),
    [
        (Filtering.ENDPOINT_INDEPENDENT, {"a3478", "a3479", "b3478"}),
        (Filtering.ADDRESS_DEPENDENT, {"a3478", "a3479"}),
        (Filtering.ADDRESS_AND_PORT_DEPENDENT, {"a3478"}),
    ],
)
async def test_filtering_behaviour_decides_which_sources_get_in(
    autojump_clock: trio.testing.MockClock, filtering: Filtering, admitted: set[str]
) -> None:
    net, server, nat, client = build(NatBehavior(filtering=filtering))
    async with net:
        senders = {}
        for label, endpoint in [
            ("a3478", (SERVER_A, 3478)),
            ("a3479", (SERVER_A, 3479)),
            ("b3478", (SERVER_B, 3478)),
        ]:
            senders[label] = server.udp_socket()
            await senders[label].bind(endpoint)
        sock = client.udp_socket()
        await sock.bind(("", 5000))
        # Unsolicited traffic before any mapping exists never gets in.
        await senders["a3478"].sendto(b"early", ("198.51.100.1", 5000))
        await trio.sleep(1)
        assert nat.counters[Verdict.NO_MAPPING] == 1
        await sock.sendto(b"open", (SERVER_A, 3478))
        _, mapped = await senders["a3478"].recvfrom(100)
        for label, sender in senders.items():
            await sender.sendto(label.encode(), mapped)
        got = set()
        with trio.move_on_after(2):
            while True:
                data, _ = await sock.recvfrom(100)
                got.add(data.decode())
        assert got == admitted
        assert nat.counters[Verdict.DROPPED_BY_FILTER] == 3 - len(admitted)


@pytest.mark.parametrize("hairpinning", [True, False])
async def test_hairpinning_turns_traffic_to_the_external_address_back_inside(
    autojump_clock: trio.testing.MockClock, hairpinning: bool
) -> None:
    behavior = NatBehavior(filtering=Filtering.ENDPOINT_INDEPENDENT, hairpinning=hairpinning)
    net, server, nat, alice = build(behavior)
    bob = nat.lan.add_host("10.0.0.3", name="bob")
    async with net, trio.open_nursery() as nursery:
        await start_reflectors(nursery, server, [(SERVER_A, 3478)])
        a, b = alice.udp_socket(), bob.udp_socket()
        await a.bind(("", 5000))
        await b.bind(("", 6000))
        alice_public = await mapped_address(a, (SERVER_A, 3478))
        bob_public = await mapped_address(b, (SERVER_A, 3478))
        ip, port = alice_public.split(":")
        await b.sendto(b"hello neighbour", (ip, int(port)))
        received = None
        with trio.move_on_after(2):
            received = await a.recvfrom(100)
        if hairpinning:
            # RFC 4787 REQ-9: the hairpinned packet carries bob's external source.
            assert received == (b"hello neighbour", ("198.51.100.1", int(bob_public.split(":")[1])))
            assert nat.counters[Verdict.HAIRPINNED] == 1
        else:
            assert received is None
            assert nat.counters[Verdict.NO_HAIRPIN] == 1
        nursery.cancel_scope.cancel()


async def test_two_hosts_behind_one_nat_reach_each_other_on_the_lan(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, _, nat, alice = build(NatBehavior())
    bob = nat.lan.add_host(name="bob")
    assert bob.addresses[0].compressed == "10.0.0.3"
    async with net:
        a, b = alice.udp_socket(), bob.udp_socket()
        await a.bind(("", 5000))
        await b.sendto(b"lan", ("10.0.0.2", 5000))
        assert await a.recvfrom(10) == (b"lan", ("10.0.0.3", 49152))
        assert nat.mappings() == []
        assert nat.counters.total() == 0


@pytest.mark.parametrize("inbound_refresh", [False, True])
async def test_mapping_expires_after_its_lifetime_unless_refreshed(
    autojump_clock: trio.testing.MockClock, inbound_refresh: bool
) -> None:
    behavior = NatBehavior(
        filtering=Filtering.ENDPOINT_INDEPENDENT,
        mapping_timeout=30,
        inbound_refresh=inbound_refresh,
        port_allocation=PortAllocation.SEQUENTIAL,
        port_range=(20000, 20100),
    )
    net, server, nat, client = build(behavior)
    async with net:
        peer = server.udp_socket()
        await peer.bind((SERVER_A, 3478))
        sock = client.udp_socket()
        await sock.bind(("", 5000))
        await sock.sendto(b"open", (SERVER_A, 3478))
        _, mapped = await peer.recvfrom(100)
        assert mapped == ("198.51.100.1", 20000)
        [binding] = nat.mappings()
        assert binding.expires == binding.created + 30

        await trio.sleep(29)
        await sock.sendto(b"keepalive", (SERVER_A, 3478))  # outbound always refreshes
        await peer.recvfrom(100)
        await trio.sleep(29)
        assert len(nat.mappings()) == 1
        await peer.sendto(b"inbound", mapped)  # refreshes only with inbound_refresh
        assert await sock.recv(100) == b"inbound"
        await trio.sleep(2)
        assert len(nat.mappings()) == int(inbound_refresh)
        await trio.sleep(29)
        assert nat.mappings() == []

        await peer.sendto(b"too late", mapped)
        await trio.sleep(1)
        assert nat.counters[Verdict.NO_MAPPING] == 1
        await sock.sendto(b"again", (SERVER_A, 3478))
        _, remapped = await peer.recvfrom(100)
        assert remapped == ("198.51.100.1", 20001)  # a new mapping, a new port
        assert nat.table.expired == 1


async def test_preserving_allocation_falls_back_to_the_next_free_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, nat, alice = build(NatBehavior(port_allocation=PortAllocation.PRESERVING))
    bob = nat.lan.add_host(name="bob")
    async with net, trio.open_nursery() as nursery:
        await start_reflectors(nursery, server, [(SERVER_A, 3478)])
        a, b = alice.udp_socket(), bob.udp_socket()
        await a.bind(("", 7000))
        await b.bind(("", 7000))
        assert await mapped_address(a, (SERVER_A, 3478)) == "198.51.100.1:7000"
        assert await mapped_address(b, (SERVER_A, 3478)) == "198.51.100.1:7001"
        nursery.cancel_scope.cancel()


async def test_sequential_allocation_counts_up_from_the_range_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    behavior = NatBehavior(
        mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
        port_allocation=PortAllocation.SEQUENTIAL,
        port_range=(40000, 40002),
    )
    net, server, nat, client = build(behavior)
    async with net, trio.open_nursery() as nursery:
        targets = [(SERVER_A, 3478), (SERVER_A, 3479), (SERVER_B, 3478), (SERVER_B, 3479)]
        await start_reflectors(nursery, server, targets)
        sock = client.udp_socket()
        seen = [await mapped_address(sock, target) for target in targets[:3]]
        assert seen == [f"198.51.100.1:{port}" for port in (40000, 40001, 40002)]
        # The range is exhausted: the fourth destination gets no mapping at all.
        await sock.sendto(b"x", targets[3])
        await trio.sleep(1)
        assert nat.counters[Verdict.PORTS_EXHAUSTED] == 1
        nursery.cancel_scope.cancel()


async def test_random_allocation_is_seeded(autojump_clock: trio.testing.MockClock) -> None:
    async def ports(seed: int) -> list[int]:
        net = netsim.Internet(seed=seed)
        server = net.add_host(SERVER_A)
        nat = net.add_nat("198.51.100.1", behavior=NatBehavior.symmetric())
        client = nat.lan.add_host()
        async with net, trio.open_nursery() as nursery:
            targets = [(SERVER_A, port) for port in range(3000, 3010)]
            await start_reflectors(nursery, server, targets)
            sock = client.udp_socket()
            seen = [await mapped_address(sock, target) for target in targets]
            nursery.cancel_scope.cancel()
        return [int(text.split(":")[1]) for text in seen]

    first = await ports(1)
    assert all(1024 <= port <= 65535 for port in first)
    assert len(set(first)) == 10
    assert first != sorted(first)
    assert await ports(1) == first
    assert await ports(2) != first


def test_nat_table_is_usable_without_sockets() -> None:
    import ipaddress
    import random

    ext = ipaddress.ip_address("198.51.100.1")
    table = netsim.NatTable(ext, NatBehavior.restricted_cone(), random.Random(0))
    inside = (ipaddress.ip_address("10.0.0.2"), 5000)
    server = (ipaddress.ip_address("203.0.113.10"), 3478)
    other = (ipaddress.ip_address("203.0.113.10"), 9999)
    stranger = (ipaddress.ip_address("203.0.113.99"), 3478)
    assert table.outbound(inside, server, now=0.0) == (ext, 5000)
    assert table.inbound(other, 5000, now=1.0) == (inside, "")
    assert table.inbound(stranger, 5000, now=1.0) == (None, "dropped-by-filter")
    assert table.inbound(server, 5001, now=1.0) == (None, "no-mapping")
    assert table.inbound(server, 5000, now=120.0) == (None, "no-mapping")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mapping_timeout": 0},
        {"mapping_timeout": float("nan")},
        {"port_range": (2000, 1000)},
        {"port_range": (0, 10)},
    ],
)
def test_nat_behaviour_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(netsim.NetsimError):
        NatBehavior(**kwargs)  # type: ignore[arg-type]
