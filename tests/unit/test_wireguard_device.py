"""Two sans-IO devices talking through an in-memory network: handshake, transport, routing, roaming."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.wireguard import (
    DROP_REASONS,
    ConfigError,
    Device,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    PeerConfig,
    Timers,
)
from tests.packets import ipv4, ipv6

KEY_A = bytes(range(1, 33))
KEY_B = bytes(range(101, 133))
ADDR_A: tuple[str, int] = ("192.0.2.1", 51820)
ADDR_B: tuple[str, int] = ("192.0.2.2", 51820)
NET = ipaddress.ip_network


class Pair:
    """Devices A (10.0.0.1, fd00::1) and B (10.0.0.2, fd00::2) joined by a lossless in-memory network.

    A knows B's endpoint; B learns A's from the handshake. ``addr_a`` is where A's datagrams appear
    to come from (change it to roam). ``drop`` decides per datagram whether the network loses it.
    """

    def __init__(
        self,
        *,
        timers: Timers = Timers(),  # noqa: B008
        psk_a: bytes | None = None,
        psk_b: bytes | None = None,
        seed: int = 1,
        keepalive_a: float | None = None,
        b_knows_a: bool = False,
    ) -> None:
        rng_a, rng_b = random.Random(seed), random.Random(seed + 1000)
        self.wall = 1.7e9
        self.now = 0.0
        self.a = Device(KEY_A, timers=timers, random=rng_a.randbytes, wall_clock=self.wall_time)
        self.b = Device(KEY_B, timers=timers, random=rng_b.randbytes, wall_clock=self.wall_time)
        self.a.add_peer(
            PeerConfig(
                self.b.public_key,
                preshared_key=psk_a,
                allowed_ips=(NET("10.0.0.2/32"), NET("fd00::2/128")),
                endpoint=ADDR_B,
                persistent_keepalive=keepalive_a,
            )
        )
        self.b.add_peer(
            PeerConfig(
                self.a.public_key,
                preshared_key=psk_b,
                allowed_ips=(NET("10.0.0.1/32"), NET("fd00::1/128")),
                endpoint=ADDR_A if b_knows_a else None,
            )
        )
        self.addr_a = ADDR_A
        self.drop: Callable[[bytes, str], bool] = lambda data, sender: False
        self.log: list[tuple[float, str, bytes]] = []
        self.received: dict[str, list[bytes]] = {"a": [], "b": []}

    def wall_time(self) -> float:
        return self.wall + self.now

    def pump(self, *extra: tuple[str, bytes]) -> None:
        """Deliver queued datagrams (and ``extra`` ones, from "a" or "b") until both sides are quiet."""
        pending = list(extra)
        for _ in range(100):
            pending += [("a", d) for d, addr in self.a.datagrams_to_send() if addr == ADDR_B]
            pending += [("b", d) for d, addr in self.b.datagrams_to_send() if addr == self.addr_a]
            if not pending:
                return
            batch, pending = pending, []
            for sender, data in batch:
                self.log.append((self.now, sender, data))
                if self.drop(data, sender):
                    continue
                if sender == "a":
                    inner = self.b.receive_datagram(data, self.addr_a, self.now)
                    if inner is not None:
                        self.received["b"].append(inner)
                else:
                    inner = self.a.receive_datagram(data, ADDR_B, self.now)
                    if inner is not None:
                        self.received["a"].append(inner)
        raise AssertionError("the devices never went quiet")

    def send(self, sender: str, packet: bytes) -> None:
        """Let ``sender`` send ``packet`` from its TUN, then deliver everything."""
        device = self.a if sender == "a" else self.b
        out = device.send_packet(packet, self.now)
        self.pump(*([(sender, out[0])] if out is not None else []))

    def advance(self, until: float) -> None:
        """Move the clock to ``until``, firing both devices' timers on the way."""
        while True:
            deadlines = [d for d in (self.a.get_timer(), self.b.get_timer()) if d is not None]
            step = min([until, *deadlines])
            if step > until or step >= until:
                break
            self.now = max(self.now, step)
            self.a.handle_timer(self.now)
            self.b.handle_timer(self.now)
            self.pump()
        self.now = until
        self.a.handle_timer(self.now)
        self.b.handle_timer(self.now)
        self.pump()

    def sent(self, sender: str, kind: int, since: float = 0.0) -> list[tuple[float, bytes]]:
        """Datagrams of message type ``kind`` that ``sender`` put on the wire at or after ``since``."""
        return [(t, d) for t, s, d in self.log if s == sender and d[0] == kind and t >= since]

    def handshake(self) -> None:
        self.send("a", ipv4("10.0.0.1", "10.0.0.2", b"hello"))
        assert self.received["b"][-1] == ipv4("10.0.0.1", "10.0.0.2", b"hello")


def events(device: Device) -> list[Event]:
    out = []
    while (event := device.next_event()) is not None:
        out.append(event)
    return out


def test_handshake_then_data_both_ways() -> None:
    pair = Pair()
    first = ipv4("10.0.0.1", "10.0.0.2", b"queued until the session exists")
    pair.send("a", first)
    assert pair.received["b"] == [first]
    kinds = [d[0] for _, _, d in pair.log]
    assert kinds == [1, 2, 4]  # initiation, response, the queued packet
    reply = ipv6("fd00::2", "fd00::1", b"v6 reply")
    pair.send("b", reply)
    assert pair.received["a"] == [reply]
    assert events(pair.a) == [HandshakeCompleted(pair.b.public_key, ADDR_B)]
    assert events(pair.b) == [
        EndpointChanged(pair.a.public_key, None, ADDR_A),
        HandshakeCompleted(pair.a.public_key, ADDR_A),
    ]
    stats_a = pair.a.peer_stats()[pair.b.public_key]
    assert stats_a.handshakes == 1
    assert stats_a.last_handshake == pair.wall
    assert stats_a.tx_bytes > len(first)
    assert stats_a.rx_bytes > len(reply)
    assert stats_a.endpoint == ADDR_B
    assert stats_a.has_session
    assert sum(pair.a.counters.values()) == sum(pair.b.counters.values()) == 0


def test_transport_is_padded_to_16_and_stripped() -> None:
    pair = Pair()
    pair.handshake()
    for size in range(40):
        packet = ipv4("10.0.0.1", "10.0.0.2", bytes(size))
        out = pair.a.send_packet(packet, pair.now)
        assert out is not None
        assert (len(out[0]) - 32) % 16 == 0
        assert len(out[0]) - 32 >= len(packet)
        assert pair.b.receive_datagram(out[0], ADDR_A, pair.now) == packet


def test_preshared_key_mismatch_never_completes() -> None:
    pair = Pair(psk_a=bytes(range(32)), psk_b=bytes(range(1, 33)))
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2"))
    assert pair.received["b"] == []
    assert pair.a.counters["decrypt"] == 1
    assert events(pair.a) == []


def test_matching_preshared_key_works() -> None:
    psk = bytes(range(50, 82))
    pair = Pair(psk_a=psk, psk_b=psk)
    pair.handshake()


def test_initiation_from_unknown_peer_is_dropped() -> None:
    pair = Pair()
    stranger = Device(bytes(range(200, 232)), random=random.Random(5).randbytes)
    stranger.add_peer(
        PeerConfig(pair.b.public_key, endpoint=ADDR_B, allowed_ips=(NET("10.0.0.0/8"),))
    )
    stranger.send_packet(ipv4("10.1.0.1", "10.0.0.2"), 0.0)
    [(initiation, _)] = stranger.datagrams_to_send()
    assert pair.b.receive_datagram(initiation, ("203.0.113.9", 1), 0.0) is None
    assert pair.b.counters["unknown_peer"] == 1
    assert pair.b.datagrams_to_send() == []


def test_replayed_initiation_and_transport_are_dropped() -> None:
    pair = Pair()
    pair.handshake()
    initiation = pair.sent("a", 1)[0][1]
    transport = pair.sent("a", 4)[0][1]
    assert pair.b.receive_datagram(initiation, ADDR_A, pair.now + 1) is None
    assert pair.b.counters["timestamp"] == 1
    assert pair.b.receive_datagram(transport, ADDR_A, pair.now + 1) is None
    assert pair.b.counters["replay"] == 1
    assert pair.b.datagrams_to_send() == []


def test_at_most_one_initiation_per_20_ms() -> None:
    pair = Pair()
    pair.a.send_packet(ipv4("10.0.0.1", "10.0.0.2"), 0.0)
    [(first, _)] = pair.a.datagrams_to_send()
    pair.now = 5.5  # past REKEY_TIMEOUT, so A may initiate again (with a newer timestamp)
    pair.a.handle_timer(pair.now)
    [(second, _)] = pair.a.datagrams_to_send()
    assert pair.b.receive_datagram(first, ADDR_A, 10.000) is None
    assert pair.b.receive_datagram(second, ADDR_A, 10.010) is None
    assert pair.b.counters["flood"] == 1
    assert len(pair.b.datagrams_to_send()) == 1


def test_outbound_longest_prefix_match_and_no_route() -> None:
    keys = [bytes([i]) * 32 for i in (7, 8, 9)]
    device = Device(KEY_A, random=random.Random(0).randbytes)
    peers = [Device(k).public_key for k in keys]
    device.add_peer(
        PeerConfig(peers[0], allowed_ips=(NET("0.0.0.0/0"), NET("::/0")), endpoint=ADDR_B)
    )
    device.add_peer(
        PeerConfig(
            peers[1],
            allowed_ips=(NET("10.0.0.0/8"), NET("2001:db8::/32")),
            endpoint=("192.0.2.8", 1),
        )
    )
    device.add_peer(
        PeerConfig(
            peers[2],
            allowed_ips=(NET("10.1.2.0/24"), NET("2001:db8:1::/48")),
            endpoint=("192.0.2.9", 1),
        )
    )
    cases = [
        (ipv4("10.0.0.1", "8.8.8.8"), ADDR_B),
        (ipv4("10.0.0.1", "10.200.0.1"), ("192.0.2.8", 1)),
        (ipv4("10.0.0.1", "10.1.2.3"), ("192.0.2.9", 1)),
        (ipv6("fd00::1", "2001:db8:1::5"), ("192.0.2.9", 1)),
        (ipv6("fd00::1", "2001:db8:2::5"), ("192.0.2.8", 1)),
        (ipv6("fd00::1", "2001:4860::1"), ADDR_B),
    ]
    by_endpoint: dict[tuple[str, int], bytes] = {}
    for k in peers:
        endpoint = device.peer_stats()[k].endpoint
        assert endpoint is not None
        by_endpoint[endpoint] = k
    for packet, endpoint in cases:
        assert device.send_packet(packet, 0.0) is None  # no session yet: queued, handshake started
        assert device._peers[by_endpoint[endpoint]].staged[-1] == packet
    assert sorted(addr for _, addr in device.datagrams_to_send()) == sorted(by_endpoint)
    device.remove_peer(peers[0])
    assert device.send_packet(ipv4("10.0.0.1", "8.8.8.8"), 1.0) is None
    assert device.counters["no_route"] == 1
    assert device.send_packet(b"\x45" + bytes(5), 1.0) is None
    assert device.counters["malformed"] == 1


def test_inbound_source_outside_allowed_ips_is_dropped() -> None:
    pair = Pair()
    pair.handshake()
    # A routes by destination only, so it encrypts a packet whose source B does not allow for A.
    for spoofed in (
        ipv4("10.0.0.99", "10.0.0.2", b"not from an allowed source"),
        ipv6("fd00::99", "fd00::2", b"nor this"),
    ):
        pair.send("a", spoofed)
    assert pair.b.counters["allowed_ips"] == 2
    assert len(pair.received["b"]) == 1  # only the handshake's packet
    pair.send("a", ipv6("fd00::1", "fd00::2", b"allowed"))
    assert pair.received["b"][-1].endswith(b"allowed")


def test_add_peer_rejects_bad_configs_without_changing_anything() -> None:
    device = Device(KEY_A)
    other = Device(KEY_B).public_key
    device.add_peer(PeerConfig(other, allowed_ips=(NET("10.0.0.0/24"),)))
    third = Device(bytes([3]) * 32).public_key
    with pytest.raises(ConfigError, match="already"):
        device.add_peer(PeerConfig(other))
    with pytest.raises(ConfigError, match="own"):
        device.add_peer(PeerConfig(device.public_key))
    with pytest.raises(ConfigError, match="another peer"):
        device.add_peer(PeerConfig(third, allowed_ips=(NET("10.9.0.0/16"), NET("10.0.0.0/24"))))
    assert device.peers() == [other]
    assert device.send_packet(ipv4("10.0.0.1", "10.9.0.1"), 0.0) is None
    assert device.counters["no_route"] == 1
    with pytest.raises(ConfigError, match="low-order"):
        device.add_peer(PeerConfig(bytes(32)))
    with pytest.raises(ConfigError):
        PeerConfig(b"short")
    with pytest.raises(ConfigError):
        PeerConfig(other, preshared_key=b"x")
    with pytest.raises(ConfigError):
        PeerConfig(other, persistent_keepalive=0)
    with pytest.raises(ConfigError):
        Device(b"\x00" * 32)
    with pytest.raises(ConfigError):
        device.remove_peer(third)
    # Nested prefixes on different peers are fine: longest prefix wins.
    device.add_peer(PeerConfig(third, allowed_ips=(NET("10.0.0.128/25"),)))


def test_roaming_only_on_authenticated_packets() -> None:
    pair = Pair()
    pair.handshake()
    events(pair.b)
    good = pair.a.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"one"), pair.now)
    assert good is not None
    forged = bytearray(good[0])
    forged[-1] ^= 1
    new_addr = ("198.51.100.50", 40000)
    assert pair.b.receive_datagram(bytes(forged), new_addr, pair.now) is None
    assert pair.b.peer_stats()[pair.a.public_key].endpoint == ADDR_A
    # A valid packet replayed from elsewhere does not move the endpoint either.
    assert pair.b.receive_datagram(good[0], ADDR_A, pair.now) is not None
    assert pair.b.receive_datagram(good[0], new_addr, pair.now) is None
    assert pair.b.peer_stats()[pair.a.public_key].endpoint == ADDR_A
    assert events(pair.b) == []
    # A fresh authenticated packet from the new address does.
    pair.addr_a = new_addr
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2", b"two"))
    assert pair.b.peer_stats()[pair.a.public_key].endpoint == new_addr
    assert events(pair.b) == [EndpointChanged(pair.a.public_key, ADDR_A, new_addr)]
    pair.send("b", ipv4("10.0.0.2", "10.0.0.1", b"reply goes to the new address"))
    assert pair.received["a"][-1].endswith(b"reply goes to the new address")


def test_staged_packets_are_bounded_and_kept_in_order() -> None:
    pair = Pair()
    pair.drop = lambda data, sender: True
    packets = [ipv4("10.0.0.1", "10.0.0.2", i.to_bytes(2, "big")) for i in range(130)]
    for p in packets:
        assert pair.a.send_packet(p, pair.now) is None
    assert pair.a.counters["queue_full"] == 2
    pair.pump()
    pair.drop = lambda data, sender: False
    pair.advance(5.4)  # the retransmission gets through
    assert pair.received["b"] == packets[2:]


def test_set_endpoint_and_remove_peer() -> None:
    pair = Pair()
    pair.handshake()
    pair.a.set_endpoint(pair.b.public_key, ("203.0.113.1", 9))
    out = pair.a.send_packet(ipv4("10.0.0.1", "10.0.0.2"), pair.now)
    assert out is not None
    assert out[1] == ("203.0.113.1", 9)
    pair.a.remove_peer(pair.b.public_key)
    assert pair.a.peer_stats() == {}
    assert pair.a._keypairs == {}
    assert pair.a._handshakes == {}
    pair.a.handle_timer(pair.now + 1000)
    assert pair.a.get_timer() is None
    assert pair.a.datagrams_to_send() == []
    with pytest.raises(ConfigError):
        pair.a.set_endpoint(pair.b.public_key, ADDR_B)


def _valid_datagrams() -> list[bytes]:
    pair = Pair(timers=dataclasses.replace(Timers()))
    pair.b.under_load = False
    pair.handshake()
    pair.send("b", ipv4("10.0.0.2", "10.0.0.1", b"reply"))
    cookie = Device(KEY_B, random=random.Random(3).randbytes)
    cookie.under_load = True
    cookie.add_peer(PeerConfig(pair.a.public_key))
    initiation = pair.sent("a", 1)[0][1]
    cookie.receive_datagram(initiation, ADDR_A, 0.0)
    [(reply, _)] = cookie.datagrams_to_send()
    return [d for _, _, d in pair.log] + [reply]


VALID = _valid_datagrams()


def _fresh_receiver() -> tuple[Pair, Device]:
    pair = Pair()
    pair.handshake()
    return pair, pair.b


def test_every_length_of_garbage_is_dropped_and_counted() -> None:
    pair, device = _fresh_receiver()
    rng = random.Random(42)
    for length in range(2001):
        for head in (b"", b"\x01\0\0\0", b"\x02\0\0\0", b"\x03\0\0\0", b"\x04\0\0\0"):
            data = (head + rng.randbytes(length))[:length]
            before = sum(device.counters.values())
            assert device.receive_datagram(data, ("203.0.113.5", 7), 1.0) is None
            assert sum(device.counters.values()) == before + 1
    assert set(device.counters) == set(DROP_REASONS)
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2", b"still serving"))
    assert pair.received["b"][-1].endswith(b"still serving")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    device = Device(KEY_B, random=random.Random(0).randbytes)
    device.add_peer(PeerConfig(Device(KEY_A).public_key, allowed_ips=(NET("10.0.0.1/32"),)))
    assert device.receive_datagram(data, ("203.0.113.5", 7), 1.0) is None
    assert sum(device.counters.values()) == 1


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 2000)),
)
def test_mutated_valid_messages_never_raise(
    data: bytes, flips: list[tuple[int, int]], cut: int | None
) -> None:
    pair, device = _fresh_receiver()
    mutated = bytearray(data)
    for pos, value in flips:
        if mutated:
            mutated[pos % len(mutated)] = value
    if cut is not None:
        mutated = mutated[:cut]
    device.receive_datagram(bytes(mutated), ("203.0.113.5", 7), pair.now)
    device.handle_timer(pair.now + 1)
    device.datagrams_to_send()
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2", b"still serving"))
    assert pair.received["b"][-1].endswith(b"still serving")


def test_simultaneous_initiations_settle_on_working_sessions() -> None:
    pair = Pair(b_knows_a=True)
    assert pair.a.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"from a"), 0.0) is None
    assert pair.b.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"from b"), 0.0) is None
    pair.pump()
    assert pair.received["b"] == [ipv4("10.0.0.1", "10.0.0.2", b"from a")]
    assert pair.received["a"] == [ipv4("10.0.0.2", "10.0.0.1", b"from b")]
    for i in range(3):
        pair.send("a", ipv4("10.0.0.1", "10.0.0.2", bytes([i])))
        pair.send("b", ipv4("10.0.0.2", "10.0.0.1", bytes([i])))
    assert len(pair.received["a"]) == len(pair.received["b"]) == 4
    assert sum(pair.a.counters.values()) + sum(pair.b.counters.values()) == 0


def test_responder_without_endpoint_queues_until_the_peer_initiates() -> None:
    pair = Pair()
    waiting = ipv4("10.0.0.2", "10.0.0.1", b"waiting for A")
    assert pair.b.send_packet(waiting, 0.0) is None
    assert pair.b.datagrams_to_send() == []  # no endpoint: nothing to send yet
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2", b"hello"))
    assert pair.received["a"] == [waiting]


def test_inner_packet_with_bad_length_is_dropped() -> None:
    pair = Pair()
    pair.handshake()
    for bad in (
        b"\x45\x00\x00\x05" + bytes(16),  # total length below the header
        b"\x45\x00\x04\x00" + bytes(40),  # total length beyond the data
        b"\x00" * 40,  # not IPv4 or IPv6
    ):
        peer = pair.a._peers[pair.b.public_key]
        assert peer.current is not None
        datagram = pair.a._seal(peer, peer.current, bad, pair.now)
        assert pair.b.receive_datagram(datagram, ADDR_A, pair.now) is None
    assert pair.b.counters["malformed"] == 3


def test_public_api_is_documented() -> None:
    import punchtrio.wireguard as wg

    for name in wg.__all__:
        obj = getattr(wg, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__doc__, name
    for method in ("add_peer", "receive_datagram", "send_packet", "get_timer", "handle_timer"):
        assert getattr(Device, method).__doc__, method


def test_initiations_carry_increasing_timestamps_even_if_the_wall_clock_stalls() -> None:
    pair = Pair()
    pair.wall_time = lambda: 1.7e9  # type: ignore[method-assign]
    pair.drop = lambda data, sender: sender == "b"
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2"))
    pair.advance(16)
    initiations = pair.sent("a", 1)
    assert len(initiations) >= 3
    assert pair.b.counters["timestamp"] == 0
    assert len(pair.sent("b", 2)) == len(initiations)  # every one was answered


def test_bytearray_and_memoryview_datagrams_are_accepted() -> None:
    pair = Pair()
    pair.a.send_packet(ipv4("10.0.0.1", "10.0.0.2"), 0.0)
    [(initiation, _)] = pair.a.datagrams_to_send()
    assert pair.b.receive_datagram(bytearray(initiation), ADDR_A, 0.0) is None  # type: ignore[arg-type]
    [(response, _)] = pair.b.datagrams_to_send()
    assert pair.a.receive_datagram(memoryview(response), ADDR_B, 0.0) is None  # type: ignore[arg-type]
    [(transport, _)] = pair.a.datagrams_to_send()
    inner = pair.b.receive_datagram(bytearray(transport), ADDR_A, 0.0)  # type: ignore[arg-type]
    assert inner == ipv4("10.0.0.1", "10.0.0.2")
    assert isinstance(inner, bytes)


def test_endpoints_are_validated() -> None:
    for bad in (("example.com", 1), ("192.0.2.1", 0), ("192.0.2.1", "1"), ("192.0.2.1",), "x"):
        with pytest.raises(ConfigError):
            PeerConfig(KEY_B, endpoint=bad)  # type: ignore[arg-type]
    PeerConfig(KEY_B, endpoint=("2001:db8::1", 51820, 0, 0))  # type: ignore[arg-type]
    device = Device(KEY_A)
    device.add_peer(PeerConfig(Device(KEY_B).public_key))
    with pytest.raises(ConfigError):
        device.set_endpoint(Device(KEY_B).public_key, ("not an address", 5))


def test_docs_list_every_drop_reason() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "wireguard.md").read_text()
    for reason in DROP_REASONS:
        assert f"`{reason}`" in doc, reason
