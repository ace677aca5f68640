"""WireGuard's four message formats: fixed sizes, little-endian fields, one parse error.

Layouts (offsets in bytes)::

    initiation  (148)  type=1 | reserved[3] | sender u32 | ephemeral[32] | static[48] | timestamp[28] | mac1[16] | mac2[16]
    response     (92)  type=2 | reserved[3] | sender u32 | receiver u32 | ephemeral[32] | empty[16] | mac1[16] | mac2[16]
    cookie reply (64)  type=3 | reserved[3] | receiver u32 | nonce[24] | cookie[32]
    transport  (>=32)  type=4 | reserved[3] | receiver u32 | counter u64 | ciphertext (plaintext padded to 16) + tag[16]

The first four bytes are read as one little-endian ``u32`` so a non-zero reserved byte makes the
message type unknown, as in the reference implementation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._exceptions import PunchtrioError

MESSAGE_INITIATION = 1
"""Type of a handshake initiation message."""
MESSAGE_RESPONSE = 2
"""Type of a handshake response message."""
MESSAGE_COOKIE_REPLY = 3
"""Type of a cookie reply message."""
MESSAGE_TRANSPORT = 4
"""Type of a transport data message."""

INITIATION_SIZE = 148
"""Size in bytes of a handshake initiation."""
RESPONSE_SIZE = 92
"""Size in bytes of a handshake response."""
COOKIE_REPLY_SIZE = 64
"""Size in bytes of a cookie reply."""
TRANSPORT_HEADER_SIZE = 16
"""Size in bytes of a transport message header (type, receiver index, counter)."""
TAG_SIZE = 16
"""Size in bytes of a Poly1305 authentication tag."""
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE
"""Size in bytes of the smallest transport message: a keepalive (empty plaintext)."""
PADDING_MULTIPLE = 16
"""Transport plaintexts are zero-padded to a multiple of this many bytes."""


class MessageError(PunchtrioError, ValueError):
    """A datagram is not a well-formed WireGuard message (wrong size, type or reserved bytes).

    This is the only exception the parsers in this module raise.
    """


_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
_TRANSPORT_HEADER = struct.Struct("<IIQ")


@dataclass(frozen=True)
class Initiation:
    """A parsed handshake initiation (message type 1)."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def encode(self) -> bytes:
        """Return the 148-byte wire form."""
        return _INITIATION.pack(
            MESSAGE_INITIATION,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True)
class Response:
    """A parsed handshake response (message type 2)."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def encode(self) -> bytes:
        """Return the 92-byte wire form."""
        return _RESPONSE.pack(
            MESSAGE_RESPONSE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True)
class CookieReply:
    """A parsed cookie reply (message type 3)."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def encode(self) -> bytes:
        """Return the 64-byte wire form."""
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )


@dataclass(frozen=True)
class Transport:
    """A parsed transport data message (message type 4); ``encrypted`` includes the tag."""

    receiver: int
    counter: int
    encrypted: bytes

    def encode(self) -> bytes:
        """Return the wire form: the 16-byte header followed by the ciphertext."""
        return (
            _TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, self.receiver, self.counter) + self.encrypted
        )


Message = Initiation | Response | CookieReply | Transport


def message_type(data: bytes) -> int:
    """Return the message type (1-4) of ``data``.

    Raises :class:`MessageError` if ``data`` is shorter than four bytes, has non-zero reserved
    bytes or an unknown type.
    """
    if len(data) < 4:
        raise MessageError(f"a WireGuard message is at least 4 bytes, got {len(data)}")
    kind: int = struct.unpack_from("<I", data)[0]
    if kind not in (1, 2, 3, 4):
        raise MessageError(f"unknown WireGuard message type 0x{kind:08x}")
    return kind


def _expect(data: bytes, kind: int, size: int, name: str) -> None:
    if message_type(data) != kind:
        raise MessageError(f"not a {name} message")
    if len(data) != size:
        raise MessageError(f"a {name} is {size} bytes, got {len(data)}")


def parse_initiation(data: bytes) -> Initiation:
    """Parse a 148-byte handshake initiation. Raises :class:`MessageError`."""
    _expect(data, MESSAGE_INITIATION, INITIATION_SIZE, "handshake initiation")
    _, sender, eph, static, ts, mac1, mac2 = _INITIATION.unpack(data)
    return Initiation(sender, eph, static, ts, mac1, mac2)


def parse_response(data: bytes) -> Response:
    """Parse a 92-byte handshake response. Raises :class:`MessageError`."""
    _expect(data, MESSAGE_RESPONSE, RESPONSE_SIZE, "handshake response")
    _, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(data)
    return Response(sender, receiver, eph, empty, mac1, mac2)


def parse_cookie_reply(data: bytes) -> CookieReply:
    """Parse a 64-byte cookie reply. Raises :class:`MessageError`."""
    _expect(data, MESSAGE_COOKIE_REPLY, COOKIE_REPLY_SIZE, "cookie reply")
    _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
    return CookieReply(receiver, nonce, cookie)


def parse_transport(data: bytes) -> Transport:
    """Parse a transport message: a 16-byte header and at least a 16-byte tag.

    Raises :class:`MessageError`.
    """
    if message_type(data) != MESSAGE_TRANSPORT:
        raise MessageError("not a transport data message")
    if len(data) < TRANSPORT_MIN_SIZE:
        raise MessageError(f"a transport message is at least {TRANSPORT_MIN_SIZE} bytes")
    _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    return Transport(receiver, counter, bytes(data[TRANSPORT_HEADER_SIZE:]))


def parse_message(data: bytes) -> Message:
    """Parse any WireGuard message by its type. Raises :class:`MessageError`."""
    kind = message_type(data)
    if kind == MESSAGE_INITIATION:
        return parse_initiation(data)
    if kind == MESSAGE_RESPONSE:
        return parse_response(data)
    if kind == MESSAGE_COOKIE_REPLY:
        return parse_cookie_reply(data)
    return parse_transport(data)
