"""The Trio shell's loops, with a stand-in device: real UDP sockets on loopback, a socketpair as TUN."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from punchtrio.tunnel import UserspaceTunnel

Address = tuple[str, int]


@dataclass(frozen=True)
class Delivered:
    """Stand-in event: one datagram became a packet."""

    size: int


class StandInDevice:
    """A toy device: 'encrypts' by prefixing 0x04, keeps one timer that sends a keepalive."""

    def __init__(self, peer: Address | None, keepalive_every: float | None = None) -> None:
        self.peer = peer
        self.under_load = False
        self.queued: list[tuple[bytes, Address]] = []
        self.events: list[object] = []
        self.timer_calls: list[float] = []
        self.keepalive_every = keepalive_every
        self.deadline: float | None = None
        self.rx = self.tx = 0

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bytes | None:
        if data[:1] != b"\x04":
            return None
        self.peer = addr
        self.rx += len(data)
        if len(data) > 1:
            self.events.append(Delivered(len(data) - 1))
            return data[1:]
        return None

    def process_handshakes(self, now: float, limit: int) -> bool:
        return False

    def send_packet(self, packet: bytes, now: float) -> tuple[bytes, Address] | None:
        if self.peer is None:
            return None
        self.tx += len(packet) + 1
        return b"\x04" + packet, self.peer

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self.queued = self.queued, []
        return out

    def get_timer(self) -> float | None:
        if self.deadline is None and self.keepalive_every is not None:
            self.deadline = trio.current_time() + self.keepalive_every
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.timer_calls.append(now)
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            if self.peer is not None:
                self.queued.append((b"\x04", self.peer))

    def next_event(self) -> object | None:
        return self.events.pop(0) if self.events else None

    def peer_stats(self) -> dict[bytes, Any]:
        return {b"peer": (self.peer, self.rx, self.tx)}


@dataclass
class FakeTun:
    """One end of a datagram socketpair stands in for the TUN fd; ``outside`` is the kernel's side."""

    inside: socket.socket
    outside: socket.socket
    name: str = "faketun0"

    def fileno(self) -> int:
        return self.inside.fileno()


@pytest.fixture
def fake_tuns() -> Iterator[tuple[FakeTun, FakeTun]]:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    for inside, outside in pairs:
        inside.setblocking(False)
        outside.setblocking(False)
        outside.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    yield FakeTun(*pairs[0]), FakeTun(*pairs[1])
    for pair in pairs:
        for s in pair:
            s.close()


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


async def _send_all(sock: socket.socket, packets: list[bytes]) -> None:
    """Send on a non-blocking socket, waiting when the peer's queue is full."""
    with trio.fail_after(10):
        for packet in packets:
            while True:
                try:
                    sock.send(packet)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)


async def _cross(
    sender: socket.socket, receiver: socket.socket, packets: list[bytes], window: int = 100
) -> list[bytes]:
    """Send ``packets`` a window at a time, each window received before the next is sent.

    Datagrams may be dropped by design when a queue overflows (a full TUN writer backlog, a full
    UDP receive buffer); on a loaded machine a burst of thousands would overflow them. A window
    keeps the test about order and batching, not about the machine's speed.
    """
    got: list[bytes] = []
    for start in range(0, len(packets), window):
        part = packets[start : start + window]
        await _send_all(sender, part)
        got += await _receive(receiver, len(part))
    return got


async def _receive(sock: socket.socket, count: int, limit: float = 10) -> list[bytes]:
    got: list[bytes] = []
    with trio.fail_after(limit):
        while len(got) < count:
            await trio.lowlevel.wait_readable(sock)
            while len(got) < count:
                try:
                    got.append(sock.recv(65535))
                except BlockingIOError:
                    break
    return got


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 - polling a plain counter, there is no event to wait on
        await trio.sleep(0.01)


class StepCounter(trio.abc.Instrument):
    """Counts scheduler steps of tasks whose name contains ``needle``."""

    def __init__(self, needle: str) -> None:
        self.needle = needle
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.needle in task.name:
            self.steps += 1


@pytest.mark.parametrize("gso", [True, False])
async def test_packets_cross_two_shells_in_batches(
    fake_tuns: tuple[FakeTun, FakeTun], gso: bool
) -> None:
    tun_a, tun_b = fake_tuns
    sock_a, sock_b = _udp(), _udp()
    address_a = sock_a.getsockname()
    dev_a = StandInDevice(peer=sock_b.getsockname())
    dev_b = StandInDevice(peer=None)
    events: list[object] = []
    a = UserspaceTunnel(dev_a, tun_a, [sock_a], gso=gso)
    b = UserspaceTunnel(dev_b, tun_b, [sock_b], on_event=events.append)
    counter = StepCounter("_udp_reader")
    trio.lowlevel.add_instrument(counter)
    packets = [i.to_bytes(4, "big") * 100 for i in range(2000)]
    with sock_a, sock_b:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            await nursery.start(b.serve)
            assert await _cross(tun_a.outside, tun_b.outside, packets) == packets
            # and back: B learned A's address from the authenticated (prefixed) datagrams
            tun_b.outside.send(b"reply")
            assert await _receive(tun_a.outside, 1) == [b"reply"]
            nursery.cancel_scope.cancel()
    trio.lowlevel.remove_instrument(counter)
    assert a.counters.packets_from_tun == len(packets)
    assert a.counters.datagrams_sent == len(packets)
    assert b.counters.datagrams_received == len(packets)
    assert b.counters.packets_to_tun == len(packets)
    assert events == [Delivered(len(p)) for p in packets]
    assert b.peer_stats() == {b"peer": (address_a, dev_b.rx, dev_b.tx)}
    # Drained in batches: the readers stepped far fewer times than packets crossed.
    assert counter.steps < len(packets) / 4


async def test_timer_rearms_and_sends(
    fake_tuns: tuple[FakeTun, FakeTun], autojump_clock: trio.testing.MockClock
) -> None:
    tun_a, _ = fake_tuns
    peer = _udp()
    sock = _udp()
    device = StandInDevice(peer=peer.getsockname(), keepalive_every=10.0)
    tunnel = UserspaceTunnel(device, tun_a, [sock])
    with peer, sock:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            await nursery.start(tunnel.serve)
            assert await _receive(peer, 3, limit=1000) == [b"\x04"] * 3
            nursery.cancel_scope.cancel()
    assert len(device.timer_calls) == 3
    assert device.timer_calls[0] == pytest.approx(start + 10.0)
    assert tunnel.counters.sent_by_type == {4: 3}


async def test_earlier_deadline_from_the_data_path_wakes_the_timer(
    fake_tuns: tuple[FakeTun, FakeTun], autojump_clock: trio.testing.MockClock
) -> None:
    tun_a, _ = fake_tuns
    sock = _udp()
    device = StandInDevice(peer=None, keepalive_every=1000.0)
    tunnel = UserspaceTunnel(device, tun_a, [sock])
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            await trio.sleep(1)
            device.deadline = trio.current_time() + 5
            # a datagram makes the reader flush, which re-arms the timer at the earlier deadline
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"junk", sock.getsockname())
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    assert len(device.timer_calls) == 1
    assert tunnel.counters.datagrams_received == 1


async def test_send_errors_are_counted_not_raised(fake_tuns: tuple[FakeTun, FakeTun]) -> None:
    tun_a, _ = fake_tuns
    sock = _udp()
    # an IPv6 destination but only an IPv4 socket: the packet is lost and counted
    device = StandInDevice(peer=("2001:db8::1", 9))
    tunnel = UserspaceTunnel(device, tun_a, [sock])
    port = sock.getsockname()[1]
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            tun_a.outside.send(b"x" * 40)
            with trio.fail_after(5):
                await _until(lambda: tunnel.counters.send_errors > 0)
            nursery.cancel_scope.cancel()
    assert tunnel.counters.packets_from_tun == 1
    assert tunnel.counters.datagrams_sent == 0
    assert tunnel.listen_port == port
    assert tunnel.name == "faketun0"


def test_public_names_are_documented() -> None:
    import punchtrio.tunnel

    for name in punchtrio.tunnel.__all__:
        obj = getattr(punchtrio.tunnel, name)
        if not isinstance(obj, (int, str)):  # constants carry no docstring of their own
            assert obj.__doc__, name
            assert obj.__module__.startswith("punchtrio.tunnel"), name


class CoalescingSocket(socket.socket):
    """A real UDP socket whose reads return what UDP GRO would: one buffer, a segment size."""

    coalesced: bytes = b""
    segment: int = 0

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
        super().recvfrom(bufsize)  # consume the datagram that made the fd readable
        cmsg = [(socket.SOL_UDP, 104, self.segment.to_bytes(4, sys.byteorder))]
        return self.coalesced, cmsg, 0, ("192.0.2.9", 4242)


async def test_gro_coalesced_datagrams_are_split(fake_tuns: tuple[FakeTun, FakeTun]) -> None:
    tun, _ = fake_tuns
    sock = CoalescingSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    segments = [b"\x04" + bytes([i]) * 99 for i in range(5)] + [b"\x04short"]
    sock.coalesced, sock.segment = b"".join(segments), 100
    device = StandInDevice(peer=None)
    tunnel = UserspaceTunnel(device, tun, [sock])
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            poke.sendto(b"wake", sock.getsockname())
            assert await _receive(tun.outside, 6) == [s[1:] for s in segments]
            nursery.cancel_scope.cancel()
    assert tunnel.counters.datagrams_received == 6
    assert tunnel.counters.udp_reads == 1
    assert device.peer == ("192.0.2.9", 4242)
