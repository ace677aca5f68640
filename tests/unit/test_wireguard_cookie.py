"""mac1/mac2 and cookie replies: a responder under load makes initiators prove their address."""

from __future__ import annotations

import hashlib
import random

from punchtrio.wireguard import COOKIE_REPLY_SIZE, HandshakeCompleted, Timers
from punchtrio.wireguard._cookie import CookieChecker, CookieGenerator
from punchtrio.wireguard._messages import parse_cookie_reply
from tests.packets import ipv4
from tests.unit.test_wireguard_device import ADDR_A, Pair, events

INITIATION, COOKIE = 1, 3


def test_mac1_is_keyed_blake2s_of_the_receivers_public_key() -> None:
    public = bytes(range(32))
    gen = CookieGenerator(public)
    body = bytes(range(116))
    msg = gen.add_macs(body, now=0.0)
    key = hashlib.blake2s(b"mac1----" + public).digest()
    assert msg[116:132] == hashlib.blake2s(body, digest_size=16, key=key).digest()
    assert msg[132:] == bytes(16)
    checker = CookieChecker(public, random.Random(1).randbytes)
    assert checker.check_mac1(msg)
    assert not checker.check_mac1(msg[:-17] + b"\x00" + msg[-16:])
    assert not CookieChecker(bytes(32), random.Random(1).randbytes).check_mac1(msg)


def test_cookie_round_trip_binds_mac2_to_the_source_address() -> None:
    public = bytes(range(32))
    checker = CookieChecker(public, random.Random(1).randbytes)
    gen = CookieGenerator(public)
    msg = gen.add_macs(bytes(116), now=0.0)
    assert not checker.check_mac2(msg, ADDR_A, 0.0)
    reply = parse_cookie_reply(checker.create_reply(msg, 5, ADDR_A, 0.0))
    assert reply.receiver == 5
    assert gen.consume_reply(reply, 1.0)
    assert not gen.consume_reply(reply, 1.0)  # only once per message sent
    retry = gen.add_macs(bytes(116), now=2.0)
    assert checker.check_mac2(retry, ADDR_A, 2.0)
    assert not checker.check_mac2(retry, ("192.0.2.99", ADDR_A[1]), 2.0)
    assert not checker.check_mac2(retry, (ADDR_A[0], ADDR_A[1] + 1), 2.0)
    # The secret rotates after 120 s: the old cookie stops working.
    assert not checker.check_mac2(gen.add_macs(bytes(116), now=121.0), ADDR_A, 121.0)
    # And an initiator stops using a cookie 120 s after receiving it.
    assert gen.add_macs(bytes(116), now=121.5)[-16:] == bytes(16)


def test_check_mac2_or_reply_is_check_mac2_then_create_reply() -> None:
    public = bytes(range(32))
    seed = 7
    checker = CookieChecker(public, random.Random(seed).randbytes)
    same = CookieChecker(public, random.Random(seed).randbytes)
    gen = CookieGenerator(public)
    msg = gen.add_macs(bytes(116), now=0.0)  # no cookie yet: mac2 is zero
    reply = checker.check_mac2_or_reply(msg, 5, ADDR_A, 0.0)
    assert not same.check_mac2(msg, ADDR_A, 0.0)
    assert reply == same.create_reply(msg, 5, ADDR_A, 0.0)  # same secret, same nonce
    assert reply is not None
    assert gen.consume_reply(parse_cookie_reply(reply), 0.5)
    retry = gen.add_macs(bytes(116), now=1.0)
    assert checker.check_mac2_or_reply(retry, 5, ADDR_A, 1.0) is None
    other = checker.check_mac2_or_reply(retry, 5, ("192.0.2.99", ADDR_A[1]), 1.0)
    assert other is not None
    assert len(other) == COOKIE_REPLY_SIZE
    # A wrong mac2 that is not zero is refused too.
    forged = retry[:-1] + bytes([retry[-1] ^ 1])
    assert checker.check_mac2_or_reply(forged, 5, ADDR_A, 1.0) is not None
    assert not checker.check_mac2(forged, ADDR_A, 1.0)


def test_cookie_reply_that_does_not_match_our_mac1_is_rejected() -> None:
    public = bytes(range(32))
    checker = CookieChecker(public, random.Random(1).randbytes)
    gen = CookieGenerator(public)
    gen.add_macs(bytes(116), now=0.0)
    other = CookieGenerator(public).add_macs(b"\x01" * 116, now=0.0)
    assert not gen.consume_reply(
        parse_cookie_reply(checker.create_reply(other, 1, ADDR_A, 0.0)), 0.0
    )


def test_responder_under_load_answers_with_a_cookie_and_initiator_retries_with_mac2() -> None:
    pair = Pair()
    pair.b.under_load = True
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2", b"behind a cookie"))
    [(_, reply)] = pair.sent("b", COOKIE)
    assert len(reply) == COOKIE_REPLY_SIZE
    assert pair.b.counters["under_load"] == 1
    assert pair.received["b"] == []
    pair.advance(6)  # the retransmission carries mac2 and is accepted
    retry = pair.sent("a", INITIATION)[-1][1]
    assert retry[-16:] != bytes(16)
    assert pair.received["b"] == [ipv4("10.0.0.1", "10.0.0.2", b"behind a cookie")]
    assert HandshakeCompleted(pair.b.public_key, ("192.0.2.2", 51820)) in events(pair.a)
    assert pair.a.counters["cookie"] == 0
    assert pair.b.counters["under_load"] == 1


def test_mac2_from_another_address_gets_another_cookie() -> None:
    pair = Pair()
    pair.b.under_load = True
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2"))
    pair.addr_a = ("198.51.100.3", 1234)  # A's NAT mapping changed: the cookie is for the old one
    pair.advance(6)
    assert len(pair.sent("b", COOKIE)) == 2
    pair.advance(12)
    assert len(pair.received["b"]) == 1


def test_load_is_detected_from_the_handshake_queue_depth() -> None:
    from punchtrio.wireguard import Device, PeerConfig

    b = Device(Pair().b._private, random=random.Random(5).randbytes, defer_handshakes=True)
    b.load_threshold = 2
    first = Pair().a
    b.add_peer(PeerConfig(first.public_key))
    first.send_packet(ipv4("10.0.0.1", "10.0.0.2"), 0.0)
    [(initiation, _)] = first.datagrams_to_send()
    for i in range(3):
        b.receive_datagram(initiation, ADDR_A, 0.1 + i / 100)
    assert b.pending_handshakes == 3
    while b.process_handshakes(0.2, 1):
        pass
    assert b.counters["under_load"] == 3  # processed while the queue was deep or cooling down
    assert b.counters["timestamp"] == 0
    b.receive_datagram(initiation, ADDR_A, 1.3)  # the cooldown is over: processed normally
    b.process_handshakes(1.3, 1)
    assert b.peer_stats()[first.public_key].endpoint == ADDR_A


def test_mac1_failure_is_counted_and_unanswered() -> None:
    pair = Pair()
    pair.a.send_packet(ipv4("10.0.0.1", "10.0.0.2"), 0.0)
    [(initiation, _)] = pair.a.datagrams_to_send()
    broken = initiation[:120] + bytes([initiation[120] ^ 1]) + initiation[121:]
    assert pair.b.receive_datagram(broken, ADDR_A, 0.0) is None
    assert pair.b.counters["mac"] == 1
    assert pair.b.datagrams_to_send() == []


def test_fast_timers_refresh_cookies_sooner() -> None:
    assert Timers.fast(2.0).cookie_refresh_time == 2.0


def test_under_load_each_source_is_rate_limited() -> None:
    from punchtrio.wireguard._ratelimit import RateLimiter, source_key

    limiter = RateLimiter(rate=20, burst=5)
    assert [limiter.allow(ADDR_A, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow(("192.0.2.77", 1), 0.0)  # another source has its own bucket
    assert not limiter.allow(ADDR_A, 0.01)
    assert limiter.allow(ADDR_A, 0.06)  # 20 per second refill
    assert source_key(("2001:db8::1", 1)) == source_key(("2001:db8::ffff", 2))  # one /64
    assert source_key(("::ffff:192.0.2.1", 1)) == source_key(("192.0.2.1", 1))
    small = RateLimiter(max_sources=2)
    assert small.allow(("192.0.2.1", 1), 0.0)
    assert small.allow(("192.0.2.2", 1), 0.0)
    assert not small.allow(("192.0.2.3", 1), 0.01)  # table full of buckets not yet refilled
    assert small.allow(("192.0.2.3", 1), 5.0)  # old entries expired


def test_device_under_load_rate_limits_a_source_with_a_valid_cookie() -> None:
    pair = Pair()
    pair.b.under_load = True
    pair.send("a", ipv4("10.0.0.1", "10.0.0.2"))  # initiation, cookie reply
    pair.advance(5.4)  # retry with mac2: accepted
    retry = pair.sent("a", INITIATION)[-1][1]
    for _ in range(10):
        pair.b.receive_datagram(retry, ADDR_A, pair.now)
    assert pair.b.counters["rate_limited"] >= 5
