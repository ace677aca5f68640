"""Topologies: NAT behind NAT, routers without translation, the trace hook and counters."""

from __future__ import annotations

import trio

from punchtrio import netsim
from punchtrio.netsim import Filtering, NatBehavior, Verdict


async def test_nat_behind_nat_translates_twice(autojump_clock: trio.testing.MockClock) -> None:
    trace: list[netsim.TraceRecord] = []
    net = netsim.Internet(trace=trace.append)
    server = net.add_host("203.0.113.10", name="server")
    carrier = net.add_nat("198.51.100.1", name="cgnat", lan="100.64.0.0/24")
    home = carrier.lan.add_nat(
        "100.64.0.7", name="home", lan="192.168.1.0/24", behavior=NatBehavior.full_cone()
    )
    laptop = home.lan.add_host(name="laptop")
    neighbour = carrier.lan.add_host("100.64.0.8", name="neighbour")
    async with net:
        srv = server.udp_socket()
        await srv.bind(("", 3478))
        sock = laptop.udp_socket()
        await sock.bind(("", 5000))
        await sock.sendto(b"out", ("203.0.113.10", 3478))
        _, seen = await srv.recvfrom(10)
        assert seen == ("198.51.100.1", 5000)
        await srv.sendto(b"back", seen)
        assert await sock.recvfrom(10) == (b"back", ("203.0.113.10", 3478))

        [inner] = home.mappings()
        [outer] = carrier.mappings()
        assert (inner.internal, inner.external) == ("192.168.1.2:5000", "100.64.0.7:5000")
        assert (outer.internal, outer.external) == ("100.64.0.7:5000", "198.51.100.1:5000")

        # A host on the carrier's LAN reaches the laptop through the full-cone home NAT.
        n = neighbour.udp_socket()
        await n.sendto(b"hi from the carrier lan", ("100.64.0.7", 5000))
        assert await sock.recvfrom(30) == (b"hi from the carrier lan", ("100.64.0.8", 49152))

    path = [(r.where, r.verdict) for r in trace[:5]]
    assert path == [
        ("laptop", Verdict.SENT),
        ("home", Verdict.NAT_OUT),
        ("cgnat", Verdict.NAT_OUT),
        ("server", Verdict.DELIVERED),
        ("server", Verdict.SENT),
    ]
    assert trace[1].detail == "192.168.1.2:5000 as 100.64.0.7:5000"
    assert all(r.size in (3, 4, 23) for r in trace)


async def test_router_forwards_public_addresses_without_translation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet()
    client = net.add_host("192.0.2.1")
    router = net.add_router("198.51.100.254", lan="203.0.113.0/24", name="campus")
    lab = router.lan.add_host("203.0.113.20")
    async with net:
        inside = lab.udp_socket()
        await inside.bind(("", 80))
        outside = client.udp_socket()
        await outside.sendto(b"direct", ("203.0.113.20", 80))
        _, seen = await inside.recvfrom(10)
        assert seen == ("192.0.2.1", 49152)
        await inside.sendto(b"reply", seen)
        assert await outside.recv(10) == b"reply"
        await outside.sendto(b"nobody", ("203.0.113.99", 80))
        await outside.sendto(b"nowhere", ("192.0.2.200", 80))
        await trio.sleep(1)
    # Forwarded: the datagram, the reply, and the one to 203.0.113.99, which the LAN then drops
    # because that address is inside its prefix but unassigned.
    assert router.counters[Verdict.FORWARDED] == 3
    assert router.counters[Verdict.NO_ROUTE] == 1
    assert client.counters[Verdict.NO_ROUTE] == 1  # nothing on the internet owns 192.0.2.200
    assert net.counters[Verdict.DELIVERED] == 2


async def test_counters_and_trace_agree(autojump_clock: trio.testing.MockClock) -> None:
    trace: list[netsim.TraceRecord] = []
    net = netsim.Internet(seed=5, trace=trace.append)
    server = net.add_host("203.0.113.10")
    nat = net.add_nat(
        "198.51.100.1",
        behavior=NatBehavior(filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT),
        link=netsim.Link(latency=0.01, loss=0.3, duplicate=0.3),
    )
    client = nat.lan.add_host()
    async with net:
        srv = server.udp_socket()
        await srv.bind(("", 1))
        sock = client.udp_socket()
        for _ in range(50):
            await sock.sendto(b"x", ("203.0.113.10", 1))
            await srv.sendto(b"y", ("198.51.100.1", 49152))
            await trio.sleep(0.1)
    from collections import Counter

    assert Counter(r.verdict for r in trace) == net.counters
    assert sum(node.counters.total() for node in net.nodes) + sum(
        1 for r in trace if "->" in r.where
    ) == len(trace)
    assert net.counters[Verdict.LOST] > 0
    assert net.counters[Verdict.DUPLICATED] > 0
    assert [r.time for r in trace] == sorted(r.time for r in trace)


async def test_nat_reboot_and_link_cut_mid_run(autojump_clock: trio.testing.MockClock) -> None:
    net = netsim.Internet()
    server = net.add_host("203.0.113.10")
    behavior = NatBehavior(
        port_allocation=netsim.PortAllocation.SEQUENTIAL, port_range=(30000, 30100)
    )
    nat = net.add_nat("198.51.100.1", behavior=behavior)
    client = nat.lan.add_host()
    async with net:
        srv = server.udp_socket()
        await srv.bind(("", 1))
        sock = client.udp_socket()
        await sock.sendto(b"a", ("203.0.113.10", 1))
        assert (await srv.recvfrom(1))[1] == ("198.51.100.1", 30000)
        await sock.sendto(b"b", ("203.0.113.10", 1))
        assert (await srv.recvfrom(1))[1] == ("198.51.100.1", 30000)
        nat.reset()
        assert nat.mappings() == []
        await srv.sendto(b"stale", ("198.51.100.1", 30000))
        await trio.sleep(1)
        assert nat.counters[Verdict.NO_MAPPING] == 1
        # After the reboot the next datagram opens a fresh mapping.
        await sock.sendto(b"c", ("203.0.113.10", 1))
        assert (await srv.recvfrom(1))[1] == ("198.51.100.1", 30000)

        nat.outside.link = netsim.Link(loss=1.0)
        await sock.sendto(b"d", ("203.0.113.10", 1))
        await trio.sleep(1)
        assert not srv.is_readable()
        assert net.counters[Verdict.LOST] == 1
        nat.outside.link = netsim.Link()
        client.interface.link = netsim.Link(latency=0.25)
        start = trio.current_time()
        await sock.sendto(b"e", ("203.0.113.10", 1))
        assert await srv.recv(1) == b"e"
        assert trio.current_time() - start == 0.25


async def test_current_host_follows_activate(autojump_clock: trio.testing.MockClock) -> None:
    net = netsim.Internet()
    alice = net.add_host("192.0.2.1")
    assert netsim.current_host() is None
    seen: list[netsim.Host | None] = []

    async def task() -> None:
        seen.append(netsim.current_host())

    async with net, trio.open_nursery() as nursery:
        with alice.activate():
            assert netsim.current_host() is alice
            nursery.start_soon(task)
        assert netsim.current_host() is None
    assert seen == [alice]
