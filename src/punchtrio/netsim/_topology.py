"""The topology of a simulation: networks, and the hosts, routers and NATs attached to them."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import ipaddress
import socket as _stdlib_socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio

from ._addresses import (
    LOOPBACK,
    Endpoint,
    IPAddress,
    NetsimError,
    family_of,
    format_endpoint,
    parse_ip,
)
from ._engine import Emission
from ._link import Link
from ._nat import NatBehavior, NatBinding, NatTable
from ._socket import NonBlockingSocket, UDPSocket, UnsupportedSocketError
from ._stream import TCPSocket
from ._tcp import TcpSegment
from ._trace import Verdict

if TYPE_CHECKING:
    from ._internet import Internet

FIRST_EPHEMERAL_PORT = 49152
"""A host hands out ephemeral ports sequentially from here (to 65535), skipping ports in use."""

INITIAL_TTL = 64
"""Hops a packet may take through routers and NATs before it is dropped (``ttl-exceeded``)."""

_S = TypeVar("_S", UDPSocket, TCPSocket)
_BindKey = tuple[int, "IPAddress | None", int]

_current_host: contextvars.ContextVar[Host | None] = contextvars.ContextVar(
    "punchtrio_netsim_host", default=None
)


@dataclass(frozen=True)
class _Packet:
    """A packet in flight: UDP when ``segment`` is None, else TCP (``payload`` is its data)."""

    src: Endpoint
    dst: Endpoint
    payload: bytes
    ttl: int = INITIAL_TTL
    segment: TcpSegment | None = None


class Interface:
    """A node's attachment to one network: its addresses there and the link to it.

    ``link`` may be replaced at any time, for example ``nat.outside.link = Link(loss=1.0)`` to cut
    a NAT off; packets already in flight keep the delay they were given.
    """

    def __init__(
        self, node: Node, network: Network, addresses: tuple[IPAddress, ...], link: Link
    ) -> None:
        self.node = node
        self.network = network
        self.addresses = addresses
        self.link = link


class Node:
    """Something attached to networks: a :class:`Host`, :class:`Router` or :class:`NAT`."""

    def __init__(self, internet: Internet, name: str) -> None:
        self.internet = internet
        self.name = name
        self.index = internet._register(self)
        self.counters: Counter[Verdict] = Counter()
        """How many packets this node gave each :class:`Verdict`."""

    def __repr__(self) -> str:
        return f"<netsim.{type(self).__name__} {self.name}>"

    def _receive(self, interface: Interface, packet: _Packet) -> None:
        raise NotImplementedError

    def _note(self, packet: _Packet, verdict: Verdict, detail: str = "", where: str = "") -> None:
        self.counters[verdict] += 1
        self.internet._note(where or self.name, packet, verdict, detail)


class Network:
    """One network segment: the public internet (no prefix) or a LAN with an address prefix.

    Nodes on a network reach each other directly; packets to other addresses go by the longest
    matching route, else to the network's gateway (the NAT or router that owns a LAN). A LAN drops
    packets to unassigned addresses inside its own prefix (``no-route``).
    """

    def __init__(
        self,
        internet: Internet,
        name: str,
        prefix: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
    ) -> None:
        self.internet = internet
        self.name = name
        self.prefix = prefix
        self.gateway: Interface | None = None
        self._by_address: dict[IPAddress, Interface] = {}
        self._routes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Interface]] = []

    def __repr__(self) -> str:
        return f"<netsim.Network {self.name} {self.prefix or 'public'}>"

    @property
    def nodes(self) -> list[Node]:
        """The nodes attached to this network, in the order they were added."""
        seen: dict[int, Node] = {}
        for interface in self._by_address.values():
            seen.setdefault(interface.node.index, interface.node)
        return [seen[i] for i in sorted(seen)]

    def add_host(
        self, *addresses: str | IPAddress, name: str | None = None, link: Link | None = None
    ) -> Host:
        """Attach a new :class:`Host` with ``addresses`` (IP literals; IPv4 and/or IPv6).

        On a LAN, no address means the next free one in the prefix. ``link`` defaults to a perfect
        link; ``name`` defaults to ``host<N>``. Raises :class:`NetsimError` for a non-literal,
        duplicate or out-of-prefix address.
        """
        parsed = self._addresses(addresses)
        host = Host(self.internet, self.internet._new_name(name, "host"))
        host._interface = self._attach(host, parsed, link)
        return host

    def add_nat(
        self,
        address: str | IPAddress | None = None,
        *,
        behavior: NatBehavior | None = None,
        lan: str = "10.0.0.0/24",
        name: str | None = None,
        link: Link | None = None,
        block_udp: bool = False,
    ) -> NAT:
        """Attach a new :class:`NAT` with external ``address`` here and a fresh LAN ``lan`` inside.

        The NAT takes the first address of ``lan`` as its inside address; hosts added to
        ``nat.lan`` sit behind it. ``behavior`` defaults to :class:`NatBehavior` ``()``.
        ``block_udp=True`` makes it a network that lets only TCP out: it drops every UDP packet it
        would forward, in both directions (verdict ``blocked``; see :attr:`Router.block_udp`).
        Raises :class:`NetsimError` for an invalid address, prefix or name, and then changes
        nothing.
        """
        (external,) = self._addresses((address,) if address is not None else ())
        name = self.internet._new_name(name, "nat")
        inside = _lan(self.internet, f"{name}-lan", lan)
        nat = NAT(self.internet, name, behavior or NatBehavior(), external)
        nat.block_udp = block_udp
        nat.outside = self._attach(nat, (external,), link)
        nat.lan = inside
        nat.inside = inside._attach(nat, (inside._gateway_address(),), None)
        inside.gateway = nat.inside
        return nat

    def add_router(
        self,
        address: str | IPAddress | None = None,
        *,
        lan: str,
        name: str | None = None,
        link: Link | None = None,
        block_udp: bool = False,
    ) -> Router:
        """Attach a new :class:`Router` at ``address`` that routes the prefix ``lan`` without NAT.

        This network gets a route to ``lan`` through the router; hosts added to ``router.lan`` are
        reachable by their own addresses. ``block_udp=True`` makes the router drop every UDP
        packet it would forward (see :attr:`Router.block_udp`). Raises :class:`NetsimError` for an
        invalid address, prefix or name, and then changes nothing.
        """
        (outside,) = self._addresses((address,) if address is not None else ())
        name = self.internet._new_name(name, "router")
        inside = _lan(self.internet, f"{name}-lan", lan)
        assert inside.prefix is not None
        router = Router(self.internet, name)
        router.block_udp = block_udp
        router.outside = self._attach(router, (outside,), link)
        router.lan = inside
        router.inside = inside._attach(router, (inside._gateway_address(),), None)
        inside.gateway = router.inside
        self._routes.append((inside.prefix, router.outside))
        self._routes.sort(key=lambda route: -route[0].prefixlen)
        return router

    def _gateway_address(self) -> IPAddress:
        assert self.prefix is not None
        return self.prefix.network_address + 1

    def _addresses(self, given: tuple[str | IPAddress | None, ...]) -> tuple[IPAddress, ...]:
        """Parse and check node addresses (or pick the next free one on a LAN); change nothing."""
        parsed = tuple(parse_ip(a) for a in given if a is not None)
        if not parsed:
            if self.prefix is None:
                raise NetsimError(f"a node on {self.name} needs an explicit address")
            free = (
                self.prefix.network_address + offset
                for offset in range(2, self.prefix.num_addresses - 1)
            )
            candidate = next((a for a in free if a not in self._by_address), None)
            if candidate is None:
                raise NetsimError(f"no free address left in {self.prefix}")
            return (candidate,)
        for address in parsed:
            if address in self._by_address or parsed.count(address) > 1:
                raise NetsimError(f"{address} is already used on {self.name}")
            if address.is_loopback or address.is_multicast or address.is_unspecified:
                raise NetsimError(f"{address} cannot be a node address")
            if self.prefix is not None and address not in self.prefix:
                raise NetsimError(f"{address} is outside {self.name}'s prefix {self.prefix}")
        return parsed

    def _attach(self, node: Node, addresses: tuple[IPAddress, ...], link: Link | None) -> Interface:
        interface = Interface(node, self, addresses, link or Link())
        for address in addresses:
            self._by_address[address] = interface
        return interface

    def _next_hop(self, dst: IPAddress, sender: Interface) -> Interface | None:
        target = self._by_address.get(dst)
        if target is not None:
            return target
        for prefix, via in self._routes:
            if dst.version == prefix.version and dst in prefix and via is not sender:
                return via
        if self.prefix is not None and dst.version == self.prefix.version and dst in self.prefix:
            return None
        if self.gateway is not None and self.gateway is not sender:
            return self.gateway
        return None

    def _transmit(self, sender: Interface, packet: _Packet) -> None:
        """Carry ``packet`` from ``sender`` across this network (engine task only)."""
        target = self._next_hop(packet.dst[0], sender)
        if target is None:
            sender.node._note(packet, Verdict.NO_ROUTE, f"on {self.name}")
            return
        where = f"{sender.node.name}->{target.node.name}"
        rng = self.internet.rng
        delays = [0.0]
        for link in (sender.link, target.link):
            arriving: list[float] = []
            for delay in delays:
                copies = link.copies(rng)
                if not copies:
                    self.internet._note(where, packet, Verdict.LOST)
                elif len(copies) > 1:
                    self.internet._note(where, packet, Verdict.DUPLICATED)
                arriving.extend(delay + extra for extra in copies)
            delays = arriving
        for delay in delays:
            self.internet._engine.schedule(delay, target.node._receive, target, packet)


def current_host() -> Host | None:
    """Return the host chosen by the innermost ``host.activate()`` in this task, or None.

    Library code can use it to learn that it runs in a simulation, and on which host (for
    example, to list the host's addresses as candidates).
    """
    return _current_host.get()


class Host(Node):
    """A simulated machine with one or more addresses on one network, and UDP and TCP sockets.

    Make sockets with :meth:`udp_socket` and :meth:`tcp_socket`, or run ordinary Trio code under
    :meth:`activate` so that ``trio.socket.socket()`` (and with it ``trio.open_tcp_stream``,
    ``trio.serve_tcp``) creates sockets on this host. A segment for a TCP port nobody listens on
    is answered with an RST, as a kernel does.
    """

    _interface: Interface

    def __init__(self, internet: Internet, name: str) -> None:
        super().__init__(internet, name)
        self._sockets: dict[_BindKey, UDPSocket] = {}
        self._ports: dict[tuple[int, int], int] = {}
        self._next_ephemeral = FIRST_EPHEMERAL_PORT
        self._tcp_sockets: dict[_BindKey, TCPSocket] = {}
        self._tcp_ports: dict[tuple[int, int], int] = {}
        self._next_tcp_ephemeral = FIRST_EPHEMERAL_PORT
        self._connections: dict[tuple[Endpoint, Endpoint], TCPSocket] = {}
        self._connection_ports: Counter[tuple[int, int]] = Counter()

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """The host's addresses (without loopback), in the order given."""
        return self._interface.addresses

    @property
    def network(self) -> Network:
        """The network this host is attached to."""
        return self._interface.network

    @property
    def interface(self) -> Interface:
        """The host's attachment to its network; assign ``interface.link`` to change the link."""
        return self._interface

    @property
    def sockets(self) -> list[UDPSocket]:
        """The open, bound sockets of this host, by family and port."""
        return sorted(self._sockets.values(), key=lambda sock: (int(sock.family), sock.port))

    def udp_socket(self, family: int = _stdlib_socket.AF_INET) -> UDPSocket:
        """Return a new, unbound UDP socket on this host (``AF_INET`` or ``AF_INET6``).

        The socket works with or without a running simulation scope, but packets move only while
        the :class:`Internet` is entered. Raises :class:`UnsupportedSocketError` for another family.
        """
        if family not in (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6):
            raise UnsupportedSocketError(
                errno.EAFNOSUPPORT, f"netsim simulates AF_INET and AF_INET6, not family {family}"
            )
        return UDPSocket(self, family)

    def nonblocking_socket(
        self,
        family: int = _stdlib_socket.AF_INET,
        type: int = _stdlib_socket.SOCK_DGRAM,
        proto: int = 0,
    ) -> NonBlockingSocket:
        """Return a new, unbound UDP socket on this host shaped like a non-blocking stdlib socket.

        For fast paths that ``await trio.lowlevel.wait_readable(sock)`` and then drain with
        synchronous ``recvfrom``; see :class:`NonBlockingSocket`. Its ``trio_socket`` is the same
        socket with the Trio interface. The signature matches :class:`socket.socket`, so code that
        takes a socket constructor can be given this method. Raises
        :class:`UnsupportedSocketError` for anything but a UDP socket.
        """
        if type != _stdlib_socket.SOCK_DGRAM or proto not in (0, _stdlib_socket.IPPROTO_UDP):
            raise UnsupportedSocketError(
                errno.EPROTONOSUPPORT, "netsim simulates UDP sockets only (SOCK_DGRAM)"
            )
        return NonBlockingSocket(self.udp_socket(family))

    def tcp_socket(self, family: int = _stdlib_socket.AF_INET, proto: int = 0) -> TCPSocket:
        """Return a new, unbound TCP socket on this host (``AF_INET`` or ``AF_INET6``).

        See :class:`TCPSocket`; segments move only while the :class:`Internet` is entered. Raises
        :class:`UnsupportedSocketError` (``EAFNOSUPPORT``) for another family.
        """
        if family not in (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6):
            raise UnsupportedSocketError(
                errno.EAFNOSUPPORT, f"netsim simulates AF_INET and AF_INET6, not family {family}"
            )
        return TCPSocket(self, family, proto)

    @property
    def tcp_connections(self) -> list[TCPSocket]:
        """This host's TCP connections (open, closing, or waiting to be accepted), by endpoints."""
        return [self._connections[key] for key in sorted(self._connections, key=_connection_order)]

    @property
    def address(self) -> IPAddress:
        """The host's first address."""
        return self._interface.addresses[0]

    @contextlib.contextmanager
    def activate(self) -> Iterator[Host]:
        """Make ``trio.socket.socket()`` create sockets on this host inside the ``with`` block.

        The choice is a context variable, so tasks started inside the block (``nursery.start_soon``)
        inherit it.
        """
        token = _current_host.set(self)
        try:
            yield self
        finally:
            _current_host.reset(token)

    def source_address(self, family: int, dst: IPAddress) -> IPAddress:
        """Return the source address this host uses towards ``dst`` from a wildcard-bound socket.

        Raises ``OSError(ENETUNREACH)`` if the host has no address of that family.
        """
        if dst.is_loopback:
            return LOOPBACK[family]
        for address in self.addresses:
            if family_of(address) == family:
                return address
        raise OSError(errno.ENETUNREACH, "Network is unreachable (no address of this family)")

    def bind(self, sock: UDPSocket | TCPSocket, ip: IPAddress | None, port: int) -> None:
        """Bind ``sock`` (socket use only); raises ``OSError`` as the kernel would.

        The same port may be bound on different specific addresses, but not on a specific
        address and the wildcard at once. UDP and TCP ports are separate.
        """
        if isinstance(sock, TCPSocket):
            self._bind(self._tcp_sockets, self._tcp_ports, sock, ip, port)
        else:
            self._bind(self._sockets, self._ports, sock, ip, port)

    def _bind(
        self,
        sockets: dict[_BindKey, _S],
        ports: dict[tuple[int, int], int],
        sock: _S,
        ip: IPAddress | None,
        port: int,
    ) -> None:
        family = int(sock.family)
        if ip is not None and ip not in self.addresses and ip != LOOPBACK[family]:
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        if port == 0:
            port = self._ephemeral(family, tcp=isinstance(sock, TCPSocket))
        users = ports.get((family, port), 0)
        if users and (
            ip is None or (family, None, port) in sockets or (family, ip, port) in sockets
        ):
            raise OSError(errno.EADDRINUSE, "Address already in use")
        sockets[(family, ip, port)] = sock
        ports[(family, port)] = users + 1
        sock._bound(ip, port)

    def unbind(self, sock: UDPSocket | TCPSocket) -> None:
        """Forget a closing socket's port."""
        if isinstance(sock, TCPSocket):
            self._unbind(self._tcp_sockets, self._tcp_ports, sock)
        else:
            self._unbind(self._sockets, self._ports, sock)

    @staticmethod
    def _unbind(sockets: dict[_BindKey, _S], ports: dict[tuple[int, int], int], sock: _S) -> None:
        family = int(sock.family)
        key = (family, sock.local_ip, sock.port)
        if sockets.get(key) is sock:
            del sockets[key]
            ports[(family, sock.port)] -= 1
            if not ports[(family, sock.port)]:
                del ports[(family, sock.port)]

    def _ephemeral(self, family: int, *, tcp: bool = False) -> int:
        for _ in range(65536 - FIRST_EPHEMERAL_PORT):
            if tcp:
                port = self._next_tcp_ephemeral
                self._next_tcp_ephemeral = port + 1 if port < 65535 else FIRST_EPHEMERAL_PORT
                if (family, port) not in self._tcp_ports and not self._connection_ports[
                    (family, port)
                ]:
                    return port
            else:
                port = self._next_ephemeral
                self._next_ephemeral = port + 1 if port < 65535 else FIRST_EPHEMERAL_PORT
                if (family, port) not in self._ports:
                    return port
        raise OSError(errno.EADDRINUSE, "no free ephemeral port")

    def _register_connection(self, sock: TCPSocket, local: Endpoint, remote: Endpoint) -> None:
        if (local, remote) in self._connections:
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address (4-tuple in use)")
        self._connections[(local, remote)] = sock
        self._connection_ports[(int(family_of(local[0])), local[1])] += 1

    def _forget_connection(self, sock: TCPSocket) -> None:
        key = (sock._local, sock._peer)
        if key[0] is None or key[1] is None or self._connections.get((key[0], key[1])) is not sock:
            return
        del self._connections[(key[0], key[1])]
        port_key = (int(family_of(key[0][0])), key[0][1])
        self._connection_ports[port_key] -= 1
        if not self._connection_ports[port_key]:
            del self._connection_ports[port_key]

    def _transmit_segment(self, src: Endpoint, dst: Endpoint, segment: TcpSegment) -> None:
        """Send a TCP segment from one of this host's connections (engine task only)."""
        packet = _Packet(src, dst, segment.data, INITIAL_TTL, segment)
        if dst[0] in self.addresses or dst[0].is_loopback:
            self._note(packet, Verdict.SENT, "local")
            self._deliver(packet)
            return
        self._note(packet, Verdict.SENT)
        self._interface.network._transmit(self._interface, packet)

    def emit(self, src: Endpoint, dst: Endpoint, payload: bytes) -> None:
        """Hand a datagram sent by one of this host's sockets to the simulation."""
        self.internet._engine.submit(
            Emission(trio.current_time(), self.index, src, dst, payload, self._send)
        )

    def _send(self, emission: Emission) -> None:
        packet = _Packet(emission.src, emission.dst, emission.payload)
        dst_ip = packet.dst[0]
        if dst_ip in self.addresses or dst_ip.is_loopback:
            self._note(packet, Verdict.SENT, "local")
            self._deliver(packet)
            return
        self._note(packet, Verdict.SENT)
        self._interface.network._transmit(self._interface, packet)

    def _receive(self, interface: Interface, packet: _Packet) -> None:
        self._deliver(packet)

    def _deliver(self, packet: _Packet) -> None:
        if packet.segment is not None:
            self._deliver_segment(packet, packet.segment)
            return
        ip, port = packet.dst
        family = int(family_of(ip))
        sock = self._sockets.get((family, ip, port)) or self._sockets.get((family, None, port))
        if sock is None or not sock.accepts_from(packet.src):
            self._note(packet, Verdict.NO_LISTENER)
        elif sock.deliver(packet.payload, packet.src):
            self._note(packet, Verdict.DELIVERED)
        else:
            self._note(packet, Verdict.BUFFER_FULL)

    def _deliver_segment(self, packet: _Packet, segment: TcpSegment) -> None:
        connection = self._connections.get((packet.dst, packet.src))
        if connection is not None:
            self._note(packet, Verdict.DELIVERED)
            connection._segment_arrived(segment)
            return
        if segment.syn and segment.ack is None and not segment.rst:
            ip, port = packet.dst
            family = int(family_of(ip))
            listener = self._tcp_sockets.get((family, ip, port)) or self._tcp_sockets.get(
                (family, None, port)
            )
            if listener is not None and listener._listening:
                if listener._backlog_full():
                    self._note(packet, Verdict.BUFFER_FULL, "listen backlog full")
                else:
                    self._note(packet, Verdict.DELIVERED)
                    listener._incoming_syn(packet.src, packet.dst, segment)
                return
        self._note(packet, Verdict.NO_LISTENER)
        if not segment.rst:  # a closed port answers with an RST (RFC 9293 3.10.7.1)
            if segment.ack is not None:
                reset = TcpSegment(segment.ack, rst=True)
            else:
                reset = TcpSegment(0, segment.seq + segment.length, rst=True)
            self._transmit_segment(packet.dst, packet.src, reset)

    def _close_sockets(self) -> None:
        for sock in list(self._sockets.values()):
            sock.close()
        for tcp in [*self._tcp_sockets.values(), *self._connections.values()]:
            tcp._discard()
        self._connections.clear()
        self._connection_ports.clear()


class Router(Node):
    """Forwards packets between its LAN and the network above it, without translation.

    ``outside`` and ``inside`` are its two :class:`Interface` objects; ``lan`` is the
    :class:`Network` behind it (add hosts with ``lan.add_host(...)``).
    """

    outside: Interface
    inside: Interface
    lan: Network
    block_udp: bool = False
    """If True, every UDP packet that reaches this router or NAT is dropped, in both directions,
    with the verdict ``blocked``: a network that lets only TCP out. TCP passes as usual. Traffic
    between hosts on the LAN does not cross the router and is not affected. It may be changed
    while the simulation runs."""

    def _receive(self, interface: Interface, packet: _Packet) -> None:
        if self.block_udp and packet.segment is None:
            self._note(packet, Verdict.BLOCKED, "udp blocked")
            return
        if packet.ttl <= 1:
            self._note(packet, Verdict.TTL_EXCEEDED)
            return
        self._forward(
            interface,
            _Packet(packet.src, packet.dst, packet.payload, packet.ttl - 1, packet.segment),
        )

    def _forward(self, interface: Interface, packet: _Packet) -> None:
        if packet.dst[0] in self.outside.addresses or packet.dst[0] in self.inside.addresses:
            self._note(packet, Verdict.NO_LISTENER)
            return
        prefix = self.lan.prefix
        inward = prefix is not None and packet.dst[0].version == prefix.version
        inward = inward and packet.dst[0] in prefix  # type: ignore[operator]
        if interface is self.outside and not inward:
            self._note(packet, Verdict.NO_ROUTE)
            return
        out = self.inside if inward else self.outside
        self._note(packet, Verdict.FORWARDED)
        out.network._transmit(out, packet)


class NAT(Router):
    """A NAT between its LAN (``lan``) and the network above it, with RFC 4787 behaviour.

    ``behavior`` is its :class:`NatBehavior`; ``external_address`` is its one outside address;
    :meth:`mappings` shows the live mapping table; ``counters`` counts verdicts.
    """

    def __init__(
        self, internet: Internet, name: str, behavior: NatBehavior, external: IPAddress
    ) -> None:
        super().__init__(internet, name)
        self.behavior = behavior
        self.external_address = external
        self.table = NatTable(external, behavior, internet.rng)
        """The UDP translation state, a :class:`NatTable`."""
        self.tcp_table = NatTable(
            external,
            dataclasses.replace(behavior, mapping_timeout=behavior.tcp_mapping_timeout),
            internet.rng,
        )
        """The TCP translation state: a separate :class:`NatTable` (its own ports), with the same
        behaviour except that mappings live ``behavior.tcp_mapping_timeout`` seconds."""

    def mappings(self) -> list[NatBinding]:
        """Return the live UDP mappings (a snapshot), sorted by external port; expired ones are gone."""
        return self.table.bindings(trio.current_time())

    def tcp_mappings(self) -> list[NatBinding]:
        """Return the live TCP mappings (a snapshot), sorted by external port."""
        return self.tcp_table.bindings(trio.current_time())

    def reset(self) -> None:
        """Forget every UDP and TCP mapping at once, as a NAT reboot does."""
        self.table.clear()
        self.tcp_table.clear()

    def _table(self, packet: _Packet) -> NatTable:
        return self.table if packet.segment is None else self.tcp_table

    def _forward(self, interface: Interface, packet: _Packet) -> None:
        now = trio.current_time()
        if interface is self.outside:
            self._inbound(packet, now)
            return
        if family_of(packet.dst[0]) != family_of(self.external_address):
            self._note(packet, Verdict.NO_ROUTE, "family not translated")
            return
        if packet.dst[0] == self.external_address:
            self._hairpin(packet, now)
            return
        if packet.dst[0] in self.inside.addresses:
            self._note(packet, Verdict.NO_LISTENER)
            return
        mapped = self._table(packet).outbound(packet.src, packet.dst, now)
        if mapped is None:
            self._note(packet, Verdict.PORTS_EXHAUSTED)
            return
        tracing = self.internet.trace is not None
        self._note(
            packet, Verdict.NAT_OUT, f"{_text(packet.src)} as {_text(mapped)}" if tracing else ""
        )
        out = _Packet(mapped, packet.dst, packet.payload, packet.ttl, packet.segment)
        self.outside.network._transmit(self.outside, out)

    def _inbound(self, packet: _Packet, now: float) -> None:
        if packet.dst[0] != self.external_address:
            self._note(packet, Verdict.NO_ROUTE)
            return
        # An unsolicited inbound SYN finds no mapping and is dropped silently (RFC 5382 REQ-4).
        internal, reason = self._table(packet).inbound(packet.src, packet.dst[1], now)
        if internal is None:
            self._note(packet, Verdict(reason))
            return
        self._note(packet, Verdict.NAT_IN, f"to {_text(internal)}" if self.internet.trace else "")
        translated = _Packet(packet.src, internal, packet.payload, packet.ttl, packet.segment)
        self.inside.network._transmit(self.inside, translated)

    def _hairpin(self, packet: _Packet, now: float) -> None:
        if not self.behavior.hairpinning:
            self._note(packet, Verdict.NO_HAIRPIN)
            return
        mapped = self._table(packet).outbound(packet.src, packet.dst, now)
        if mapped is None:
            self._note(packet, Verdict.PORTS_EXHAUSTED)
            return
        self._note(packet, Verdict.HAIRPINNED, f"{_text(packet.src)} as {_text(mapped)}")
        self._inbound(_Packet(mapped, packet.dst, packet.payload, packet.ttl, packet.segment), now)


def _connection_order(key: tuple[Endpoint, Endpoint]) -> tuple[int, ...]:
    (local_ip, local_port), (remote_ip, remote_port) = key
    return (
        local_ip.version,
        int(local_ip),
        local_port,
        remote_ip.version,
        int(remote_ip),
        remote_port,
    )


def _text(endpoint: Endpoint) -> str:
    return format_endpoint(endpoint)


def _lan(internet: Internet, name: str, prefix: str) -> Network:
    try:
        network = ipaddress.ip_network(prefix)
    except ValueError:
        raise NetsimError(
            f"LAN prefix must be a CIDR literal like 10.0.0.0/24, got {prefix!r}"
        ) from None
    if network.num_addresses < 4:
        raise NetsimError(f"LAN prefix {prefix} is too small")
    return Network(internet, name, network)
