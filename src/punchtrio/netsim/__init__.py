"""An in-process virtual internet for tests and NAT research, built on Trio's custom socket factory.

Build IPv4, IPv6 or dual-stack hosts, routers, RFC 4787 NATs (NAT66 included) and stateful IPv6
firewalls joined by links with latency, jitter, loss and duplication;
enter the :class:`Internet` and ordinary Trio code using ``trio.socket`` (UDP, and TCP through
``trio.open_tcp_stream`` / ``trio.serve_tcp``) runs unchanged on the simulated hosts, in virtual time under ``trio.testing.MockClock``. See ``docs/netsim.md``.
"""

from ._addresses import NetsimError
from ._internet import Internet, NoCurrentHostError
from ._link import Link
from ._nat import (
    Filtering,
    Ipv6Firewall,
    Ipv6FirewallTable,
    Mapping,
    NatBehavior,
    NatBinding,
    NatTable,
    PortAllocation,
)
from ._services import DistantRendezvous, serve_stun
from ._socket import (
    MAX_DATAGRAM,
    RECEIVE_QUEUE_LIMIT,
    NonBlockingSocket,
    UDPSocket,
    UnsupportedSocketError,
)
from ._stream import TCPSocket
from ._tcp import (
    TCP_MSS,
    TCP_RECEIVE_BUFFER,
    TCP_SEND_BUFFER,
    TcpConnection,
    TcpEstablished,
    TcpSegment,
    TcpState,
    TcpTerminated,
)
from ._topology import (
    FIRST_EPHEMERAL_PORT,
    INITIAL_TTL,
    NAT,
    Host,
    Interface,
    Network,
    Node,
    Router,
    current_host,
)
from ._trace import TraceRecord, Verdict

__all__ = [
    "FIRST_EPHEMERAL_PORT",
    "INITIAL_TTL",
    "MAX_DATAGRAM",
    "NAT",
    "RECEIVE_QUEUE_LIMIT",
    "TCP_MSS",
    "TCP_RECEIVE_BUFFER",
    "TCP_SEND_BUFFER",
    "DistantRendezvous",
    "Filtering",
    "Host",
    "Interface",
    "Internet",
    "Ipv6Firewall",
    "Ipv6FirewallTable",
    "Link",
    "Mapping",
    "NatBehavior",
    "NatBinding",
    "NatTable",
    "NetsimError",
    "Network",
    "NoCurrentHostError",
    "Node",
    "NonBlockingSocket",
    "PortAllocation",
    "Router",
    "TCPSocket",
    "TcpConnection",
    "TcpEstablished",
    "TcpSegment",
    "TcpState",
    "TcpTerminated",
    "TraceRecord",
    "UDPSocket",
    "UnsupportedSocketError",
    "Verdict",
    "current_host",
    "serve_stun",
]
