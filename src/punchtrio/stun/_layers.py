"""STUN messages as Scapy layers (RFC 8489, RFC 5780, RFC 3489 attributes), owned by punchtrio.

Scapy's ``scapy.contrib.stun`` knows only a few attributes and leaves MESSAGE-INTEGRITY empty. Rather
than patching its private tables, this module defines its own :class:`StunMessage` and one Packet class
per attribute, dispatched through punchtrio's own table. Padding bytes are a field of every attribute,
so a parsed message rebuilds bit-exactly even when its sender padded with spaces (RFC 5769 does).

Parsing goes through :func:`parse_message`, which checks the framing with ``struct`` before Scapy sees
the bytes and turns every failure into :class:`StunError`. Scapy is for the control plane: the server's
hot path (``_server.py``) reads and writes the few fields it needs with ``struct``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
import warnings
import zlib
from typing import Any

with warnings.catch_warnings():
    # Scapy's first import can warn (deprecations in its dependencies, missing interfaces): not
    # something punchtrio's users can act on, and fatal under ``-W error``. Only Scapy's core is
    # loaded (``scapy.packet``, ``scapy.fields``), not its protocol layers: they cost start-up time.
    warnings.simplefilter("ignore")
    import scapy.packet  # noqa: F401

from scapy.config import conf
from scapy.fields import (
    BitEnumField,
    BitField,
    ByteEnumField,
    ByteField,
    Field,
    FieldListField,
    IntField,
    IP6Field,
    IPField,
    MultipleTypeField,
    PacketListField,
    ShortField,
    StrLenField,
    XBitField,
    XIntField,
    XShortEnumField,
    XShortField,
    XStrFixedLenField,
)
from scapy.packet import Packet

from .._exceptions import PunchtrioError

__all__ = [
    "ATTRIBUTE_TYPES",
    "MAGIC_COOKIE",
    "ChangeRequest",
    "ChangedAddress",
    "ChannelNumber",
    "Data",
    "ErrorCode",
    "Fingerprint",
    "Lifetime",
    "MappedAddress",
    "MessageIntegrity",
    "Nonce",
    "OtherAddress",
    "Realm",
    "RequestedTransport",
    "ResponseOrigin",
    "ResponsePort",
    "Software",
    "SourceAddress",
    "StunAttribute",
    "StunError",
    "StunMessage",
    "UnknownAttributes",
    "Username",
    "XorMappedAddress",
    "XorPeerAddress",
    "XorRelayedAddress",
    "encode_message",
    "long_term_key",
    "message_type",
    "new_transaction_id",
    "parse_message",
    "verify_fingerprint",
    "verify_integrity",
]

HEADER_LEN = 20
MAGIC_COOKIE = 0x2112A442
"""RFC 8489 section 5: the fixed second word of every STUN message header."""
FINGERPRINT_XOR = 0x5354554E
"""RFC 8489 section 14.7: the CRC-32 is XORed with this ("STUN")."""

BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111


def message_type(method: int, message_class: int) -> int:
    """Return the 14-bit STUN message type of ``method`` (12 bits) and ``message_class``.

    Classes: 0 request, 1 indication, 2 success response, 3 error response (RFC 8489 section 5).
    Raises ``ValueError`` for a method above 0xFFF or a class outside 0-3.
    """
    if not 0 <= method <= 0xFFF or not 0 <= message_class <= 3:
        raise ValueError("a STUN method has 12 bits and a class is 0-3")
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 1) << 4)
        | ((message_class & 2) << 7)
    )


MESSAGE_TYPES = {
    BINDING_REQUEST: "Binding request",
    BINDING_INDICATION: "Binding indication",
    BINDING_SUCCESS: "Binding success response",
    BINDING_ERROR: "Binding error response",
}
# RFC 8656 (TURN) methods: Allocate, Refresh, Send, Data, CreatePermission, ChannelBind.
for _method, _label in (
    (3, "Allocate"),
    (4, "Refresh"),
    (8, "CreatePermission"),
    (9, "ChannelBind"),
):
    MESSAGE_TYPES[message_type(_method, 0)] = f"{_label} request"
    MESSAGE_TYPES[message_type(_method, 2)] = f"{_label} success response"
    MESSAGE_TYPES[message_type(_method, 3)] = f"{_label} error response"
MESSAGE_TYPES[message_type(6, 1)] = "Send indication"
MESSAGE_TYPES[message_type(7, 1)] = "Data indication"

ATTRIBUTE_TYPES = {
    0x0001: "MAPPED-ADDRESS",
    0x0002: "RESPONSE-ADDRESS",
    0x0003: "CHANGE-REQUEST",
    0x0004: "SOURCE-ADDRESS",
    0x0005: "CHANGED-ADDRESS",
    0x0006: "USERNAME",
    0x0008: "MESSAGE-INTEGRITY",
    0x0009: "ERROR-CODE",
    0x000A: "UNKNOWN-ATTRIBUTES",
    0x000C: "CHANNEL-NUMBER",
    0x000D: "LIFETIME",
    0x0012: "XOR-PEER-ADDRESS",
    0x0013: "DATA",
    0x0014: "REALM",
    0x0015: "NONCE",
    0x0016: "XOR-RELAYED-ADDRESS",
    0x0017: "REQUESTED-ADDRESS-FAMILY",
    0x0018: "EVEN-PORT",
    0x0019: "REQUESTED-TRANSPORT",
    0x001A: "DONT-FRAGMENT",
    0x0020: "XOR-MAPPED-ADDRESS",
    0x0024: "PRIORITY",
    0x0025: "USE-CANDIDATE",
    0x0026: "PADDING",
    0x0027: "RESPONSE-PORT",
    0x0022: "RESERVATION-TOKEN",
    0x8000: "ADDITIONAL-ADDRESS-FAMILY",
    0x8001: "ADDRESS-ERROR-CODE",
    0x8002: "PASSWORD-ALGORITHMS",
    0x8004: "ICMP",
    0x8022: "SOFTWARE",
    0x8023: "ALTERNATE-SERVER",
    0x8028: "FINGERPRINT",
    0x8029: "ICE-CONTROLLED",
    0x802A: "ICE-CONTROLLING",
    0x802B: "RESPONSE-ORIGIN",
    0x802C: "OTHER-ADDRESS",
}
"""Attribute type numbers and their RFC names (those punchtrio knows by name)."""

_FAMILIES = {1: "IPv4", 2: "IPv6"}
_ADDRESS_LENGTHS = {1: 8, 2: 20}


class StunError(PunchtrioError):
    """A datagram is not a well-formed STUN message, or a STUN message cannot be built.

    :func:`parse_message` raises only this exception, whatever the input bytes.
    """


def new_transaction_id() -> int:
    """Return a random 96-bit transaction id (``os.urandom``), as RFC 8489 section 6 requires."""
    return int.from_bytes(os.urandom(12), "big")


# --- fields ----------------------------------------------------------------------------------------


class _AttrLength(ShortField):
    """The attribute length: the value's size without padding, computed when left to ``None``."""

    def i2m(self, pkt: Any, x: Any) -> int:
        if x is None:
            return int(pkt.value_length())
        return int(x)


class _Padding(Field[bytes, bytes]):
    """The 0-3 bytes that align an attribute to 4 bytes; kept as received, zeros when built."""

    def __init__(self, name: str) -> None:
        super().__init__(name, None)

    def getfield(self, pkt: Any, s: bytes) -> tuple[bytes, bytes]:
        n = (-(pkt.length or 0)) % 4
        return s[n:], bytes(s[:n])

    def addfield(self, pkt: Any, s: bytes, val: Any) -> bytes:
        n = (-(len(s) - 4)) % 4
        pad = val if isinstance(val, bytes) and len(val) == n else bytes(n)
        return bytes(s) + pad

    def i2repr(self, pkt: Any, x: Any) -> str:
        return repr(x)


class _XorPort(ShortField):
    """A port XORed with the top 16 bits of the magic cookie; shown as the plain port."""

    def m2i(self, pkt: Any, x: int) -> int:
        return int(x) ^ (MAGIC_COOKIE >> 16)

    def i2m(self, pkt: Any, x: Any) -> int:
        return int(x or 0) ^ (MAGIC_COOKIE >> 16)


def _xor_pad(pkt: Any, size: int) -> bytes:
    """Return the XOR key for an address: magic cookie, then (IPv6) the parent's transaction id."""
    tid = 0
    parent = getattr(pkt, "parent", None)
    if parent is not None and parent.transaction_id is not None:
        tid = int(parent.transaction_id)
    key = MAGIC_COOKIE.to_bytes(4, "big") + tid.to_bytes(12, "big")
    return key[:size]


def _xor(data: bytes, key: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, key, strict=False))


class _XorIPv4(IPField):
    def m2i(self, pkt: Any, x: bytes) -> str:
        return str(super().m2i(pkt, _xor(x, _xor_pad(pkt, 4))))

    def i2m(self, pkt: Any, x: Any) -> bytes:
        return _xor(super().i2m(pkt, x), _xor_pad(pkt, 4))


class _XorIPv6(IP6Field):
    def m2i(self, pkt: Any, x: bytes) -> str:
        return str(super().m2i(pkt, _xor(x, _xor_pad(pkt, 16))))

    def i2m(self, pkt: Any, x: Any) -> bytes:
        return _xor(super().i2m(pkt, x), _xor_pad(pkt, 16))


# --- attributes ------------------------------------------------------------------------------------


class StunAttribute(Packet):
    """One STUN attribute (type, length, value, padding); the base of every attribute layer.

    Parsing a generic attribute dispatches on its type to the matching subclass; unknown types stay
    :class:`StunAttribute` with the raw ``value``. ``length`` and ``padding`` are computed when
    left to ``None`` (padding is zeros).
    """

    name = "STUN attribute"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        StrLenField("value", b"", length_from=lambda pkt: pkt.length or 0),
        _Padding("padding"),
    ]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kargs: Any) -> type[Packet]:
        if _pkt and len(_pkt) >= 2:
            return _ATTRIBUTE_CLASSES.get(struct.unpack("!H", _pkt[:2])[0], StunAttribute)
        return cls

    def value_length(self) -> int:
        """Return the size in bytes of this attribute's value as built (no header, no padding)."""
        built = b""
        for fld in self.fields_desc[2:]:
            if fld.name != "padding":
                built = fld.addfield(self, built, self.getfieldval(fld.name))
        return len(built)

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return conf.padding_layer

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


def _address_fields(xor: bool) -> list[Any]:
    ip4: Field[Any, Any] = _XorIPv4("ip", "0.0.0.0") if xor else IPField("ip", "0.0.0.0")
    ip6: Field[Any, Any] = _XorIPv6("ip", "::") if xor else IP6Field("ip", "::")
    port: Field[Any, Any] = _XorPort("port", 0) if xor else ShortField("port", 0)
    return [
        ByteField("reserved", 0),
        ByteEnumField("family", 1, _FAMILIES),
        port,
        MultipleTypeField(
            [(ip4, lambda pkt: pkt.family == 1), (ip6, lambda pkt: pkt.family == 2)],
            IPField("ip", "0.0.0.0"),
        ),
    ]


class _AddressAttribute(StunAttribute):
    """Base of the attributes that carry a transport address (family, port, IPv4 or IPv6)."""

    def endpoint(self) -> tuple[str, int]:
        """Return ``(ip, port)`` as a plain (un-XORed) transport address, ``ip`` normalized."""
        return str(ipaddress.ip_address(str(self.ip))), int(self.port)


def _address_class(type_: int, class_name: str, label: str, xor: bool) -> type[_AddressAttribute]:
    fields = [XShortEnumField("type", type_, ATTRIBUTE_TYPES), _AttrLength("length", None)]
    fields += _address_fields(xor)
    fields.append(_Padding("padding"))
    doc = f"{label} attribute (type 0x{type_:04x}): ``family`` 1 (IPv4) or 2 (IPv6), ``port``, ``ip``."
    if xor:
        doc += " Port and address are XORed on the wire; fields hold the plain values."
    cls = type(
        class_name,
        (_AddressAttribute,),
        {"name": f"STUN {label}", "fields_desc": fields, "__doc__": doc, "__module__": __name__},
    )
    return cls


MappedAddress = _address_class(0x0001, "MappedAddress", "MAPPED-ADDRESS", False)
SourceAddress = _address_class(0x0004, "SourceAddress", "SOURCE-ADDRESS (RFC 3489)", False)
ChangedAddress = _address_class(0x0005, "ChangedAddress", "CHANGED-ADDRESS (RFC 3489)", False)
XorMappedAddress = _address_class(0x0020, "XorMappedAddress", "XOR-MAPPED-ADDRESS", True)
ResponseOrigin = _address_class(0x802B, "ResponseOrigin", "RESPONSE-ORIGIN (RFC 5780)", False)
XorPeerAddress = _address_class(0x0012, "XorPeerAddress", "XOR-PEER-ADDRESS (RFC 8656)", True)
XorRelayedAddress = _address_class(
    0x0016, "XorRelayedAddress", "XOR-RELAYED-ADDRESS (RFC 8656)", True
)
OtherAddress = _address_class(0x802C, "OtherAddress", "OTHER-ADDRESS (RFC 5780)", False)


class ChangeRequest(StunAttribute):
    """CHANGE-REQUEST (RFC 5780): ask the server to answer from its other IP and/or port."""

    name = "STUN CHANGE-REQUEST"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0003, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        BitField("reserved", 0, 29),
        BitField("change_ip", 0, 1),
        BitField("change_port", 0, 1),
        BitField("reserved2", 0, 1),
        _Padding("padding"),
    ]


class ResponsePort(StunAttribute):
    """RESPONSE-PORT (RFC 5780): ask the server to send the response to this port of our IP."""

    name = "STUN RESPONSE-PORT"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0027, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        ShortField("port", 0),
        XShortField("reserved", 0),
        _Padding("padding"),
    ]


class ErrorCode(StunAttribute):
    """ERROR-CODE: ``code`` (300-699, class * 100 + number) and a UTF-8 ``reason`` phrase."""

    name = "STUN ERROR-CODE"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0009, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        BitField("reserved", 0, 21),
        BitField("error_class", 4, 3),
        ByteField("number", 0),
        StrLenField("reason", b"", length_from=lambda pkt: max((pkt.length or 0) - 4, 0)),
        _Padding("padding"),
    ]

    @property
    def code(self) -> int:
        """The error code as one number, e.g. 420."""
        return int(self.error_class) * 100 + int(self.number)


class _TextAttribute(StunAttribute):
    def text(self) -> str:
        """Return the value decoded as UTF-8 (undecodable bytes replaced)."""
        return bytes(self.value).decode("utf-8", "replace")


class Software(_TextAttribute):
    """SOFTWARE: the sender's name and version, UTF-8, at most 763 bytes."""

    name = "STUN SOFTWARE"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x8022, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        StrLenField("value", b"", length_from=lambda pkt: pkt.length or 0),
        _Padding("padding"),
    ]


class Username(_TextAttribute):
    """USERNAME: the credential user name, UTF-8, at most 513 bytes."""

    name = "STUN USERNAME"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0006, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        StrLenField("value", b"", length_from=lambda pkt: pkt.length or 0),
        _Padding("padding"),
    ]


class UnknownAttributes(StunAttribute):
    """UNKNOWN-ATTRIBUTES: the comprehension-required attribute types a server did not understand."""

    name = "STUN UNKNOWN-ATTRIBUTES"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x000A, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        FieldListField(
            "types",
            [],
            XShortField("", 0),
            length_from=lambda pkt: pkt.length or 0,
        ),
        _Padding("padding"),
    ]


class Realm(_TextAttribute):
    """REALM: the long-term credential realm a server names in a 401, UTF-8, under 763 bytes."""

    name = "STUN REALM"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0014, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        StrLenField("value", b"", length_from=lambda pkt: pkt.length or 0),
        _Padding("padding"),
    ]


class Nonce(_TextAttribute):
    """NONCE: the server's opaque nonce for long-term credentials, under 763 bytes."""

    name = "STUN NONCE"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0015, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        StrLenField("value", b"", length_from=lambda pkt: pkt.length or 0),
        _Padding("padding"),
    ]


class ChannelNumber(StunAttribute):
    """CHANNEL-NUMBER (RFC 8656): a TURN channel, 0x4000-0x4FFF, then 16 reserved bits."""

    name = "STUN CHANNEL-NUMBER"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x000C, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        XShortField("channel", 0x4000),
        XShortField("reserved", 0),
        _Padding("padding"),
    ]


class Lifetime(StunAttribute):
    """LIFETIME (RFC 8656): seconds an allocation lives (asked in a request, granted in a reply)."""

    name = "STUN LIFETIME"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x000D, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        IntField("lifetime", 600),
        _Padding("padding"),
    ]


class Data(StunAttribute):
    """DATA (RFC 8656): the application payload of a Send or Data indication."""

    name = "STUN DATA"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0013, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        StrLenField("value", b"", length_from=lambda pkt: pkt.length or 0),
        _Padding("padding"),
    ]


class RequestedTransport(StunAttribute):
    """REQUESTED-TRANSPORT (RFC 8656): the relayed protocol, 17 (UDP), then 24 reserved bits."""

    name = "STUN REQUESTED-TRANSPORT"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0019, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        ByteField("protocol", 17),
        XBitField("reserved", 0, 24),
        _Padding("padding"),
    ]


class MessageIntegrity(StunAttribute):
    """MESSAGE-INTEGRITY: HMAC-SHA1 over the message up to this attribute.

    Leave ``hmac`` to ``None`` and build with :func:`encode_message` and a key to have it computed.
    """

    name = "STUN MESSAGE-INTEGRITY"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x0008, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        XStrFixedLenField("hmac", None, 20),
        _Padding("padding"),
    ]


class Fingerprint(StunAttribute):
    """FINGERPRINT: CRC-32 of the message up to this attribute, XORed with 0x5354554e.

    Left to ``None``, ``crc`` is computed when the message is built. It must be the last attribute.
    """

    name = "STUN FINGERPRINT"
    fields_desc = [  # noqa: RUF012
        XShortEnumField("type", 0x8028, ATTRIBUTE_TYPES),
        _AttrLength("length", None),
        XIntField("crc", None),
        _Padding("padding"),
    ]


_ATTRIBUTE_CLASSES: dict[int, type[StunAttribute]] = {
    0x0001: MappedAddress,
    0x0003: ChangeRequest,
    0x0004: SourceAddress,
    0x0005: ChangedAddress,
    0x0006: Username,
    0x0008: MessageIntegrity,
    0x0009: ErrorCode,
    0x000A: UnknownAttributes,
    0x000C: ChannelNumber,
    0x000D: Lifetime,
    0x0012: XorPeerAddress,
    0x0013: Data,
    0x0014: Realm,
    0x0015: Nonce,
    0x0016: XorRelayedAddress,
    0x0019: RequestedTransport,
    0x0020: XorMappedAddress,
    0x0027: ResponsePort,
    0x8022: Software,
    0x8028: Fingerprint,
    0x802B: ResponseOrigin,
    0x802C: OtherAddress,
}


# --- the message -----------------------------------------------------------------------------------


class StunMessage(Packet):
    """A STUN message: header (type, length, magic cookie, 96-bit transaction id) and attributes.

    ``transaction_id`` defaults to a fresh random value (not Scapy's zero); ``length`` is computed
    when ``None``, and so is a FINGERPRINT whose ``crc`` is ``None``. Use :func:`encode_message` to
    compute MESSAGE-INTEGRITY too, and :func:`parse_message` (never the constructor) for input from
    the network. ``hashret``/``answers`` match a response to its request by transaction id.
    """

    name = "STUN"
    fields_desc = [  # noqa: RUF012
        BitField("reserved", 0, 2),
        BitEnumField("msg_type", BINDING_REQUEST, 14, MESSAGE_TYPES),
        ShortField("length", None),
        XIntField("magic_cookie", MAGIC_COOKIE),
        XBitField("transaction_id", None, 96),
        PacketListField("attributes", [], StunAttribute),
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not (args and args[0]) and self.getfieldval("transaction_id") is None:
            self.transaction_id = new_transaction_id()

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.length is None:
            pkt = pkt[:2] + struct.pack("!H", len(pkt) - HEADER_LEN) + pkt[4:]
        return _seal(pkt, self, None) + pay

    def hashret(self) -> bytes:
        return struct.pack("!I", self.magic_cookie) + int(self.transaction_id or 0).to_bytes(
            12, "big"
        )

    def answers(self, other: Packet) -> int:
        if not isinstance(other, StunMessage) or other.msg_type is None:
            return 0
        is_response = (int(self.msg_type) & 0x0110) in (0x0100, 0x0110)
        is_request = (int(other.msg_type) & 0x0110) == 0
        same_method = (int(self.msg_type) & 0x3EEF) == (int(other.msg_type) & 0x3EEF)
        return int(is_response and is_request and same_method and self.hashret() == other.hashret())

    def method(self) -> int:
        """Return the 12-bit STUN method (1 for Binding)."""
        t = int(self.msg_type)
        return (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)

    def message_class(self) -> int:
        """Return the class: 0 request, 1 indication, 2 success response, 3 error response."""
        t = int(self.msg_type)
        return ((t >> 4) & 1) | ((t >> 7) & 2)

    def get(self, cls: type[StunAttribute]) -> Any:
        """Return the first attribute of class ``cls``, or ``None``."""
        for attr in self.attributes:
            if type(attr) is cls:
                return attr
        return None


def _seal(raw: bytes, msg: StunMessage, key: bytes | None) -> bytes:
    """Fill MESSAGE-INTEGRITY (if ``key``) and FINGERPRINT fields that were left to ``None``."""
    out = bytearray(raw)
    offset = HEADER_LEN
    for attr in msg.attributes:
        if offset + 4 > len(out):
            break
        length = struct.unpack_from("!H", out, offset + 2)[0]
        end = offset + 4 + length + (-length % 4)
        if isinstance(attr, MessageIntegrity) and attr.hmac is None and key is not None:
            out[offset + 4 : offset + 24] = _integrity(bytes(out[:offset]), offset + 24, key)
        elif isinstance(attr, Fingerprint) and attr.crc is None:
            struct.pack_into("!I", out, offset + 4, _fingerprint(bytes(out[:offset]), end))
        offset = end
    return bytes(out)


def _with_length(prefix: bytes, end: int) -> bytes:
    return prefix[:2] + struct.pack("!H", end - HEADER_LEN) + prefix[4:]


def _integrity(prefix: bytes, end: int, key: bytes) -> bytes:
    return hmac.new(key, _with_length(prefix, end), hashlib.sha1).digest()


def _fingerprint(prefix: bytes, end: int) -> int:
    return (zlib.crc32(_with_length(prefix, end)) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def encode_message(msg: StunMessage, key: bytes | None = None) -> bytes:
    """Build ``msg`` to bytes, computing MESSAGE-INTEGRITY with ``key`` and then FINGERPRINT.

    ``key`` is the HMAC-SHA1 key: the password for short-term credentials, or
    :func:`long_term_key` for long-term ones. Only attributes whose value is ``None`` are computed.
    Raises :class:`StunError` if Scapy cannot build the message.
    """
    try:
        return _seal(bytes(msg), msg, key)
    except StunError:
        raise
    except Exception as exc:
        raise StunError(f"cannot build STUN message: {exc}") from None


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """Return the RFC 8489 long-term credential key, MD5(username ":" realm ":" password).

    The caller applies SASLprep/OpaqueString to ``password`` first if needed.
    """
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def _attribute_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """Return ``(type, offset, length)`` for every attribute, checking only the TLV framing."""
    found = []
    offset = HEADER_LEN
    while offset < len(data):
        if offset + 4 > len(data):
            raise StunError("truncated attribute header")
        atype, length = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + length + (-length % 4)
        if end > len(data):
            raise StunError(f"attribute 0x{atype:04x} runs past the end of the message")
        found.append((atype, offset, length))
        offset = end
    return found


def verify_fingerprint(data: bytes) -> bool:
    """Return whether ``data`` ends with a FINGERPRINT attribute whose CRC matches."""
    try:
        attrs = _attribute_offsets(data)
    except StunError:
        return False
    if not attrs or attrs[-1][0] != 0x8028 or attrs[-1][2] != 4:
        return False
    _, offset, _ = attrs[-1]
    expected: int = struct.unpack_from("!I", data, offset + 4)[0]
    return _fingerprint(data[:offset], offset + 8) == expected


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Return whether ``data`` carries a MESSAGE-INTEGRITY that matches HMAC-SHA1 with ``key``."""
    try:
        attrs = _attribute_offsets(data)
    except StunError:
        return False
    for atype, offset, length in attrs:
        if atype == 0x0008 and length == 20:
            expected = _integrity(data[:offset], offset + 24, key)
            return bool(hmac.compare_digest(expected, data[offset + 4 : offset + 24]))
    return False


_FIXED_LENGTHS = {
    0x0003: (4,),
    0x0008: (20,),
    0x8028: (4,),
    0x0027: (4,),
    0x000C: (4,),
    0x000D: (4,),
    0x0019: (4,),
}
_ADDRESS_TYPES = frozenset({0x0001, 0x0004, 0x0005, 0x0012, 0x0016, 0x0020, 0x802B, 0x802C})


def _check_attribute(data: bytes, atype: int, offset: int, length: int) -> None:
    name = ATTRIBUTE_TYPES.get(atype, f"0x{atype:04x}")
    if atype in _ADDRESS_TYPES:
        family = data[offset + 5] if length >= 2 else 0
        if _ADDRESS_LENGTHS.get(family) != length:
            raise StunError(f"malformed {name}: family {family}, length {length}")
    elif atype in _FIXED_LENGTHS and length not in _FIXED_LENGTHS[atype]:
        raise StunError(f"malformed {name}: length {length}")
    elif atype == 0x0009 and (length < 4 or not 3 <= data[offset + 6] & 7 <= 6):
        raise StunError("malformed ERROR-CODE")
    elif atype == 0x000A and length % 2:
        raise StunError("malformed UNKNOWN-ATTRIBUTES: odd length")


def parse_message(
    data: bytes, *, check_fingerprint: bool = True, classic: bool = False
) -> StunMessage:
    """Parse one datagram as a STUN message and return it.

    Checks the header (top bits zero, length a multiple of 4 matching the datagram, the magic cookie
    unless ``classic`` allows RFC 3489 messages without it), the attribute framing and the sizes of
    the attributes punchtrio knows; with ``check_fingerprint`` a FINGERPRINT must be the last
    attribute and match. Raises :class:`StunError` and nothing else, whatever ``data`` holds.
    """
    try:
        data = bytes(data)
    except Exception:
        raise StunError("a STUN message is bytes") from None
    if len(data) < HEADER_LEN:
        raise StunError(f"too short for a STUN header: {len(data)} bytes")
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    if msg_type & 0xC000:
        raise StunError("not STUN: the first two bits are not zero")
    if length % 4 or length != len(data) - HEADER_LEN:
        raise StunError(f"length field {length} does not match {len(data) - HEADER_LEN} bytes")
    if cookie != MAGIC_COOKIE and not classic:
        raise StunError("not STUN: wrong magic cookie")
    attrs = _attribute_offsets(data)
    for index, (atype, offset, alen) in enumerate(attrs):
        _check_attribute(data, atype, offset, alen)
        if atype == 0x8028 and check_fingerprint:
            if index != len(attrs) - 1:
                raise StunError("FINGERPRINT is not the last attribute")
            if not verify_fingerprint(data):
                raise StunError("FINGERPRINT does not match")
    try:
        msg = StunMessage(data)
    except Exception as exc:
        raise StunError(f"cannot decode STUN message: {type(exc).__name__}") from None
    if len(msg.attributes) != len(attrs) or conf.padding_layer in msg:
        raise StunError("cannot decode STUN message attributes")
    return msg
