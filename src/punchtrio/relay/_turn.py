"""A TURN client (RFC 8656), sans-IO: one allocation on one server, for UDP relaying.

:class:`TurnClient` speaks the control plane with punchtrio's Scapy STUN layers and the data plane
with ``struct``: ChannelData once a channel is bound, Send/Data indications before. It is driven
like every punchtrio core: the caller sends what :meth:`TurnClient.datagrams_to_send` returns to
the server, feeds what the server sends to :meth:`TurnClient.receive`, calls
:meth:`TurnClient.handle_timer` at :meth:`TurnClient.get_timer`, and reads
:meth:`TurnClient.next_event`. The clock ``now`` is any monotonic clock in seconds.

What it does, and why (details in ``docs/relay.md``):

- Allocate with the long-term credential mechanism: the first request goes without credentials,
  the 401 names the realm and the nonce, every later request is signed (USERNAME, REALM, NONCE,
  MESSAGE-INTEGRITY); a 438 (stale nonce) is retried once with the new nonce.
- The allocation is refreshed one minute before it expires (half-way for short lifetimes), each
  permission every 240 s (it lasts 300 s) and each channel every 540 s (it lasts 600 s). A
  permission is refreshed with CreatePermission even though ChannelBind installs one too, so a
  peer keeps working if a channel refresh is lost.
- Channels are numbered 0x4000-0x4FFF, the range RFC 8656 left after narrowing RFC 5766's.
- A 437 (allocation mismatch) to a Refresh, CreatePermission or ChannelBind means the server lost
  the allocation: allocate again and re-create every permission and channel. A 437 to an Allocate
  means the server still holds an allocation on our 5-tuple (ours, from before a restart): delete
  it with a zero-lifetime Refresh, wait :data:`DELETE_WAIT` and allocate again, once.
- Responses count only if they answer a pending transaction, come from the server and, once we
  sign, carry a valid MESSAGE-INTEGRITY (success responses must; error responses may omit it,
  because servers answer 401 and 438 unsigned). Everything else is dropped and counted in
  :attr:`TurnClient.counters`.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .._endpoint import format_endpoint
from .._exceptions import PunchtrioError
from ..stun import (
    MAGIC_COOKIE,
    RC,
    RM,
    RTO,
    ChannelNumber,
    Data,
    ErrorCode,
    Fingerprint,
    Lifetime,
    MessageIntegrity,
    Nonce,
    Realm,
    RequestedTransport,
    StunAttribute,
    StunError,
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
from ._turn_credentials import TurnCredentials
from ._turn_stream import TurnStreamDecoder, TurnStreamError, pad_channel_data

__all__ = [
    "CHANNEL_LIFETIME",
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "PERMISSION_LIFETIME",
    "ChannelBound",
    "ChannelFailed",
    "PermissionCreated",
    "PermissionFailed",
    "TurnAllocated",
    "TurnClient",
    "TurnClosed",
    "TurnError",
    "TurnEvent",
    "TurnFailed",
    "TurnReallocating",
    "TurnRefreshed",
    "TurnState",
]

Endpoint = tuple[str, int]

ALLOCATE, REFRESH, SEND, DATA, CREATE_PERMISSION, CHANNEL_BIND = 3, 4, 6, 7, 8, 9
_ALLOCATE_REQUEST = message_type(ALLOCATE, 0)
_SEND_INDICATION = message_type(SEND, 1)

CHANNEL_MIN = 0x4000
"""Lowest TURN channel number (RFC 8656 section 12)."""
CHANNEL_MAX = 0x4FFF
"""Highest TURN channel number: RFC 8656 reserves 0x5000-0x7FFF (RFC 5766 had allowed them)."""
PERMISSION_LIFETIME = 300.0
"""Seconds a permission lasts on the server (RFC 8656 section 9)."""
CHANNEL_LIFETIME = 600.0
"""Seconds a channel binding lasts on the server (RFC 8656 section 12)."""
REFRESH_MARGIN = 60.0
"""Seconds before an expiry that the client refreshes (allocation, permission, channel)."""
STREAM_TIMEOUT = 39.5
"""RFC 8489 Ti: seconds a transaction over TCP or TLS waits for its response (no retransmits)."""
CLOSE_ATTEMPTS = 3
"""Requests sent for the final zero-lifetime Refresh before :meth:`TurnClient.close` gives up."""
UDP = 17
DELETE_WAIT = 2.0
"""Seconds between deleting an allocation on our 5-tuple and allocating again on it: coturn frees a
zero-lifetime allocation at its next one-second tick and answers 437 until then."""
"""REQUESTED-TRANSPORT protocol number for UDP relaying."""

_CHANNEL_HEADER = struct.Struct("!HH")
_STUN_HEADER = struct.Struct("!HHI")
_ATTR_HEADER = struct.Struct("!HH")
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

_REASONS = {
    300: "try another server",
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    420: "unknown attribute",
    437: "allocation mismatch",
    438: "stale nonce",
    440: "address family not supported",
    441: "wrong credentials",
    442: "unsupported transport protocol",
    443: "peer address family mismatch",
    486: "allocation quota reached",
    500: "server error",
    508: "insufficient capacity",
}


class TurnError(PunchtrioError):
    """A TURN client was used wrongly (bad arguments, or an operation its state does not allow).

    Failures of the server or the network are events (:class:`TurnFailed`...), never exceptions.
    """


class TurnState(str, enum.Enum):
    """Where a :class:`TurnClient` is in its life."""

    IDLE = "idle"
    """Created; :meth:`TurnClient.allocate` not called yet."""
    ALLOCATING = "allocating"
    """An Allocate (or the delete before one) is under way."""
    ALLOCATED = "allocated"
    """The server holds our allocation: relaying works for peers with a permission."""
    FAILED = "failed"
    """The allocation failed for good (:class:`TurnFailed`); :meth:`TurnClient.allocate` retries."""
    CLOSING = "closing"
    """The final zero-lifetime Refresh is under way."""
    CLOSED = "closed"
    """Closed: nothing more is sent or accepted."""


# --- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnAllocated:
    """The server granted an allocation: ``relayed`` is our address on the relay, ``mapped`` the
    server-reflexive address it saw (``None`` if it did not say), ``lifetime`` seconds granted.

    Sent again, with a possibly new ``relayed``, after a re-allocation (:class:`TurnReallocating`).
    """

    relayed: Endpoint
    mapped: Endpoint | None
    lifetime: int


@dataclass(frozen=True)
class TurnRefreshed:
    """The allocation was refreshed; it now lasts ``lifetime`` seconds more."""

    lifetime: int


@dataclass(frozen=True)
class TurnReallocating:
    """The server lost the allocation (``code``, usually 437): a new one is being made.

    Until the next :class:`TurnAllocated`, :meth:`TurnClient.wrap` returns ``None``.
    """

    code: int | None
    reason: str


@dataclass(frozen=True)
class TurnFailed:
    """The allocation failed for good: ``code`` is the server's error code (``None`` for a
    timeout or a protocol violation), ``reason`` one readable line naming the server (never a
    password). :meth:`TurnClient.allocate` may be called again (say, after a 486 or 508)."""

    code: int | None
    reason: str


@dataclass(frozen=True)
class PermissionCreated:
    """The server installed a permission for ``ip``: its peers may now send to us via the relay."""

    ip: str


@dataclass(frozen=True)
class PermissionFailed:
    """The server refused (or never answered) a permission for ``ip``; it is not retried."""

    ip: str
    code: int | None
    reason: str


@dataclass(frozen=True)
class ChannelBound:
    """``channel`` (0x4000-0x4FFF) is bound to ``peer``: its traffic now goes as ChannelData."""

    peer: Endpoint
    channel: int


@dataclass(frozen=True)
class ChannelFailed:
    """Binding a channel to ``peer`` failed; Send indications still work if it has a permission."""

    peer: Endpoint
    code: int | None
    reason: str


@dataclass(frozen=True)
class TurnClosed:
    """The client is closed (the server deleted the allocation, or it did not answer in time)."""


TurnEvent = (
    TurnAllocated
    | TurnRefreshed
    | TurnReallocating
    | TurnFailed
    | PermissionCreated
    | PermissionFailed
    | ChannelBound
    | ChannelFailed
    | TurnClosed
)


# --- internal state ---------------------------------------------------------------------------------

_Kind = Literal["allocate", "delete", "rotate", "refresh", "permission", "channel", "close"]


@dataclass(eq=False)
class _Request:
    """One outstanding request and its retransmission schedule."""

    kind: _Kind
    method: int
    attributes: Callable[[], list[StunAttribute]]
    ip: str | None = None
    peer: Endpoint | None = None
    transaction_id: int = 0
    raw: bytes = b""
    key: bytes | None = None
    attempts: int = 0
    rc: int = RC
    rm: int = RM
    next_send: float | None = None
    deadline: float = 0.0
    nonce_retried: bool = False
    challenged: bool = False
    integrity_failures: int = 0


@dataclass(eq=False)
class _Permission:
    installed: bool = False
    refresh_at: float = math.inf
    pending: _Request | None = None
    failed: bool = False


@dataclass(eq=False)
class _Channel:
    number: int
    bound: bool = False
    refresh_at: float = math.inf
    pending: _Request | None = None
    failed: bool = False


@dataclass(eq=False)
class _Allocation:
    relayed: Endpoint
    mapped: Endpoint | None
    lifetime: int
    expires_at: float
    refresh_at: float
    pending: _Request | None = None


_COUNTERS = (
    "sent",
    "received",
    "retransmissions",
    "channel_data_in",
    "data_indications_in",
    "channel_data_out",
    "send_indications_out",
    "dropped_closed",
    "dropped_wrong_source",
    "dropped_malformed",
    "dropped_unmatched",
    "dropped_integrity",
    "dropped_unknown_channel",
    "dropped_unknown_peer",
    "dropped_unexpected",
)


def _normalize_peer(peer: Endpoint) -> Endpoint:
    try:
        ip = ipaddress.ip_address(peer[0])
        port = int(peer[1])
    except (ValueError, TypeError, IndexError):
        raise TurnError(f"a peer is a literal (ip, port), not {peer!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 0 < port < 65536:
        raise TurnError(f"peer port must be from 1 to 65535, not {port}")
    return str(ip), port


def _format(endpoint: Endpoint) -> str:
    return format_endpoint(endpoint)


def _xor_address(ip: str, port: int, transaction_id: bytes) -> bytes:
    """The value of an XOR-PEER-ADDRESS, built with struct (Send indications are data path)."""
    packed = ipaddress.ip_address(ip).packed
    key = _COOKIE_BYTES + transaction_id
    family = 1 if len(packed) == 4 else 2
    xored = bytes(a ^ b for a, b in zip(packed, key, strict=False))
    return struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + xored


class TurnClient:
    """One TURN allocation on ``server`` (a literal ``(ip, port)``), sans-IO.

    ``credentials``: the long-term user name and password (static, or from
    :func:`~punchtrio.relay.rest_credentials`). ``transport``: how the shell reaches the server:
    ``"udp"`` (requests retransmitted as RFC 8489 says: RTO ``rto`` seconds, 0.5 by default,
    doubling, 7 requests, then 8 s), or ``"tcp"``/``"tls"`` over one connection (no
    retransmission; each request waits 39.5 s; outgoing ChannelData padded to 4 bytes; split what
    the connection delivers with :meth:`receive_stream` or a
    :class:`~punchtrio.relay.TurnStreamDecoder`). The relayed transport is always UDP.
    ``lifetime``: the allocation lifetime asked for, in seconds (600). ``random``: the source of
    transaction ids (``os.urandom``; tests pass a deterministic one).

    Raises :class:`TurnError` for a server that is not a literal IP address and port, an unknown
    transport, a non-positive lifetime or ``rto``.
    """

    def __init__(
        self,
        server: tuple[str, int],
        credentials: TurnCredentials,
        *,
        transport: Literal["udp", "tcp", "tls"] = "udp",
        lifetime: int = 600,
        random: Callable[[int], bytes] = os.urandom,
        rto: float = RTO,
    ) -> None:
        try:
            self.server: Endpoint = _normalize_peer(server)
        except TurnError:
            raise TurnError(f"a TURN server is a literal (ip, port), not {server!r}") from None
        if not isinstance(credentials, TurnCredentials):
            raise TurnError("credentials must be TurnCredentials")
        if transport not in ("udp", "tcp", "tls"):
            raise TurnError(f"transport must be udp, tcp or tls, not {transport!r}")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int):
            raise TurnError("lifetime must be an integer number of seconds")
        if not 0 < lifetime <= 0xFFFFFFFF:
            raise TurnError("lifetime must be a positive number of seconds")
        if not (math.isfinite(rto) and rto > 0):
            raise TurnError("rto must be a positive number of seconds")
        self.transport = transport
        self.lifetime = lifetime
        self.rto = rto
        self._credentials = credentials
        self._next_credentials: TurnCredentials | None = None
        self._random = random
        self._stream = transport != "udp"
        self._decoder = TurnStreamDecoder() if self._stream else None
        self._server_text = f"{_format(self.server)} ({transport})"
        self._state = TurnState.IDLE
        self._is_closed = False
        self._realm: bytes | None = None
        self._nonce: bytes | None = None
        self._key: bytes | None = None
        self._allocation: _Allocation | None = None
        self._delete_tried = False
        self._allocate_at: float | None = None
        self._pending: dict[int, _Request] = {}
        self._outbox: list[bytes] = []
        self._events: list[TurnEvent] = []
        self._peers: dict[Endpoint, _Channel | None] = {}
        self._permissions: dict[str, _Permission] = {}
        self._channel_peers: dict[int, Endpoint] = {}
        self._bound: dict[Endpoint, bytes] = {}
        self._next_channel = CHANNEL_MIN
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        """Packet counters by name (``sent``, ``received``, ``dropped_*``...); never reset."""

    # -- properties ----------------------------------------------------------------------------

    @property
    def state(self) -> TurnState:
        """The client's :class:`TurnState`."""
        return self._state

    @property
    def relayed_address(self) -> Endpoint | None:
        """Our address on the relay (XOR-RELAYED-ADDRESS) while allocated, else ``None``."""
        return self._allocation.relayed if self._allocation is not None else None

    @property
    def mapped_address(self) -> Endpoint | None:
        """Our address as the server saw it (XOR-MAPPED-ADDRESS) while allocated, else ``None``."""
        return self._allocation.mapped if self._allocation is not None else None

    @property
    def credentials(self) -> TurnCredentials:
        """The credentials requests are signed with (see :meth:`update_credentials`)."""
        return self._credentials

    def channel_of(self, peer: Endpoint) -> int | None:
        """Return the channel number bound to ``peer``, or ``None`` if none is bound yet."""
        header = self._bound.get(peer)
        return None if header is None else int.from_bytes(header[:2], "big")

    def has_permission(self, ip: str) -> bool:
        """Return whether the server confirmed a permission for ``ip``."""
        permission = self._permissions.get(ip)
        return permission is not None and permission.installed

    # -- the sans-IO interface -----------------------------------------------------------------

    def allocate(self, now: float) -> None:
        """Start the allocation (again, after :class:`TurnFailed`).

        Raises :class:`TurnError` if the client is already allocating, allocated or closed.
        """
        if self._state not in (TurnState.IDLE, TurnState.FAILED):
            raise TurnError(f"cannot allocate: the TURN client is {self._state.value}")
        self._delete_tried = False
        self._start_allocate(now)

    def update_credentials(self, credentials: TurnCredentials) -> None:
        """Sign the next requests with ``credentials`` (say, REST credentials fetched anew).

        A server ties an allocation to the user name that made it (RFC 8656 answers 441
        otherwise), so a new user name cannot refresh the current allocation: at its next
        refresh the client deletes it and allocates anew with the new credentials
        (:class:`TurnReallocating`, then :class:`TurnAllocated` with a new relayed address). Call
        it well before the old credentials expire. The same user name with a new password is used
        at once. Raises :class:`TurnError` for something that is not :class:`TurnCredentials`.
        """
        if not isinstance(credentials, TurnCredentials):
            raise TurnError("credentials must be TurnCredentials")
        if self._allocation is None or credentials.username == self._credentials.username:
            self._credentials = credentials
            self._key = None
            self._refresh_key()
        else:
            self._next_credentials = credentials

    def add_peer(self, peer: tuple[str, int], now: float) -> None:
        """Relay to and from ``peer`` (a literal ``(ip, port)``): a permission and a channel.

        Sends CreatePermission for its IP and ChannelBind for a free channel as soon as the
        allocation exists, and keeps both refreshed. Calling it again for a known peer does
        nothing; after :meth:`close` nothing at all. Raises :class:`TurnError` for a malformed
        peer address.
        """
        peer = _normalize_peer(peer)
        if self._state is TurnState.CLOSED or self._state is TurnState.CLOSING:
            return
        if peer in self._peers:
            return
        channel: _Channel | None = None
        if self._next_channel <= CHANNEL_MAX:
            channel = _Channel(self._next_channel)
            self._next_channel += 1
            self._channel_peers[channel.number] = peer
        self._peers[peer] = channel
        self._permissions.setdefault(peer[0], _Permission())
        if self._state is TurnState.ALLOCATED:
            self._install(peer, now)

    def datagrams_to_send(self) -> list[bytes]:
        """Return (and forget) what is due for the server, oldest first.

        Over UDP each item is one datagram for :attr:`server`; over TCP/TLS each is ready to be
        written to the stream as it is.
        """
        out = self._outbox
        self._outbox = []
        self.counters["sent"] += len(out)
        return out

    def wrap(self, peer: tuple[str, int], payload: bytes) -> bytes | None:
        """Return what to send to the server so that it relays ``payload`` to ``peer``.

        ChannelData (4 bytes of header, padded to 4 bytes on TCP/TLS) once a channel is bound;
        else a Send indication if the server confirmed a permission for the peer's IP; else
        ``None`` (so also before the allocation, after :meth:`close`, and for payloads over
        65535 bytes). The fast path is a dictionary look-up and one ``struct.pack``.
        """
        header = self._bound.get(peer)
        if header is not None:
            size = len(payload)
            if size > 0xFFFF:
                return None
            self.counters["channel_data_out"] += 1
            message = header + size.to_bytes(2, "big") + payload
            return pad_channel_data(message) if self._stream else message
        return self._send_indication(peer, payload)

    def receive(
        self, data: bytes, now: float, *, source: tuple[str, int] | None = None
    ) -> tuple[tuple[str, int], bytes] | None:
        """Take one message from the server; return ``(peer, payload)`` if it relayed one.

        ``data`` is one UDP datagram, or one message split from a TCP/TLS stream. ``source``,
        when the shell knows it, must be the server's address. ChannelData on a channel of ours
        and Data indications from a peer with a permission give their payload; responses advance
        the allocation (events, datagrams to send). Anything else is dropped and counted in
        :attr:`counters`; this method never raises.
        """
        counters = self.counters
        counters["received"] += 1
        if self._is_closed:
            counters["dropped_closed"] += 1
            return None
        if source is not None and source != self.server and not self._is_server(source):
            counters["dropped_wrong_source"] += 1
            return None
        size = len(data)
        if size < 4:
            counters["dropped_malformed"] += 1
            return None
        first = data[0]
        if 0x40 <= first <= 0x4F:
            # The data path: ChannelData, with struct only.
            number, length = _CHANNEL_HEADER.unpack_from(data)
            peer = self._channel_peers.get(number)
            if peer is None or size < 4 + length:
                counters["dropped_unknown_channel" if peer is None else "dropped_malformed"] += 1
                return None
            counters["channel_data_in"] += 1
            return peer, bytes(data[4 : 4 + length])
        if first >= 0x40:
            counters["dropped_malformed"] += 1
            return None
        try:
            message = parse_message(data)
        except StunError:
            counters["dropped_malformed"] += 1
            return None
        message_class = message.message_class()
        if message_class == 1:
            if message.method() != DATA:
                counters["dropped_unexpected"] += 1
                return None
            return self._data_indication(message)
        if message_class == 0:
            counters["dropped_unexpected"] += 1
            return None
        request = self._pending.get(int(message.transaction_id))
        if request is None or request.method != message.method():
            counters["dropped_unmatched"] += 1
            return None
        self._response(request, message, bytes(data), now)
        return None

    def _is_server(self, source: tuple[str, int]) -> bool:
        try:
            return _normalize_peer(source) == self.server
        except TurnError:
            return False

    def receive_datagram(
        self, data: bytes, address: tuple[str, int], now: float
    ) -> tuple[tuple[str, int], bytes] | None:
        """Same as :meth:`receive` with ``source=address``: the ``(data, addr, now)`` form."""
        return self.receive(data, now, source=address)

    def receive_stream(self, data: bytes, now: float) -> list[tuple[tuple[str, int], bytes]]:
        """Take a chunk read from the TCP/TLS connection; return the payloads it completed.

        Splits the stream with a :class:`~punchtrio.relay.TurnStreamDecoder`. A stream that is
        not TURN any more fails the client (:class:`TurnFailed`): close the connection then.
        Raises :class:`TurnError` on a UDP client. Never raises for bad input.
        """
        if self._decoder is None:
            raise TurnError("receive_stream() is for TCP and TLS clients")
        out: list[tuple[tuple[str, int], bytes]] = []
        try:
            messages = self._decoder.feed(data)
        except TurnStreamError as exc:
            self.counters["dropped_malformed"] += 1
            if self._state not in (TurnState.CLOSED, TurnState.FAILED):
                self._fail(None, f"TURN server {self._server_text} sent garbage: {exc}")
            return out
        for message in messages:
            relayed = self.receive(message, now)
            if relayed is not None:
                out.append(relayed)
        return out

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` is due next (the caller's clock), or ``None``."""
        times: list[float] = []
        if self._allocate_at is not None:
            times.append(self._allocate_at)
        for request in self._pending.values():
            times.append(request.next_send if request.next_send is not None else request.deadline)
        allocation = self._allocation
        if allocation is not None and self._state is TurnState.ALLOCATED:
            if allocation.pending is None:
                times.append(allocation.refresh_at)
            for permission in self._permissions.values():
                if permission.installed and permission.pending is None:
                    times.append(permission.refresh_at)
            for channel in self._peers.values():
                if channel is not None and channel.bound and channel.pending is None:
                    times.append(channel.refresh_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Retransmit, time out transactions and send the refreshes that are due at ``now``."""
        if self._allocate_at is not None and now >= self._allocate_at:
            self._allocate_at = None
            self._start_allocate(now)
        for request in list(self._pending.values()):
            if request.transaction_id not in self._pending:
                continue
            if request.next_send is not None and now >= request.next_send:
                self._transmit(request, now)
                self.counters["retransmissions"] += 1
            elif request.next_send is None and now >= request.deadline:
                self._timeout(request, now)
        allocation = self._allocation
        if allocation is None or self._state is not TurnState.ALLOCATED:
            return
        if allocation.pending is None and now >= allocation.refresh_at:
            if self._next_credentials is not None:
                self._rotate(now)
                return
            allocation.pending = self._request(
                "refresh", REFRESH, lambda: [Lifetime(lifetime=self.lifetime)], now
            )
        for ip, permission in self._permissions.items():
            if permission.installed and permission.pending is None and now >= permission.refresh_at:
                self._create_permission(ip, now)
        for peer, channel in self._peers.items():
            if (
                channel is not None
                and channel.bound
                and channel.pending is None
                and now >= channel.refresh_at
            ):
                self._bind(peer, channel, now)

    def next_event(self) -> TurnEvent | None:
        """Return the next event, or ``None``."""
        return self._events.pop(0) if self._events else None

    def close(self, now: float) -> None:
        """Delete the allocation (Refresh with LIFETIME 0) and stop.

        :class:`TurnClosed` follows once the server answers, or after the last of
        :data:`CLOSE_ATTEMPTS` requests times out (about 3.5 s over UDP); at once when there is no
        allocation. Calling it again does nothing.
        """
        if self._state in (TurnState.CLOSING, TurnState.CLOSED):
            return
        allocated = self._allocation is not None and self._state is TurnState.ALLOCATED
        self._cancel_all()
        self._bound.clear()
        if not allocated:
            self._closed()
            return
        self._state = TurnState.CLOSING
        self._request(
            "close", REFRESH, lambda: [Lifetime(lifetime=0)], now, rc=CLOSE_ATTEMPTS, rm=4
        )

    # -- requests ------------------------------------------------------------------------------

    def _refresh_key(self) -> None:
        if self._realm is not None:
            secret = b":".join(
                (
                    self._credentials.username.encode("utf-8"),
                    self._realm,
                    self._credentials.password.encode("utf-8"),
                )
            )
            self._key = hashlib.md5(secret).digest()

    def _request(
        self,
        kind: _Kind,
        method: int,
        attributes: Callable[[], list[StunAttribute]],
        now: float,
        *,
        ip: str | None = None,
        peer: Endpoint | None = None,
        rc: int = RC,
        rm: int = RM,
    ) -> _Request:
        request = _Request(kind, method, attributes, ip=ip, peer=peer, rc=rc, rm=rm)
        self._encode(request)
        self._transmit(request, now)
        return request

    def _encode(self, request: _Request) -> None:
        """Give ``request`` a new transaction id and build it, signed once we know the realm."""
        self._pending.pop(request.transaction_id, None)
        transaction_id = int.from_bytes(self._random(12)[:12].rjust(12, b"\0"), "big")
        while transaction_id in self._pending:
            transaction_id = int.from_bytes(os.urandom(12), "big")
        attributes = list(request.attributes())
        key = None
        if self._realm is not None and self._nonce is not None and self._key is not None:
            attributes += [
                Username(value=self._credentials.username.encode("utf-8")),
                Realm(value=self._realm),
                Nonce(value=self._nonce),
                MessageIntegrity(),
            ]
            key = self._key
        attributes.append(Fingerprint())
        message = StunMessage(
            msg_type=message_type(request.method, 0),
            transaction_id=transaction_id,
            attributes=attributes,
        )
        request.raw = encode_message(message, key)
        request.key = key
        request.transaction_id = transaction_id
        request.attempts = 0
        request.integrity_failures = 0
        self._pending[transaction_id] = request

    def _transmit(self, request: _Request, now: float) -> None:
        request.attempts += 1
        self._outbox.append(request.raw)
        if self._stream:
            request.next_send = None
            request.deadline = now + STREAM_TIMEOUT
        elif request.attempts < request.rc:
            request.next_send = now + self.rto * 2 ** (request.attempts - 1)
        else:
            request.next_send = None
            request.deadline = now + request.rm * self.rto

    def _start_allocate(self, now: float) -> None:
        self._state = TurnState.ALLOCATING
        if self._next_credentials is not None:
            self._credentials = self._next_credentials
            self._next_credentials = None
            self._refresh_key()
        self._request(
            "allocate",
            ALLOCATE,
            lambda: [RequestedTransport(protocol=UDP), Lifetime(lifetime=self.lifetime)],
            now,
        )

    def _install(self, peer: Endpoint, now: float) -> None:
        permission = self._permissions[peer[0]]
        if not permission.installed and permission.pending is None and not permission.failed:
            self._create_permission(peer[0], now)
        channel = self._peers.get(peer)
        if channel is not None and not channel.bound and channel.pending is None:
            self._bind(peer, channel, now)

    def _create_permission(self, ip: str, now: float) -> None:
        permission = self._permissions[ip]
        permission.pending = self._request(
            "permission",
            CREATE_PERMISSION,
            lambda: [XorPeerAddress(family=1 if ":" not in ip else 2, ip=ip, port=0)],
            now,
            ip=ip,
        )

    def _bind(self, peer: Endpoint, channel: _Channel, now: float) -> None:
        ip, port = peer
        channel.pending = self._request(
            "channel",
            CHANNEL_BIND,
            lambda: [
                ChannelNumber(channel=channel.number),
                XorPeerAddress(family=1 if ":" not in ip else 2, ip=ip, port=port),
            ],
            now,
            ip=ip,
            peer=peer,
        )

    # -- responses -----------------------------------------------------------------------------

    def _response(self, request: _Request, message: StunMessage, raw: bytes, now: float) -> None:
        is_error = message.message_class() == 3
        if request.key is not None:
            signed = message.get(MessageIntegrity) is not None
            if (signed and not verify_integrity(raw, request.key)) or (not is_error and not signed):
                self.counters["dropped_integrity"] += 1
                request.integrity_failures += 1
                if self._stream:
                    self._timeout(request, now)
                return
        del self._pending[request.transaction_id]
        if not is_error:
            self._success(request, message, now)
            return
        error = message.get(ErrorCode)
        code = int(error.code) if error is not None else 0
        phrase = bytes(error.reason).decode("utf-8", "replace") if error is not None else ""
        phrase = "".join(ch for ch in phrase if ch.isprintable())[:100]
        realm = message.get(Realm)
        nonce = message.get(Nonce)
        if code == 401 and request.key is None and realm is not None and nonce is not None:
            if request.challenged:
                self._error(request, code, phrase, now)
                return
            self._realm = bytes(realm.value)
            self._nonce = bytes(nonce.value)
            self._refresh_key()
            request.challenged = True
            self._encode(request)
            self._transmit(request, now)
            return
        if code == 438 and nonce is not None and not request.nonce_retried:
            self._nonce = bytes(nonce.value)
            if realm is not None and bytes(realm.value) != self._realm:
                self._realm = bytes(realm.value)
                self._refresh_key()
            request.nonce_retried = True
            self._encode(request)
            self._transmit(request, now)
            return
        self._error(request, code, phrase, now)

    def _success(self, request: _Request, message: StunMessage, now: float) -> None:
        kind = request.kind
        if kind == "allocate":
            relayed_attr = message.get(XorRelayedAddress)
            if relayed_attr is None:
                self._fail(None, f"TURN server {self._server_text} sent no relayed address")
                return
            mapped_attr = message.get(XorMappedAddress)
            lifetime_attr = message.get(Lifetime)
            lifetime = int(lifetime_attr.lifetime) if lifetime_attr is not None else self.lifetime
            self._state = TurnState.ALLOCATED
            self._allocation = _Allocation(
                relayed=relayed_attr.endpoint(),
                mapped=mapped_attr.endpoint() if mapped_attr is not None else None,
                lifetime=lifetime,
                expires_at=now + lifetime,
                refresh_at=now + _refresh_delay(lifetime),
            )
            self._events.append(
                TurnAllocated(self._allocation.relayed, self._allocation.mapped, lifetime)
            )
            for peer in self._peers:
                self._install(peer, now)
        elif kind in ("delete", "rotate"):
            self._allocate_at = now + DELETE_WAIT
        elif kind == "refresh":
            allocation = self._allocation
            if allocation is None:
                return
            lifetime_attr = message.get(Lifetime)
            lifetime = int(lifetime_attr.lifetime) if lifetime_attr is not None else self.lifetime
            allocation.pending = None
            allocation.lifetime = lifetime
            allocation.expires_at = now + lifetime
            allocation.refresh_at = now + _refresh_delay(lifetime)
            self._events.append(TurnRefreshed(lifetime))
        elif kind == "permission":
            assert request.ip is not None
            permission = self._permissions[request.ip]
            permission.pending = None
            first = not permission.installed
            permission.installed = True
            permission.refresh_at = now + PERMISSION_LIFETIME - REFRESH_MARGIN
            if first:
                self._events.append(PermissionCreated(request.ip))
        elif kind == "channel":
            assert request.peer is not None
            channel = self._peers[request.peer]
            assert channel is not None
            channel.pending = None
            first = not channel.bound
            channel.bound = True
            channel.refresh_at = now + CHANNEL_LIFETIME - REFRESH_MARGIN
            self._bound[request.peer] = channel.number.to_bytes(2, "big")
            if first:
                self._events.append(ChannelBound(request.peer, channel.number))
        elif kind == "close":
            self._closed()

    def _describe(self, code: int | None, phrase: str) -> str:
        if code is None:
            return phrase
        name = phrase or _REASONS.get(code, "error")
        return f"{code} {name}"

    def _error(self, request: _Request, code: int, phrase: str, now: float) -> None:
        kind = request.kind
        what = self._describe(code, phrase)
        if kind == "close":
            self._closed()
        elif kind == "rotate":
            self._allocate_at = now + DELETE_WAIT
        elif kind == "allocate":
            if code == 437 and not self._delete_tried:
                # Our 5-tuple still has an allocation (ours, from before a restart): delete it.
                # Unsigned at first if we have no nonce yet: the 401 challenge then signs it.
                self._delete_tried = True
                self._request("delete", REFRESH, lambda: [Lifetime(lifetime=0)], now)
            elif code in (401, 441):
                self._fail(code, self._refused_credentials(what))
            else:
                hint = " (try again later)" if code in (486, 508) else ""
                self._fail(
                    code, f"TURN server {self._server_text} refused the allocation: {what}{hint}"
                )
        elif kind == "delete" and code == 437:
            self._allocate_at = now + DELETE_WAIT  # already being deleted: allocate once it is gone
        elif kind == "delete":
            self._fail(
                437,
                f"TURN server {self._server_text} holds another allocation for our address "
                f"and would not delete it: {what}",
            )
        elif code == 437:
            self._reallocate(
                code, f"TURN server {self._server_text} lost the allocation: {what}", now
            )
        elif code in (401, 441):
            self._fail(code, self._refused_credentials(what))
        elif kind == "refresh":
            self._fail(code, f"TURN server {self._server_text} refused to refresh: {what}")
        elif kind == "permission":
            assert request.ip is not None
            self._permission_failed(request.ip, code, f"permission refused: {what}")
        elif kind == "channel":
            assert request.peer is not None
            self._channel_failed(request.peer, code, f"channel refused: {what}")

    def _timeout(self, request: _Request, now: float) -> None:
        self._pending.pop(request.transaction_id, None)
        if request.integrity_failures:
            why = "its answers failed the MESSAGE-INTEGRITY check"
        else:
            why = f"no answer after {request.attempts} request(s)"
        kind = request.kind
        if kind == "close":
            self._closed()
        elif kind == "rotate":
            self._allocate_at = now + DELETE_WAIT
        elif kind in ("allocate", "delete"):
            self._fail(None, f"TURN server {self._server_text}: {why}")
        elif kind == "refresh":
            allocation = self._allocation
            if allocation is not None and now + REFRESH_MARGIN / 4 < allocation.expires_at:
                allocation.pending = self._request(
                    "refresh", REFRESH, lambda: [Lifetime(lifetime=self.lifetime)], now
                )
            else:
                self._fail(None, f"TURN server {self._server_text} did not refresh: {why}")
        elif kind == "permission":
            assert request.ip is not None
            self._permission_failed(request.ip, None, f"permission not confirmed: {why}")
        elif kind == "channel":
            assert request.peer is not None
            self._channel_failed(request.peer, None, f"channel not confirmed: {why}")

    def _refused_credentials(self, what: str) -> str:
        return (
            f"TURN server {self._server_text} refused the credentials of user "
            f"{self._credentials.username!r}: {what}"
        )

    def _permission_failed(self, ip: str, code: int | None, reason: str) -> None:
        permission = self._permissions[ip]
        permission.pending = None
        permission.installed = False
        permission.failed = True
        self._events.append(
            PermissionFailed(ip, code, f"TURN server {self._server_text}: {reason}")
        )

    def _channel_failed(self, peer: Endpoint, code: int | None, reason: str) -> None:
        channel = self._peers[peer]
        if channel is None:
            return
        channel.pending = None
        channel.bound = False
        channel.failed = True
        self._bound.pop(peer, None)
        self._events.append(ChannelFailed(peer, code, f"TURN server {self._server_text}: {reason}"))

    # -- state changes ---------------------------------------------------------------------------

    def _cancel_all(self) -> None:
        self._pending.clear()
        self._allocate_at = None
        allocation = self._allocation
        if allocation is not None:
            allocation.pending = None
        for permission in self._permissions.values():
            permission.pending = None
            permission.installed = False
            permission.failed = False
        for channel in self._peers.values():
            if channel is not None:
                channel.pending = None
                channel.bound = False
                channel.failed = False

    def _reallocate(self, code: int | None, reason: str, now: float) -> None:
        self._cancel_all()
        self._bound.clear()
        self._allocation = None
        self._events.append(TurnReallocating(code, reason))
        self._delete_tried = False
        self._start_allocate(now)

    def _rotate(self, now: float) -> None:
        """Delete the allocation made with the old user name, then allocate with the new one."""
        self._cancel_all()
        self._bound.clear()
        self._allocation = None
        self._state = TurnState.ALLOCATING
        self._events.append(TurnReallocating(None, "new TURN credentials: allocating again"))
        self._request(
            "rotate", REFRESH, lambda: [Lifetime(lifetime=0)], now, rc=CLOSE_ATTEMPTS, rm=4
        )

    def _fail(self, code: int | None, reason: str) -> None:
        self._cancel_all()
        self._bound.clear()
        self._allocation = None
        self._state = TurnState.FAILED
        self._events.append(TurnFailed(code, reason))

    def _closed(self) -> None:
        self._cancel_all()
        self._bound.clear()
        self._allocation = None
        self._state = TurnState.CLOSED
        self._is_closed = True
        self._events.append(TurnClosed())

    # -- data path helpers -------------------------------------------------------------------------

    def _send_indication(self, peer: Endpoint, payload: bytes) -> bytes | None:
        if self._state is not TurnState.ALLOCATED or len(payload) > 0xFFFF - 64:
            return None
        try:
            normal = _normalize_peer(peer)
        except TurnError:
            return None
        if normal != peer:
            header = self._bound.get(normal)
            if header is not None:
                return self.wrap(normal, payload)
        permission = self._permissions.get(normal[0])
        if permission is None or not permission.installed:
            return None
        transaction_id = self._random(12)[:12].rjust(12, b"\0")
        address = _xor_address(normal[0], normal[1], transaction_id)
        size = len(payload)
        attributes = (
            _ATTR_HEADER.pack(0x0012, len(address))
            + address
            + _ATTR_HEADER.pack(0x0013, size)
            + payload
            + bytes(-size % 4)
        )
        self.counters["send_indications_out"] += 1
        return (
            _STUN_HEADER.pack(_SEND_INDICATION, len(attributes), MAGIC_COOKIE)
            + transaction_id
            + attributes
        )

    def _data_indication(self, message: StunMessage) -> tuple[Endpoint, bytes] | None:
        address = message.get(XorPeerAddress)
        data = message.get(Data)
        if address is None or data is None:
            self.counters["dropped_malformed"] += 1
            return None
        try:
            peer = _normalize_peer(address.endpoint())
        except TurnError:
            self.counters["dropped_malformed"] += 1
            return None
        if peer[0] not in self._permissions or self._state is not TurnState.ALLOCATED:
            self.counters["dropped_unknown_peer"] += 1
            return None
        self.counters["data_indications_in"] += 1
        return peer, bytes(data.value)


def _refresh_delay(lifetime: int) -> float:
    """Seconds after a grant to refresh: a minute before expiry, or half-way if that is sooner."""
    return float(max(lifetime / 2, lifetime - REFRESH_MARGIN))
