"""TCP in the simulation is as deterministic as UDP: same seed and program, same trace."""

from __future__ import annotations

import trio
import trio.testing

from punchtrio import netsim
from punchtrio.netsim import NatBehavior


async def busy_streams(seed: int) -> list[tuple[object, ...]]:
    """Hosts behind NATs stream through lossy, jittery, duplicating links, all at once."""
    trace: list[netsim.TraceRecord] = []
    net = netsim.Internet(seed=seed, trace=trace.append)
    server = net.add_host("203.0.113.10", name="server")
    lossy = netsim.Link(latency=0.02, jitter=0.015, loss=0.08, duplicate=0.05)
    nats = [
        net.add_nat("198.51.100.1", behavior=NatBehavior.symmetric(), link=lossy),
        net.add_nat("198.51.100.2", behavior=NatBehavior.full_cone(), link=lossy, block_udp=True),
    ]
    clients = [nat.lan.add_host() for nat in nats for _ in range(3)]

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(3000):
                await stream.send_all(data)

    async def client(host: netsim.Host) -> None:
        with host.activate():
            udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            for round_ in range(2):
                await udp.sendto(f"{host.name} {round_}".encode(), ("203.0.113.10", 7))
                stream = await trio.open_tcp_stream("203.0.113.10", 443)
                message = host.name.encode() * 5000
                await stream.send_all(message)
                received = b""
                while len(received) < len(message):
                    received += await stream.receive_some()
                assert received == message
                await stream.aclose()

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        async with trio.open_nursery() as group:
            for host in clients:
                group.start_soon(client, host)
        await trio.sleep(100)  # TIME-WAIT and stray retransmissions end too
        nursery.cancel_scope.cancel()
    table = [(nat.name, m.internal, m.external) for nat in nats for m in nat.tcp_mappings()]
    return [
        (r.time, r.where, r.src, r.dst, r.size, r.verdict, r.detail, r.protocol, r.tcp)
        for r in trace
    ] + [("mappings", *table)]


def run(seed: int) -> list[tuple[object, ...]]:
    return trio.run(busy_streams, seed, clock=trio.testing.MockClock(autojump_threshold=0))


def test_same_seed_same_tcp_trace() -> None:
    first = run(5)
    verdicts = {record[5] for record in first[:-1]}
    assert {netsim.Verdict.LOST, netsim.Verdict.DUPLICATED, netsim.Verdict.BLOCKED} <= verdicts
    assert len(first) > 2000
    for _ in range(2):
        assert run(5) == first
    assert run(6) != first
