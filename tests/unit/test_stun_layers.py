"""STUN Scapy layers: RFC 5769 vectors, computed integrity and fingerprint, fuzzing of the parser."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.stun import (
    ATTRIBUTE_TYPES,
    MAGIC_COOKIE,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    MessageIntegrity,
    OtherAddress,
    Software,
    StunAttribute,
    StunError,
    StunMessage,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    encode_message,
    long_term_key,
    parse_message,
    verify_fingerprint,
    verify_integrity,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc5769.json").read_text())
NAMES = [
    "sample_request",
    "sample_ipv4_response",
    "sample_ipv6_response",
    "sample_request_long_term",
]


def _vector(name: str) -> tuple[bytes, bytes, dict[str, Any]]:
    vector = VECTORS[name]
    if "realm" in vector:
        key = long_term_key(vector["username"], vector["realm"], vector["password"])
    else:
        key = vector["password"].encode()
    return bytes.fromhex(vector["hex"]), key, vector


def _fresh_copy(msg: StunMessage) -> StunMessage:
    """Rebuild ``msg`` from its field values, leaving lengths, HMAC and CRC to be computed."""
    computed = {"length", "hmac", "crc"}
    attrs = [
        type(attr)(
            **{f.name: attr.getfieldval(f.name) for f in attr.fields_desc if f.name not in computed}
        )
        for attr in msg.attributes
    ]
    return StunMessage(
        msg_type=msg.msg_type,
        magic_cookie=msg.magic_cookie,
        transaction_id=msg.transaction_id,
        attributes=attrs,
    )


@pytest.mark.parametrize("name", NAMES)
def test_rfc5769_vectors_parse_and_rebuild_bit_exactly(name: str) -> None:
    data, key, _ = _vector(name)
    msg = parse_message(data)
    assert bytes(msg) == data
    assert verify_integrity(data, key)
    assert not verify_integrity(data, key + b"x")
    assert verify_fingerprint(data) == (name != "sample_request_long_term")


@pytest.mark.parametrize("name", NAMES)
def test_rfc5769_vectors_built_from_fields_compute_integrity_and_fingerprint(name: str) -> None:
    data, key, _ = _vector(name)
    fresh = _fresh_copy(parse_message(data))
    assert fresh.get(MessageIntegrity).hmac is None
    assert encode_message(fresh, key) == data


def test_sample_request_fields() -> None:
    data, _, vector = _vector("sample_request")
    msg = parse_message(data)
    assert msg.msg_type == 0x0001
    assert msg.transaction_id == 0xB7E7A701BC34D686FA87DFAE
    assert msg.get(Software).text() == vector["software"]
    username = msg.get(Username)
    assert username.text() == vector["username"]
    assert username.padding == b"   "
    assert [ATTRIBUTE_TYPES[a.type] for a in msg.attributes] == [
        "SOFTWARE",
        "PRIORITY",
        "ICE-CONTROLLED",
        "USERNAME",
        "MESSAGE-INTEGRITY",
        "FINGERPRINT",
    ]


@pytest.mark.parametrize("name", ["sample_ipv4_response", "sample_ipv6_response"])
def test_rfc5769_responses_xor_mapped_address(name: str) -> None:
    data, _, vector = _vector(name)
    mapped = parse_message(data).get(XorMappedAddress)
    assert mapped.endpoint() == tuple(vector["mapped"])


def test_long_term_key_is_md5_of_user_realm_password() -> None:
    _, key, vector = _vector("sample_request_long_term")
    assert len(key) == 16
    assert (
        parse_message(_vector("sample_request_long_term")[0]).get(Username).text()
        == (vector["username"])
    )


def test_fingerprint_mismatch_is_rejected() -> None:
    data = bytearray(_vector("sample_ipv4_response")[0])
    data[-1] ^= 1
    with pytest.raises(StunError, match="FINGERPRINT"):
        parse_message(bytes(data))
    assert parse_message(bytes(data), check_fingerprint=False).get(Fingerprint) is not None


def test_transaction_ids_are_random_96_bit() -> None:
    ids = {StunMessage().transaction_id for _ in range(50)}
    assert len(ids) == 50
    assert all(0 <= tid < 2**96 for tid in ids)
    assert 0 not in ids


def test_a_built_message_keeps_its_transaction_id() -> None:
    msg = StunMessage()
    assert bytes(msg)[8:20] == bytes(msg)[8:20] == msg.transaction_id.to_bytes(12, "big")


def test_hashret_and_answers_match_response_to_request() -> None:
    request = StunMessage(attributes=[ChangeRequest(change_ip=1)])
    response = StunMessage(
        msg_type=0x0101,
        transaction_id=request.transaction_id,
        attributes=[XorMappedAddress(ip="198.51.100.1", port=40000)],
    )
    other = StunMessage(msg_type=0x0101)
    assert response.hashret() == request.hashret()
    assert response.answers(request)
    assert not request.answers(response)
    assert not other.answers(request)
    parsed = parse_message(bytes(response))
    assert parsed.answers(parse_message(bytes(request)))


def test_error_code_and_unknown_attributes() -> None:
    msg = StunMessage(
        msg_type=0x0111,
        attributes=[
            ErrorCode(error_class=4, number=20, reason=b"Unknown Attribute"),
            UnknownAttributes(types=[0x0003, 0x7777, 0x1234]),
        ],
    )
    parsed = parse_message(bytes(msg))
    assert parsed.get(ErrorCode).code == 420
    assert parsed.get(ErrorCode).reason == b"Unknown Attribute"
    assert parsed.get(UnknownAttributes).types == [0x0003, 0x7777, 0x1234]
    assert parsed.message_class() == 3
    assert parsed.method() == 1


def test_ipv6_xor_mapped_address_uses_the_transaction_id() -> None:
    msg = StunMessage(
        msg_type=0x0101,
        attributes=[XorMappedAddress(family=2, ip="2001:db8::7", port=3478)],
    )
    raw = bytes(msg)
    assert parse_message(raw).get(XorMappedAddress).endpoint() == ("2001:db8::7", 3478)
    # The same address under another transaction id is XORed differently on the wire.
    other = StunMessage(msg_type=0x0101, attributes=[XorMappedAddress(family=2, ip="2001:db8::7")])
    assert bytes(other)[-16:] != raw[-16:]


def test_classic_messages_need_opting_in() -> None:
    raw = struct.pack("!HHI", 1, 0, 0x12345678) + bytes(12)
    with pytest.raises(StunError, match="magic cookie"):
        parse_message(raw)
    assert parse_message(raw, classic=True).magic_cookie == 0x12345678


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (b"\x00\x01\x00\x00" + bytes(15), "too short"),
        (b"\xc0\x01\x00\x00" + struct.pack("!I", MAGIC_COOKIE) + bytes(12), "first two bits"),
        (b"\x00\x01\x00\x04" + struct.pack("!I", MAGIC_COOKIE) + bytes(12), "length"),
        (
            b"\x00\x01\x00\x04" + struct.pack("!I", MAGIC_COOKIE) + bytes(12) + b"\x00\x01\x00\x08",
            "past the end",
        ),
        (
            b"\x00\x01\x00\x08"
            + struct.pack("!I", MAGIC_COOKIE)
            + bytes(12)
            + b"\x00\x01\x00\x04\x00\x01\x00\x00",
            "MAPPED-ADDRESS",
        ),
    ],
)
def test_malformed_messages_raise_stun_error(data: bytes, reason: str) -> None:
    with pytest.raises(StunError, match=reason):
        parse_message(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parser_raises_only_stun_error_on_arbitrary_bytes(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except StunError:
        return
    assert bytes(msg) == data


_KNOWN = sorted(ATTRIBUTE_TYPES)


@st.composite
def _attribute_soup(draw: st.DrawFn) -> bytes:
    """A valid header followed by attributes of known and unknown types with random bodies."""
    body = b""
    for _ in range(draw(st.integers(0, 5))):
        atype = draw(st.sampled_from(_KNOWN) | st.integers(0, 0xFFFF))
        value = draw(st.binary(max_size=24))
        if draw(st.booleans()) and atype in (0x0001, 0x0020, 0x802C):
            value = bytes([0, draw(st.integers(0, 3))]) + value[:18]
        length = len(value) if draw(st.booleans()) else draw(st.integers(0, 40))
        body += struct.pack("!HH", atype, length) + value + bytes(-len(value) % 4)
    cls = draw(st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011, draw(st.integers(0, 0x3FFF))]))
    tid = draw(st.binary(min_size=12, max_size=12))
    return struct.pack("!HHI", cls, len(body), MAGIC_COOKIE) + tid + body


@settings(max_examples=500, deadline=None)
@given(_attribute_soup())
def test_parser_raises_only_stun_error_on_attribute_soup(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except StunError:
        return
    assert bytes(msg) == data
    for attr in msg.attributes:
        assert isinstance(attr, StunAttribute)


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda ip: str(ipaddress.ip_address(ip)))


@settings(max_examples=200, deadline=None)
@given(
    v4=_ipv4,
    v6=_ipv6,
    port=st.integers(0, 65535),
    software=st.text(max_size=40),
    key=st.binary(min_size=1, max_size=32),
)
def test_built_messages_round_trip(v4: str, v6: str, port: int, software: str, key: bytes) -> None:
    msg = StunMessage(
        msg_type=0x0101,
        attributes=[
            Software(value=software.encode()),
            XorMappedAddress(ip=v4, port=port),
            XorMappedAddress(family=2, ip=v6, port=port),
            MappedAddress(family=2, ip=v6, port=port),
            OtherAddress(ip=v4, port=port),
            MessageIntegrity(),
            Fingerprint(),
        ],
    )
    raw = encode_message(msg, key)
    assert len(raw) % 4 == 0
    parsed = parse_message(raw)
    assert verify_integrity(raw, key)
    assert verify_fingerprint(raw)
    xors = [a for a in parsed.attributes if isinstance(a, XorMappedAddress)]
    assert [a.endpoint() for a in xors] == [(v4, port), (v6, port)]
    assert parsed.get(MappedAddress).endpoint() == (v6, port)
    assert parsed.get(Software).value == software.encode()
