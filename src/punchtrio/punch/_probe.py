"""Punch probes: a Scapy layer of punchtrio's own, their MAC, and the checks a received probe passes.

A probe is 72 bytes, the same for a ping and a pong (so answering never amplifies)::

     0  magic "\\xf0pun"    4  version (1)   5  kind (1 ping, 2 pong)   6  reserved (0, 2 bytes)
     8  transaction id (12 bytes; a pong echoes its ping's)
    20  sender key id (8 bytes: the first 8 bytes of BLAKE2s of its WireGuard static public key)
    28  timestamp (unsigned 64-bit microseconds since the Unix epoch, the sender's wall clock)
    36  family (0 none, 4, 6)  37 reserved (0)  38 port  40 address (16 bytes, IPv4 left-aligned):
        in a pong, the address the ping came from as its receiver saw it; zero in a ping
    56  MAC: keyed BLAKE2s-128 of bytes 0-56 under the pair's probe key

The probe key is ``BLAKE2s(key=X25519(our private, their public), data=PROBE_KEY_LABEL)``: both
peers derive it from their WireGuard static keys, nobody else can. :class:`ProbeGuard` checks a
received probe in order of cost: framing and key id with plain byte comparisons, the MAC, the Scapy
dissection, the timestamp window, the replay cache.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import warnings
from collections import deque
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Scapy's first import may warn; fatal under -W error
    from scapy.fields import (
        ByteEnumField,
        ByteField,
        Field,
        LongField,
        ShortField,
        XShortField,
        XStrFixedLenField,
    )
    from scapy.packet import Packet

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError

from .._exceptions import PunchtrioError
from ..mux import PROBE_MAGIC

Address = tuple[str, int]

PROBE_SIZE = 72
"""Bytes in every probe, ping or pong."""
PROBE_VERSION = 1
"""The probe format version this module speaks."""
PING = 1
"""``kind`` of a ping: answer me."""
PONG = 2
"""``kind`` of a pong: the answer to the ping with the same transaction id."""
KEY_ID_SIZE = 8
"""Bytes of a key id."""
PROBE_KEY_LABEL = b"punchtrio probe key v1"
"""The BLAKE2s input (keyed with the X25519 shared secret) that yields the probe key."""
PROBE_WINDOW = 30.0
"""Seconds a probe's timestamp may differ from the receiver's wall clock, either way."""
REPLAY_CACHE_SIZE = 4096
"""Transaction ids remembered per peer; older ones are covered by a rising timestamp floor."""

_MAC_OFFSET = 56
_MAC_SIZE = 16
_KEY_ID = slice(20, 28)
_FAMILIES = {0: "none", 4: "IPv4", 6: "IPv6"}
_ZERO16 = bytes(16)


class ProbeError(PunchtrioError):
    """A datagram is not a well-formed punch probe; ``str`` says which part is wrong."""


class ProbeKeyError(PunchtrioError):
    """A probe key cannot be derived: a key is not 32 bytes, or the peer's is a low-order point."""


class ProbeRejected(ProbeError):
    """A probe failed a check. ``reason`` is one of ``malformed``, ``unknown_key``, ``mac``,
    ``stale`` or ``replay``: the counter the puncher increments."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


class _ObservedAddress(Field[Any, bytes]):
    """16 bytes holding an IPv4 (left-aligned) or IPv6 address, per the packet's ``family``."""

    def __init__(self, name: str, default: str | None) -> None:
        super().__init__(name, default, fmt="16s")

    def i2m(self, pkt: Any, x: Any) -> bytes:
        if not x:
            return _ZERO16
        packed = ipaddress.ip_address(x).packed
        return packed + bytes(16 - len(packed))

    def m2i(self, pkt: Any, x: bytes) -> Any:
        family = getattr(pkt, "family", 0)
        if family == 4:
            return str(ipaddress.IPv4Address(x[:4]))
        if family == 6:
            return str(ipaddress.IPv6Address(x))
        return None

    def i2repr(self, pkt: Any, x: Any) -> str:
        return repr(x)


class Probe(Packet):
    """A punch probe as a Scapy packet (control plane only: the data path never builds one).

    Fields: ``magic``, ``version``, ``kind`` (:data:`PING` or :data:`PONG`), ``txid`` (12 bytes),
    ``key_id`` (8 bytes), ``timestamp`` (microseconds since the Unix epoch), ``family`` (0, 4 or
    6), ``port`` and ``address`` (text, or ``None``: the observed address in a pong), ``mac``.
    Build the bytes with :func:`encode_probe` (it computes the MAC); read untrusted bytes with
    :func:`parse_probe` or :class:`ProbeGuard`, never the constructor.
    """

    name = "PunchProbe"
    fields_desc = [  # noqa: RUF012
        XStrFixedLenField("magic", PROBE_MAGIC, 4),
        ByteField("version", PROBE_VERSION),
        ByteEnumField("kind", PING, {PING: "ping", PONG: "pong"}),
        XShortField("reserved", 0),
        XStrFixedLenField("txid", bytes(12), 12),
        XStrFixedLenField("key_id", bytes(KEY_ID_SIZE), KEY_ID_SIZE),
        LongField("timestamp", 0),
        ByteEnumField("family", 0, _FAMILIES),
        ByteField("reserved2", 0),
        ShortField("port", 0),
        _ObservedAddress("address", None),
        XStrFixedLenField("mac", bytes(_MAC_SIZE), _MAC_SIZE),
    ]

    @property
    def observed(self) -> Address | None:
        """The ``(address, port)`` carried in a pong, or ``None``."""
        if not self.family or self.address is None:
            return None
        return str(self.address), int(self.port)

    @property
    def sent_at(self) -> float:
        """The sender's wall-clock time, seconds since the Unix epoch."""
        return int(self.timestamp) / 1e6


def key_id(public_key: bytes) -> bytes:
    """Return the 8-byte key id of a 32-byte static public key (the first bytes of its BLAKE2s)."""
    return hashlib.blake2s(public_key).digest()[:KEY_ID_SIZE]


def derive_probe_key(private_key: bytes, peer_public_key: bytes) -> bytes:
    """Return the 32-byte probe key shared with a peer: BLAKE2s keyed with X25519(ours, theirs).

    Both sides get the same key from their own private and the other's public static key. Raises
    :class:`ProbeKeyError` if either key is not 32 bytes or the shared secret is all zero.
    """
    if len(private_key) != 32 or len(peer_public_key) != 32:
        raise ProbeKeyError("probe keys come from 32-byte X25519 keys")
    try:
        shared = crypto_scalarmult(private_key, peer_public_key)
    except CryptoError:
        raise ProbeKeyError("the peer's public key is a low-order point") from None
    if hmac.compare_digest(shared, bytes(32)):
        raise ProbeKeyError("the peer's public key is a low-order point")
    return hashlib.blake2s(PROBE_KEY_LABEL, key=shared).digest()


def _mac(key: bytes, header: bytes) -> bytes:
    return hashlib.blake2s(header, key=key, digest_size=_MAC_SIZE).digest()


def encode_probe(probe: Probe, key: bytes) -> bytes:
    """Return the 72 bytes of ``probe`` with its MAC computed under ``key`` (any ``mac`` given is
    replaced). Raises :class:`ProbeError` if a field does not fit the format."""
    try:
        raw = bytes(probe)
    except (ValueError, struct.error, TypeError, OverflowError) as exc:
        raise ProbeError(f"cannot encode probe: {exc}") from None
    if len(raw) != PROBE_SIZE:
        raise ProbeError(f"a probe is {PROBE_SIZE} bytes, this one would be {len(raw)}")
    return raw[:_MAC_OFFSET] + _mac(key, raw[:_MAC_OFFSET])


def build_probe(
    kind: int,
    txid: bytes,
    sender_key_id: bytes,
    wall: float,
    key: bytes,
    observed: Address | None = None,
) -> bytes:
    """Return an encoded probe: ``kind`` from the sender ``sender_key_id`` at wall time ``wall``
    (seconds since the Unix epoch), ``observed`` the address a pong reports. Raises
    :class:`ProbeError` for a field that does not fit."""
    family = 0
    if observed is not None:
        try:
            family = ipaddress.ip_address(observed[0]).version
        except ValueError:
            raise ProbeError(f"observed address {observed[0]!r} is not an IP address") from None
    probe = Probe(
        kind=kind,
        txid=txid,
        key_id=sender_key_id,
        timestamp=max(0, int(wall * 1e6)),
        family=family,
        port=observed[1] if observed is not None else 0,
        address=observed[0] if observed is not None else None,
    )
    return encode_probe(probe, key)


def parse_probe(data: bytes) -> Probe:
    """Parse a probe's bytes (the MAC is not checked here: see :func:`verify_mac`).

    Raises :class:`ProbeError`, and nothing else, for any input that is not exactly a version-1
    probe with consistent fields (zero reserved bytes, a known kind and family, a zero address
    block in pings, a non-zero port with an address, nothing beyond the 4 bytes of an IPv4 address).
    """
    if not isinstance(data, bytes) or len(data) != PROBE_SIZE:
        raise ProbeError(f"a probe is {PROBE_SIZE} bytes")
    if not data.startswith(PROBE_MAGIC):
        raise ProbeError("not a probe (bad magic)")
    if data[4] != PROBE_VERSION:
        raise ProbeError(f"unsupported probe version {data[4]}")
    kind, reserved = data[5], data[6:8]
    if kind not in (PING, PONG):
        raise ProbeError(f"unknown probe kind {kind}")
    family, reserved2, port = data[36], data[37], (data[38] << 8) | data[39]
    address = data[40:56]
    if reserved != b"\x00\x00" or reserved2:
        raise ProbeError("reserved bytes must be zero")
    if family not in _FAMILIES:
        raise ProbeError(f"unknown address family {family}")
    if family == 0 and (port or address != _ZERO16):
        raise ProbeError("an address block without a family")
    if family and not port:
        raise ProbeError("an observed address needs a port")
    if family == 4 and address[4:] != _ZERO16[4:]:
        raise ProbeError("bytes beyond an IPv4 address must be zero")
    if kind == PING and family:
        raise ProbeError("a ping carries no observed address")
    try:
        return Probe(data)
    except Exception as exc:  # Scapy's dissector may raise anything; the framing was checked
        raise ProbeError(f"cannot dissect probe: {exc}") from None


def verify_mac(data: bytes, key: bytes) -> bool:
    """Return whether the last 16 bytes of a 72-byte probe are its MAC under ``key`` (constant time)."""
    if len(data) != PROBE_SIZE:
        return False
    return hmac.compare_digest(data[_MAC_OFFSET:], _mac(key, data[:_MAC_OFFSET]))


def probe_sender(data: bytes) -> bytes | None:
    """Return the sender key id of something shaped like a probe, else ``None`` (no other check)."""
    if len(data) != PROBE_SIZE or not data.startswith(PROBE_MAGIC):
        return None
    return data[_KEY_ID]


class ProbeGuard:
    """The checks on probes from one peer: key id, MAC, timestamp window and replay cache.

    ``key`` is the pair's probe key (:func:`derive_probe_key`) and ``peer_key_id`` the peer's key
    id. ``window`` is :data:`PROBE_WINDOW` seconds either way; the cache holds ``cache_size``
    transaction ids (default :data:`REPLAY_CACHE_SIZE`) and, when it overflows, raises a floor below
    which timestamps count as stale, so an evicted id can never be replayed.
    """

    def __init__(
        self,
        key: bytes,
        peer_key_id: bytes,
        *,
        window: float = PROBE_WINDOW,
        cache_size: int = REPLAY_CACHE_SIZE,
    ) -> None:
        self._key = key
        self.peer_key_id = peer_key_id
        self._window_us = int(window * 1e6)
        self._cache_size = cache_size
        self._seen: set[bytes] = set()
        self._order: deque[tuple[int, bytes]] = deque()
        self._floor = -1

    def check(self, data: bytes, wall: float) -> Probe:
        """Return the parsed probe if ``data`` passes every check at wall time ``wall`` (seconds
        since the Unix epoch), and remember it. Raises :class:`ProbeRejected`; a rejected probe
        changes nothing."""
        if len(data) != PROBE_SIZE or not data.startswith(PROBE_MAGIC):
            raise ProbeRejected("malformed")
        if data[_KEY_ID] != self.peer_key_id:
            raise ProbeRejected("unknown_key")
        if not verify_mac(data, self._key):
            raise ProbeRejected("mac")
        try:
            probe = parse_probe(data)
        except ProbeError as exc:
            raise ProbeRejected("malformed", str(exc)) from None
        stamp = int(probe.timestamp)
        now_us = int(wall * 1e6)
        self._expire(now_us)
        if abs(stamp - now_us) > self._window_us or stamp <= self._floor:
            raise ProbeRejected("stale")
        tag = data[5:20]  # kind and transaction id
        if tag in self._seen:
            raise ProbeRejected("replay")
        self._seen.add(tag)
        self._order.append((stamp, tag))
        if len(self._order) > self._cache_size:
            old_stamp, old_tag = self._order.popleft()
            self._seen.discard(old_tag)
            self._floor = max(self._floor, old_stamp)
        return probe

    def _expire(self, now_us: int) -> None:
        order, limit = self._order, now_us - self._window_us
        while order and order[0][0] < limit:
            stamp, tag = order.popleft()
            self._seen.discard(tag)
            self._floor = max(self._floor, stamp)
