"""Message formats: sizes, round trips, and parsers that only ever raise MessageError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import PunchtrioError
from punchtrio.wireguard import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    CookieReply,
    Initiation,
    MessageError,
    Response,
    Transport,
    _messages,
    _tai64n,
    parse_message,
)

PARSERS = [
    _messages.parse_initiation,
    _messages.parse_response,
    _messages.parse_cookie_reply,
    _messages.parse_transport,
    _messages.parse_message,
    _messages.message_type,
    _tai64n.decode,
]


def test_sizes() -> None:
    assert (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE, TRANSPORT_HEADER_SIZE) == (
        148,
        92,
        64,
        16,
    )
    assert issubclass(MessageError, PunchtrioError)


def b(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


def test_round_trips_and_little_endian_fields() -> None:
    init = Initiation(0x01020304, b(32, 1), b(48, 2), b(28, 3), b(16, 4), b(16, 5))
    wire = init.encode()
    assert len(wire) == 148
    assert wire[:8] == b"\x01\0\0\0\x04\x03\x02\x01"
    assert parse_message(wire) == init
    resp = Response(7, 0xA0B0C0D0, b(32, 1), b(16, 2), b(16, 3), b(16, 4))
    wire = resp.encode()
    assert len(wire) == 92
    assert wire[8:12] == b"\xd0\xc0\xb0\xa0"
    assert parse_message(wire) == resp
    reply = CookieReply(9, b(24, 1), b(32, 2))
    assert len(reply.encode()) == 64
    assert parse_message(reply.encode()) == reply
    data = Transport(3, 2**64 - 1, b(48, 9))
    wire = data.encode()
    assert wire[8:16] == b"\xff" * 8
    assert parse_message(wire) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\0\0",
        b"\x05\0\0\0" + bytes(144),
        b"\x01\x01\0\0" + bytes(144),  # reserved byte set
        b"\x01\0\0\0" + bytes(143),
        b"\x02\0\0\0" + bytes(89),
        b"\x03\0\0\0" + bytes(61),
        b"\x04\0\0\0" + bytes(27),
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(MessageError):
        parse_message(data)


@given(st.binary(max_size=300))
def test_parsers_only_raise_message_error(data: bytes) -> None:
    for parse in PARSERS:
        try:
            parse(data)
        except MessageError:
            pass


@given(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=200))
def test_parsers_with_valid_type_only_raise_message_error(kind: int, rest: bytes) -> None:
    data = bytes([kind, 0, 0, 0]) + rest
    for parse in PARSERS:
        try:
            parse(data)
        except MessageError:
            pass
