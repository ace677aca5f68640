"""The virtual internet: networks, hosts, routers, NATs, and the simulation scope that runs them."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import ipaddress
import random
import socket as _stdlib_socket
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

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
from ._engine import Emission, Engine
from ._link import Link
from ._nat import NatBehavior, NatBinding, NatTable
from ._socket import UDPSocket, UnsupportedSocketError
from ._trace import TraceRecord, Verdict

FIRST_EPHEMERAL_PORT = 49152
"""A host hands out ephemeral ports sequentially from here (to 65535), skipping ports in use."""

INITIAL_TTL = 64
"""Hops a packet may take through routers and NATs before it is dropped (``ttl-exceeded``)."""

_current_host: contextvars.ContextVar[Host | None] = contextvars.ContextVar(
    "punchtrio_netsim_host", default=None
)


class NoCurrentHostError(NetsimError):
    """``trio.socket.socket()`` was called in a simulation outside ``host.activate()``."""


@dataclass(frozen=True)
class _Packet:
    src: Endpoint
    dst: Endpoint
    payload: bytes
    ttl: int = INITIAL_TTL


class Interface:
    """A node's attachment to one network: its addresses there and the link to it."""

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
        self._next_auto = 2

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
        host = Host(self.internet, name or self.internet._auto_name("host"))
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
    ) -> NAT:
        """Attach a new :class:`NAT` with external ``address`` here and a fresh LAN ``lan`` inside.

        The NAT takes the first address of ``lan`` as its inside address; hosts added to
        ``nat.lan`` sit behind it. ``behavior`` defaults to :class:`NatBehavior` ``()``. Raises
        :class:`NetsimError` for an invalid address or prefix.
        """
        (external,) = self._addresses((address,) if address is not None else ())
        nat = NAT(
            self.internet,
            name or self.internet._auto_name("nat"),
            behavior or NatBehavior(),
            external,
        )
        nat.outside = self._attach(nat, (external,), link)
        nat.lan = self.internet._lan(f"{nat.name}-lan", lan)
        nat.inside = nat.lan._attach(nat, (nat.lan._gateway_address(),), None)
        nat.lan.gateway = nat.inside
        return nat

    def add_router(
        self,
        address: str | IPAddress | None = None,
        *,
        lan: str,
        name: str | None = None,
        link: Link | None = None,
    ) -> Router:
        """Attach a new :class:`Router` at ``address`` that routes the prefix ``lan`` without NAT.

        This network gets a route to ``lan`` through the router; hosts added to ``router.lan`` are
        reachable by their own addresses. Raises :class:`NetsimError` for an invalid address or
        prefix.
        """
        (outside,) = self._addresses((address,) if address is not None else ())
        router = Router(self.internet, name or self.internet._auto_name("router"))
        router.outside = self._attach(router, (outside,), link)
        router.lan = self.internet._lan(f"{router.name}-lan", lan)
        router.inside = router.lan._attach(router, (router.lan._gateway_address(),), None)
        router.lan.gateway = router.inside
        self._routes.append((router.lan.prefix, router.outside))  # type: ignore[arg-type]
        self._routes.sort(key=lambda route: -route[0].prefixlen)
        return router

    def _gateway_address(self) -> IPAddress:
        assert self.prefix is not None
        return self.prefix.network_address + 1

    def _addresses(self, given: tuple[str | IPAddress | None, ...]) -> tuple[IPAddress, ...]:
        parsed = tuple(parse_ip(a) for a in given if a is not None)
        if parsed:
            return parsed
        if self.prefix is None:
            raise NetsimError(f"a node on {self.name} needs an explicit address")
        for offset in range(self._next_auto, self.prefix.num_addresses - 1):
            candidate = self.prefix.network_address + offset
            if candidate not in self._by_address:
                self._next_auto = offset + 1
                return (candidate,)
        raise NetsimError(f"no free address left in {self.prefix}")

    def _attach(self, node: Node, addresses: tuple[IPAddress, ...], link: Link | None) -> Interface:
        if not addresses:
            raise NetsimError("a node needs at least one address")
        for address in addresses:
            if address in self._by_address:
                raise NetsimError(f"{address} is already used on {self.name}")
            if address.is_loopback or address.is_multicast or address.is_unspecified:
                raise NetsimError(f"{address} cannot be a node address")
            if self.prefix is not None and address not in self.prefix:
                raise NetsimError(f"{address} is outside {self.name}'s prefix {self.prefix}")
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


class Host(Node):
    """A simulated machine with one or more addresses on one network, and UDP sockets.

    Make sockets with :meth:`udp_socket`, or run ordinary Trio code under :meth:`activate` so that
    ``trio.socket.socket(AF_INET, SOCK_DGRAM)`` creates sockets on this host.
    """

    _interface: Interface

    def __init__(self, internet: Internet, name: str) -> None:
        super().__init__(internet, name)
        self._sockets: dict[tuple[int, IPAddress | None, int], UDPSocket] = {}
        self._ports: dict[tuple[int, int], int] = {}
        self._next_ephemeral = FIRST_EPHEMERAL_PORT

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """The host's addresses (without loopback), in the order given."""
        return self._interface.addresses

    @property
    def network(self) -> Network:
        """The network this host is attached to."""
        return self._interface.network

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

    def bind(self, sock: UDPSocket, ip: IPAddress | None, port: int) -> None:
        """Bind ``sock`` (socket use only); raises ``OSError`` as the kernel would.

        The same port may be bound on different specific addresses, but not on a specific
        address and the wildcard at once.
        """
        family = int(sock.family)
        if ip is not None and ip not in self.addresses and ip != LOOPBACK[family]:
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        if port == 0:
            port = self._ephemeral(family)
        users = self._ports.get((family, port), 0)
        if users and (
            ip is None
            or (family, None, port) in self._sockets
            or (family, ip, port) in self._sockets
        ):
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self._sockets[(family, ip, port)] = sock
        self._ports[(family, port)] = users + 1
        sock._bound(ip, port)

    def unbind(self, sock: UDPSocket) -> None:
        """Forget a closing socket's port."""
        family = int(sock.family)
        key = (family, sock.local_ip, sock.port)
        if self._sockets.get(key) is sock:
            del self._sockets[key]
            self._ports[(family, sock.port)] -= 1
            if not self._ports[(family, sock.port)]:
                del self._ports[(family, sock.port)]

    def _ephemeral(self, family: int) -> int:
        for _ in range(65536 - FIRST_EPHEMERAL_PORT):
            port = self._next_ephemeral
            self._next_ephemeral = port + 1 if port < 65535 else FIRST_EPHEMERAL_PORT
            if (family, port) not in self._ports:
                return port
        raise OSError(errno.EADDRINUSE, "no free ephemeral port")

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
        ip, port = packet.dst
        family = int(family_of(ip))
        sock = self._sockets.get((family, ip, port)) or self._sockets.get((family, None, port))
        if sock is None or not sock.accepts_from(packet.src):
            self._note(packet, Verdict.NO_LISTENER)
        elif sock.deliver(packet.payload, packet.src):
            self._note(packet, Verdict.DELIVERED)
        else:
            self._note(packet, Verdict.BUFFER_FULL)

    def _close_sockets(self) -> None:
        for sock in list(self._sockets.values()):
            sock.close()


class Router(Node):
    """Forwards packets between its LAN (``lan``) and the network above it, without translation."""

    outside: Interface
    inside: Interface
    lan: Network
    """The network behind this node; add hosts with ``lan.add_host(...)``."""

    def _receive(self, interface: Interface, packet: _Packet) -> None:
        if packet.ttl <= 1:
            self._note(packet, Verdict.TTL_EXCEEDED)
            return
        self._forward(interface, replace(packet, ttl=packet.ttl - 1))

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
        """The translation state, a :class:`NatTable`."""

    def mappings(self) -> list[NatBinding]:
        """Return the live mappings (a snapshot), sorted by external port; expired ones are gone."""
        return self.table.bindings(trio.current_time())

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
        mapped = self.table.outbound(packet.src, packet.dst, now)
        if mapped is None:
            self._note(packet, Verdict.PORTS_EXHAUSTED)
            return
        self._note(packet, Verdict.NAT_OUT, f"{_text(packet.src)} as {_text(mapped)}")
        self.outside.network._transmit(self.outside, replace(packet, src=mapped))

    def _inbound(self, packet: _Packet, now: float) -> _Packet | None:
        if packet.dst[0] != self.external_address:
            self._note(packet, Verdict.NO_ROUTE)
            return None
        internal, reason = self.table.inbound(packet.src, packet.dst[1], now)
        if internal is None:
            self._note(packet, Verdict(reason))
            return None
        self._note(packet, Verdict.NAT_IN, f"to {_text(internal)}")
        translated = replace(packet, dst=internal)
        self.inside.network._transmit(self.inside, translated)
        return translated

    def _hairpin(self, packet: _Packet, now: float) -> None:
        if not self.behavior.hairpinning:
            self._note(packet, Verdict.NO_HAIRPIN)
            return
        mapped = self.table.outbound(packet.src, packet.dst, now)
        if mapped is None:
            self._note(packet, Verdict.PORTS_EXHAUSTED)
            return
        self._note(packet, Verdict.HAIRPINNED, f"{_text(packet.src)} as {_text(mapped)}")
        self._inbound(replace(packet, src=mapped), now)


def _text(endpoint: Endpoint) -> str:
    return format_endpoint(endpoint)


class _SocketFactory(trio.abc.SocketFactory):
    def __init__(self, internet: Internet) -> None:
        self._internet = internet

    def socket(
        self,
        family: _stdlib_socket.AddressFamily | int = _stdlib_socket.AF_INET,
        type: _stdlib_socket.SocketKind | int = _stdlib_socket.SOCK_STREAM,
        proto: int = 0,
    ) -> trio.socket.SocketType:
        host = _current_host.get()
        if host is None or host.internet is not self._internet:
            raise NoCurrentHostError(
                "trio.socket.socket() inside a netsim simulation needs a host: "
                "run the code under `with host.activate():`"
            )
        kind = int(type) & ~(
            getattr(_stdlib_socket, "SOCK_NONBLOCK", 0) | getattr(_stdlib_socket, "SOCK_CLOEXEC", 0)
        )
        if kind != _stdlib_socket.SOCK_DGRAM or proto not in (0, _stdlib_socket.IPPROTO_UDP):
            raise UnsupportedSocketError(
                errno.EPROTONOSUPPORT, "netsim simulates UDP sockets only (SOCK_DGRAM)"
            )
        return host.udp_socket(family)


class _Resolver(trio.abc.HostnameResolver):
    def __init__(self, internet: Internet) -> None:
        self._internet = internet

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        await trio.lowlevel.checkpoint()
        name = host.decode("ascii") if host is not None else ""
        address = self._internet.resolve(name)
        if address is None or (family and family != family_of(address)):
            raise _stdlib_socket.gaierror(
                _stdlib_socket.EAI_NONAME, f"netsim has no name {name!r} (add it with add_name)"
            )
        port_number = int(port) if port is not None else 0
        sockaddr: tuple[Any, ...] = (str(address), port_number)
        if address.version == 6:
            sockaddr = (*sockaddr, 0, 0)
        kinds = [type] if type else [_stdlib_socket.SOCK_DGRAM]
        return [(family_of(address), kind, proto, "", sockaddr) for kind in kinds]

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        await trio.lowlevel.checkpoint()
        return sockaddr[0], str(sockaddr[1])


class Internet:
    """A simulated internet: the public network, everything attached to it, and the clock-driven engine.

    Build the topology with :meth:`add_host`, :meth:`add_nat` and :meth:`add_router` (and the
    same methods on ``nat.lan`` / ``router.lan``), then enter it: ``async with Internet(seed=1) as
    net:`` starts the engine in a nursery; plain ``with`` starts it as a Trio system task. While
    entered, ``trio.socket.socket()`` makes simulated sockets (on the host given by
    ``host.activate()``) and ``trio.socket.getaddrinfo`` resolves only names added with
    :meth:`add_name`; on exit every socket is closed and the previous socket factory and resolver
    are restored. The simulation uses ``trio.current_time()``, so under ``trio.testing.MockClock``
    it runs in virtual time and the same seed and program give the same trace.

    - ``seed``: seeds the one :class:`random.Random` the simulation draws from (default 0).
    - ``trace``: an optional callback given every :class:`TraceRecord` (default none).

    ``counters`` counts every verdict across the simulation.
    """

    def __init__(
        self, *, seed: int = 0, trace: Callable[[TraceRecord], None] | None = None
    ) -> None:
        self.rng = random.Random(seed)
        """The simulation's only source of randomness."""
        self.trace = trace
        self.counters: Counter[Verdict] = Counter()
        self._nodes: list[Node] = []
        self._names: dict[str, IPAddress] = {}
        self._engine = Engine()
        self.network = Network(self, "internet", None)
        """The public network; :meth:`add_host` and friends attach to it."""
        self._lans: list[Network] = []
        self._scope: trio.CancelScope | None = None
        self._nursery_manager: Any = None
        self._saved: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"<netsim.Internet {len(self._nodes)} nodes>"

    # --- building ----------------------------------------------------------------------------

    def add_host(
        self, *addresses: str | IPAddress, name: str | None = None, link: Link | None = None
    ) -> Host:
        """Attach a host to the public network; see :meth:`Network.add_host`."""
        return self.network.add_host(*addresses, name=name, link=link)

    def add_nat(
        self,
        address: str | IPAddress,
        *,
        behavior: NatBehavior | None = None,
        lan: str = "10.0.0.0/24",
        name: str | None = None,
        link: Link | None = None,
    ) -> NAT:
        """Attach a NAT to the public network; see :meth:`Network.add_nat`."""
        return self.network.add_nat(address, behavior=behavior, lan=lan, name=name, link=link)

    def add_router(
        self,
        address: str | IPAddress,
        *,
        lan: str,
        name: str | None = None,
        link: Link | None = None,
    ) -> Router:
        """Attach a router to the public network; see :meth:`Network.add_router`."""
        return self.network.add_router(address, lan=lan, name=name, link=link)

    def add_name(self, name: str, address: str | IPAddress) -> None:
        """Make ``trio.socket.getaddrinfo(name, ...)`` and ``sendto((name, port))`` give ``address``."""
        self._names[name.lower().rstrip(".")] = parse_ip(address)

    def resolve(self, name: str) -> IPAddress | None:
        """Return the address added for ``name`` with :meth:`add_name`, or None."""
        return self._names.get(name.lower().rstrip("."))

    @property
    def nodes(self) -> list[Node]:
        """Every host, router and NAT, in the order they were created."""
        return list(self._nodes)

    def node(self, name: str) -> Node:
        """Return the node called ``name``; raises :class:`NetsimError` if there is none."""
        for node in self._nodes:
            if node.name == name:
                return node
        raise NetsimError(f"no node named {name!r}")

    def _auto_name(self, kind: str) -> str:
        taken = {node.name for node in self._nodes}
        number = 1
        while f"{kind}{number}" in taken:
            number += 1
        return f"{kind}{number}"

    def _register(self, node: Node) -> int:
        if any(existing.name == node.name for existing in self._nodes):
            raise NetsimError(f"a node named {node.name!r} already exists")
        self._nodes.append(node)
        return len(self._nodes)

    def _lan(self, name: str, prefix: str) -> Network:
        try:
            network = ipaddress.ip_network(prefix)
        except ValueError:
            raise NetsimError(
                f"LAN prefix must be a CIDR literal like 10.0.0.0/24, got {prefix!r}"
            ) from None
        if network.num_addresses < 4:
            raise NetsimError(f"LAN prefix {prefix} is too small")
        lan = Network(self, name, network)
        self._lans.append(lan)
        return lan

    def _note(self, where: str, packet: _Packet, verdict: Verdict, detail: str = "") -> None:
        self.counters[verdict] += 1
        if self.trace is not None:
            self.trace(
                TraceRecord(
                    time=trio.current_time(),
                    where=where,
                    src=format_endpoint(packet.src),
                    dst=format_endpoint(packet.dst),
                    size=len(packet.payload),
                    verdict=verdict,
                    detail=detail,
                )
            )

    # --- the simulation scope ----------------------------------------------------------------

    def _install(self) -> None:
        if self._saved is not None:
            raise NetsimError("this Internet is already running")
        factory = trio.socket.set_custom_socket_factory(_SocketFactory(self))
        resolver = trio.socket.set_custom_hostname_resolver(_Resolver(self))
        self._saved = (factory, resolver)

    def _uninstall(self) -> None:
        for node in self._nodes:
            if isinstance(node, Host):
                node._close_sockets()
        self._engine.clear()
        if self._saved is not None:
            factory, resolver = self._saved
            trio.socket.set_custom_socket_factory(factory)
            trio.socket.set_custom_hostname_resolver(resolver)
            self._saved = None

    async def __aenter__(self) -> Internet:
        self._install()
        self._scope = trio.CancelScope()
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        nursery.start_soon(self._run_engine, self._scope, name="netsim-engine")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._scope is not None
        self._scope.cancel()
        try:
            await self._nursery_manager.__aexit__(exc_type, exc, tb)
        except BaseException as error:
            # The engine only ends by cancellation, so a group holding just the body's own
            # exception is unwrapped: code inside the scope sees its errors as raised.
            inner = getattr(error, "exceptions", None)
            if exc is not None and inner is not None and len(inner) == 1 and inner[0] is exc:
                return False
            raise
        finally:
            self._scope = None
            self._uninstall()
        return False

    async def _run_engine(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._engine.run()

    def __enter__(self) -> Internet:
        self._install()
        self._scope = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._run_engine, self._scope, name="netsim-engine")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        self._uninstall()
