"""A STUN Binding client transaction, sans-IO: RFC 8489 retransmissions driven by the caller's clock.

The caller owns the socket, which may be shared with other protocols: it sends what
:meth:`StunTransaction.datagrams_to_send` returns, feeds every received datagram to
:meth:`StunTransaction.receive_datagram` (which says whether it was consumed), calls
:meth:`StunTransaction.handle_timer` at :meth:`StunTransaction.get_timer`, and reads the outcome with
:meth:`StunTransaction.next_event`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ._layers import (
    ChangedAddress,
    ChangeRequest,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    OtherAddress,
    ResponseOrigin,
    ResponsePort,
    Software,
    StunAttribute,
    StunError,
    StunMessage,
    XorMappedAddress,
    parse_message,
)

__all__ = [
    "BindingFailed",
    "BindingSucceeded",
    "BindingTimedOut",
    "StunTransaction",
    "TransactionEvent",
    "is_usable_mapped_address",
]

Endpoint = tuple[str, int]

RTO = 0.5
"""RFC 8489 initial retransmission timeout, seconds."""
RC = 7
"""RFC 8489 number of requests sent before giving up."""
RM = 16
"""RFC 8489: after the last request, wait ``RM * RTO`` for a response."""


@dataclass(frozen=True)
class BindingSucceeded:
    """A Binding success response arrived.

    ``mapped`` is the server-reflexive endpoint (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS);
    ``source`` is where the response came from; ``response_origin``, ``other_address`` (RFC 5780,
    or RFC 3489 CHANGED-ADDRESS) are ``None`` when the server did not send them; ``rtt`` is seconds
    from the last transmission to the response.
    """

    mapped: Endpoint
    source: Endpoint
    response_origin: Endpoint | None
    other_address: Endpoint | None
    rtt: float


@dataclass(frozen=True)
class BindingFailed:
    """The server answered with an error (``error_code``) or with an unusable response."""

    reason: str
    error_code: int | None = None


@dataclass(frozen=True)
class BindingTimedOut:
    """No acceptable response after ``attempts`` requests and the final wait."""

    attempts: int


TransactionEvent = BindingSucceeded | BindingFailed | BindingTimedOut


def _normalize(endpoint: Endpoint) -> Endpoint:
    return str(ipaddress.ip_address(endpoint[0])), int(endpoint[1])


def is_usable_mapped_address(endpoint: Endpoint, *, allow_loopback: bool = False) -> bool:
    """Return whether a server may report ``endpoint`` as our mapped address.

    Rejects port 0, the unspecified address, multicast, broadcast, anything unparsable, and
    loopback unless ``allow_loopback`` (true when the server itself was reached over loopback).
    """
    try:
        addr = ipaddress.ip_address(endpoint[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if not 0 < endpoint[1] < 65536 or addr.is_unspecified or addr.is_multicast:
        return False
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        return False
    return allow_loopback or not addr.is_loopback


def _endpoint(attr: StunAttribute | None) -> Endpoint | None:
    if attr is None:
        return None
    return _normalize((str(attr.ip), int(attr.port)))


class StunTransaction:
    """One Binding request to ``destination``, retransmitted as RFC 8489 section 6.2.1 says.

    Requests go out at ``now``, then after ``rto``, ``2*rto``, ``4*rto``... (seconds), ``rc`` in
    all; ``rm * rto`` after the last one the transaction times out. ``change_ip``/``change_port`` add
    a CHANGE-REQUEST, ``response_port`` a RESPONSE-PORT. A response is accepted only if it carries
    our transaction id and comes from ``expected_source`` (default: ``destination``; a change
    request is answered from another address, which the caller names here). The request is padded
    with a SOFTWARE attribute to at least ``pad_to`` bytes, so that servers that bound responses by
    the request's size (punchtrio's does) can send every attribute. Raises ``ValueError`` for a
    destination that is not an IP literal or for non-positive timer settings.
    """

    def __init__(
        self,
        destination: Endpoint,
        now: float,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        response_port: int | None = None,
        expected_source: Endpoint | None = None,
        rto: float = RTO,
        rc: int = RC,
        rm: int = RM,
        pad_to: int | None = None,
    ) -> None:
        if rto <= 0 or rc < 1 or rm < 0:
            raise ValueError("rto must be > 0, rc >= 1 and rm >= 0")
        self.destination = _normalize(destination)
        self.expected_source = _normalize(expected_source or destination)
        self.rto, self.rc, self.rm = rto, rc, rm
        self._allow_loopback = ipaddress.ip_address(self.destination[0]).is_loopback
        attrs: list[StunAttribute] = []
        if change_ip or change_port:
            attrs.append(ChangeRequest(change_ip=int(change_ip), change_port=int(change_port)))
        if response_port is not None:
            attrs.append(ResponsePort(port=response_port))
        if pad_to is None:
            pad_to = 100 if ":" in self.destination[0] else 44
        base = 20 + sum(len(bytes(a)) for a in attrs) + 8
        text = b"punchtrio"
        text += b" " * max(0, pad_to - base - 4 - len(text))
        attrs += [Software(value=text), Fingerprint()]
        self.request_message = StunMessage(attributes=attrs)
        self.transaction_id: int = int(self.request_message.transaction_id)
        self.request = bytes(self.request_message)
        self.attempts = 0
        self.done = False
        self._next_send: float | None = now
        self._deadline: float | None = None
        self._last_send = now
        self._events: list[TransactionEvent] = []

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Return the ``(datagram, destination)`` pairs due at ``now`` (at most one)."""
        if self.done or self._next_send is None or now < self._next_send:
            return []
        self.attempts += 1
        self._last_send = now
        if self.attempts < self.rc:
            self._next_send = now + self.rto * 2 ** (self.attempts - 1)
        else:
            self._next_send = None
            self._deadline = now + self.rm * self.rto
        return [(self.request, self.destination)]

    def get_timer(self) -> float | None:
        """Return when to call :meth:`handle_timer` next (seconds, the caller's clock), or ``None``."""
        if self.done:
            return None
        return self._next_send if self._next_send is not None else self._deadline

    def handle_timer(self, now: float) -> None:
        """Advance time: give up once the final wait has passed."""
        if not self.done and self._deadline is not None and now >= self._deadline:
            self._finish(BindingTimedOut(self.attempts))

    def next_event(self) -> TransactionEvent | None:
        """Return the next outcome event, or ``None``; there is at most one per transaction."""
        return self._events.pop(0) if self._events else None

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> bool:
        """Offer one received datagram; return ``True`` if it was this transaction's response.

        Datagrams that are not STUN, carry another transaction id, come from an unexpected
        address, or are not a Binding response are ignored (``False``), so a shared socket can pass
        everything it receives here first.
        """
        if self.done or len(data) < 20 or data[8:20] != self.transaction_id.to_bytes(12, "big"):
            return False
        try:
            if _normalize(source) != self.expected_source:
                return False
            msg = parse_message(data)
        except (StunError, ValueError):
            return False
        if msg.method() != 1 or msg.message_class() not in (2, 3):
            return False
        if msg.message_class() == 3:
            error = msg.get(ErrorCode)
            code = error.code if error is not None else None
            reason = error.reason.decode("utf-8", "replace") if error is not None else "no reason"
            self._finish(BindingFailed(f"server answered {code} {reason}".strip(), code))
            return True
        mapped = _endpoint(msg.get(XorMappedAddress) or msg.get(MappedAddress))
        if mapped is None:
            self._finish(BindingFailed("server response has no mapped address"))
        elif not is_usable_mapped_address(mapped, allow_loopback=self._allow_loopback):
            self._finish(BindingFailed(f"server reported an unusable mapped address {mapped}"))
        else:
            self._finish(
                BindingSucceeded(
                    mapped=mapped,
                    source=self.expected_source,
                    response_origin=_endpoint(msg.get(ResponseOrigin)),
                    other_address=_endpoint(msg.get(OtherAddress) or msg.get(ChangedAddress)),
                    rtt=max(0.0, now - self._last_send),
                )
            )
        return True

    def _finish(self, event: TransactionEvent) -> None:
        self.done = True
        self._next_send = self._deadline = None
        self._events.append(event)
