"""The STUN server: the sans-IO responder, then the Trio server on loopback (127.0.0.1/127.0.0.2)."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.stun import (
    RESPONSE_ALLOWANCE,
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    SourceAddress,
    StunAttribute,
    StunMessage,
    StunResponder,
    StunServer,
    StunServerError,
    UnknownAttributes,
    XorMappedAddress,
    parse_message,
)

P = ("192.0.2.1", 3478)
A = ("192.0.2.2", 3479)
CLIENT = ("198.51.100.9", 40000)


def _request(*attrs: StunAttribute, pad: int = 0) -> bytes:
    raw = bytes(StunMessage(attributes=list(attrs)))
    if pad:
        raw = bytes(
            StunMessage(
                transaction_id=int.from_bytes(raw[8:20], "big"),
                attributes=[StunAttribute(type=0x8022, value=b" " * pad), *attrs],
            )
        )
    return raw


def test_binding_response_has_every_rfc5780_attribute() -> None:
    responder = StunResponder(P, A, rate=None)
    request = _request(Fingerprint(), pad=24)
    reply = responder.handle(request, P, CLIENT, 0.0)
    assert reply is not None
    assert reply.source == P
    assert reply.destination == CLIENT
    msg = parse_message(reply.data)
    assert msg.transaction_id == parse_message(request).transaction_id
    assert msg.msg_type == 0x0101
    assert msg.get(XorMappedAddress).endpoint() == CLIENT
    assert msg.get(MappedAddress).endpoint() == CLIENT
    assert msg.get(ResponseOrigin).endpoint() == P
    assert msg.get(OtherAddress).endpoint() == A
    assert msg.get(ChangedAddress).endpoint() == A
    assert msg.get(Fingerprint) is not None
    assert responder.stats.answered == 1


@pytest.mark.parametrize(
    ("change_ip", "change_port", "local", "source"),
    [
        (1, 1, P, A),
        (1, 0, P, (A[0], P[1])),
        (0, 1, P, (P[0], A[1])),
        (0, 0, P, P),
        (1, 1, A, P),
        (0, 1, (A[0], P[1]), A),
    ],
)
def test_change_request_picks_the_source(
    change_ip: int, change_port: int, local: tuple[str, int], source: tuple[str, int]
) -> None:
    responder = StunResponder(P, A, rate=None)
    request = _request(ChangeRequest(change_ip=change_ip, change_port=change_port))
    reply = responder.handle(request, local, CLIENT, 0.0)
    assert reply is not None
    assert reply.source == source
    msg = parse_message(reply.data)
    assert msg.get(ResponseOrigin).endpoint() == source
    # OTHER-ADDRESS is relative to where the request arrived.
    flipped = (P[0] if local[0] == A[0] else A[0], P[1] if local[1] == A[1] else A[1])
    assert msg.get(OtherAddress).endpoint() == flipped


def test_change_request_without_alternate_gets_420() -> None:
    responder = StunResponder(P, rate=None)
    reply = responder.handle(_request(ChangeRequest(change_ip=1)), P, CLIENT, 0.0)
    assert reply is not None
    msg = parse_message(reply.data)
    assert msg.msg_type == 0x0111
    assert msg.get(ErrorCode).code == 420
    assert msg.get(UnknownAttributes).types == [0x0003]
    assert responder.stats.errors == 1
    # A CHANGE-REQUEST that asks for no change is answered normally, without OTHER-ADDRESS.
    reply = responder.handle(_request(ChangeRequest()), P, CLIENT, 0.0)
    assert reply is not None
    ok = parse_message(reply.data)
    assert ok.msg_type == 0x0101
    assert ok.get(OtherAddress) is None


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    responder = StunResponder(P, A, rate=None)
    request = _request(StunAttribute(type=0x7777, value=b"x"), StunAttribute(type=0xC000))
    reply = responder.handle(request, P, CLIENT, 0.0)
    assert reply is not None
    assert parse_message(reply.data).get(UnknownAttributes).types == [0x7777]


def test_response_port_redirects_to_the_same_ip() -> None:
    responder = StunResponder(P, A, rate=None)
    reply = responder.handle(_request(ResponsePort(port=5555)), P, CLIENT, 0.0)
    assert reply is not None
    assert reply.destination == (CLIENT[0], 5555)


def test_classic_rfc3489_request_gets_mapped_source_and_changed() -> None:
    responder = StunResponder(P, A, rate=None)
    request = (
        struct.pack("!HHI", 1, 8, 0xDEADBEEF)
        + bytes(range(12))
        + bytes(ChangeRequest(change_port=1))
    )
    reply = responder.handle(request, P, CLIENT, 0.0)
    assert reply is not None
    assert reply.data[4:20] == request[4:20]
    msg = parse_message(reply.data, classic=True)
    assert msg.get(XorMappedAddress) is None
    assert msg.get(MappedAddress).endpoint() == CLIENT
    assert msg.get(SourceAddress).endpoint() == (P[0], A[1])
    assert msg.get(ChangedAddress).endpoint() == A


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        bytes(19),
        b"\x80" + bytes(19),
        struct.pack("!HHI", 1, 4, 0x2112A442) + bytes(12),
        struct.pack("!HHI", 1, 4, 0x2112A442) + bytes(12) + b"\x00\x03\x00\x08",
        pytest.param(
            bytes(StunMessage(attributes=[ChangeRequest(length=2)])), id="change-request-2"
        ),
        pytest.param(bytes(StunMessage(attributes=[Fingerprint(crc=1234)])), id="bad-fingerprint"),
        pytest.param(
            bytes(StunMessage(attributes=[Fingerprint(), StunAttribute(type=0x8022)])),
            id="fingerprint-not-last",
        ),
        bytes(2000),
    ],
)
def test_malformed_datagrams_are_dropped_and_counted(data: bytes) -> None:
    responder = StunResponder(P, A, rate=None)
    assert responder.handle(data, P, CLIENT, 0.0) is None
    assert responder.stats.malformed == 1
    assert responder.stats.received == 1


def test_responses_and_indications_are_ignored() -> None:
    responder = StunResponder(P, A, rate=None)
    for msg_type in (0x0101, 0x0111, 0x0011, 0x0003):
        assert responder.handle(bytes(StunMessage(msg_type=msg_type)), P, CLIENT, 0.0) is None
    assert responder.stats.ignored == 4
    assert responder.stats.malformed == 0


def test_rate_limit_per_source_ip() -> None:
    responder = StunResponder(P, A, rate=10.0, burst=5.0)
    request = _request()
    answers = [responder.handle(request, P, CLIENT, 0.0) for _ in range(8)]
    assert sum(a is not None for a in answers) == 5
    assert responder.stats.rate_limited == 3
    # Another source has its own bucket; the first refills at 10 per second.
    assert responder.handle(request, P, ("198.51.100.10", 1), 0.0) is not None
    assert responder.handle(request, P, CLIENT, 0.05) is None
    assert responder.handle(request, P, CLIENT, 0.1) is not None


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(
        st.tuples(st.sampled_from([0x0003, 0x0027, 0x7777, 0x8022, 0x8028]), st.binary(max_size=12))
    ),
    classic=st.booleans(),
    ipv6=st.booleans(),
)
def test_no_amplification(body: list[tuple[int, bytes]], classic: bool, ipv6: bool) -> None:
    primary, alternate = (("2001:db8::1", 3478), ("2001:db8::2", 3479)) if ipv6 else (P, A)
    client = ("2001:db8::99", 40000) if ipv6 else CLIENT
    responder = StunResponder(primary, alternate, rate=None)
    attrs = b"".join(struct.pack("!HH", t, len(v)) + v + bytes(-len(v) % 4) for t, v in body)
    cookie = 0x01020304 if classic else 0x2112A442
    request = struct.pack("!HHI", 1, len(attrs), cookie) + bytes(12) + attrs
    reply = responder.handle(request, primary, client, 0.0)
    if reply is not None:
        assert len(reply.data) <= len(request) + RESPONSE_ALLOWANCE
        parse_message(reply.data, classic=classic)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), prefix=st.sampled_from([b"", b"\x00\x01", b"\x00\x01\x00"]))
def test_responder_never_raises(data: bytes, prefix: bytes) -> None:
    responder = StunResponder(P, A, rate=None)
    datagram = prefix + data
    if len(datagram) >= 20 and prefix:
        body = datagram[20:]
        datagram = struct.pack("!HHI", 1, len(body), 0x2112A442) + datagram[8:20] + body
    reply = responder.handle(datagram, P, CLIENT, 0.0)
    stats = responder.stats
    assert stats.received == 1
    assert (reply is None) == (stats.answered + stats.errors == 0)


def test_link_local_ipv6_source_is_encoded_without_its_zone() -> None:
    responder = StunResponder(("2001:db8::1", 3478), rate=None)
    reply = responder.handle(_request(), ("2001:db8::1", 3478), ("fe80::1%lo", 5), 0.0)
    assert reply is not None
    assert parse_message(reply.data).get(XorMappedAddress).endpoint() == ("fe80::1", 5)


def test_minimal_request_still_gets_the_mapped_address() -> None:
    responder = StunResponder(("2001:db8::1", 3478), ("2001:db8::2", 3479), rate=None)
    reply = responder.handle(_request(), ("2001:db8::1", 3478), ("2001:db8::99", 4), 0.0)
    assert reply is not None
    assert len(reply.data) <= 20 + RESPONSE_ALLOWANCE
    assert parse_message(reply.data).get(XorMappedAddress).endpoint() == ("2001:db8::99", 4)


def test_bad_configurations_raise() -> None:
    with pytest.raises(StunServerError, match="both IP and port"):
        StunResponder(P, (P[0], 4000))
    with pytest.raises(StunServerError, match="both IP and port"):
        StunResponder(P, ("192.0.2.7", P[1]))
    with pytest.raises(StunServerError, match="family"):
        StunResponder(P, ("2001:db8::1", 4000))
    with pytest.raises(StunServerError, match="not an IP"):
        StunResponder(("stun.example", 3478))


# --- the Trio server on loopback -------------------------------------------------------------------


async def _ask(
    sock: trio.socket.SocketType, destination: tuple[str, int], request: bytes
) -> tuple[bytes, tuple[str, int]] | None:
    await sock.sendto(request, destination)
    with trio.move_on_after(2):
        data, source = await sock.recvfrom(2048)
        return data, source[:2]
    return None


async def test_server_on_loopback_honours_change_request() -> None:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0), rate=None)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(server.serve)
        primary, _, _, alternate = endpoints
        assert len(set(endpoints)) == 4
        with trio.socket.socket(type=socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            me = sock.getsockname()
            for change_ip, change_port, expected in [
                (0, 0, primary),
                (1, 1, alternate),
                (1, 0, (alternate[0], primary[1])),
                (0, 1, (primary[0], alternate[1])),
            ]:
                request = _request(ChangeRequest(change_ip=change_ip, change_port=change_port))
                answer = await _ask(sock, primary, request)
                assert answer is not None
                data, source = answer
                assert source == expected
                msg = parse_message(data)
                assert msg.get(XorMappedAddress).endpoint() == me
                assert msg.get(ResponseOrigin).endpoint() == expected
                assert msg.get(OtherAddress).endpoint() == alternate
            # Malformed input is counted and the server keeps answering.
            await sock.sendto(b"garbage", primary)
            assert await _ask(sock, alternate, _request()) is not None
        assert server.stats.malformed == 1
        assert server.stats.answered == 5
        nursery.cancel_scope.cancel()


async def test_server_without_alternate_answers_420_and_rate_limits() -> None:
    server = StunServer(("127.0.0.1", 0), rate=1.0, burst=2.0)
    async with trio.open_nursery() as nursery:
        (primary,) = await nursery.start(server.serve)
        with trio.socket.socket(type=socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            answer = await _ask(sock, primary, _request(ChangeRequest(change_port=1)))
            assert answer is not None
            assert parse_message(answer[0]).get(ErrorCode).code == 420
            assert await _ask(sock, primary, _request()) is not None
            for _ in range(3):
                await sock.sendto(_request(), primary)
            with trio.move_on_after(0.3) as scope:
                await sock.recvfrom(2048)
            assert scope.cancelled_caught
        assert server.stats.rate_limited == 3
        nursery.cancel_scope.cancel()


async def test_server_reports_bind_failure() -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        server = StunServer(taken.getsockname())
        with pytest.raises(StunServerError, match="cannot bind"):
            await server.serve()
