"""The same seed and the same program give the same trace, whatever order Trio runs the tasks in."""

from __future__ import annotations

import trio
import trio.testing

from punchtrio import netsim
from punchtrio.netsim import Mapping, NatBehavior, PortAllocation


async def busy_internet(seed: int) -> list[tuple[object, ...]]:
    """Many hosts behind NATs sending at the same instants over lossy, jittery links."""
    trace: list[netsim.TraceRecord] = []
    net = netsim.Internet(seed=seed, trace=trace.append)
    server = net.add_host("203.0.113.10", "203.0.113.11", name="server")
    lossy = netsim.Link(latency=0.02, jitter=0.015, loss=0.1, duplicate=0.1)
    nats = [
        net.add_nat("198.51.100.1", behavior=NatBehavior.symmetric(), link=lossy),
        net.add_nat(
            "198.51.100.2",
            behavior=NatBehavior(
                mapping=Mapping.ADDRESS_DEPENDENT, port_allocation=PortAllocation.SEQUENTIAL
            ),
            link=lossy,
        ),
        net.add_nat("198.51.100.3", behavior=NatBehavior.full_cone(), link=lossy),
    ]
    clients = [nat.lan.add_host() for nat in nats for _ in range(3)]

    async def echo(address: str) -> None:
        sock = server.udp_socket()
        await sock.bind((address, 7))
        while True:
            data, src = await sock.recvfrom(100)
            await sock.sendto(data, src)

    async def client(host: netsim.Host) -> None:
        with host.activate():
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            for round_ in range(10):
                # Every client sends at the same instants: Trio's task order must not matter.
                for address in ("203.0.113.10", "203.0.113.11"):
                    await sock.sendto(f"{host.name} {round_}".encode(), (address, 7))
                with trio.move_on_after(0.2):
                    while True:
                        await sock.recvfrom(100)

    async with net, trio.open_nursery() as nursery:
        nursery.start_soon(echo, "203.0.113.10")
        nursery.start_soon(echo, "203.0.113.11")
        async with trio.open_nursery() as group:
            for host in clients:
                group.start_soon(client, host)
        nursery.cancel_scope.cancel()
    table = [(nat.name, m.internal, m.external) for nat in nats for m in nat.mappings()]
    return [(r.time, r.where, r.src, r.dst, r.size, r.verdict, r.detail) for r in trace] + [
        ("mappings", *table)
    ]


def run(seed: int) -> list[tuple[object, ...]]:
    return trio.run(busy_internet, seed, clock=trio.testing.MockClock(autojump_threshold=0))


def test_same_seed_same_trace() -> None:
    first = run(42)
    verdicts = {record[5] for record in first[:-1]}
    assert {netsim.Verdict.LOST, netsim.Verdict.DUPLICATED, netsim.Verdict.NAT_OUT} <= verdicts
    assert len(first) > 500
    for _ in range(4):
        assert run(42) == first
    assert run(43) != first
