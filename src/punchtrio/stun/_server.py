"""An RFC 5780 STUN server: a sans-IO responder and a Trio shell that owns the sockets.

The responder reads and writes the few fields it needs with ``struct``, not Scapy: building one
response with Scapy costs ~0.5 ms, which would cap the server near 2,000 responses/s on one core;
with ``struct`` the hot path costs a few microseconds (see ``docs/stun.md`` and ``benchmarks/stun.py``).

No amplification: a response is at most ``len(request) + RESPONSE_ALLOWANCE`` bytes. Attributes are
added in priority order while they fit, so a minimal 20-byte IPv4 request still gets XOR-MAPPED-ADDRESS,
OTHER-ADDRESS, MAPPED-ADDRESS and RESPONSE-ORIGIN; a client that wants more pads its request (punchtrio's
client pads with a SOFTWARE attribute, which every server ignores).
"""

from __future__ import annotations

import errno
import socket
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .._exceptions import PunchtrioError
from .._token_bucket import TokenBuckets, address_key
from ._layers import FINGERPRINT_XOR, MAGIC_COOKIE
from ._transaction import _normalize

__all__ = [
    "RESPONSE_ALLOWANCE",
    "Reply",
    "ServerStats",
    "StunResponder",
    "StunServer",
    "StunServerError",
]

Endpoint = tuple[str, int]

RESPONSE_ALLOWANCE = 48
"""Bytes a response may exceed its request by (the anti-amplification bound)."""

MAX_REQUEST = 1280
"""Larger datagrams are dropped as malformed: no STUN Binding request needs more."""

_HEADER = struct.Struct("!HHI")
_ATTR = struct.Struct("!HH")
_ERROR_REASON = b"Unknown Attribute"
# Comprehension-required attributes a request may carry that the server understands (or ignores on
# purpose: it does not authenticate, so USERNAME and MESSAGE-INTEGRITY are not checked).
_KNOWN_REQUEST_ATTRIBUTES = frozenset({0x0003, 0x0006, 0x0008, 0x0024, 0x0025, 0x0026, 0x0027})


class StunServerError(PunchtrioError):
    """The server's addresses are invalid, or it cannot bind one of its sockets."""

    exit_code = 3


@dataclass
class ServerStats:
    """Counters of what the server did, since it started.

    ``received`` datagrams; ``answered`` with a success response; ``errors`` sent as error responses
    (420); ``malformed`` datagrams dropped (not STUN, bad framing, bad FINGERPRINT, too large);
    ``ignored`` well-formed STUN that is not a Binding request; ``rate_limited`` dropped requests;
    ``send_failures`` responses the kernel refused.
    """

    received: int = 0
    answered: int = 0
    errors: int = 0
    malformed: int = 0
    ignored: int = 0
    rate_limited: int = 0
    send_failures: int = 0


@dataclass(frozen=True)
class Reply:
    """A datagram to send: ``data`` from the local ``source`` endpoint to ``destination``."""

    data: bytes
    source: Endpoint
    destination: Endpoint


_MAX_SOURCES = 65536
"""Sources whose request rate is tracked at once (see :mod:`punchtrio._token_bucket`)."""


def _pack_ip(ip: str) -> bytes:
    if ":" in ip:
        # Link-local sources come as "fe80::1%eth0"; the zone is not part of the address.
        return socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    return socket.inet_pton(socket.AF_INET, ip)


def _address_attr(atype: int, endpoint: Endpoint) -> bytes:
    packed = _pack_ip(endpoint[0])
    family = 1 if len(packed) == 4 else 2
    return struct.pack("!HHBBH", atype, 4 + len(packed), 0, family, endpoint[1]) + packed


def _xor_address_attr(endpoint: Endpoint, transaction_id: bytes) -> bytes:
    packed = _pack_ip(endpoint[0])
    key = struct.pack("!I", MAGIC_COOKIE) + transaction_id
    xored = bytes(a ^ b for a, b in zip(packed, key, strict=False))
    family = 1 if len(packed) == 4 else 2
    port = endpoint[1] ^ (MAGIC_COOKIE >> 16)
    return struct.pack("!HHBBH", 0x0020, 4 + len(packed), 0, family, port) + xored


class StunResponder:
    """The server's protocol core, sans-IO: one request in, at most one :class:`Reply` out.

    ``primary`` and the optional ``alternate`` are ``(ip, port)`` endpoints; with an alternate the
    server owns all four IP x port combinations and honours CHANGE-REQUEST, otherwise a
    CHANGE-REQUEST that asks for a change gets a 420 error. ``rate`` (requests per second per source
    IP, IPv6 per /64; ``None`` for no limit) and ``burst`` configure the rate limit. Raises
    :class:`StunServerError` if the alternate does not differ from the primary in both IP and port,
    or if ``rate`` or ``burst`` is not positive.
    """

    def __init__(
        self,
        primary: Endpoint,
        alternate: Endpoint | None = None,
        *,
        rate: float | None = 50.0,
        burst: float = 100.0,
    ) -> None:
        try:
            self.primary = _normalize(primary)
            self.alternate = None if alternate is None else _normalize(alternate)
        except ValueError as exc:
            raise StunServerError(f"not an IP address: {exc}") from None
        if self.alternate is not None:
            same_port = self.alternate[1] == self.primary[1] != 0
            if self.alternate[0] == self.primary[0] or same_port:
                raise StunServerError(
                    "the alternate address must differ from the primary in both IP and port"
                )
            if (":" in self.alternate[0]) != (":" in self.primary[0]):
                raise StunServerError("primary and alternate must be of the same IP family")
        self.stats = ServerStats()
        try:
            self._limiter = (
                None
                if rate is None
                else TokenBuckets(rate=rate, burst=burst, max_keys=_MAX_SOURCES)
            )
        except ValueError as exc:
            raise StunServerError(f"rate limit: {exc} (rate=None: no limit)") from None
        self._static: dict[tuple[Endpoint, int], tuple[Endpoint, bytes, bytes, bytes]] = {}

    def set_endpoints(self, primary: Endpoint, alternate: Endpoint | None) -> None:
        """Replace the endpoints (once the ports chosen by the kernel are known)."""
        self.primary, self.alternate = _normalize(primary), alternate and _normalize(alternate)
        self._static.clear()

    @property
    def local_endpoints(self) -> list[Endpoint]:
        """Every endpoint the server listens on: one, or four with an alternate address."""
        if self.alternate is None:
            return [self.primary]
        (pi, pp), (ai, ap) = self.primary, self.alternate
        return [(pi, pp), (pi, ap), (ai, pp), (ai, ap)]

    def _flip(self, local: Endpoint, change_ip: bool, change_port: bool) -> Endpoint:
        assert self.alternate is not None
        ips = (self.primary[0], self.alternate[0])
        ports = (self.primary[1], self.alternate[1])
        ip = ips[1 - ips.index(local[0])] if change_ip else local[0]
        port = ports[1 - ports.index(local[1])] if change_port else local[1]
        return ip, port

    def _static_attrs(self, local: Endpoint, change: int) -> tuple[Endpoint, bytes, bytes, bytes]:
        """Return (source, RESPONSE-ORIGIN, OTHER-ADDRESS, CHANGED-ADDRESS) for a request."""
        key = (local, change)
        cached = self._static.get(key)
        if cached is None:
            if self.alternate is None:
                source, other, changed = local, b"", b""
            else:
                source = self._flip(local, bool(change & 4), bool(change & 2))
                other_ep = self._flip(local, True, True)
                other = _address_attr(0x802C, other_ep)
                changed = _address_attr(0x0005, other_ep)
            cached = (source, _address_attr(0x802B, source), other, changed)
            self._static[key] = cached
        return cached

    def handle(self, data: bytes, local: Endpoint, remote: Endpoint, now: float) -> Reply | None:
        """Process one datagram received on ``local`` from ``remote`` at ``now`` (seconds).

        Returns the reply to send, or ``None`` when the datagram is dropped (and counted).
        """
        stats = self.stats
        stats.received += 1
        size = len(data)
        if size < 20 or size > MAX_REQUEST:
            stats.malformed += 1
            return None
        msg_type, length, cookie = _HEADER.unpack_from(data)
        if msg_type & 0xC000 or length & 3 or length + 20 != size:
            stats.malformed += 1
            return None
        change = 0
        response_port = 0
        fingerprint = False
        unknown: list[int] = []
        offset = 20
        while offset < size:
            if fingerprint or offset + 4 > size:
                stats.malformed += 1
                return None
            atype, alen = _ATTR.unpack_from(data, offset)
            value = offset + 4
            offset = value + alen + (-alen & 3)
            if offset > size:
                stats.malformed += 1
                return None
            if atype == 0x0003:
                if alen != 4:
                    stats.malformed += 1
                    return None
                change = data[value + 3] & 6
            elif atype == 0x0027:
                if alen != 4:
                    stats.malformed += 1
                    return None
                response_port = (data[value] << 8) | data[value + 1]
            elif atype == 0x8028:
                fingerprint = True
                crc = zlib.crc32(data[: value - 4]) ^ FINGERPRINT_XOR
                if alen != 4 or data[value : value + 4] != struct.pack("!I", crc):
                    stats.malformed += 1
                    return None
            elif atype < 0x8000 and atype not in _KNOWN_REQUEST_ATTRIBUTES:
                unknown.append(atype)
        if msg_type != 0x0001:
            stats.ignored += 1
            return None
        if self._limiter is not None and not self._limiter.allow(address_key(remote[0]), now):
            stats.rate_limited += 1
            return None
        if change and self.alternate is None:
            unknown.append(0x0003)
        destination = (remote[0], response_port) if response_port else remote
        budget = size + RESPONSE_ALLOWANCE - (8 if fingerprint else 0)
        if unknown:
            stats.errors += 1
            return Reply(
                self._finish(0x0111, data, _error_420(unknown, budget - 20), fingerprint),
                local,
                destination,
            )
        source, origin, other, changed = self._static_attrs(local, change)
        if cookie == MAGIC_COOKIE:
            parts: Sequence[bytes] = (
                _xor_address_attr(remote, data[8:20]),
                other,
                _address_attr(0x0001, remote),
                origin,
                changed,
            )
        else:
            # An RFC 3489 client: no XOR-MAPPED-ADDRESS, its "cookie" is echoed (RFC 8489 12.2).
            parts = (_address_attr(0x0001, remote), _address_attr(0x0004, source), changed)
        body = b""
        for part in parts:
            if len(body) + len(part) + 20 <= budget:
                body += part
        stats.answered += 1
        return Reply(self._finish(0x0101, data, body, fingerprint), source, destination)

    @staticmethod
    def _finish(msg_type: int, request: bytes, body: bytes, fingerprint: bool) -> bytes:
        length = len(body) + (8 if fingerprint else 0)
        out = struct.pack("!HH", msg_type, length) + request[4:20] + body
        if fingerprint:
            out += struct.pack("!HHI", 0x8028, 4, zlib.crc32(out) ^ FINGERPRINT_XOR)
        return out


def _error_420(unknown: list[int], room: int) -> bytes:
    reason_len = len(_ERROR_REASON)
    error = (
        struct.pack("!HHHBB", 0x0009, 4 + reason_len, 0, 4, 20)
        + _ERROR_REASON
        + bytes(-reason_len & 3)
    )
    fit = max(0, (room - len(error) - 4) // 2)
    listed = unknown[:fit]
    if not listed:
        return error
    values = struct.pack(f"!{len(listed)}H", *listed)
    return error + struct.pack("!HH", 0x000A, len(values)) + values + bytes(-len(values) & 3)


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _pick_ports(primary: Endpoint, alternate: Endpoint | None) -> tuple[Endpoint, Endpoint | None]:
    """Replace ports given as 0 by two distinct ports the kernel picks as free."""
    temps: list[socket.socket] = []
    try:
        chosen: list[Endpoint] = []
        for ip, port in (primary, alternate) if alternate is not None else (primary,):
            if port == 0:
                sock = socket.socket(_family(ip), socket.SOCK_DGRAM)
                temps.append(sock)
                sock.bind((ip, 0))
                port = sock.getsockname()[1]
            chosen.append((ip, port))
        return chosen[0], (chosen[1] if len(chosen) > 1 else None)
    finally:
        for sock in temps:
            sock.close()


def _bind_all(responder: StunResponder, *, v6only: bool = False) -> dict[Endpoint, socket.socket]:
    """Bind every endpoint; ports given as 0 are chosen by the kernel, the same on both IPs.

    ``v6only``: IPv6 sockets take no IPv4 (``IPV6_V6ONLY``), so another server can bind the same
    port on IPv4.
    """
    wanted = (responder.primary, responder.alternate)
    fixed = all(ep is None or ep[1] for ep in wanted)
    last_error: OSError | None = None
    for _attempt in range(20):
        sockets: dict[Endpoint, socket.socket] = {}
        try:
            responder.set_endpoints(*_pick_ports(*wanted))
            for endpoint in responder.local_endpoints:
                sock = socket.socket(_family(endpoint[0]), socket.SOCK_DGRAM)
                sockets[endpoint] = sock
                if v6only and sock.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(endpoint)
                sock.setblocking(False)
            return sockets
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            last_error = exc
            if exc.errno != errno.EADDRINUSE or fixed:
                break
    raise StunServerError(f"cannot bind the STUN server's sockets: {last_error}")


class StunServer:
    """The STUN server as a Trio service: ``await server.serve()`` runs it until cancelled.

    Arguments are those of :class:`StunResponder`, and ``v6only`` (default off): IPv6 sockets
    take no IPv4 (``IPV6_V6ONLY``), so a second server can serve IPv4 on the same port. Ports
    given as 0 are chosen by the kernel (the alternate IP gets the same two ports as the primary
    IP). Start it in a nursery with
    ``endpoints = await nursery.start(server.serve)``; ``stats`` counts what it did.
    """

    def __init__(
        self,
        primary: Endpoint,
        alternate: Endpoint | None = None,
        *,
        rate: float | None = 50.0,
        burst: float = 100.0,
        v6only: bool = False,
    ) -> None:
        self.responder = StunResponder(primary, alternate, rate=rate, burst=burst)
        self.v6only = v6only

    @property
    def stats(self) -> ServerStats:
        """The responder's counters (see :class:`ServerStats`)."""
        return self.responder.stats

    async def serve(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the sockets, report the bound endpoints through ``task_status``, answer forever.

        Raises :class:`StunServerError` if a socket cannot be bound. Sockets close on cancellation.
        """
        sockets = _bind_all(self.responder, v6only=self.v6only)
        try:
            async with trio.open_nursery() as nursery:
                for endpoint, sock in sockets.items():
                    nursery.start_soon(self._answer, endpoint, sock, sockets)
                task_status.started(list(sockets))
        finally:
            for sock in sockets.values():
                sock.close()

    async def _answer(
        self, local: Endpoint, sock: socket.socket, sockets: dict[Endpoint, socket.socket]
    ) -> None:
        handle = self.responder.handle
        while True:
            await trio.lowlevel.wait_readable(sock)
            # Drain what is queued without a checkpoint per datagram, then yield.
            for _ in range(256):
                try:
                    data, remote = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                try:
                    reply = handle(data, local, remote[:2], trio.current_time())
                except (OSError, ValueError, struct.error):
                    # An address the responder cannot encode; never let one datagram stop us.
                    self.stats.malformed += 1
                    continue
                if reply is not None:
                    try:
                        sockets[reply.source].sendto(reply.data, reply.destination)
                    except OSError:
                        self.stats.send_failures += 1
            await trio.lowlevel.checkpoint()
