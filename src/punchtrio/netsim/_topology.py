"""The topology of a simulation: networks, and the hosts, routers and NATs attached to them."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import ipaddress
import socket as _stdlib_socket
from collections import Counter
from collections.abc import Iterator, Sequence
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
from ._nat import Ipv6Firewall, Ipv6FirewallTable, NatBehavior, NatBinding, NatTable
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

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_S = TypeVar("_S", UDPSocket, TCPSocket)
_BindKey = tuple[int, "IPAddress | None", int]

DEFAULT_FIREWALL = Ipv6Firewall()
"""The IPv6 side a dual-stack or IPv6-only NAT gets unless told otherwise."""

_ULA = ipaddress.IPv6Network("fc00::/7")

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
    """One network segment: the public internet (no prefix) or a LAN with address prefixes.

    A LAN has an IPv4 prefix, IPv6 prefixes, or both (dual-stack). Nodes on a network reach each
    other directly; packets to other addresses go by the longest matching route, else to the
    network's gateway (the NAT or router that owns a LAN). A LAN drops packets to unassigned
    addresses inside its own prefixes (``no-route``).
    """

    def __init__(self, internet: Internet, name: str, prefixes: tuple[IPNetwork, ...]) -> None:
        self.internet = internet
        self.name = name
        self.prefixes = prefixes
        """Every prefix of this LAN, IPv4 first; ``()`` on the public network."""
        self.gateway: Interface | None = None
        self._by_address: dict[IPAddress, Interface] = {}
        self._routes: list[tuple[IPNetwork, Interface]] = []

    @property
    def prefix(self) -> IPNetwork | None:
        """The LAN's first prefix (its IPv4 prefix when it has one); None on the public network."""
        return self.prefixes[0] if self.prefixes else None

    def __repr__(self) -> str:
        shown = " ".join(str(prefix) for prefix in self.prefixes) or "public"
        return f"<netsim.Network {self.name} {shown}>"

    @property
    def nodes(self) -> list[Node]:
        """The nodes attached to this network, in the order they were added."""
        seen: dict[int, Node] = {}
        for interface in self._by_address.values():
            seen.setdefault(interface.node.index, interface.node)
        return [seen[i] for i in sorted(seen)]

    def add_host(
        self,
        *addresses: str | IPAddress,
        name: str | None = None,
        link: Link | None = None,
        ip_version: int | None = None,
    ) -> Host:
        """Attach a new :class:`Host` with ``addresses`` (IP literals; IPv4 and/or IPv6).

        On a LAN, no address means the next free one of each of the LAN's prefixes (a dual-stack
        LAN gives one IPv4 and one IPv6 address), or only of those of ``ip_version`` (4 or 6).
        ``link`` defaults to a perfect link; ``name`` defaults to ``host<N>``. Raises
        :class:`NetsimError` for a non-literal, duplicate or out-of-prefix address, or an
        ``ip_version`` the LAN has no prefix for.
        """
        parsed = self._addresses(addresses, ip_version)
        host = Host(self.internet, self.internet._new_name(name, "host"))
        host._interface = self._attach(host, parsed, link)
        return host

    def add_nat(
        self,
        address: str | IPAddress | None = None,
        *,
        behavior: NatBehavior | None = None,
        lan: str | None = "10.0.0.0/24",
        name: str | None = None,
        link: Link | None = None,
        block_udp: bool = False,
        address6: str | IPAddress | None = None,
        lan6: str | Sequence[str] | None = None,
        ipv6: Ipv6Firewall | NatBehavior | None = DEFAULT_FIREWALL,
    ) -> NAT:
        """Attach a new :class:`NAT` (a site's gateway) here, with a fresh LAN behind it.

        The IPv4 side (as before): external ``address`` (on a LAN, the next free one if omitted),
        ``behavior`` (default :class:`NatBehavior` ``()``) and the LAN prefix ``lan``; ``lan=None``
        makes a site without IPv4 (``address`` must then be None). The family of ``address`` and
        ``lan`` decides which side they describe, so ``add_nat("2001:db8::1", lan="fd00::/64")``
        is a single-family NAT66.

        The IPv6 side, present when ``lan6`` (an IPv6 CIDR text, or several) is given: ``ipv6`` is
        an :class:`Ipv6Firewall` (default: routed, stateful filtering, no translation), a
        :class:`NatBehavior` (NAT66: translated to ``address6``), or None (routed, no filtering).
        ``address6`` is the gateway's outside IPv6 address: required for NAT66 (picked from this
        network's IPv6 prefix on a LAN), optional otherwise. With a firewall or None this network
        routes the ``lan6`` prefixes through the gateway.

        The gateway takes the first address of each LAN prefix as its inside address.
        ``block_udp=True`` drops every UDP packet it would forward, in both directions (verdict
        ``blocked``; see :attr:`Router.block_udp`). Raises :class:`NetsimError` for an invalid
        address, prefix, combination or name, and then changes nothing.
        """
        primary = _prefixes(lan, what="lan")
        secondary = _prefixes(lan6, what="lan6", version=6)
        if not primary and address is not None:
            raise NetsimError("a NAT without an IPv4 side (lan=None) takes no address")
        if not primary and not secondary:
            raise NetsimError("a NAT needs a LAN: give lan, lan6 or both")
        if primary and primary[0].version == 6 and (secondary or address6 is not None):
            raise NetsimError("lan is already IPv6: give the IPv6 side once (lan or lan6)")
        if address6 is not None and not secondary:
            raise NetsimError("address6 is the outside address of an IPv6 side: it needs lan6")
        if ipv6 is not None and not isinstance(ipv6, (Ipv6Firewall, NatBehavior)):
            raise NetsimError(f"ipv6 must be an Ipv6Firewall, a NatBehavior or None, got {ipv6!r}")
        sides: list[_Side] = []
        if primary:
            version = primary[0].version
            (external,) = self._addresses((address,) if address is not None else (), version)
            if external.version != version:
                raise NetsimError(f"address {external} and lan {primary[0]} differ in family")
            sides.append(_Side(version, behavior or NatBehavior(), external))
        if secondary:
            outside6: IPAddress | None = None
            if address6 is not None or (isinstance(ipv6, NatBehavior) and self.prefixes):
                given = (address6,) if address6 is not None else ()
                (outside6,) = self._addresses(given, 6)
                if outside6.version != 6:
                    raise NetsimError(f"address6 must be an IPv6 address, got {outside6}")
            if isinstance(ipv6, NatBehavior) and outside6 is None:
                raise NetsimError("NAT66 (ipv6=NatBehavior(...)) needs address6")
            sides.append(_Side(6, ipv6, outside6))
        self._check_routes(() if isinstance(ipv6, NatBehavior) else secondary)
        name = self.internet._new_name(name, "nat")
        inside = Network(self.internet, f"{name}-lan", primary + secondary)
        nat = NAT(self.internet, name, sides)
        nat.behavior = behavior or (NatBehavior() if primary else nat.table.behavior)
        nat.block_udp = block_udp
        outside = tuple(side.outside for side in sides if side.outside is not None)
        nat.outside = self._attach(nat, outside, link)
        nat.lan = inside
        nat.inside = inside._attach(nat, inside._gateway_addresses(), None)
        inside.gateway = nat.inside
        for side in sides:
            if side.kind != "nat":
                self._add_routes([p for p in inside.prefixes if p.version == side.version], nat)
        return nat

    def add_router(
        self,
        address: str | IPAddress | None = None,
        *,
        lan: str | None,
        name: str | None = None,
        link: Link | None = None,
        block_udp: bool = False,
        lan6: str | Sequence[str] | None = None,
    ) -> Router:
        """Attach a new :class:`Router` at ``address`` that routes the prefix ``lan`` without NAT.

        ``lan6`` (an IPv6 CIDR text, or several) routes IPv6 prefixes too; ``lan=None`` with
        ``lan6`` makes an IPv6-only router. ``address`` is its outside address (on a LAN, the
        next free one of the first LAN prefix's family if omitted). This network gets a route to
        every LAN prefix through the router; hosts added to ``router.lan`` are reachable by their
        own addresses. ``block_udp=True`` makes the router drop every UDP packet it would forward
        (see :attr:`Router.block_udp`). Raises :class:`NetsimError` for an invalid address,
        prefix or name, and then changes nothing.
        """
        prefixes = _prefixes(lan, what="lan") + _prefixes(lan6, what="lan6", version=6)
        if not prefixes:
            raise NetsimError("a router needs a LAN: give lan, lan6 or both")
        if len({str(p) for p in prefixes}) != len(prefixes):
            raise NetsimError("a router's LAN prefixes must differ")
        given = (address,) if address is not None else ()
        outside = self._addresses(given, prefixes[0].version)
        self._check_routes(prefixes)
        name = self.internet._new_name(name, "router")
        inside = Network(self.internet, f"{name}-lan", prefixes)
        router = Router(self.internet, name)
        router.block_udp = block_udp
        router.outside = self._attach(router, outside[:1], link)
        router.lan = inside
        router.inside = inside._attach(router, inside._gateway_addresses(), None)
        inside.gateway = router.inside
        self._add_routes(list(prefixes), router)
        return router

    def _check_routes(self, prefixes: Sequence[IPNetwork]) -> None:
        """Raise :class:`NetsimError` if a prefix to be routed here overlaps a routed one."""
        for prefix in prefixes:
            for existing, _ in self._routes:
                if existing.version == prefix.version and existing.overlaps(prefix):
                    raise NetsimError(
                        f"{prefix} overlaps {existing}, already routed on {self.name}"
                    )

    def _add_routes(self, prefixes: list[IPNetwork], router: Router) -> None:
        for prefix in prefixes:
            self._routes.append((prefix, router.outside))
        self._routes.sort(key=lambda route: -route[0].prefixlen)

    def _gateway_addresses(self) -> tuple[IPAddress, ...]:
        return tuple(prefix.network_address + 1 for prefix in self.prefixes)

    def _addresses(
        self, given: tuple[str | IPAddress | None, ...], ip_version: int | None = None
    ) -> tuple[IPAddress, ...]:
        """Parse and check node addresses (or pick the next free ones on a LAN); change nothing."""
        parsed = tuple(parse_ip(a) for a in given if a is not None)
        if not parsed:
            if ip_version not in (None, 4, 6):
                raise NetsimError(f"ip_version must be 4 or 6, got {ip_version!r}")
            if not self.prefixes:
                raise NetsimError(f"a node on {self.name} needs an explicit address")
            prefixes = [p for p in self.prefixes if ip_version in (None, p.version)]
            if not prefixes:
                raise NetsimError(f"{self.name} has no IPv{ip_version} prefix")
            return tuple(self._free_address(prefix) for prefix in prefixes)
        for address in parsed:
            if address in self._by_address or parsed.count(address) > 1:
                raise NetsimError(f"{address} is already used on {self.name}")
            if address.is_loopback or address.is_multicast or address.is_unspecified:
                raise NetsimError(f"{address} cannot be a node address")
            if self.prefixes and not any(address in prefix for prefix in self.prefixes):
                shown = " ".join(str(prefix) for prefix in self.prefixes)
                raise NetsimError(f"{address} is outside {self.name}'s prefix {shown}")
        return parsed

    def _free_address(self, prefix: IPNetwork) -> IPAddress:
        free = (prefix.network_address + offset for offset in range(2, prefix.num_addresses - 1))
        candidate = next((a for a in free if a not in self._by_address), None)
        if candidate is None:
            raise NetsimError(f"no free address left in {prefix}")
        return candidate

    def _owns(self, address: IPAddress) -> bool:
        """True if ``address`` lies inside one of this LAN's prefixes."""
        return any(address in prefix for prefix in self.prefixes)

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
        if self._owns(dst):
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

        For IPv6, a unique-local destination (``fc00::/7``) gets a unique-local source when the
        host has one, any other destination a global (non-ULA) source, else the first IPv6
        address: RFC 6724's scope and label rules, reduced to what the simulator has. Raises
        ``OSError(ENETUNREACH)`` if the host has no address of that family (no route), as the
        kernel does.
        """
        if dst.is_loopback:
            return LOOPBACK[family]
        candidates = [address for address in self.addresses if family_of(address) == family]
        if not candidates:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        if family == _stdlib_socket.AF_INET6:
            want_ula = dst in _ULA
            for address in candidates:
                if (address in _ULA) == want_ula:
                    return address
        return candidates[0]

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
        inward = self.lan._owns(packet.dst[0])
        if interface is self.outside and not inward:
            self._note(packet, Verdict.NO_ROUTE)
            return
        out = self.inside if inward else self.outside
        self._note(packet, Verdict.FORWARDED)
        out.network._transmit(out, packet)


class _Side:
    """What a site's gateway does with one IP version: translate (NAT), filter (firewall) or route."""

    def __init__(
        self, version: int, policy: NatBehavior | Ipv6Firewall | None, outside: IPAddress | None
    ) -> None:
        self.version = version
        self.policy = policy
        self.outside = outside
        self.kind = (
            "nat"
            if isinstance(policy, NatBehavior)
            else "firewall"
            if isinstance(policy, Ipv6Firewall)
            else "routed"
        )
        self.table: NatTable | None = None
        self.tcp_table: NatTable | None = None


class NAT(Router):
    """A site's gateway between its LAN (``lan``) and the network above it, one policy per family.

    The IPv4 side (and a single-family IPv6 NAT) is an RFC 4787 NAT with ``behavior``; a
    dual-stack or IPv6-only site adds an IPv6 side: NAT66 (the same NAT rules, translated to
    ``external_address6``), a stateful :class:`Ipv6Firewall`, or plain routing. ``families``
    lists the IP versions it serves; :meth:`mappings` shows the live state; ``counters`` counts
    verdicts. ``table``, ``tcp_table``, ``behavior`` and ``external_address`` are those of the
    first side (IPv4 when present); ``external_address`` is ``::`` for an IPv6-only firewall
    site without ``address6``.
    """

    def __init__(self, internet: Internet, name: str, sides: list[_Side]) -> None:
        super().__init__(internet, name)
        self._sides = {side.version: side for side in sides}
        for side in sides:
            policy = side.policy
            if isinstance(policy, NatBehavior):
                assert side.outside is not None
                side.table = NatTable(side.outside, policy, internet.rng)
                side.tcp_table = NatTable(
                    side.outside,
                    dataclasses.replace(policy, mapping_timeout=policy.tcp_mapping_timeout),
                    internet.rng,
                )
            elif isinstance(policy, Ipv6Firewall):
                side.table = Ipv6FirewallTable(policy)
                side.tcp_table = Ipv6FirewallTable(policy, tcp=True)
        first = sides[0]
        self.external_address: IPAddress = first.outside or Ipv6FirewallTable.UNUSED_EXTERNAL
        """The outside address of the first side (the IPv4 NAT's external address)."""
        self.external_address6: IPAddress | None = next(
            (side.outside for side in sides if side.version == 6), None
        )
        """The gateway's outside IPv6 address (``address6``), or None."""
        self.table = first.table or Ipv6FirewallTable(DEFAULT_FIREWALL)
        """The first side's UDP translation state, a :class:`NatTable`."""
        self.tcp_table = first.tcp_table or Ipv6FirewallTable(DEFAULT_FIREWALL, tcp=True)
        """The first side's TCP translation state: a separate :class:`NatTable` (its own ports),
        with the same behaviour except that mappings live ``behavior.tcp_mapping_timeout``
        seconds."""
        self.behavior = self.table.behavior
        """The first side's :class:`NatBehavior` (for a firewall, the one its table runs with)."""

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions this gateway serves, IPv4 first: ``(4,)``, ``(6,)`` or ``(4, 6)``."""
        return tuple(sorted(self._sides))

    def table_for(self, ip_version: int, *, tcp: bool = False) -> NatTable:
        """Return the UDP (or, with ``tcp``, TCP) state table of the ``ip_version`` side.

        A firewall side's table is an :class:`Ipv6FirewallTable`. Raises :class:`NetsimError` if
        the gateway does not serve that version, or only routes it (no state).
        """
        side = self._sides.get(ip_version)
        if side is None or side.table is None or side.tcp_table is None:
            raise NetsimError(f"{self.name} keeps no IPv{ip_version} state")
        return self._side_table(side, tcp=tcp)

    def _side_table(self, side: _Side, *, tcp: bool) -> NatTable:
        if side is self._sides[self.families[0]]:
            return self.tcp_table if tcp else self.table  # may have been replaced by a test
        table = side.tcp_table if tcp else side.table
        assert table is not None
        return table

    def _tables(self, ip_version: int | None, *, tcp: bool) -> list[NatTable]:
        versions = self.families if ip_version is None else (ip_version,)
        return [
            self._side_table(self._sides[v], tcp=tcp)
            for v in versions
            if v in self._sides and self._sides[v].table is not None
        ]

    def mappings(self, ip_version: int | None = None) -> list[NatBinding]:
        """Return the live UDP mappings (a snapshot): IPv4 first, each side by external port.

        ``ip_version`` (4 or 6) limits them to one side. A firewall state shows ``internal ==
        external``. Expired rows are gone.
        """
        now = trio.current_time()
        return [row for table in self._tables(ip_version, tcp=False) for row in table.bindings(now)]

    def tcp_mappings(self, ip_version: int | None = None) -> list[NatBinding]:
        """Return the live TCP mappings (a snapshot), as :meth:`mappings` does for UDP."""
        now = trio.current_time()
        return [row for table in self._tables(ip_version, tcp=True) for row in table.bindings(now)]

    def reset(self) -> None:
        """Forget every UDP and TCP mapping and firewall state at once, as a reboot does."""
        for table in self._tables(None, tcp=False) + self._tables(None, tcp=True):
            table.clear()

    def _forward(self, interface: Interface, packet: _Packet) -> None:
        now = trio.current_time()
        side = self._sides.get(packet.dst[0].version)
        if side is None:
            self._note(packet, Verdict.NO_ROUTE, f"no IPv{packet.dst[0].version} here")
            return
        if side.kind == "routed":
            super()._forward(interface, packet)
        elif side.kind == "firewall":
            self._filter(side, interface, packet, now)
        elif interface is self.outside:
            self._inbound(side, packet, now)
        elif packet.dst[0] == side.outside:
            self._hairpin(side, packet, now)
        elif packet.dst[0] in self.inside.addresses:
            self._note(packet, Verdict.NO_LISTENER)
        else:
            self._outbound(side, packet, now)

    def _outbound(self, side: _Side, packet: _Packet, now: float) -> None:
        mapped = self._side_table(side, tcp=packet.segment is not None).outbound(
            packet.src, packet.dst, now
        )
        if mapped is None:
            self._note(packet, Verdict.PORTS_EXHAUSTED)
            return
        tracing = self.internet.trace is not None
        self._note(
            packet, Verdict.NAT_OUT, f"{_text(packet.src)} as {_text(mapped)}" if tracing else ""
        )
        out = _Packet(mapped, packet.dst, packet.payload, packet.ttl, packet.segment)
        self.outside.network._transmit(self.outside, out)

    def _inbound(self, side: _Side, packet: _Packet, now: float) -> None:
        if packet.dst[0] != side.outside:
            self._note(packet, Verdict.NO_ROUTE)
            return
        # An unsolicited inbound SYN finds no mapping and is dropped silently (RFC 5382 REQ-4).
        table = self._side_table(side, tcp=packet.segment is not None)
        internal, reason = table.inbound(packet.src, packet.dst[1], now)
        if internal is None:
            self._note(packet, Verdict(reason))
            return
        self._note(packet, Verdict.NAT_IN, f"to {_text(internal)}" if self.internet.trace else "")
        translated = _Packet(packet.src, internal, packet.payload, packet.ttl, packet.segment)
        self.inside.network._transmit(self.inside, translated)

    def _hairpin(self, side: _Side, packet: _Packet, now: float) -> None:
        table = self._side_table(side, tcp=packet.segment is not None)
        primary = side is self._sides[self.families[0]]
        if not (self.behavior if primary else table.behavior).hairpinning:
            self._note(packet, Verdict.NO_HAIRPIN)
            return
        mapped = table.outbound(packet.src, packet.dst, now)
        if mapped is None:
            self._note(packet, Verdict.PORTS_EXHAUSTED)
            return
        self._note(packet, Verdict.HAIRPINNED, f"{_text(packet.src)} as {_text(mapped)}")
        self._inbound(
            side, _Packet(mapped, packet.dst, packet.payload, packet.ttl, packet.segment), now
        )

    def _filter(self, side: _Side, interface: Interface, packet: _Packet, now: float) -> None:
        dst = packet.dst[0]
        if dst in self.outside.addresses or dst in self.inside.addresses:
            self._note(packet, Verdict.NO_LISTENER)
            return
        table = self._side_table(side, tcp=packet.segment is not None)
        inward = self.lan._owns(dst)
        if interface is self.outside:
            if not inward:
                self._note(packet, Verdict.NO_ROUTE)
                return
            admitted, _ = table.inbound(packet.src, packet.dst[1], now, address=dst)
            if admitted is None:
                self._note(packet, Verdict.FILTERED, "no state")
                return
            self._note(packet, Verdict.FORWARDED, "fw established")
            self.inside.network._transmit(self.inside, packet)
            return
        detail = ""
        if self.internet.trace is not None:
            known = isinstance(table, Ipv6FirewallTable) and table.has_state(
                packet.src, packet.dst, now
            )
            detail = "fw established" if known else "fw new"
        table.outbound(packet.src, packet.dst, now)
        self._note(packet, Verdict.FORWARDED, detail)
        self.outside.network._transmit(self.outside, packet)


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


def _prefixes(
    given: str | Sequence[str] | None, *, what: str, version: int | None = None
) -> tuple[IPNetwork, ...]:
    """Parse LAN prefixes (one CIDR text or several; None for none); raise :class:`NetsimError`."""
    if given is None:
        return ()
    texts = [given] if isinstance(given, str) else list(given)
    parsed: list[IPNetwork] = []
    for text in texts:
        try:
            network = ipaddress.ip_network(text)
        except (TypeError, ValueError):
            raise NetsimError(
                f"{what} must be a CIDR literal like 10.0.0.0/24 or 2001:db8:1::/64, got {text!r}"
            ) from None
        if version is not None and network.version != version:
            raise NetsimError(f"{what} must be an IPv{version} prefix, got {text}")
        if network.num_addresses < 4:
            raise NetsimError(f"LAN prefix {text} is too small")
        if any(network.overlaps(other) for other in parsed if other.version == network.version):
            raise NetsimError(f"{what} prefixes overlap: {text}")
        parsed.append(network)
    if not parsed and not isinstance(given, str):
        raise NetsimError(f"{what} must name at least one prefix")
    return tuple(parsed)
