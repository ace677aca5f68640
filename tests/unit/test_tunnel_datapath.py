"""The data thread and its turns with Trio's run loop; the TUN writer under a virtual clock."""

from __future__ import annotations

import ipaddress
import math
import socket
import sys
import threading
import time

import pytest
import trio
import trio.testing

from punchtrio.mux import PROBE_MAGIC, RELAY_MAGIC, Kind, Mux, MuxedDevice
from punchtrio.tunnel import UserspaceTunnel, _datapath
from punchtrio.tunnel._tunwriter import INLINE_TUN_WRITES
from punchtrio.tunnel._turns import RunLoopTurns, clock_is_real
from punchtrio.wireguard import Device, PeerConfig
from tests.packets import ipv4

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from .test_tunnel_userspace import (
    Delivered,
    FakeTun,
    StandInDevice,
    _cross,
    _receive,
    _udp,
    fake_tuns,
)

__all__ = ["fake_tuns"]  # the fixture, imported for its side effect on pytest


async def test_packets_cross_two_data_threads(fake_tuns: tuple[FakeTun, FakeTun]) -> None:
    tun_a, tun_b = fake_tuns
    sock_a, sock_b = _udp(), _udp()
    dev_a = StandInDevice(peer=sock_b.getsockname())
    dev_b = StandInDevice(peer=None)
    trio_thread = threading.get_ident()
    event_threads: set[int] = set()
    events: list[object] = []

    def on_event(event: object) -> None:
        event_threads.add(threading.get_ident())
        events.append(event)

    a = UserspaceTunnel(dev_a, tun_a, [sock_a], data_thread=True)
    b = UserspaceTunnel(dev_b, tun_b, [sock_b], on_event=on_event, data_thread=True)
    packets = [i.to_bytes(4, "big") * 100 for i in range(2000)]
    with sock_a, sock_b:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            await nursery.start(b.serve)
            assert a.data_path == b.data_path == "thread"
            assert await _cross(tun_a.outside, tun_b.outside, packets) == packets
            tun_b.outside.send(b"reply")
            assert await _receive(tun_a.outside, 1) == [b"reply"]
            with trio.fail_after(5):
                while len(events) < len(packets):  # noqa: ASYNC110 - the callback sets no event
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert b.counters.datagrams_received == len(packets)
    assert b.counters.packets_to_tun == len(packets)
    # The device's events reach the callback in order, on the Trio thread.
    assert events == [Delivered(len(p)) for p in packets]
    assert event_threads == {trio_thread}
    # Served in batches by the data threads.
    assert 0 < a.data_thread_turns < len(packets) / 4
    assert 0 < b.data_thread_turns < len(packets) / 4


async def test_an_earlier_deadline_from_the_data_thread_moves_the_timer(
    fake_tuns: tuple[FakeTun, FakeTun],
) -> None:
    tun_a, _ = fake_tuns
    sock, peer = _udp(), _udp()
    device = StandInDevice(peer=peer.getsockname())
    tunnel = UserspaceTunnel(device, tun_a, [sock], data_thread=True)
    with sock, peer:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            device.deadline = trio.current_time() + 0.05
            tun_a.outside.send(b"x" * 40)  # the data thread reads it and flushes
            assert await _receive(peer, 1) == [b"\x04" + b"x" * 40]
            # the timer fires at the new deadline: the keepalive goes out
            assert await _receive(peer, 1, limit=5) == [b"\x04"]
            nursery.cancel_scope.cancel()
    assert len(device.timer_calls) == 1
    assert tunnel.counters.sent_by_type == {4: 1}


async def test_a_wireguard_device_gets_the_data_thread_by_default(
    fake_tuns: tuple[FakeTun, FakeTun],
) -> None:
    # This fails if the public-API data path stops engaging (a Trio change in instruments or
    # thread handling), instead of the tunnel silently falling back to the slower Trio path.
    tun_a, tun_b = fake_tuns
    sock_a, sock_b = _udp(), _udp()
    dev_a, dev_b = Device(bytes(range(1, 33))), Device(bytes(range(101, 133)))
    dev_a.add_peer(
        PeerConfig(
            dev_b.public_key,
            allowed_ips=(ipaddress.ip_network("10.0.0.2/32"),),
            endpoint=sock_b.getsockname(),
        )
    )
    dev_b.add_peer(PeerConfig(dev_a.public_key, allowed_ips=(ipaddress.ip_network("10.0.0.1/32"),)))
    a = UserspaceTunnel(dev_a, tun_a, [sock_a])
    b = UserspaceTunnel(dev_b, tun_b, [sock_b])
    packets = [ipv4("10.0.0.1", "10.0.0.2", bytes([i]) * 100) for i in range(50)]
    with sock_a, sock_b:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            await nursery.start(b.serve)
            tun_a.outside.send(packets[0])  # queued until the handshake completes
            assert await _receive(tun_b.outside, 1) == packets[:1]
            for packet in packets[1:]:
                tun_a.outside.send(packet)
            assert await _receive(tun_b.outside, len(packets) - 1) == packets[1:]
            nursery.cancel_scope.cancel()
    assert a.data_path == b.data_path == "thread"
    assert a.data_thread_turns > 0
    assert b.data_thread_turns > 0


async def test_no_task_runs_during_a_data_thread_turn() -> None:
    turns = RunLoopTurns()
    trio.lowlevel.add_instrument(turns)
    inside = threading.Event()
    stop = threading.Event()
    overlaps = 0
    steps = 0

    def thread() -> None:
        while not stop.is_set():
            turns.acquire()
            inside.set()
            time.sleep(0.001)  # a batch, holding the turn
            inside.clear()
            turns.release()

    async def busy() -> None:
        # Always runnable: the loop never sleeps, the thread must still get turns.
        nonlocal overlaps, steps
        while not stop.is_set():
            steps += 1
            if inside.is_set():
                overlaps += 1
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            nursery.start_soon(trio.to_thread.run_sync, thread)
            await trio.sleep(0.3)
            stop.set()
    finally:
        trio.lowlevel.remove_instrument(turns)
    assert overlaps == 0
    assert steps > 10
    assert turns.turns > 10


async def test_a_virtual_clock_gets_trio_readers_and_inline_tun_writes(
    fake_tuns: tuple[FakeTun, FakeTun], autojump_clock: trio.testing.MockClock
) -> None:
    tun, _ = fake_tuns
    sock = _udp()
    device = StandInDevice(peer=None)
    tunnel = UserspaceTunnel(device, tun, [sock], data_thread=True)
    burst = [b"\x04" + bytes([i]) * 200 for i in range(INLINE_TUN_WRITES * 16)]
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            for datagram in burst:
                sender.sendto(datagram, sock.getsockname())
            # A writer thread would be invisible to the virtual clock, which would jump past this
            # timeout while a batch waited for it; inline writes arrive within virtual time.
            assert await _receive(tun.outside, len(burst), limit=1) == [d[1:] for d in burst]
            nursery.cancel_scope.cancel()
    assert tunnel.data_path == "trio"
    assert tunnel.data_thread_turns == 0


def test_clock_is_real() -> None:
    assert not clock_is_real(trio.testing.MockClock())
    assert not clock_is_real(trio.testing.MockClock(rate=1.0))

    async def current() -> bool:
        return clock_is_real(trio.lowlevel.current_clock())

    assert trio.run(current)


@pytest.mark.parametrize("data_thread", [False, None])
async def test_data_thread_false_or_a_stand_in_device_reads_on_trio(
    fake_tuns: tuple[FakeTun, FakeTun], data_thread: bool | None
) -> None:
    tun, _ = fake_tuns
    sock = _udp()
    tunnel = UserspaceTunnel(StandInDevice(peer=None), tun, [sock], data_thread=data_thread)
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            nursery.cancel_scope.cancel()
    assert tunnel.data_path == "trio"


class BrokenDevice(StandInDevice):
    """A device with a bug: the data thread must not swallow it."""

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> bytes | None:
        raise ValueError("a bug in the device")


async def test_an_error_on_the_data_thread_ends_serve_with_it(
    fake_tuns: tuple[FakeTun, FakeTun],
) -> None:
    tun, _ = fake_tuns
    sock = _udp()
    tunnel = UserspaceTunnel(BrokenDevice(peer=None), tun, [sock], data_thread=True)

    async def serve_one_datagram() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender, trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(tunnel.serve)
                sender.sendto(b"\x04boom", sock.getsockname())

    with sock, pytest.raises(BaseExceptionGroup) as raised:
        await serve_one_datagram()
    assert raised.group_contains(ValueError, match="a bug", depth=None)
    assert tunnel.data_path == "thread"


class QueueingDevice(StandInDevice):
    """A stand-in that queues handshake messages (first byte 1) as a deferring Device does."""

    def __init__(self) -> None:
        super().__init__(peer=None)
        self.pending = 0
        self.processed = 0
        self.threads: set[int] = set()  # where queued messages were processed

    @property
    def handshake_queue_room(self) -> int:
        return 1024 - self.pending

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> bytes | None:
        if data[:1] == b"\x01":
            self.pending += 1
            return None
        return super().receive_datagram(data, addr, now)

    def process_handshakes(self, now: float, limit: int) -> bool:
        n = min(limit, self.pending)
        if n:
            self.threads.add(threading.get_ident())
        self.pending -= n
        self.processed += n
        return self.pending > 0

    def get_timer(self) -> float | None:
        return -math.inf if self.pending else self.deadline  # due at once while queued

    def handle_timer(self, now: float) -> None:
        self.process_handshakes(now, 16)
        super().handle_timer(now)


async def test_a_handshake_backlog_is_served_on_the_data_thread_behind_transport(
    fake_tuns: tuple[FakeTun, FakeTun],
) -> None:
    # Trio's thread must not take queued handshakes through its timer while the data thread
    # runs: two threads taking turns with the GIL delay every packet by up to 5 ms.
    tun, _ = fake_tuns
    sock, handshake = _udp(), _udp()
    device = QueueingDevice()
    tunnel = UserspaceTunnel(device, tun, [sock], handshake_sockets=[handshake], data_thread=True)
    flood = [b"\x01" + bytes(147)] * 3000
    transport = [b"\x04" + bytes([i]) * 100 for i in range(100)]
    with sock, handshake, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            for i, datagram in enumerate(flood):
                sender.sendto(datagram, handshake.getsockname())
                if i % 30 == 0:
                    sender.sendto(transport[i // 30], sock.getsockname())
            assert await _receive(tun.outside, len(transport)) == [d[1:] for d in transport]
            with trio.fail_after(10):
                while device.processed < len(flood):  # noqa: ASYNC110 - a plain counter
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert device.processed == len(flood)
    assert device.threads
    assert threading.get_ident() not in device.threads
    assert tunnel.counters.datagrams_received == len(flood) + len(transport)


async def test_handshake_work_rests_while_transport_flows_and_not_after(
    fake_tuns: tuple[FakeTun, FakeTun], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A share this small makes each turn of handshake work rest about a thousand times as long
    # as it took: while transport flows the backlog on the handshake socket is read slowly;
    # once transport stops (TRANSPORT_RECENT), it is read at once.
    monkeypatch.setattr(_datapath, "HANDSHAKE_SHARE", 0.001)
    tun, _ = fake_tuns
    sock, handshake = _udp(), _udp()
    device = QueueingDevice()
    tunnel = UserspaceTunnel(device, tun, [sock], handshake_sockets=[handshake], data_thread=True)
    flood = [b"\x01" + bytes(147)] * 1000
    with sock, handshake, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            sender.sendto(b"\x04first", sock.getsockname())  # transport flows from now on
            assert await _receive(tun.outside, 1) == [b"first"]
            for datagram in flood:
                sender.sendto(datagram, handshake.getsockname())
            for i in range(60):  # 0.3 s of transport, one datagram every 5 ms
                sender.sendto(b"\x04" + bytes([i]), sock.getsockname())
                await trio.sleep(0.005)
            while_flowing = device.processed
            with trio.fail_after(10):
                while device.processed < len(flood):  # noqa: ASYNC110 - a plain counter
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert while_flowing < len(flood) / 2
    assert device.processed == len(flood)


class _ThreadNotingDevice(StandInDevice):
    """A stand-in that notes the thread each received datagram was handled on."""

    def __init__(self, peer: tuple[str, int] | None) -> None:
        super().__init__(peer)
        self.receive_threads: set[int] = set()

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> bytes | None:
        self.receive_threads.add(threading.get_ident())
        return super().receive_datagram(data, addr, now)


async def test_a_muxed_device_gets_the_data_thread_and_its_trio_work_runs_on_trio(
    fake_tuns: tuple[FakeTun, FakeTun],
) -> None:
    # The connector's device: WireGuard is served on the data thread, while the handlers that
    # use Trio (probes, relay frames) and the routes of relayed paths run on the Trio thread.
    tun, _ = fake_tuns
    sock, peer = _udp(), _udp()
    device = _ThreadNotingDevice(peer=None)
    mux = Mux()
    muxed = MuxedDevice(device, mux)
    trio_thread = threading.get_ident()
    threads: dict[str, set[int]] = {"probe": set(), "relay": set(), "route": set()}
    routed: list[bytes] = []

    def on_probe(data: bytes, addr: tuple[str, int], now: float) -> None:
        threads["probe"].add(threading.get_ident())

    def on_relay(data: bytes, addr: tuple[str, int], now: float) -> bytes:
        threads["relay"].add(threading.get_ident())
        return b"unwrapped " + data[len(RELAY_MAGIC) :]

    def route(datagram: bytes) -> None:
        threads["route"].add(threading.get_ident())
        routed.append(datagram)

    mux.route(Kind.PROBE, on_probe)
    mux.route(Kind.RELAY, on_relay)
    virtual = ("240.0.0.1", 1)
    muxed.set_route(virtual, route)
    tunnel = UserspaceTunnel(muxed, tun, [sock])
    address = sock.getsockname()
    wireguard = b"\x04\x00\x00\x00" + b"w" * 40
    with sock, peer:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            assert tunnel.data_path == "thread"
            peer.sendto(wireguard, address)
            assert await _receive(tun.outside, 1) == [wireguard[1:]]
            peer.sendto(PROBE_MAGIC + b"ping", address)
            peer.sendto(RELAY_MAGIC + b"packet", address)
            assert await _receive(tun.outside, 1) == [b"unwrapped packet"]
            device.peer = virtual  # what the TUN sends now goes to the relayed path's route
            tun.outside.send(b"to the relay")
            with trio.fail_after(5):
                while not routed:  # noqa: ASYNC110 - the route sets no event
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert routed == [b"\x04to the relay"]
    assert threads == {"probe": {trio_thread}, "relay": {trio_thread}, "route": {trio_thread}}
    assert device.receive_threads
    assert trio_thread not in device.receive_threads
    assert tunnel.data_thread_turns > 0
    # Once the tunnel stops, the mux makes its calls at once again.
    assert mux.receive_datagram(RELAY_MAGIC + b"again", address, 0.0) == b"unwrapped again"
