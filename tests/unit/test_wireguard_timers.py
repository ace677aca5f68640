"""The protocol's timers, driven by a fake monotonic clock through ``get_timer``/``handle_timer``."""

from __future__ import annotations

import itertools

import pytest

from punchtrio.wireguard import (
    ConfigError,
    HandshakeCompleted,
    HandshakeFailed,
    KeysZeroed,
    Timers,
)
from tests.packets import ipv4
from tests.unit.test_wireguard_device import ADDR_A, Pair, events

T = Timers()
INITIATION, RESPONSE, TRANSPORT = 1, 2, 4


def a_to_b(payload: bytes = b"data") -> bytes:
    return ipv4("10.0.0.1", "10.0.0.2", payload)


def b_to_a(payload: bytes = b"data") -> bytes:
    return ipv4("10.0.0.2", "10.0.0.1", payload)


def test_defaults_are_the_protocol_constants() -> None:
    assert (T.rekey_after_time, T.reject_after_time, T.rekey_attempt_time) == (120, 180, 90)
    assert (T.rekey_timeout, T.keepalive_timeout, T.zero_key_material_after) == (5, 10, 540)
    assert T.rekey_timeout_jitter == pytest.approx(0.333)
    assert T.rekey_after_messages == 2**60
    assert T.reject_after_messages == 2**64 - 2**13 - 1
    with pytest.raises(ConfigError):
        Timers(rekey_after_time=200)
    with pytest.raises(ConfigError):
        Timers(keepalive_timeout=0)


def test_initiator_rekeys_after_rekey_after_time_without_losing_packets() -> None:
    pair = Pair()
    pair.handshake()
    sent = []
    t = 0.0
    while t < 130:
        t += 0.5
        pair.advance(t)
        packet = a_to_b(int(t * 2).to_bytes(4, "big"))
        sent.append(packet)
        pair.send("a", packet)
        pair.send("b", b_to_a(b"ack"))
    initiations = pair.sent("a", INITIATION)
    assert len(initiations) == 2
    assert T.rekey_after_time <= initiations[1][0] < T.rekey_after_time + 1
    assert pair.received["b"][1:] == sent
    assert pair.a.peer_stats()[pair.b.public_key].handshakes == 2
    assert sum(pair.a.counters.values()) == sum(pair.b.counters.values()) == 0


def test_packets_in_flight_across_a_rekey_still_decrypt() -> None:
    pair = Pair()
    pair.handshake()
    pair.advance(T.rekey_after_time)
    old = pair.a.send_packet(a_to_b(b"old session"), pair.now)  # also starts the rekey
    assert old is not None
    pair.pump()  # initiation, response; A switches to the new session
    new = pair.a.send_packet(a_to_b(b"new session"), pair.now)
    assert new is not None
    assert new[0][4:8] != old[0][4:8]
    # The new-session packet arrives first; B's next session becomes current, old stays previous.
    assert pair.b.receive_datagram(new[0], ADDR_A, pair.now) == a_to_b(b"new session")
    assert pair.b.receive_datagram(old[0], ADDR_A, pair.now) == a_to_b(b"old session")
    # B replies with the new session.
    reply = pair.b.send_packet(b_to_a(b"reply"), pair.now)
    assert reply is not None
    assert pair.a.receive_datagram(reply[0], ("192.0.2.2", 51820), pair.now)


def test_responder_sends_with_old_session_until_the_new_one_is_confirmed() -> None:
    pair = Pair()
    pair.handshake()
    pair.advance(T.rekey_after_time + 1)
    pair.drop = lambda data, sender: sender == "a" and data[0] == TRANSPORT
    pair.send("a", a_to_b(b"lost"))  # triggers the rekey; A's keepalive/data on the new key is lost
    session_before = pair.b._peers[pair.a.public_key].current
    assert pair.b._peers[pair.a.public_key].next is not None
    out = pair.b.send_packet(b_to_a(b"still old"), pair.now)
    assert out is not None
    assert session_before is not None
    assert out[0][4:8] == session_before.header[4:8]
    # A kept the old session as previous, so it can still read it.
    assert pair.a.receive_datagram(out[0], ("192.0.2.2", 51820), pair.now) == b_to_a(b"still old")


def test_retransmit_every_rekey_timeout_plus_jitter_then_give_up() -> None:
    pair = Pair(seed=7)
    pair.drop = lambda data, sender: True
    pair.send("a", a_to_b())
    pair.advance(200)
    times = [t for t, _ in pair.sent("a", INITIATION)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps
    assert all(T.rekey_timeout <= g <= T.rekey_timeout + T.rekey_timeout_jitter for g in gaps)
    assert len({round(g, 6) for g in gaps}) > 1  # jittered
    assert T.rekey_attempt_time - T.rekey_timeout <= times[-1] < T.rekey_attempt_time
    failed = [e for e in events(pair.a) if isinstance(e, HandshakeFailed)]
    assert failed == [HandshakeFailed(pair.b.public_key)]
    assert (
        pair.a._peers[pair.b.public_key].staged == type(pair.a._peers[pair.b.public_key].staged)()
    )
    # A new packet starts a new round of attempts.
    pair.send("a", a_to_b())
    assert pair.sent("a", INITIATION, since=200)


def test_keepalive_after_keepalive_timeout_when_only_receiving() -> None:
    pair = Pair()
    pair.handshake()
    start = pair.now
    pair.advance(start + T.keepalive_timeout - 0.01)
    assert pair.sent("b", TRANSPORT) == []
    pair.advance(start + T.keepalive_timeout + 0.01)
    [(t, keepalive)] = pair.sent("b", TRANSPORT)
    assert t == pytest.approx(start + T.keepalive_timeout)
    assert len(keepalive) == 32
    assert pair.received["a"] == []  # keepalives never reach the TUN
    pair.advance(start + 100)
    assert len(pair.sent("b", TRANSPORT)) == 1  # once per burst of received data


def test_no_keepalive_when_replying_anyway() -> None:
    pair = Pair()
    pair.handshake()
    pair.advance(3)
    pair.send("b", b_to_a())
    pair.advance(50)
    assert [len(d) for _, d in pair.sent("b", TRANSPORT)] == [len(pair.sent("b", TRANSPORT)[0][1])]
    assert len(pair.sent("b", TRANSPORT)[0][1]) > 32


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    pair = Pair()
    pair.handshake()
    pair.advance(30)
    pair.drop = lambda data, sender: sender == "b"  # B's keepalives are lost
    pair.send("a", a_to_b())
    pair.advance(60)
    first_retry = pair.sent("a", INITIATION, since=30)[0][0]
    timeout = T.keepalive_timeout + T.rekey_timeout
    assert 30 + timeout <= first_retry <= 30 + timeout + T.rekey_timeout_jitter


def test_persistent_keepalive() -> None:
    pair = Pair(keepalive_a=25)
    pair.advance(0)  # the persistent keepalive brings the tunnel up at once
    assert [e for e in events(pair.a) if isinstance(e, HandshakeCompleted)]
    pair.advance(200)
    times = {t for t, d in pair.sent("a", TRANSPORT) if len(d) == 32}
    # Every 25 s; at 125 s the keepalive also starts a rekey, confirmed by one more keepalive.
    assert times == {25.0 * i for i in range(9)}
    assert [t for t, _ in pair.sent("a", INITIATION)] == [0.0, 125.0]


def test_sessions_are_rejected_after_reject_after_time() -> None:
    pair = Pair()
    pair.handshake()
    pair.advance(T.reject_after_time - 1)
    stale = pair.a.send_packet(a_to_b(), pair.now)
    assert stale is not None
    pair.now = T.reject_after_time + 0.1
    assert pair.b.receive_datagram(stale[0], ADDR_A, pair.now) is None
    assert pair.b.counters["expired"] == 1
    # A will not send with it either: the packet is queued and a handshake starts.
    assert pair.a.send_packet(a_to_b(b"fresh"), pair.now) is None
    pair.pump()
    assert pair.received["b"][-1] == a_to_b(b"fresh")


def test_key_material_zeroed_after_three_reject_after_times() -> None:
    pair = Pair()
    pair.handshake()
    derived = pair.now
    zero_at = derived + T.zero_key_material_after
    pair.advance(zero_at - 1)
    assert pair.a._peers[pair.b.public_key].previous is not None or pair.a._keypairs
    events(pair.a)
    pair.advance(zero_at + 1)
    assert KeysZeroed(pair.b.public_key) in events(pair.a)
    assert pair.a._keypairs == {}
    assert pair.b._keypairs == {}
    assert pair.a.peer_stats()[pair.b.public_key].has_session is False
    assert pair.a.get_timer() is None


def test_rekey_after_messages_and_reject_after_messages() -> None:
    pair = Pair(timers=Timers(rekey_after_messages=5, reject_after_messages=20))
    pair.handshake()
    pair.advance(6)
    for i in range(5):
        pair.send("a", a_to_b(bytes([i])))
    assert len(pair.sent("a", INITIATION)) == 2  # the fifth message crossed rekey_after_messages
    assert len(pair.received["b"]) == 6


def test_fast_timers_test_setting_rekeys_every_two_seconds() -> None:
    fast = Timers.fast(2.0)
    assert fast.rekey_after_time == 2.0
    assert fast.reject_after_time == pytest.approx(3.0)
    pair = Pair(timers=fast)
    pair.handshake()
    for step in range(1, 101):
        pair.advance(step / 10)
        pair.send("a", a_to_b())
        pair.send("b", b_to_a())
    assert pair.a.peer_stats()[pair.b.public_key].handshakes >= 4
    assert len(pair.received["b"]) == 101
    assert len(pair.received["a"]) == 100


def test_initiator_receiving_on_an_old_session_rekeys_once() -> None:
    pair = Pair()
    pair.handshake()
    age = T.reject_after_time - T.keepalive_timeout - T.rekey_timeout
    pair.advance(age - 1)
    pair.drop = lambda data, sender: data[0] == INITIATION
    before = len(pair.sent("a", INITIATION))
    pair.send("b", b_to_a(b"young enough"))
    assert len(pair.sent("a", INITIATION)) == before
    pair.advance(age + 0.5)
    pair.send("b", b_to_a(b"old: A starts a handshake"))
    pair.send("b", b_to_a(b"but only one"))
    assert len(pair.sent("a", INITIATION)) == before + 1
    assert pair.received["a"][-1] == b_to_a(b"but only one")
