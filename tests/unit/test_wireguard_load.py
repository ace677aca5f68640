"""Handshake floods: the bounded handshake queue, the under-load state and per-source limits."""

from __future__ import annotations

import ipaddress
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.wireguard import (
    COOKIE_REPLY_SIZE,
    ConfigError,
    Device,
    PeerConfig,
    Timers,
)
from punchtrio.wireguard._handshake_queue import (
    NORMAL,
    TRANSITIONS,
    UNDER_LOAD,
    HandshakeQueue,
)
from punchtrio.wireguard._ratelimit import PACKETS_BURSTABLE, PACKETS_PER_SECOND
from tests.packets import ipv4

KEY_A = bytes(range(1, 33))
KEY_B = bytes(range(101, 133))
ADDR_A: tuple[str, int] = ("192.0.2.1", 51820)
ADDR_B: tuple[str, int] = ("192.0.2.2", 51820)
FLOODER: tuple[str, int] = ("198.51.100.7", 4000)
NET = ipaddress.ip_network


def _initiations(target: bytes, count: int, seed: int = 7) -> list[bytes]:
    """Initiations to ``target`` from ``count`` fresh keys: valid mac1, unknown static keys."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        stranger = Device(rng.randbytes(32), random=rng.randbytes)
        stranger.add_peer(PeerConfig(target, allowed_ips=(NET("10.0.0.0/8"),), endpoint=ADDR_B))
        stranger.send_packet(ipv4("10.0.0.1", "10.0.0.2"), 0.0)
        [(initiation, _)] = stranger.datagrams_to_send()
        out.append(initiation)
    return out


def _victim(*, defer: bool = True, seed: int = 2) -> Device:
    rng = random.Random(seed)
    device = Device(KEY_B, random=rng.randbytes, defer_handshakes=defer)
    device.add_peer(PeerConfig(public_key(KEY_A), allowed_ips=(NET("10.0.0.1/32"),)))
    return device


def public_key(private: bytes) -> bytes:
    return Device(private).public_key


def _peer_a(b: Device, seed: int = 1) -> Device:
    rng = random.Random(seed)
    a = Device(KEY_A, random=rng.randbytes)
    a.add_peer(PeerConfig(b.public_key, allowed_ips=(NET("10.0.0.2/32"),), endpoint=ADDR_B))
    return a


def _drain(device: Device, now: float) -> None:
    while device.process_handshakes(now, 1000):
        pass


def _handshake(a: Device, b: Device, now: float = 0.0) -> None:
    """Complete a handshake A -> B (B defers; it is drained by hand)."""
    a.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"hello"), now)
    for _ in range(10):
        for data, _addr in a.datagrams_to_send():
            b.receive_datagram(data, ADDR_A, now)
        _drain(b, now)
        replies = b.datagrams_to_send()
        if not replies:
            return
        for data, _addr in replies:
            a.receive_datagram(data, ADDR_B, now)


# ---------------------------------------------------------------- the state machine


def test_the_transition_table_covers_every_case_and_is_hysteretic() -> None:
    assert len(TRANSITIONS) == 8
    # Deep always means under load; shallow leaves it only once the cooldown is over.
    for (state, deep, cooling), target in TRANSITIONS.items():
        if deep:
            assert target == UNDER_LOAD
        elif state == NORMAL:
            assert target == NORMAL
        else:
            assert target == (UNDER_LOAD if cooling else NORMAL)


def test_under_load_is_entered_at_the_threshold_and_left_after_the_cooldown() -> None:
    queue = HandshakeQueue(16, cooldown=1.0)
    assert queue.threshold == 2  # an eighth of the queue
    queue.put(b"x", ADDR_A, 1, False)
    assert not queue.under_load(0.0)
    queue.put(b"y", ADDR_A, 1, False)
    assert queue.under_load(0.0)
    queue.pop()
    queue.pop()
    assert queue.under_load(0.5)  # empty, but within the cooldown
    assert queue.under_load(0.999)
    assert not queue.under_load(1.0)
    assert queue.state == NORMAL
    with pytest.raises(ValueError, match="at least one message"):
        HandshakeQueue(0)
    with pytest.raises(ValueError, match="threshold"):
        HandshakeQueue(16, threshold=0)


def test_a_deferring_device_enters_and_leaves_under_load_with_its_queue() -> None:
    b = _victim()
    b.load_threshold = 4
    flood = _initiations(b.public_key, 4)
    for i, msg in enumerate(flood[:3]):
        b.receive_datagram(msg, FLOODER, 0.0)
        assert not b.is_under_load(0.0), i
    b.receive_datagram(flood[3], FLOODER, 0.0)
    assert b.pending_handshakes == 4
    assert b.is_under_load(0.0)
    _drain(b, 0.0)
    assert b.pending_handshakes == 0
    assert b.is_under_load(0.9)  # the cooldown keeps it there
    assert not b.is_under_load(1.0)
    with pytest.raises(ConfigError):
        b.load_threshold = 0
    with pytest.raises(ConfigError):
        Device(KEY_B, handshake_queue_size=0)


def test_a_device_that_processes_at_once_is_under_load_only_when_told() -> None:
    b = _victim(defer=False)
    for msg in _initiations(b.public_key, 200):
        b.receive_datagram(msg, FLOODER, 0.0)
    assert b.pending_handshakes == 0
    assert b.counters["unknown_peer"] == 200
    assert not b.is_under_load(0.0)
    b.under_load = True
    assert b.is_under_load(0.0)


# ---------------------------------------------------------------- under load: mac2, cookies, limits


def test_under_load_a_peer_needs_mac2_and_gets_through_with_its_cookie() -> None:
    b = _victim()
    a = _peer_a(b)
    flood = _initiations(b.public_key, 200)
    for msg in flood:  # the queue passes the threshold: under load
        b.receive_datagram(msg, FLOODER, 0.0)
    assert b.is_under_load(0.0)
    a.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"under load"), 0.0)
    [(initiation, _)] = a.datagrams_to_send()
    b.receive_datagram(initiation, ADDR_A, 0.0)
    _drain(b, 0.0)
    to_a = [d for d, addr in b.datagrams_to_send() if addr == ADDR_A]
    assert [len(d) for d in to_a] == [COOKIE_REPLY_SIZE]  # no response: mac2 was missing
    assert b.peer_stats()[a.public_key].handshakes == 0
    a.receive_datagram(to_a[0], ADDR_B, 0.0)
    # A's retransmission carries mac2; B is still under load (cooldown) and now answers.
    a.handle_timer(5.5)
    [(retry, _)] = a.datagrams_to_send()
    b.receive_datagram(retry, ADDR_A, 0.6)
    assert b.is_under_load(0.6)
    _drain(b, 0.6)
    [(response, _)] = b.datagrams_to_send()
    assert a.receive_datagram(response, ADDR_B, 0.6) is None
    [(staged, _)] = a.datagrams_to_send()  # the packet A queued while waiting
    assert b.receive_datagram(staged, ADDR_A, 0.6) == ipv4("10.0.0.1", "10.0.0.2", b"under load")
    assert b.peer_stats()[a.public_key].handshakes == 1


def test_cookie_replies_are_bounded_per_source() -> None:
    b = _victim()
    flood = _initiations(b.public_key, 40)
    spoofed = [(f"203.0.113.{i}", 1000 + i) for i in range(1, 41)]
    replies: dict[str, int] = {}
    seconds, per_tick = 3.0, 200
    ticks = 30
    for tick in range(ticks):
        now = tick * seconds / ticks
        for i in range(per_tick):
            source = FLOODER if i % 2 else spoofed[i % len(spoofed)]
            b.receive_datagram(flood[i % len(flood)], source, now)
        _drain(b, now)
        for data, addr in b.datagrams_to_send():
            assert len(data) == COOKIE_REPLY_SIZE
            replies[addr[0]] = replies.get(addr[0], 0) + 1
    sent = ticks * per_tick
    bound = PACKETS_BURSTABLE + PACKETS_PER_SECOND * seconds
    # Before the queue first reaches the threshold nothing is limited; after, every source pays.
    assert max(replies.values()) <= bound + b.load_threshold
    assert replies[FLOODER[0]] <= bound + b.load_threshold
    assert sum(replies.values()) < sent / 4
    assert b.counters["rate_limited"] > sent / 2
    assert b.counters["under_load"] == sum(replies.values())


def test_excess_initiations_stop_before_any_crypto_and_are_counted_by_reason() -> None:
    b = _victim()
    flood = _initiations(b.public_key, 30)
    size = 1024
    sources = [(f"10.{i >> 8 & 255}.{i & 255}.1", 9) for i in range(3000)]  # every one fresh
    for i, source in enumerate(sources):
        b.receive_datagram(flood[i % len(flood)], source, 0.0)
    # Nothing was processed: the queue is full, the rest dropped without a MAC or a DH.
    assert b.pending_handshakes == size
    assert b.counters["handshake_queue_full"] == len(sources) - size
    assert b.counters["mac"] == 0
    assert b.counters["unknown_peer"] == 0
    assert b.datagrams_to_send() == []
    due = b.get_timer()
    assert due is not None
    assert due <= 0.0  # due now
    b.receive_datagram(b"\x01" + bytes(10), FLOODER, 0.0)
    assert b.counters["malformed"] == 1
    _drain(b, 0.0)
    # Processed while the queue is deep: each costs a cookie reply, no DH.
    assert b.counters["under_load"] == size
    assert b.counters["unknown_peer"] == 0
    assert len(b.datagrams_to_send()) == size


def test_a_flood_does_not_delay_transport_data_in_a_batch() -> None:
    b = _victim()
    a = _peer_a(b)
    _handshake(a, b)
    flood = _initiations(b.public_key, 20)
    batch: list[tuple[bytes, tuple[str, int]]] = []
    for i in range(256):
        if i % 16 == 0:
            out = a.send_packet(ipv4("10.0.0.1", "10.0.0.2", i.to_bytes(2, "big")), 1.0)
            assert out is not None
            batch.append((out[0], ADDR_A))
        else:
            batch.append((flood[i % len(flood)], FLOODER))
    delivered = []
    for data, addr in batch:
        packet = b.receive_datagram(data, addr, 1.0)
        if packet is not None:
            delivered.append(packet)
        assert b.datagrams_to_send() == []  # no handshake work inside the batch
    assert [p[20:] for p in delivered] == [i.to_bytes(2, "big") for i in range(0, 256, 16)]
    # One source: queued freely up to the threshold, then its burst; the rest was rate-limited.
    assert b.pending_handshakes == b.load_threshold + PACKETS_BURSTABLE
    assert b.counters["rate_limited"] == 240 - b.pending_handshakes
    assert b.process_handshakes(1.0, 8)  # a bounded share afterwards; more remain
    assert b.pending_handshakes == b.load_threshold + PACKETS_BURSTABLE - 8
    # Still under load, and this source has spent its tokens: no reply, no DH.
    assert b.datagrams_to_send() == []
    assert b.counters["rate_limited"] == 240 - b.load_threshold - PACKETS_BURSTABLE + 8


async def test_queued_handshakes_wait_for_the_timer_not_for_traffic(autojump_clock: object) -> None:
    import trio.lowlevel

    b = _victim()
    for msg in _initiations(b.public_key, 40):
        b.receive_datagram(msg, FLOODER, trio.current_time())
    deadline = b.get_timer()
    assert deadline is not None
    assert deadline <= trio.current_time()
    rounds = 0
    while b.pending_handshakes:
        b.handle_timer(trio.current_time())
        rounds += 1
        await trio.lowlevel.checkpoint()
    assert rounds == 3  # 16 per call
    assert b.counters["unknown_peer"] == 40
    assert b.get_timer() is None  # nothing else is due


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 3, 4, 7]),
            st.sampled_from([148, 92, 64, 32, 147]),
            st.integers(0, 3),
            st.floats(0, 3),
        ),
        max_size=120,
    )
)
def test_every_handshake_sized_datagram_is_counted_once(
    shapes: list[tuple[int, int, int, float]],
) -> None:
    b = Device(KEY_B, random=random.Random(1).randbytes, defer_handshakes=True, load_threshold=4)
    b.add_peer(PeerConfig(public_key(KEY_A)))
    rng = random.Random(3)
    now = 0.0
    for kind, size, source, step in shapes:
        now += step
        data = kind.to_bytes(4, "little") + rng.randbytes(size - 4)
        assert b.receive_datagram(data, (f"192.0.2.{source}", 1), now) is None
        assert b.pending_handshakes <= 1024
        b.process_handshakes(now, 2)
    _drain(b, now)
    counted = sum(b.counters.values())
    assert counted == len(shapes)
    assert b.pending_handshakes == 0


def test_random_bytes_do_not_fill_the_queue_when_they_have_no_handshake_shape() -> None:
    b = _victim()
    for _ in range(2000):
        b.receive_datagram(os.urandom(100), FLOODER, 0.0)
    assert b.pending_handshakes == 0
    assert not b.is_under_load(0.0)
    assert b.counters["malformed"] + b.counters["no_session"] == 2000
    assert Timers().cookie_refresh_time == 120.0
