"""Wire format of the hub's own relay: control and data frames, and their TCP stream framing.

Every frame starts with :data:`punchtrio.mux.RELAY_MAGIC` and a type byte (:class:`FrameType`).
A UDP datagram carries one frame; on TCP (or TLS) each frame is preceded by its length as two
big-endian bytes (:func:`encode_hub_stream_frame`, :class:`HubStreamDecoder`). The layouts, with
the reasons behind them, are in ``docs/relay.md``. Parsers never raise anything but
:class:`HubRelayFrameError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .._exceptions import PunchtrioError
from ..mux import RELAY_MAGIC

KEY_LEN = 32
"""Length of a WireGuard (X25519) public key, in bytes."""
COOKIE_LEN = 16
"""Length of the relay's return-routability cookie, in bytes."""
NETWORK_LEN = 16
"""Length of a network id on the wire (the 32 hex digits of ``NetworkSecret.network_id``)."""
MAC_LEN = 32
"""Length of a frame MAC (keyed BLAKE2s-256), in bytes."""
HEADER_LEN = len(RELAY_MAGIC) + 1
"""Magic and type byte: the prefix of every frame (5 bytes)."""
DATA_HEADER_LEN = HEADER_LEN + KEY_LEN
"""Prefix of a keyed data frame: magic, type, a public key (37 bytes)."""
CHANNEL_LEN = 2
"""Length of a channel number on the wire, in bytes (big-endian)."""
CHANNEL_HEADER_LEN = HEADER_LEN + CHANNEL_LEN
"""Prefix of a channel data frame: magic, type, a channel number (7 bytes)."""
MAX_CHANNEL = 0xFFFF
"""Largest channel number; 0 is never assigned."""
MAX_PAYLOAD = 1500
"""Largest payload of a data frame, in bytes: a WireGuard datagram of a tunnel MTU up to 1468
(the default MTU of 1420 gives 1452-byte datagrams). Larger frames are dropped and counted."""
MAX_FRAME = DATA_HEADER_LEN + MAX_PAYLOAD
"""Largest frame the relay accepts (1537 bytes, a keyed data frame)."""
MAX_CHANNEL_FRAME = CHANNEL_HEADER_LEN + MAX_PAYLOAD
"""Largest channel data frame (1507 bytes)."""
NO_NETWORK = bytes(NETWORK_LEN)
"""The network id field of a bind on a hub without network secrets."""

_BIND_MAC_PREFIX = b"punchtrio-relay-v1 bind\n"
_BOUND_MAC_PREFIX = b"punchtrio-relay-v1 bound\n"
_CHANNEL_MAC_PREFIX = b"punchtrio-relay-v1 channel\n"


class HubRelayFrameError(PunchtrioError):
    """A relay frame, or the TCP stream carrying frames, breaks the wire format."""


class FrameType(enum.IntEnum):
    """The type byte after :data:`~punchtrio.mux.RELAY_MAGIC`."""

    HELLO = 0x01
    """Client to relay: "I want to bind this key" (asks for a cookie)."""
    CHALLENGE = 0x02
    """Relay to client: the return-routability cookie for the client's source."""
    BIND = 0x03
    """Client to relay: key, network, cookie, timestamp, MAC; binds the transport to the key."""
    BOUND = 0x04
    """Relay to client: the binding's lifetime, authenticated with the client's MAC key."""
    REFUSED = 0x05
    """Relay to client: why a bind was refused (:class:`RefusalCode`)."""
    CHANNEL = 0x06
    """Relay to client: the short channel number that names one peer for this binding."""
    SEND = 0x10
    """Client to relay: a payload for the peer whose public key follows the type byte."""
    DELIVER = 0x11
    """Relay to client: a payload from the peer whose public key follows the type byte."""
    SEND_CHANNEL = 0x12
    """Client to relay: a payload for the peer the 2-byte channel number names."""
    DELIVER_CHANNEL = 0x13
    """Relay to client: a payload from the peer the 2-byte channel number names."""


class RefusalCode(enum.IntEnum):
    """Why the relay refused a bind (the byte in a :attr:`FrameType.REFUSED` frame)."""

    NOT_REGISTERED = 1
    """The key has no live record at the hub in the network the bind names."""
    AUTHENTICATION = 2
    """The MAC is wrong, or the network is unknown to the hub."""
    STALE = 3
    """The timestamp is outside the hub's window, or not newer than the key's last bind."""
    BAD_COOKIE = 4
    """The cookie does not belong to this source (or has expired): start again with HELLO."""
    FULL = 5
    """The relay holds its maximum number of bindings."""
    RATE_LIMITED = 6
    """Too many binds from this source address."""


REFUSAL_REASONS: dict[int, str] = {
    RefusalCode.NOT_REGISTERED: "the key is not registered at the hub in this network",
    RefusalCode.AUTHENTICATION: "authentication failed",
    RefusalCode.STALE: "stale or replayed bind",
    RefusalCode.BAD_COOKIE: "invalid or expired cookie",
    RefusalCode.FULL: "the relay is full",
    RefusalCode.RATE_LIMITED: "too many binds from this address",
}
"""One-line reason of each :class:`RefusalCode`."""


@dataclass(frozen=True, slots=True)
class Hello:
    """``[magic][HELLO][public key 32]`` (37 bytes)."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class Challenge:
    """``[magic][CHALLENGE][cookie 16]`` (21 bytes): smaller than the HELLO it answers."""

    cookie: bytes


@dataclass(frozen=True, slots=True, repr=False)
class Bind:
    """``[magic][BIND][key 32][network 16][cookie 16][timestamp u64 ms][mac 32]`` (109 bytes).

    ``network`` is the network id's 16 bytes, or :data:`NO_NETWORK`; ``timestamp`` the client's
    wall clock in milliseconds since the Unix epoch. The MAC covers everything before it, prefixed
    with ``punchtrio-relay-v1 bind\\n`` (see :func:`bind_mac_message`).
    """

    public_key: bytes
    network: bytes
    cookie: bytes
    timestamp: int
    mac: bytes

    def __repr__(self) -> str:
        return f"Bind(timestamp={self.timestamp})"


@dataclass(frozen=True, slots=True)
class Bound:
    """``[magic][BOUND][timestamp u64 ms][lifetime u32 ms][epoch u32][mac 32]`` (53 bytes).

    ``timestamp`` echoes the bind it answers; ``epoch`` names the binding's channel table (a
    renewal on the same route keeps it; any other bind starts a new one, and the client then
    forgets its channels); the MAC (same key as the bind's) covers the rest.
    """

    timestamp: int
    lifetime_ms: int
    epoch: int
    mac: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """``[magic][REFUSED][timestamp u64 ms][code u8]`` (14 bytes); ``timestamp`` echoes the bind
    (0 when answering something else)."""

    timestamp: int
    code: int


@dataclass(frozen=True, slots=True)
class Channel:
    """``[magic][CHANNEL][epoch u32][channel u16][peer key 32][mac 32]`` (75 bytes).

    For the binding whose channel table is ``epoch``, ``channel`` names the peer ``public_key``:
    in SEND_CHANNEL frames from this client (to the peer) and DELIVER_CHANNEL frames to it (from
    the peer). The MAC (the bind's key) covers the rest, prefixed with
    ``punchtrio-relay-v1 channel\\n`` (see :func:`channel_mac_message`).
    """

    epoch: int
    channel: int
    public_key: bytes
    mac: bytes


ControlFrame = Hello | Challenge | Bind | Bound | Refused | Channel
"""Any control frame (everything but data)."""

_U64 = struct.Struct("!Q")
_BOUND = struct.Struct("!QII")
_CHANNEL = struct.Struct("!IH")
_REFUSED = struct.Struct("!QB")
_PREFIX = {kind: RELAY_MAGIC + bytes([kind]) for kind in FrameType}
SEND_PREFIX = _PREFIX[FrameType.SEND]
"""The first 5 bytes of a client-to-relay data frame."""
DELIVER_PREFIX = _PREFIX[FrameType.DELIVER]
"""The first 5 bytes of a relay-to-client data frame."""
SEND_CHANNEL_PREFIX = _PREFIX[FrameType.SEND_CHANNEL]
"""The first 5 bytes of a client-to-relay channel data frame."""
DELIVER_CHANNEL_PREFIX = _PREFIX[FrameType.DELIVER_CHANNEL]
"""The first 5 bytes of a relay-to-client channel data frame."""

_SIZES = {
    FrameType.HELLO: HEADER_LEN + KEY_LEN,
    FrameType.CHALLENGE: HEADER_LEN + COOKIE_LEN,
    FrameType.BIND: HEADER_LEN + KEY_LEN + NETWORK_LEN + COOKIE_LEN + 8 + MAC_LEN,
    FrameType.BOUND: HEADER_LEN + _BOUND.size + MAC_LEN,
    FrameType.REFUSED: HEADER_LEN + _REFUSED.size,
    FrameType.CHANNEL: HEADER_LEN + _CHANNEL.size + KEY_LEN + MAC_LEN,
}


def encode_hello(public_key: bytes) -> bytes:
    """Return a HELLO frame."""
    return _PREFIX[FrameType.HELLO] + public_key


def encode_challenge(cookie: bytes) -> bytes:
    """Return a CHALLENGE frame."""
    return _PREFIX[FrameType.CHALLENGE] + cookie


def bind_body(public_key: bytes, network: bytes, cookie: bytes, timestamp: int) -> bytes:
    """Return a BIND frame without its MAC (what :func:`bind_mac_message` covers)."""
    return b"".join((_PREFIX[FrameType.BIND], public_key, network, cookie, _U64.pack(timestamp)))


def bind_mac_message(body: bytes) -> bytes:
    """Return the bytes a BIND's MAC covers, given the frame without its MAC."""
    return _BIND_MAC_PREFIX + body


def bound_body(timestamp: int, lifetime_ms: int, epoch: int) -> bytes:
    """Return a BOUND frame without its MAC (``epoch``: the binding's channel table, u32)."""
    return _PREFIX[FrameType.BOUND] + _BOUND.pack(timestamp, lifetime_ms, epoch)


def bound_mac_message(body: bytes) -> bytes:
    """Return the bytes a BOUND's MAC covers, given the frame without its MAC."""
    return _BOUND_MAC_PREFIX + body


def channel_body(epoch: int, channel: int, public_key: bytes) -> bytes:
    """Return a CHANNEL frame without its MAC (``channel`` 1 to :data:`MAX_CHANNEL`)."""
    return b"".join((_PREFIX[FrameType.CHANNEL], _CHANNEL.pack(epoch, channel), public_key))


def channel_mac_message(body: bytes) -> bytes:
    """Return the bytes a CHANNEL's MAC covers, given the frame without its MAC."""
    return _CHANNEL_MAC_PREFIX + body


def channel_prefix(kind: int, channel: int) -> bytes:
    """Return the 7-byte prefix of a channel data frame of type ``kind`` (SEND_CHANNEL or
    DELIVER_CHANNEL) for ``channel``."""
    return _PREFIX[FrameType(kind)] + channel.to_bytes(CHANNEL_LEN, "big")


def encode_refused(timestamp: int, code: int) -> bytes:
    """Return a REFUSED frame."""
    return _PREFIX[FrameType.REFUSED] + _REFUSED.pack(timestamp, code)


def frame_type(data: bytes) -> int:
    """Return the type byte of ``data``, or ``-1`` if it does not start with magic and a type."""
    if len(data) < HEADER_LEN or not data.startswith(RELAY_MAGIC):
        return -1
    return data[4]


def parse_control(data: bytes) -> ControlFrame:
    """Parse one control frame (HELLO, CHALLENGE, BIND, BOUND, REFUSED or CHANNEL) of exact size.

    Raises :class:`HubRelayFrameError` for anything else: no magic, a data or unknown type, or
    a wrong length.
    """
    kind = frame_type(data)
    if kind < 0:
        raise HubRelayFrameError("not a relay frame")
    size = _SIZES.get(kind)  # type: ignore[call-overload]
    if size is None:
        raise HubRelayFrameError(f"not a control frame (type {kind:#04x})")
    if len(data) != size:
        raise HubRelayFrameError(f"a frame of type {kind:#04x} is {size} bytes, got {len(data)}")
    body = data[HEADER_LEN:]
    if kind == FrameType.HELLO:
        return Hello(body)
    if kind == FrameType.CHALLENGE:
        return Challenge(body)
    if kind == FrameType.BIND:
        key_end = KEY_LEN
        net_end = key_end + NETWORK_LEN
        cookie_end = net_end + COOKIE_LEN
        (timestamp,) = _U64.unpack_from(body, cookie_end)
        return Bind(
            body[:key_end],
            body[key_end:net_end],
            body[net_end:cookie_end],
            timestamp,
            body[cookie_end + 8 :],
        )
    if kind == FrameType.BOUND:
        timestamp, lifetime_ms, epoch = _BOUND.unpack_from(body)
        return Bound(timestamp, lifetime_ms, epoch, body[_BOUND.size :])
    if kind == FrameType.CHANNEL:
        epoch, channel = _CHANNEL.unpack_from(body)
        key_end = _CHANNEL.size + KEY_LEN
        return Channel(epoch, channel, body[_CHANNEL.size : key_end], body[key_end:])
    timestamp, code = _REFUSED.unpack_from(body)
    return Refused(timestamp, code)


def parse_data(data: bytes) -> tuple[int, bytes, bytes]:
    """Parse a data frame into ``(type, address, payload)``: for SEND and DELIVER the address
    is a 32-byte public key, for SEND_CHANNEL and DELIVER_CHANNEL the 2-byte channel number.

    Raises :class:`HubRelayFrameError` if ``data`` is not one, or its payload exceeds
    :data:`MAX_PAYLOAD`. (The relay and client check the same rules inline on their fast paths.)
    """
    kind = frame_type(data)
    if kind in (FrameType.SEND, FrameType.DELIVER):
        header = DATA_HEADER_LEN
    elif kind in (FrameType.SEND_CHANNEL, FrameType.DELIVER_CHANNEL):
        header = CHANNEL_HEADER_LEN
    else:
        raise HubRelayFrameError("not a data frame")
    if len(data) < header:
        raise HubRelayFrameError(f"a data frame of type {kind:#04x} is at least {header} bytes")
    if len(data) > header + MAX_PAYLOAD:
        raise HubRelayFrameError(f"a data frame's payload is at most {MAX_PAYLOAD} bytes")
    return kind, data[HEADER_LEN:header], data[header:]


# -- TCP / TLS stream framing ----------------------------------------------------------------

_LENGTH = struct.Struct("!H")
MAX_STREAM_FRAME = 0xFFFF
"""Largest frame the 2-byte length prefix can carry."""


def encode_hub_stream_frame(frame: bytes) -> bytes:
    """Return ``frame`` as carried on the relay's TCP stream: its length (2 bytes, big-endian),
    then the frame. Raises :class:`HubRelayFrameError` for an empty frame or one over 65535 bytes."""
    size = len(frame)
    if not 0 < size <= MAX_STREAM_FRAME:
        raise HubRelayFrameError(f"a stream frame is 1 to {MAX_STREAM_FRAME} bytes, got {size}")
    return _LENGTH.pack(size) + frame


class HubStreamDecoder:
    """Splits the relay's TCP byte stream back into frames (the inverse of
    :func:`encode_hub_stream_frame`), however the bytes were cut into reads.

    ``max_frame`` (default :data:`MAX_FRAME`) is the largest length accepted: a longer one, or a
    zero length, is a framing violation, after which the stream cannot be trusted to be in sync.
    Buffers at most one incomplete frame.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return every frame completed by it, in order.

        Raises :class:`HubRelayFrameError` on a zero or oversized length; the decoder is then
        unusable (the caller closes the stream).
        """
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        offset = 0
        end = len(buffer)
        max_frame = self.max_frame
        while end - offset >= 2:
            size = (buffer[offset] << 8) | buffer[offset + 1]
            if not 0 < size <= max_frame:
                raise HubRelayFrameError(
                    f"stream frame length {size} is outside 1 to {max_frame} bytes"
                )
            if end - offset - 2 < size:
                break
            frames.append(bytes(buffer[offset + 2 : offset + 2 + size]))
            offset += 2 + size
        if offset:
            del buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete frame."""
        return len(self._buffer)
