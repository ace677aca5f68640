"""A classic UDP hole punch inside netsim: the simulator as the later puncher work will use it."""

from __future__ import annotations

import pytest
import trio

from punchtrio import netsim
from punchtrio.netsim import NatBehavior

RENDEZVOUS = ("203.0.113.10", 3478)


async def rendezvous(sock: netsim.UDPSocket) -> None:
    """Pair the first two clients: tell each the other's address as the server saw it."""
    seen: dict[str, tuple[str, int]] = {}
    while True:
        data, src = await sock.recvfrom(100)
        seen[data.decode()] = src
        if len(seen) == 2:
            a_addr, b_addr = seen.values()
            await sock.sendto(f"{b_addr[0]}:{b_addr[1]}".encode(), a_addr)
            await sock.sendto(f"{a_addr[0]}:{a_addr[1]}".encode(), b_addr)


async def peer(host: netsim.Host, name: str, result: dict[str, tuple[str, int]]) -> None:
    """Register, learn the peer's mapped address, punch until a packet from the peer arrives.

    Like real punchers, answer the address a punch actually came from (peer-reflexive).
    """
    sock = host.udp_socket()
    await sock.bind(("", 5000))
    await sock.sendto(name.encode(), RENDEZVOUS)
    text, _ = await sock.recvfrom(100)
    ip, port = text.decode().rsplit(":", 1)
    target: tuple[str, int] = (ip, int(port))

    async def punch() -> None:
        for _ in range(20):
            await sock.sendto(f"punch from {name}".encode(), target)
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(punch)
        with trio.move_on_after(2):
            while True:
                data, src = await sock.recvfrom(100)
                if data.startswith(b"punch from ") and name not in result:
                    result[name] = src
                    target = src
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("left", "right", "works"),
    [
        (NatBehavior.port_restricted_cone(), NatBehavior.port_restricted_cone(), True),
        (NatBehavior.full_cone(), NatBehavior.symmetric(), True),
        (NatBehavior.port_restricted_cone(), NatBehavior.symmetric(), False),
        (NatBehavior.symmetric(), NatBehavior.symmetric(), False),
    ],
)
async def test_two_peers_punch_through_their_nats(
    autojump_clock: trio.testing.MockClock, left: NatBehavior, right: NatBehavior, works: bool
) -> None:
    net = netsim.Internet(seed=11)
    server = net.add_host(RENDEZVOUS[0], name="rendezvous")
    wan = netsim.Link(latency=0.020, jitter=0.005)
    nat_a = net.add_nat("198.51.100.1", behavior=left, link=wan, name="nat-a")
    nat_b = net.add_nat("192.0.2.1", behavior=right, link=wan, name="nat-b")
    alice = nat_a.lan.add_host(name="alice")
    bob = nat_b.lan.add_host(name="bob")
    result: dict[str, tuple[str, int]] = {}
    async with net, trio.open_nursery() as nursery:
        srv = server.udp_socket()
        await srv.bind(RENDEZVOUS)
        nursery.start_soon(rendezvous, srv)
        async with trio.open_nursery() as peers:
            peers.start_soon(peer, alice, "alice", result)
            peers.start_soon(peer, bob, "bob", result)
        nursery.cancel_scope.cancel()
    if works:
        assert result["alice"][0] == "192.0.2.1"  # bob's NAT's public address, not the LAN one
        assert result["bob"][0] == "198.51.100.1"
        assert any(m.external.endswith(f":{result['bob'][1]}") for m in nat_a.mappings())
    else:
        assert result == {}
        assert (nat_a.counters + nat_b.counters)[netsim.Verdict.DROPPED_BY_FILTER] > 0
