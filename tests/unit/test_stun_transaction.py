"""The sans-IO Binding transaction against a fake clock: retransmissions, give-up, spoofing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.stun import (
    BindingFailed,
    BindingSucceeded,
    BindingTimedOut,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    StunAttribute,
    StunMessage,
    StunTransaction,
    XorMappedAddress,
    is_usable_mapped_address,
    parse_message,
)

SERVER = ("192.0.2.10", 3478)
OTHER = ("192.0.2.11", 3479)


def _run_clock(tx: StunTransaction, until: float) -> list[float]:
    """Step a fake clock from timer to timer; return the times at which requests went out."""
    sent = []
    now = 0.0
    while not tx.done and now <= until:
        tx.handle_timer(now)
        for data, destination in tx.datagrams_to_send(now):
            assert destination == SERVER
            assert data == tx.request
            sent.append(now)
        timer = tx.get_timer()
        if timer is None:
            break
        now = timer
    return sent


def _response(tx: StunTransaction, *attrs: StunAttribute, msg_type: int = 0x0101) -> bytes:
    return bytes(
        StunMessage(
            msg_type=msg_type,
            transaction_id=tx.transaction_id,
            attributes=[*attrs, Fingerprint()],
        )
    )


def test_rfc8489_schedule_and_give_up() -> None:
    tx = StunTransaction(SERVER, 0.0)
    sent = _run_clock(tx, until=100.0)
    # RFC 8489 6.2.1: 0, 500, 1500, 3500, 7500, 15500, 31500 ms, give up at 39500 ms.
    assert sent == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert tx.done
    assert tx.next_event() == BindingTimedOut(attempts=7)
    assert tx.next_event() is None


def test_give_up_happens_exactly_at_rm_times_rto() -> None:
    tx = StunTransaction(SERVER, 0.0)
    _run_clock(tx, until=31.5)
    assert not tx.done
    assert tx.get_timer() == pytest.approx(39.5)
    tx.handle_timer(39.49)
    assert not tx.done
    tx.handle_timer(39.5)
    assert isinstance(tx.next_event(), BindingTimedOut)


@settings(max_examples=50, deadline=None)
@given(
    rto=st.floats(0.01, 3.0),
    rc=st.integers(1, 10),
    rm=st.integers(0, 20),
)
def test_schedule_is_configurable(rto: float, rc: int, rm: int) -> None:
    tx = StunTransaction(SERVER, 0.0, rto=rto, rc=rc, rm=rm)
    sent = _run_clock(tx, until=1e9)
    expected = [rto * (2**k - 1) for k in range(rc)]
    assert sent == pytest.approx(expected)
    assert tx.next_event() == BindingTimedOut(attempts=rc)


def test_nothing_is_sent_before_the_timer() -> None:
    tx = StunTransaction(SERVER, 10.0)
    assert len(tx.datagrams_to_send(10.0)) == 1
    assert tx.datagrams_to_send(10.2) == []
    assert tx.get_timer() == pytest.approx(10.5)
    assert len(tx.datagrams_to_send(10.5)) == 1


def test_success_reports_mapped_other_and_origin() -> None:
    tx = StunTransaction(SERVER, 0.0)
    tx.datagrams_to_send(0.0)
    reply = _response(
        tx,
        XorMappedAddress(ip="198.51.100.7", port=40000),
        MappedAddress(ip="203.0.113.99", port=1),
        ResponseOrigin(ip=SERVER[0], port=SERVER[1]),
        OtherAddress(ip=OTHER[0], port=OTHER[1]),
    )
    assert tx.receive_datagram(reply, SERVER, 0.25)
    event = tx.next_event()
    assert event == BindingSucceeded(
        mapped=("198.51.100.7", 40000),
        source=SERVER,
        response_origin=SERVER,
        other_address=OTHER,
        rtt=0.25,
    )
    assert tx.done
    assert tx.get_timer() is None
    assert tx.datagrams_to_send(100.0) == []


def test_mapped_address_is_the_fallback_for_old_servers() -> None:
    tx = StunTransaction(SERVER, 0.0)
    assert tx.receive_datagram(_response(tx, MappedAddress(ip="198.51.100.7", port=5)), SERVER, 1)
    event = tx.next_event()
    assert isinstance(event, BindingSucceeded)
    assert event.mapped == ("198.51.100.7", 5)


def test_reply_from_another_address_is_ignored() -> None:
    tx = StunTransaction(SERVER, 0.0)
    reply = _response(tx, XorMappedAddress(ip="198.51.100.7", port=40000))
    assert not tx.receive_datagram(reply, ("192.0.2.66", 3478), 0.1)
    assert not tx.receive_datagram(reply, (SERVER[0], 3479), 0.1)
    assert tx.next_event() is None
    assert not tx.done
    assert tx.receive_datagram(reply, SERVER, 0.2)


def test_reply_with_another_transaction_id_is_ignored() -> None:
    tx = StunTransaction(SERVER, 0.0)
    spoof = bytes(
        StunMessage(msg_type=0x0101, attributes=[XorMappedAddress(ip="198.51.100.7", port=1)])
    )
    assert not tx.receive_datagram(spoof, SERVER, 0.1)
    assert tx.next_event() is None
    assert not tx.done


def test_garbage_and_requests_are_ignored() -> None:
    tx = StunTransaction(SERVER, 0.0)
    assert not tx.receive_datagram(b"", SERVER, 0.1)
    assert not tx.receive_datagram(b"\x01" * 300, SERVER, 0.1)
    # Our own request echoed back (as hairpinning does) is not a response.
    assert not tx.receive_datagram(tx.request, SERVER, 0.1)
    corrupted = bytearray(_response(tx, XorMappedAddress(ip="198.51.100.7", port=1)))
    corrupted[-1] ^= 0xFF
    assert not tx.receive_datagram(bytes(corrupted), SERVER, 0.1)
    assert not tx.done


@pytest.mark.parametrize(
    "mapped",
    [("0.0.0.0", 4000), ("127.0.0.1", 4000), ("224.0.0.1", 4000), ("198.51.100.7", 0)],
)
def test_unusable_mapped_addresses_are_rejected(mapped: tuple[str, int]) -> None:
    tx = StunTransaction(SERVER, 0.0)
    reply = _response(tx, XorMappedAddress(ip=mapped[0], port=mapped[1]))
    assert tx.receive_datagram(reply, SERVER, 0.1)
    event = tx.next_event()
    assert isinstance(event, BindingFailed)
    assert "unusable mapped address" in event.reason


def test_ipv6_unusable_mapped_addresses() -> None:
    assert not is_usable_mapped_address(("::", 1))
    assert not is_usable_mapped_address(("ff02::1", 1))
    assert not is_usable_mapped_address(("::1", 1))
    assert not is_usable_mapped_address(("::ffff:127.0.0.1", 1))
    assert not is_usable_mapped_address(("not an ip", 1))
    assert is_usable_mapped_address(("2001:db8::1", 1))
    assert is_usable_mapped_address(("::1", 1), allow_loopback=True)


def test_loopback_is_accepted_from_a_loopback_server() -> None:
    tx = StunTransaction(("127.0.0.1", 3478), 0.0)
    reply = _response(tx, XorMappedAddress(ip="127.0.0.1", port=50000))
    assert tx.receive_datagram(reply, ("127.0.0.1", 3478), 0.1)
    assert isinstance(tx.next_event(), BindingSucceeded)


def test_error_response_fails_the_transaction() -> None:
    tx = StunTransaction(SERVER, 0.0, change_ip=True)
    reply = _response(
        tx, ErrorCode(error_class=4, number=20, reason=b"Unknown Attribute"), msg_type=0x0111
    )
    assert tx.receive_datagram(reply, SERVER, 0.1)
    assert tx.next_event() == BindingFailed("server answered 420 Unknown Attribute", 420)


def test_change_request_expects_the_answer_from_the_other_address() -> None:
    tx = StunTransaction(SERVER, 0.0, change_ip=True, change_port=True, expected_source=OTHER)
    request = parse_message(tx.request)
    change = request.get(ChangeRequest)
    assert (change.change_ip, change.change_port) == (1, 1)
    reply = _response(tx, XorMappedAddress(ip="198.51.100.7", port=40000))
    assert not tx.receive_datagram(reply, SERVER, 0.1)
    assert tx.receive_datagram(reply, OTHER, 0.1)
    event = tx.next_event()
    assert isinstance(event, BindingSucceeded)
    assert event.source == OTHER


def test_requests_are_padded_for_bounded_servers() -> None:
    assert len(StunTransaction(SERVER, 0.0).request) >= 44
    assert len(StunTransaction(("2001:db8::1", 3478), 0.0).request) >= 100
    assert len(StunTransaction(SERVER, 0.0, pad_to=0).request) == 20 + 16 + 8


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="rto"):
        StunTransaction(SERVER, 0.0, rto=0)
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        StunTransaction(("example.com", 3478), 0.0)
