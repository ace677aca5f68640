"""Port mapping on the gateway, sans-IO: PCP (RFC 6887) first, NAT-PMP (RFC 6886) as its fallback.

A gateway that speaks PCP or NAT-PMP on UDP 5351 forwards an external port to our socket when
asked: the mapped endpoint is reachable from anywhere, so it becomes a candidate the peer can
probe even when our NAT filters by address and port or maps per destination.

:class:`PortMapper` is driven like the other punchtrio cores: :meth:`~PortMapper.start` and
:meth:`~PortMapper.close` take ``now``; :meth:`~PortMapper.receive_datagram` takes
``(data, addr, now)``; :meth:`~PortMapper.datagrams_to_send` returns what to send (always to the
gateway's port 5351); :meth:`~PortMapper.get_timer` / :meth:`~PortMapper.handle_timer` drive
retransmission, refresh and retry; :meth:`~PortMapper.next_event` returns
:class:`MappingObtained`, :class:`MappingFailed` and :class:`MappingLost`.

The wire formats are plain ``struct`` code: :func:`encode_pcp_map` / :func:`parse_pcp_response`
and :func:`encode_natpmp_request` / :func:`parse_natpmp_response`. The parsers raise only
:class:`PortMapError`, whatever the bytes.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .._exceptions import PunchtrioError

PORT = 5351
"""The UDP port PCP and NAT-PMP servers listen on (RFC 6887 § 19.1, RFC 6886 § 3)."""
PCP_VERSION = 2
NATPMP_VERSION = 0
PCP_MAP = 1
"""PCP's MAP opcode."""
NATPMP_EXTERNAL = 0
NATPMP_MAP_UDP = 1
UDP = 17
PCP_RESPONSE_MIN = 24
PCP_MAP_SIZE = 60
"""Bytes of a PCP MAP request or response without options (24 header + 36 MAP)."""

PCP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide external",
    12: "address mismatch",
    13: "excessive remote peers",
}
"""PCP result codes (RFC 6887 § 7.4) and their names."""
NATPMP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}
"""NAT-PMP result codes (RFC 6886 § 3.5)."""
UNSUPPORTED_VERSION = 1

Protocol = Literal["pcp", "natpmp", "upnp"]
"""Which protocol obtained a mapping (``"upnp"``: :class:`~punchtrio.punch.UpnpMapping`)."""


class PortMapError(PunchtrioError):
    """A PCP or NAT-PMP datagram is malformed, or port-mapping settings are out of range."""


# -- wire formats ----------------------------------------------------------------------------


def _ip16(address: str) -> bytes:
    """An address as PCP's 16 bytes (IPv4 as IPv4-mapped IPv6)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def _from_ip16(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(raw)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


def encode_pcp_map(
    *,
    nonce: bytes,
    client_ip: str,
    internal_port: int,
    lifetime: int,
    suggested_port: int = 0,
    suggested_ip: str = "0.0.0.0",
) -> bytes:
    """Return a 60-byte PCP MAP request for UDP (RFC 6887 § 11.1); ``lifetime`` 0 deletes.

    ``nonce`` is 12 bytes; ``client_ip`` is the address the request is sent from (the server
    checks it). Raises :class:`PortMapError` for a wrong nonce size or a port or lifetime out of
    range.
    """
    if len(nonce) != 12:
        raise PortMapError("a PCP nonce is 12 bytes")
    if not (1 <= internal_port <= 65535 and 0 <= suggested_port <= 65535):
        raise PortMapError("ports must be 1-65535 (the suggested one 0-65535)")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise PortMapError("a lifetime is 0 to 2**32 - 1 seconds")
    header = struct.pack("!BBHI", PCP_VERSION, PCP_MAP, 0, lifetime) + _ip16(client_ip)
    body = nonce + struct.pack("!B3xHH", UDP, internal_port, suggested_port) + _ip16(suggested_ip)
    return header + body


@dataclass(frozen=True)
class PcpResponse:
    """A PCP MAP response: ``result`` code, granted ``lifetime`` (s), server ``epoch`` (s), the
    request's ``nonce``, ``protocol``, ``internal_port`` and the assigned external endpoint."""

    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: str


@dataclass(frozen=True)
class VersionMismatch:
    """A reply saying "unsupported version" in the other protocol's framing (RFC 6887 § 9,
    Appendix A): a NAT-PMP server answering PCP, or a PCP server answering NAT-PMP."""

    version: int


def parse_pcp_response(data: bytes) -> PcpResponse | VersionMismatch:
    """Parse what a server sent in answer to a PCP MAP request.

    Returns a :class:`PcpResponse`, or :class:`VersionMismatch` for a NAT-PMP "unsupported
    version" reply. Raises :class:`PortMapError` for anything else: too short, not a response,
    another opcode, a length that is not a multiple of 4 or over 1100 bytes (§ 7).
    """
    if len(data) >= 4 and data[0] == NATPMP_VERSION and data[1] >= 128:
        result = struct.unpack_from("!H", data, 2)[0]
        if result == UNSUPPORTED_VERSION:
            return VersionMismatch(NATPMP_VERSION)
        raise PortMapError(f"a NAT-PMP reply (result {result}) to a PCP request")
    if len(data) < PCP_RESPONSE_MIN or len(data) % 4 or len(data) > 1100:
        raise PortMapError(f"a PCP response is 24-1100 bytes, a multiple of 4: {len(data)}")
    version, r_opcode, _, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if version != PCP_VERSION:
        raise PortMapError(f"PCP version {version}")
    if not r_opcode & 0x80:
        raise PortMapError("a PCP request, not a response")
    if r_opcode & 0x7F != PCP_MAP:
        raise PortMapError(f"PCP opcode {r_opcode & 0x7F}, not MAP")
    if len(data) < PCP_MAP_SIZE:
        if result != 0:  # an error response may carry no opcode data (§ 8.3)
            return PcpResponse(result, lifetime, epoch, b"", 0, 0, 0, "::")
        raise PortMapError(f"a successful MAP response is at least 60 bytes: {len(data)}")
    nonce = data[24:36]
    protocol, internal, external = struct.unpack_from("!B3xHH", data, 36)
    return PcpResponse(
        result, lifetime, epoch, nonce, protocol, internal, external, _from_ip16(data[44:60])
    )


def encode_natpmp_request(opcode: int, internal_port: int = 0, lifetime: int = 0) -> bytes:
    """Return a NAT-PMP request: ``opcode`` 0 (external address, 2 bytes) or 1 (map UDP
    ``internal_port`` for ``lifetime`` s, 12 bytes; 0 deletes). Raises :class:`PortMapError`
    for another opcode or values out of range."""
    if opcode == NATPMP_EXTERNAL:
        return bytes((NATPMP_VERSION, NATPMP_EXTERNAL))
    if opcode != NATPMP_MAP_UDP:
        raise PortMapError(f"NAT-PMP opcode {opcode} is not one we send")
    if not 1 <= internal_port <= 65535 or not 0 <= lifetime <= 0xFFFFFFFF:
        raise PortMapError("a port is 1-65535, a lifetime 0 to 2**32 - 1 seconds")
    suggested = internal_port if lifetime else 0
    return struct.pack("!BBHHHI", NATPMP_VERSION, opcode, 0, internal_port, suggested, lifetime)


@dataclass(frozen=True)
class NatPmpResponse:
    """A NAT-PMP response: ``opcode`` (without the 128 bit), ``result``, ``epoch`` (s since the
    gateway started); ``external_ip`` for opcode 0; ports and ``lifetime`` for opcode 1."""

    opcode: int
    result: int
    epoch: int
    external_ip: str | None = None
    internal_port: int = 0
    external_port: int = 0
    lifetime: int = 0


def parse_natpmp_response(data: bytes) -> NatPmpResponse | VersionMismatch:
    """Parse a NAT-PMP response (RFC 6886 § 3.2, 3.3), or a PCP "unsupported version" reply.

    Raises :class:`PortMapError` for anything else: a request, an unknown opcode, the wrong size.
    """
    if len(data) >= 4 and data[0] == PCP_VERSION and data[1] & 0x80:
        if data[3] == UNSUPPORTED_VERSION:
            return VersionMismatch(PCP_VERSION)
        raise PortMapError(f"a PCP reply (result {data[3]}) to a NAT-PMP request")
    if len(data) < 8:
        raise PortMapError(f"a NAT-PMP response is at least 8 bytes: {len(data)}")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != NATPMP_VERSION:
        raise PortMapError(f"NAT-PMP version {version}")
    if op < 128:
        raise PortMapError("a NAT-PMP request, not a response")
    opcode = op - 128
    if result != 0:
        return NatPmpResponse(opcode, result, epoch)
    if opcode == NATPMP_EXTERNAL:
        if len(data) != 12:
            raise PortMapError(f"an external-address response is 12 bytes: {len(data)}")
        return NatPmpResponse(
            opcode, result, epoch, external_ip=str(ipaddress.IPv4Address(data[8:12]))
        )
    if opcode == NATPMP_MAP_UDP:
        if len(data) != 16:
            raise PortMapError(f"a mapping response is 16 bytes: {len(data)}")
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return NatPmpResponse(opcode, result, epoch, None, internal, external, lifetime)
    raise PortMapError(f"NAT-PMP opcode {opcode} is not one we ask")


# -- the mapper ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortMapSettings:
    """What to ask for and how hard (seconds, counts).

    - ``lifetime`` 7200: the lifetime asked for (the gateway may grant less);
    - ``initial_timeout`` 0.25 and ``attempts`` 4: a request is sent, then again after 0.25,
      0.5 and 1 s (RFC 6886's schedule, cut to 1.75 s in all: a gateway on the LAN answers in
      milliseconds, and the connector should not wait long for one that does not exist);
    - ``refresh`` 0.5: a mapping is renewed when this fraction of its lifetime has passed
      (RFC 6886 § 3.3, RFC 6887 § 11.2.1), and lost if that fails;
    - ``retry`` 300: after a failure, or a lost mapping, a new attempt this long later;
    - ``pcp`` and ``natpmp``: which protocols to try (PCP first).

    Raises :class:`PortMapError` for values out of range.
    """

    lifetime: int = 7200
    initial_timeout: float = 0.25
    attempts: int = 4
    refresh: float = 0.5
    retry: float = 300.0
    pcp: bool = True
    natpmp: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.lifetime <= 0xFFFFFFFF or self.attempts < 1:
            raise PortMapError("lifetime must be 1 to 2**32 - 1 s and attempts >= 1")
        if not (self.initial_timeout > 0 and self.retry > 0 and 0 < self.refresh < 1):
            raise PortMapError("timeouts must be positive and refresh a fraction in (0, 1)")
        if not (self.pcp or self.natpmp):
            raise PortMapError("at least one of pcp and natpmp")


@dataclass(frozen=True)
class MappingObtained:
    """The gateway maps ``external`` (ip, port) to our port, for ``lifetime`` s, by ``protocol``.
    Emitted again after each refresh that changes the external endpoint."""

    external: tuple[str, int]
    lifetime: int
    protocol: Protocol


@dataclass(frozen=True)
class MappingFailed:
    """No mapping: ``reason`` (no answer, or the gateway's refusal). A retry follows."""

    reason: str


@dataclass(frozen=True)
class MappingLost:
    """A mapping we held is gone (a refresh failed, or the gateway lost its state): ``reason``."""

    external: tuple[str, int]
    reason: str


PortMapEvent = MappingObtained | MappingFailed | MappingLost

_State = Literal["idle", "asking", "mapped", "waiting", "closed"]


class PortMapper:
    """Keep one UDP port mapped on the gateway, sans-IO.

    ``gateway`` is the gateway's address (datagrams go to ``(gateway, PORT)`` and are accepted
    only from there); ``client_ip`` our address towards it (PCP checks it; ``None``: set
    :attr:`client_ip` before :meth:`start`, as :class:`PortMapSession` does from its connected
    socket); ``internal_port`` the port to map (the WireGuard socket's). ``random(n)`` gives
    ``n`` random bytes (default :func:`os.urandom`). Raises :class:`PortMapError` for a port out
    of range or an address that is not literal.
    """

    def __init__(
        self,
        gateway: str,
        client_ip: str | None,
        internal_port: int,
        *,
        settings: PortMapSettings | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        try:
            ipaddress.ip_address(gateway)
            if client_ip is not None:
                ipaddress.ip_address(client_ip)
        except ValueError as exc:
            raise PortMapError(f"gateway and client addresses must be literal: {exc}") from None
        if not 1 <= internal_port <= 65535:
            raise PortMapError(f"internal port out of range: {internal_port}")
        self.gateway = (gateway, PORT)
        self.client_ip = client_ip
        """Our address as the gateway sees it (written into PCP requests)."""
        self.internal_port = internal_port
        self.settings = settings if settings is not None else PortMapSettings()
        self._random = random
        self._nonce = random(12)
        self._state: _State = "idle"
        self._protocol: Protocol = "pcp" if self.settings.pcp else "natpmp"
        self._out: list[bytes] = []
        self._events: deque[PortMapEvent] = deque()
        self._deadline: float | None = None
        self._sent = 0
        self._refreshing = False
        self._mapping: MappingObtained | None = None
        self._external_ip: str | None = None  # NAT-PMP's answer to opcode 0
        self._natpmp_port: tuple[int, int] | None = None  # NAT-PMP (external port, lifetime)
        self._epoch: tuple[int, float] | None = None  # (server epoch, when we heard it)

    @property
    def mapping(self) -> MappingObtained | None:
        """The mapping we hold now, or ``None``."""
        return self._mapping

    @property
    def protocol(self) -> Protocol:
        """The protocol in use (or being tried)."""
        return self._protocol

    def start(self, now: float) -> None:
        """Ask for the mapping (PCP first). Calling it again while asking or mapped does nothing.

        Raises :class:`PortMapError` if :attr:`client_ip` is still unknown.
        """
        if self.client_ip is None:
            raise PortMapError("client_ip must be known before start()")
        if self._state in ("idle", "waiting"):
            self._ask(now, refreshing=False)

    def close(self, now: float) -> None:
        """Delete the mapping we hold (one request with lifetime 0, not retransmitted: the
        gateway forgets it at its lifetime's end anyway) and stop."""
        if self._mapping is not None or self._state == "asking":
            self._out.append(self._request(0))
        self._mapping = None
        self._state = "closed"
        self._deadline = None

    def datagrams_to_send(self) -> list[bytes]:
        """Return and forget the datagrams to send to :attr:`gateway`."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> PortMapEvent | None:
        """Return the oldest event not returned yet, or ``None``."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next run, or ``None``."""
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Retransmit, give up, refresh or retry, as due at ``now``."""
        if self._deadline is None or now < self._deadline:
            return
        if self._state == "asking":
            if self._sent < self.settings.attempts:
                self._send(now)
            elif self._protocol == "pcp" and self.settings.natpmp and not self._refreshing:
                self._protocol = "natpmp"  # a NAT-PMP-only gateway may drop PCP silently
                self._sent = 0
                self._send(now)
            else:
                self._give_up(now, "the gateway did not answer")
        elif self._state == "mapped":
            self._ask(now, refreshing=True)
        elif self._state == "waiting":
            self._ask(now, refreshing=False)

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        """Handle a datagram from ``addr``; anything not from the gateway, or not an answer to
        what we asked, is ignored."""
        if self._state not in ("asking", "mapped") or tuple(addr) != self.gateway:
            return
        try:
            if self._protocol == "pcp":
                self._on_pcp(parse_pcp_response(data), now)
            else:
                self._on_natpmp(parse_natpmp_response(data), now)
        except PortMapError:
            return

    # -- internals ---------------------------------------------------------------------------

    def _ask(self, now: float, *, refreshing: bool) -> None:
        self._state = "asking"
        self._refreshing = refreshing
        if not refreshing:
            self._protocol = "pcp" if self.settings.pcp else "natpmp"
        self._sent = 0
        self._external_ip = None
        self._natpmp_port = None
        self._send(now)

    def _request(self, lifetime: int) -> bytes:
        if self._protocol == "pcp":
            suggested = self._mapping.external if self._mapping is not None else ("0.0.0.0", 0)
            assert self.client_ip is not None  # start() checked it
            return encode_pcp_map(
                nonce=self._nonce,
                client_ip=self.client_ip,
                internal_port=self.internal_port,
                lifetime=lifetime,
                suggested_port=suggested[1],
                suggested_ip=suggested[0],
            )
        return encode_natpmp_request(NATPMP_MAP_UDP, self.internal_port, lifetime)

    def _send(self, now: float) -> None:
        if self._protocol == "natpmp" and self._external_ip is None:
            self._out.append(encode_natpmp_request(NATPMP_EXTERNAL))
        if self._protocol == "pcp" or self._natpmp_port is None:
            self._out.append(self._request(self.settings.lifetime))
        self._deadline = now + self.settings.initial_timeout * 2**self._sent
        self._sent += 1

    def _on_pcp(self, reply: PcpResponse | VersionMismatch, now: float) -> None:
        if isinstance(reply, VersionMismatch):
            if not self.settings.natpmp:
                self._give_up(now, "the gateway speaks only NAT-PMP, which is turned off")
                return
            self._protocol = "natpmp"
            self._sent = 0
            self._send(now)
            return
        if reply.result != 0:
            if reply.nonce and reply.nonce != self._nonce:
                return
            name = PCP_RESULTS.get(reply.result, f"result {reply.result}")
            self._give_up(now, f"the gateway refused the PCP mapping: {name}")
            return
        if (reply.nonce, reply.protocol, reply.internal_port) != (
            self._nonce,
            UDP,
            self.internal_port,
        ):
            return  # not an answer to our request
        if reply.lifetime == 0 or reply.external_port == 0:
            self._give_up(now, "the gateway granted no lifetime")
            return
        self._check_epoch(reply.epoch, now)
        self._mapped((reply.external_ip, reply.external_port), reply.lifetime, now)

    def _on_natpmp(self, reply: NatPmpResponse | VersionMismatch, now: float) -> None:
        if isinstance(reply, VersionMismatch):
            return  # we sent version 0: a PCP-only server; the timeout ends this
        if reply.result != 0:
            name = NATPMP_RESULTS.get(reply.result, f"result {reply.result}")
            self._give_up(now, f"the gateway refused the NAT-PMP mapping: {name}")
            return
        self._check_epoch(reply.epoch, now)
        if reply.opcode == NATPMP_EXTERNAL:
            self._external_ip = reply.external_ip
        elif reply.internal_port == self.internal_port:
            if reply.lifetime == 0 or reply.external_port == 0:
                self._give_up(now, "the gateway granted no lifetime")
                return
            self._natpmp_port = (reply.external_port, reply.lifetime)
        if self._external_ip is not None and self._natpmp_port is not None:
            port, lifetime = self._natpmp_port
            self._mapped((self._external_ip, port), lifetime, now)

    def _check_epoch(self, epoch: int, now: float) -> None:
        """RFC 6887 § 8.5 / RFC 6886 § 3.6: an epoch that fell behind means a gateway restart."""
        previous = self._epoch
        self._epoch = (epoch, now)
        if previous is None or self._mapping is None:
            return
        expected = previous[0] + (now - previous[1]) * 7 / 8 - 2
        if epoch < expected:
            lost = self._mapping
            self._mapping = None
            self._events.append(MappingLost(lost.external, "the gateway restarted"))

    def _mapped(self, external: tuple[str, int], lifetime: int, now: float) -> None:
        held = self._mapping
        self._mapping = MappingObtained(external, lifetime, self._protocol)
        if held is None or held.external != external:
            if held is not None:
                self._events.append(MappingLost(held.external, "the gateway moved the mapping"))
            self._events.append(self._mapping)
        self._state = "mapped"
        self._deadline = now + max(1.0, lifetime * self.settings.refresh)

    def _give_up(self, now: float, reason: str) -> None:
        held = self._mapping
        self._mapping = None
        if held is not None:
            self._events.append(MappingLost(held.external, reason))
        else:
            self._events.append(MappingFailed(reason))
        self._state = "waiting"
        self._deadline = now + self.settings.retry
