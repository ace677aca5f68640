"""Raw fast paths on netsim: stdlib-shaped non-blocking sockets, drained without an await each."""

from __future__ import annotations

import os
import socket
from typing import Any

import trio

from punchtrio import netsim


def pair() -> tuple[netsim.Internet, netsim.Host, netsim.Host]:
    net = netsim.Internet()
    return net, net.add_host("192.0.2.1"), net.add_host("192.0.2.2")


async def test_wait_readable_then_drain(autojump_clock: trio.testing.MockClock) -> None:
    net, alice, bob = pair()
    async with net:
        raw = bob.nonblocking_socket()
        raw.bind(("", 51820))
        raw.setblocking(False)
        sender = alice.udp_socket()
        for i in range(300):
            sender.sendto_nowait(i.to_bytes(2, "big"), ("192.0.2.2", 51820))
        got: list[int] = []
        while len(got) < 300:
            await trio.lowlevel.wait_readable(raw)
            while True:
                try:
                    data, addr = raw.recvfrom(2048)
                except BlockingIOError:
                    break
                assert addr == ("192.0.2.1", 49152)
                got.append(int.from_bytes(data, "big"))
        assert got == list(range(300))
        # The readiness descriptor is quiet again once the queue is empty.
        with trio.move_on_after(1) as scope:
            await trio.lowlevel.wait_readable(raw)
        assert scope.cancelled_caught
        # Trio code and the raw view share one port, as a multiplexed socket does.
        await raw.trio_socket.sendto(b"via trio", ("192.0.2.1", 49152))
        assert await sender.recv(10) == b"via trio"


async def test_closing_wakes_a_raw_waiter_and_frees_the_pipe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, _, bob = pair()
    async with net, trio.open_nursery() as nursery:
        raw = bob.nonblocking_socket()
        raw.bind(("", 1))
        fd = raw.fileno()
        woke: list[type[BaseException]] = []

        async def wait() -> None:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError as exc:
                woke.append(type(exc))

        nursery.start_soon(wait)
        await trio.sleep(1)
        raw.close()
    assert woke == [trio.ClosedResourceError]
    try:
        os.fstat(fd)
    except OSError:
        pass
    else:
        raise AssertionError("the readiness pipe was not closed")


class _LoopbackDevice:
    """A stand-in for the WireGuard device: datagrams become packets and packets datagrams."""

    under_load = False

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> bytes | None:
        return b"decrypted " + data

    def process_handshakes(self, now: float, limit: int) -> bool:
        return False

    def send_packet(self, packet: bytes, now: float) -> tuple[bytes, tuple[str, int]] | None:
        return b"encrypted " + packet, self.peer

    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        return []

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> Any:
        return None

    def peer_stats(self) -> dict[bytes, Any]:
        return {}


async def test_the_userspace_tunnel_shell_runs_unchanged_in_netsim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from punchtrio.tunnel import UserspaceTunnel

    net, alice, bob = pair()
    tun_inside, tun_outside = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_inside.setblocking(False)
    app = trio.socket.from_stdlib_socket(tun_outside)
    try:
        async with net, trio.open_nursery() as nursery:
            raw = bob.nonblocking_socket()
            raw.bind(("", 51820))
            peer = alice.udp_socket()
            await peer.bind(("", 51820))
            tunnel = UserspaceTunnel(_LoopbackDevice(("192.0.2.1", 51820)), tun_inside, [raw])  # type: ignore[list-item]
            await nursery.start(tunnel.serve)
            await peer.sendto(b"datagram", ("192.0.2.2", 51820))
            assert await app.recv(100) == b"decrypted datagram"
            await app.send(b"packet")
            assert await peer.recvfrom(100) == (b"encrypted packet", ("192.0.2.2", 51820))
            assert tunnel.counters.datagrams_received == tunnel.counters.datagrams_sent == 1
            nursery.cancel_scope.cancel()
    finally:
        app.close()
        tun_inside.close()
