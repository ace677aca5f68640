"""What happened to each packet: verdicts and trace records for researchers."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(str, enum.Enum):
    """What a node or link did with a packet; the value is a short stable string."""

    SENT = "sent"
    """A socket on a host sent the packet."""
    FORWARDED = "forwarded"
    """A router passed the packet on unchanged."""
    NAT_OUT = "nat-out"
    """A NAT rewrote the source of an outbound packet to its mapped external endpoint."""
    NAT_IN = "nat-in"
    """A NAT admitted an inbound packet and rewrote its destination to the internal endpoint."""
    HAIRPINNED = "hairpinned"
    """A NAT turned a packet from its inside to its own external address back inside."""
    DELIVERED = "delivered"
    """A socket's receive queue got the packet."""
    DUPLICATED = "duplicated"
    """A link delivered an extra copy of the packet."""
    LOST = "lost"
    """A link lost the packet."""
    DROPPED_BY_FILTER = "dropped-by-filter"
    """A NAT's filtering refused an inbound packet on an existing mapping."""
    NO_MAPPING = "no-mapping"
    """A NAT got an inbound packet for an external port with no live mapping."""
    NO_HAIRPIN = "no-hairpin"
    """A NAT without hairpinning dropped a packet from inside to its own external address."""
    PORTS_EXHAUSTED = "ports-exhausted"
    """A NAT had no free external port for a new mapping."""
    NO_ROUTE = "no-route"
    """No node on the network owns or routes the destination address."""
    NO_LISTENER = "no-listener"
    """No socket is bound to the destination port (or a connected socket refused the source)."""
    BUFFER_FULL = "buffer-full"
    """The receiving socket's queue was full."""
    TTL_EXCEEDED = "ttl-exceeded"
    """The packet crossed too many routers (a routing loop)."""
    BLOCKED = "blocked"
    """A router or NAT with ``block_udp`` dropped a UDP packet."""
    FILTERED = "filtered"
    """A stateful IPv6 firewall dropped an inbound packet that matches no state."""


@dataclass(frozen=True)
class TraceRecord:
    """One event in a packet's life, as given to the trace hook.

    ``time`` is ``trio.current_time()`` in seconds; ``where`` names the node (or ``"a->b"`` for the
    link between nodes ``a`` and ``b``); ``src`` and ``dst`` are ``"ip:port"`` texts of the packet as
    it was when the event happened; ``size`` is the UDP payload (or TCP segment data) length in
    bytes; ``detail`` says more where useful, for example a NAT's translation; ``protocol`` is
    ``"udp"`` or ``"tcp"``; for TCP, ``tcp`` summarises the segment as tcpdump would
    (``"[S.] seq 1 ack 2 win 65536"``), else it is empty.
    """

    time: float
    where: str
    src: str
    dst: str
    size: int
    verdict: Verdict
    detail: str = ""
    protocol: str = "udp"
    tcp: str = ""

    def __str__(self) -> str:
        """One line: time in seconds, place, verdict, endpoints, size, TCP summary and detail."""
        detail = f" ({self.detail})" if self.detail else ""
        segment = f" tcp {self.tcp}" if self.tcp else ""
        return (
            f"{self.time:10.6f} {self.where:<16} {self.verdict.value:<17} "
            f"{self.src} -> {self.dst} {self.size} B{segment}{detail}"
        )
