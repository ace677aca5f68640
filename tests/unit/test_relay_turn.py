"""TurnClient against constructed server responses, with a fake clock."""

from __future__ import annotations

import hashlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.relay import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    ChannelBound,
    ChannelFailed,
    PermissionCreated,
    PermissionFailed,
    TurnAllocated,
    TurnClient,
    TurnClosed,
    TurnCredentials,
    TurnError,
    TurnEvent,
    TurnFailed,
    TurnReallocating,
    TurnRefreshed,
    TurnState,
)
from punchtrio.stun import (
    ChannelNumber,
    Data,
    ErrorCode,
    Lifetime,
    MessageIntegrity,
    Nonce,
    Realm,
    RequestedTransport,
    StunAttribute,
    StunMessage,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    message_type,
    parse_message,
    verify_integrity,
)

SERVER = ("192.0.2.1", 3478)
RELAYED = ("192.0.2.1", 50000)
MAPPED = ("198.51.100.7", 40000)
PEER = ("203.0.113.5", 51820)
USER, PASSWORD, REALM = "alice", "s3cret-password", b"example.org"
KEY = hashlib.md5(f"{USER}:example.org:{PASSWORD}".encode()).digest()
ALLOCATE, REFRESH, CREATE_PERMISSION, CHANNEL_BIND = 3, 4, 8, 9


def counter_random() -> object:
    numbers = itertools.count(1)
    return lambda n: next(numbers).to_bytes(n, "big")


def new_client(*, transport: str = "udp", lifetime: int = 600) -> TurnClient:
    return TurnClient(
        SERVER,
        TurnCredentials(USER, PASSWORD),
        transport=transport,  # type: ignore[arg-type]
        lifetime=lifetime,
        random=counter_random(),  # type: ignore[arg-type]
    )


def sent(client: TurnClient) -> list[StunMessage]:
    return [parse_message(raw) for raw in client.datagrams_to_send()]


def events(client: TurnClient) -> list[TurnEvent]:
    out = []
    while (event := client.next_event()) is not None:
        out.append(event)
    return out


def answer(
    request: StunMessage,
    attributes: list[StunAttribute] = (),  # type: ignore[assignment]
    *,
    error: int | None = None,
    key: bytes | None = KEY,
) -> bytes:
    """A response to ``request``: success, or ``error``; signed with ``key`` if not ``None``."""
    attrs = list(attributes)
    if error is not None:
        attrs.insert(0, ErrorCode(error_class=error // 100, number=error % 100, reason=b"nope"))
    if key is not None:
        attrs.append(MessageIntegrity())
    response = StunMessage(
        msg_type=message_type(request.method(), 3 if error is not None else 2),
        transaction_id=request.transaction_id,
        attributes=attrs,
    )
    return encode_message(response, key)


def challenge(request: StunMessage, nonce: bytes = b"nonce-1", code: int = 401) -> bytes:
    return answer(request, [Realm(value=REALM), Nonce(value=nonce)], error=code, key=None)


def allocated_ok(request: StunMessage, lifetime: int = 600) -> bytes:
    return answer(
        request,
        [
            XorRelayedAddress(ip=RELAYED[0], port=RELAYED[1]),
            XorMappedAddress(ip=MAPPED[0], port=MAPPED[1]),
            Lifetime(lifetime=lifetime),
        ],
    )


def allocate(client: TurnClient, now: float = 0.0, lifetime: int = 600) -> None:
    """Run the 401 dance and a successful Allocate; leave no events behind."""
    client.allocate(now)
    (first,) = sent(client)
    client.receive(challenge(first), now, source=SERVER)
    (second,) = sent(client)
    client.receive(allocated_ok(second, lifetime), now, source=SERVER)
    assert client.state is TurnState.ALLOCATED
    events(client)


def attr(message: StunMessage, cls: type[StunAttribute]) -> StunAttribute:
    found = message.get(cls)
    assert found is not None, f"{cls.__name__} missing"
    return found  # type: ignore[no-any-return]


def test_allocate_runs_the_long_term_credential_dance() -> None:
    client = new_client()
    client.allocate(0.0)
    (first,) = sent(client)
    assert first.method() == ALLOCATE
    assert first.message_class() == 0
    assert attr(first, RequestedTransport).protocol == 17
    assert attr(first, Lifetime).lifetime == 600
    assert first.get(MessageIntegrity) is None
    assert first.get(Username) is None
    assert client.receive(challenge(first), 0.1, source=SERVER) is None
    (second, *rest) = client.datagrams_to_send()
    assert rest == []
    signed = parse_message(second)
    assert signed.transaction_id != first.transaction_id
    assert attr(signed, Username).value == USER.encode()
    assert attr(signed, Realm).value == REALM
    assert attr(signed, Nonce).value == b"nonce-1"
    assert verify_integrity(second, KEY)
    client.receive(allocated_ok(signed), 0.2, source=SERVER)
    assert events(client) == [TurnAllocated(RELAYED, MAPPED, 600)]
    assert client.relayed_address == RELAYED
    assert client.mapped_address == MAPPED
    assert client.state is TurnState.ALLOCATED


def test_a_stale_nonce_is_retried_once_with_the_new_nonce() -> None:
    client = new_client()
    client.allocate(0.0)
    (first,) = sent(client)
    client.receive(challenge(first), 0.0)
    (second,) = sent(client)
    client.receive(challenge(second, b"nonce-2", 438), 0.0)
    (third,) = sent(client)
    assert attr(third, Nonce).value == b"nonce-2"
    client.receive(challenge(third, b"nonce-3", 438), 0.0)
    assert sent(client) == []
    (failed,) = events(client)
    assert isinstance(failed, TurnFailed)
    assert failed.code == 438
    assert client.state is TurnState.FAILED


def test_a_stale_nonce_on_refresh_keeps_the_allocation() -> None:
    client = new_client()
    allocate(client)
    client.handle_timer(540.0)
    (refresh,) = sent(client)
    client.receive(challenge(refresh, b"nonce-2", 438), 540.0)
    (again,) = sent(client)
    assert again.method() == REFRESH
    assert attr(again, Nonce).value == b"nonce-2"
    client.receive(answer(again, [Lifetime(lifetime=600)]), 540.1)
    assert events(client) == [TurnRefreshed(600)]


def test_refresh_is_sent_a_minute_before_expiry_and_reschedules() -> None:
    client = new_client()
    allocate(client)
    assert client.get_timer() == pytest.approx(540.0)
    client.handle_timer(539.9)
    assert sent(client) == []
    client.handle_timer(540.0)
    (refresh,) = sent(client)
    assert refresh.method() == REFRESH
    assert attr(refresh, Lifetime).lifetime == 600
    assert verify_integrity(bytes(refresh), KEY)
    client.receive(answer(refresh, [Lifetime(lifetime=300)]), 541.0)
    assert events(client) == [TurnRefreshed(300)]
    assert client.get_timer() == pytest.approx(541.0 + 240.0)


def test_a_short_lifetime_is_refreshed_half_way() -> None:
    client = new_client(lifetime=60)
    allocate(client, lifetime=60)
    assert client.get_timer() == pytest.approx(30.0)


def test_permission_and_channel_are_created_and_refreshed_separately() -> None:
    client = new_client()
    allocate(client)
    client.add_peer(PEER, 1.0)
    permission, bind = sent(client)
    assert permission.method() == CREATE_PERMISSION
    assert attr(permission, XorPeerAddress).endpoint()[0] == PEER[0]
    assert bind.method() == CHANNEL_BIND
    assert attr(bind, ChannelNumber).channel == CHANNEL_MIN
    assert attr(bind, XorPeerAddress).endpoint() == PEER
    client.receive(answer(permission), 1.0)
    client.receive(answer(bind), 1.0)
    assert events(client) == [PermissionCreated(PEER[0]), ChannelBound(PEER, CHANNEL_MIN)]
    assert client.channel_of(PEER) == CHANNEL_MIN
    # The permission lasts 300 s: it is refreshed with CreatePermission at 241 s, even though
    # the channel (600 s) is still bound.
    assert client.get_timer() == 241.0
    client.handle_timer(241.0)
    (again,) = sent(client)
    assert again.method() == CREATE_PERMISSION
    client.receive(answer(again), 241.0)
    client.handle_timer(481.0)
    (third,) = sent(client)
    assert third.method() == CREATE_PERMISSION
    client.receive(answer(third), 481.0)
    assert events(client) == []
    # The allocation at 540 s, the channel at 541 s (ChannelBind again with the same number).
    client.handle_timer(540.0)
    (refresh,) = sent(client)
    assert refresh.method() == REFRESH
    client.receive(answer(refresh, [Lifetime(lifetime=600)]), 540.0)
    client.handle_timer(541.0)
    (rebind,) = sent(client)
    assert rebind.method() == CHANNEL_BIND
    assert attr(rebind, ChannelNumber).channel == CHANNEL_MIN


def test_peers_added_before_the_allocation_are_installed_once_it_exists() -> None:
    client = new_client()
    client.add_peer(PEER, 0.0)
    assert client.wrap(PEER, b"x") is None
    client.allocate(0.0)
    (first,) = sent(client)
    client.receive(challenge(first), 0.0)
    (second,) = sent(client)
    client.receive(allocated_ok(second), 0.0)
    methods = [m.method() for m in sent(client)]
    assert methods == [CREATE_PERMISSION, CHANNEL_BIND]


def test_channel_numbers_stay_in_the_rfc_8656_range() -> None:
    client = new_client()
    allocate(client)
    numbers = []
    for port in range(1, CHANNEL_MAX - CHANNEL_MIN + 3):
        client.add_peer(("10.0.0.1", port), 1.0)  # one IP: one permission, many channels
        for raw in client.datagrams_to_send():
            # ChannelBind requests start with CHANNEL-NUMBER (read with struct: Scapy is slow).
            if struct.unpack_from("!H", raw)[0] == message_type(CHANNEL_BIND, 0):
                assert struct.unpack_from("!HH", raw, 20) == (0x000C, 4)
                numbers.append(struct.unpack_from("!H", raw, 24)[0])
    assert numbers == list(range(CHANNEL_MIN, CHANNEL_MAX + 1))  # the last peer got no channel
    assert client.channel_of(("10.0.0.1", 4098)) is None


def test_wrap_uses_send_indications_until_the_channel_is_bound() -> None:
    client = new_client()
    allocate(client)
    client.add_peer(PEER, 1.0)
    permission, bind = sent(client)
    assert client.wrap(PEER, b"early") is None  # no permission yet
    client.receive(answer(permission), 1.1)
    indication = client.wrap(PEER, b"hello")
    assert indication is not None
    message = parse_message(indication)
    assert message.msg_type == message_type(6, 1)
    assert attr(message, XorPeerAddress).endpoint() == PEER
    assert attr(message, Data).value == b"hello"
    client.receive(answer(bind), 1.2)
    assert client.wrap(PEER, b"hello") == struct.pack("!HH", CHANNEL_MIN, 5) + b"hello"
    assert client.counters["send_indications_out"] == 1
    assert client.counters["channel_data_out"] == 1
    assert client.wrap(PEER, bytes(70000)) is None


def test_ipv6_send_indications_parse_back() -> None:
    client = new_client()
    allocate(client)
    peer = ("2001:db8::5", 4444)
    client.add_peer(peer, 1.0)
    permission, _ = sent(client)
    client.receive(answer(permission), 1.0)
    indication = client.wrap(peer, b"v6")
    assert indication is not None
    assert attr(parse_message(indication), XorPeerAddress).endpoint() == peer


def test_channel_data_is_padded_on_tcp() -> None:
    client = new_client(transport="tcp")
    allocate(client)
    client.add_peer(PEER, 1.0)
    _, bind = sent(client)
    client.receive(answer(bind), 1.0)
    assert client.wrap(PEER, b"abcde") == struct.pack("!HH", CHANNEL_MIN, 5) + b"abcde\0\0\0"
    assert client.wrap(PEER, b"abcd") == struct.pack("!HH", CHANNEL_MIN, 4) + b"abcd"


def bound_client() -> TurnClient:
    client = new_client()
    allocate(client)
    client.add_peer(PEER, 1.0)
    permission, bind = sent(client)
    client.receive(answer(permission), 1.0)
    client.receive(answer(bind), 1.0)
    events(client)
    return client


def data_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    message = StunMessage(
        msg_type=message_type(7, 1),
        attributes=[XorPeerAddress(ip=peer[0], port=peer[1]), Data(value=payload)],
    )
    return encode_message(message)


def test_receive_unwraps_channel_data_and_data_indications() -> None:
    client = bound_client()
    frame = struct.pack("!HH", CHANNEL_MIN, 3) + b"abc" + b"\0"  # UDP may pad too
    assert client.receive(frame, 2.0, source=SERVER) == (PEER, b"abc")
    other_port = (PEER[0], 9999)
    assert client.receive(data_indication(other_port, b"xyz"), 2.0) == (other_port, b"xyz")
    assert client.counters["channel_data_in"] == 1
    assert client.counters["data_indications_in"] == 1


def test_receive_drops_and_counts_what_does_not_belong() -> None:
    client = bound_client()
    frame = struct.pack("!HH", CHANNEL_MIN, 3) + b"abc"
    assert client.receive(frame, 2.0, source=("192.0.2.99", 3478)) is None
    assert client.counters["dropped_wrong_source"] == 1
    assert client.receive(struct.pack("!HH", CHANNEL_MIN + 1, 3) + b"abc", 2.0) is None
    assert client.counters["dropped_unknown_channel"] == 1
    assert client.receive(struct.pack("!HH", 0x5000, 3) + b"abc", 2.0) is None
    assert client.receive(struct.pack("!HH", CHANNEL_MIN, 30) + b"abc", 2.0) is None
    assert client.counters["dropped_malformed"] == 2
    assert client.receive(data_indication(("198.51.100.1", 1), b"x"), 2.0) is None
    assert client.counters["dropped_unknown_peer"] == 1
    stray = StunMessage(msg_type=message_type(REFRESH, 2), attributes=[])
    assert client.receive(encode_message(stray), 2.0) is None
    assert client.counters["dropped_unmatched"] == 1


def test_unsigned_or_badly_signed_success_responses_are_dropped() -> None:
    client = new_client()
    client.allocate(0.0)
    (first,) = sent(client)
    client.receive(challenge(first), 0.0)
    (second,) = sent(client)
    client.receive(allocated_ok(second)[:-24] + b"", 0.0)  # truncated: malformed
    unsigned = answer(second, [XorRelayedAddress(ip="192.0.2.1", port=1)], key=None)
    client.receive(unsigned, 0.0)
    forged = answer(second, [XorRelayedAddress(ip="192.0.2.1", port=1)], key=b"wrong")
    client.receive(forged, 0.0)
    assert client.counters["dropped_integrity"] == 2
    assert client.state is TurnState.ALLOCATING
    # Retransmissions go on, and the genuine answer still counts.
    client.handle_timer(0.5)
    assert len(client.datagrams_to_send()) == 1
    client.receive(allocated_ok(second), 0.6)
    assert isinstance(events(client)[0], TurnAllocated)


def test_udp_retransmissions_follow_rfc_8489() -> None:
    client = new_client()
    client.allocate(0.0)
    times = [0.0]
    assert len(client.datagrams_to_send()) == 1
    now = 0.0
    while client.state is TurnState.ALLOCATING:
        timer = client.get_timer()
        assert timer is not None
        now = timer
        client.handle_timer(now)
        if client.datagrams_to_send():
            times.append(now)
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert now == pytest.approx(39.5)
    (failed,) = events(client)
    assert isinstance(failed, TurnFailed)
    assert failed.code is None
    assert "192.0.2.1:3478" in failed.reason
    assert "7 request" in failed.reason
    assert client.counters["retransmissions"] == 6


def test_tcp_requests_are_not_retransmitted() -> None:
    client = new_client(transport="tcp")
    client.allocate(0.0)
    assert len(client.datagrams_to_send()) == 1
    assert client.get_timer() == pytest.approx(39.5)
    client.handle_timer(39.5)
    assert client.datagrams_to_send() == []
    assert isinstance(events(client)[0], TurnFailed)


def test_wrong_password_fails_with_a_clear_error_without_the_password() -> None:
    client = new_client()
    client.allocate(0.0)
    (first,) = sent(client)
    client.receive(challenge(first), 0.0)
    (second,) = sent(client)
    client.receive(challenge(second, b"nonce-2"), 0.0)
    (failed,) = events(client)
    assert isinstance(failed, TurnFailed)
    assert failed.code == 401
    assert "192.0.2.1:3478" in failed.reason
    assert "'alice'" in failed.reason
    assert PASSWORD not in failed.reason
    assert PASSWORD not in repr(client.credentials)


def test_441_wrong_credentials_on_refresh_fails() -> None:
    client = new_client()
    allocate(client)
    client.handle_timer(540.0)
    (refresh,) = sent(client)
    client.receive(answer(refresh, error=441), 540.0)
    (failed,) = events(client)
    assert isinstance(failed, TurnFailed)
    assert failed.code == 441
    assert "credentials" in failed.reason
    assert PASSWORD not in failed.reason
    assert client.relayed_address is None


@pytest.mark.parametrize("code", [442, 486, 508, 400])
def test_allocate_errors_fail_and_may_be_retried(code: int) -> None:
    client = new_client()
    client.allocate(0.0)
    (first,) = sent(client)
    client.receive(challenge(first), 0.0)
    (second,) = sent(client)
    client.receive(answer(second, error=code), 0.0)
    (failed,) = events(client)
    assert isinstance(failed, TurnFailed)
    assert failed.code == code
    assert ("try again later" in failed.reason) == (code in (486, 508))
    client.allocate(10.0)  # allowed again after a failure, signed at once
    (again,) = sent(client)
    assert verify_integrity(bytes(again), KEY)


def test_437_on_refresh_reallocates_and_reinstalls_peers() -> None:
    client = bound_client()
    client.handle_timer(540.0)
    (refresh,) = [m for m in sent(client) if m.method() == REFRESH]
    client.receive(answer(refresh, error=437), 540.0)
    (lost,) = events(client)
    assert isinstance(lost, TurnReallocating)
    assert lost.code == 437
    assert client.wrap(PEER, b"x") is None
    (allocate_again,) = sent(client)
    assert allocate_again.method() == ALLOCATE
    assert verify_integrity(bytes(allocate_again), KEY)
    client.receive(allocated_ok(allocate_again), 540.1)
    assert isinstance(events(client)[0], TurnAllocated)
    permission, bind = sent(client)
    assert (permission.method(), bind.method()) == (CREATE_PERMISSION, CHANNEL_BIND)
    assert attr(bind, ChannelNumber).channel == CHANNEL_MIN


def test_437_on_allocate_deletes_the_old_allocation_once() -> None:
    client = new_client()
    client.allocate(0.0)
    (first,) = sent(client)
    client.receive(challenge(first), 0.0)
    (second,) = sent(client)
    client.receive(answer(second, error=437, key=None), 0.0)
    (delete,) = sent(client)
    assert delete.method() == REFRESH
    assert attr(delete, Lifetime).lifetime == 0
    client.receive(answer(delete), 0.1)
    # coturn frees a zero-lifetime allocation at its next one-second tick: wait before allocating.
    assert sent(client) == []
    assert client.get_timer() == pytest.approx(2.1)
    client.handle_timer(2.1)
    (third,) = sent(client)
    assert third.method() == ALLOCATE
    client.receive(answer(third, error=437), 0.2)
    (failed,) = events(client)
    assert isinstance(failed, TurnFailed)
    assert failed.code == 437


def test_permission_errors_are_per_peer() -> None:
    client = new_client()
    allocate(client)
    client.add_peer(PEER, 1.0)
    permission, bind = sent(client)
    client.receive(answer(permission, error=403), 1.0)
    client.receive(answer(bind, error=508), 1.0)
    refused, unbound = events(client)
    assert isinstance(refused, PermissionFailed)
    assert isinstance(unbound, ChannelFailed)
    assert (refused.code, unbound.code) == (403, 508)
    assert client.state is TurnState.ALLOCATED
    assert client.wrap(PEER, b"x") is None


def test_close_deletes_the_allocation() -> None:
    client = bound_client()
    client.close(5.0)
    (delete,) = sent(client)
    assert delete.method() == REFRESH
    assert attr(delete, Lifetime).lifetime == 0
    assert client.state is TurnState.CLOSING
    assert client.wrap(PEER, b"x") is None
    client.receive(answer(delete, [Lifetime(lifetime=0)]), 5.1)
    assert events(client) == [TurnClosed()]
    assert client.get_timer() is None
    client.close(6.0)
    assert client.receive(struct.pack("!HH", CHANNEL_MIN, 1) + b"x", 6.0) is None
    assert client.counters["dropped_closed"] == 1


def test_close_gives_up_after_a_few_seconds() -> None:
    client = bound_client()
    client.close(5.0)
    now = 5.0
    while (timer := client.get_timer()) is not None:
        now = timer
        client.handle_timer(now)
    assert now == pytest.approx(5.0 + 3.5)
    assert events(client) == [TurnClosed()]
    assert len(client.datagrams_to_send()) == 3


def test_close_before_allocating_is_immediate() -> None:
    client = new_client()
    client.close(0.0)
    assert events(client) == [TurnClosed()]
    with pytest.raises(TurnError):
        client.allocate(1.0)


def test_new_credentials_rotate_the_allocation_at_its_refresh() -> None:
    client = bound_client()
    new = TurnCredentials("bob", "other")
    client.update_credentials(new)
    client.handle_timer(540.0)
    (delete,) = [m for m in sent(client) if m.method() == REFRESH]
    assert delete.method() == REFRESH
    assert attr(delete, Lifetime).lifetime == 0
    assert attr(delete, Username).value == b"alice"
    assert isinstance(events(client)[0], TurnReallocating)
    client.receive(answer(delete), 540.0)
    client.handle_timer(542.0)
    (allocate_again,) = sent(client)
    assert attr(allocate_again, Username).value == b"bob"
    bob_key = hashlib.md5(b"bob:example.org:other").digest()
    assert verify_integrity(bytes(allocate_again), bob_key)


def test_bad_arguments_raise_turn_error() -> None:
    credentials = TurnCredentials(USER, PASSWORD)
    with pytest.raises(TurnError):
        TurnClient(("turn.example.org", 3478), credentials)
    with pytest.raises(TurnError):
        TurnClient(SERVER, credentials, lifetime=0)
    with pytest.raises(TurnError):
        TurnClient(SERVER, credentials, transport="dtls")  # type: ignore[arg-type]
    client = TurnClient(SERVER, credentials)
    with pytest.raises(TurnError):
        client.add_peer(("not-an-ip", 1), 0.0)
    with pytest.raises(TurnError):
        client.add_peer(("192.0.2.9", 0), 0.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_receive_never_raises(data: bytes) -> None:
    client = bound_client()
    client.receive(data, 3.0, source=SERVER)
    client.receive(b"\x01\x13" + data, 3.0)
    client.receive(b"\x40\x00" + data, 3.0)


def test_receive_stream_splits_and_fails_on_garbage() -> None:
    client = new_client(transport="tcp")
    allocate(client)
    client.add_peer(PEER, 1.0)
    _, bind = sent(client)
    client.receive(answer(bind), 1.0)
    frame = struct.pack("!HH", CHANNEL_MIN, 5) + b"hello\0\0\0"
    stream = frame + frame
    assert client.receive_stream(stream[:7], 2.0) == []
    assert client.receive_stream(stream[7:], 2.0) == [(PEER, b"hello"), (PEER, b"hello")]
    assert client.receive_stream(b"\xff" * 8, 2.0) == []
    assert isinstance(events(client)[-1], TurnFailed)
    with pytest.raises(TurnError):
        new_client().receive_stream(b"", 0.0)
