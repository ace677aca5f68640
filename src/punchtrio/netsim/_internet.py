"""The simulation scope: the :class:`Internet`, its socket factory and its name resolver."""

from __future__ import annotations

import errno
import random
import socket as _stdlib_socket
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import trio

from ._addresses import IPAddress, NetsimError, family_of, format_endpoint, parse_ip, to_sockaddr
from ._engine import Engine
from ._link import Link
from ._nat import Ipv6Firewall, NatBehavior
from ._socket import UnsupportedSocketError
from ._topology import DEFAULT_FIREWALL, NAT, Host, Network, Node, Router, _current_host, _Packet
from ._trace import TraceRecord, Verdict


class NoCurrentHostError(NetsimError):
    """``trio.socket.socket()`` was called in a simulation outside ``host.activate()``."""


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
        if kind == _stdlib_socket.SOCK_DGRAM and proto in (0, _stdlib_socket.IPPROTO_UDP):
            return host.udp_socket(family)
        if kind == _stdlib_socket.SOCK_STREAM and proto in (0, _stdlib_socket.IPPROTO_TCP):
            return host.tcp_socket(family, proto)
        raise UnsupportedSocketError(
            errno.EPROTONOSUPPORT,
            "netsim simulates UDP (SOCK_DGRAM) and TCP (SOCK_STREAM) sockets only",
        )


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
        addresses = [
            address
            for address in self._internet.resolve_all(name)
            if not family or family == family_of(address)
        ]
        if not addresses:
            raise _stdlib_socket.gaierror(
                _stdlib_socket.EAI_NONAME, f"netsim has no name {name!r} (add it with add_name)"
            )
        port_number = int(port) if port is not None else 0
        kinds = [type] if type else [_stdlib_socket.SOCK_DGRAM]
        return [
            (
                family_of(address),
                kind,
                proto,
                "",
                to_sockaddr(family_of(address), (address, port_number)),
            )
            for address in addresses
            for kind in kinds
        ]

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

    ``counters`` counts every verdict across the simulation. Entering an ``Internet`` that is
    already running raises :class:`NetsimError`. The engine acts only when every other task is
    blocked (that is what makes it deterministic), so a task that busy-loops on
    ``trio.sleep(0)`` stalls the simulation.
    """

    def __init__(
        self, *, seed: int = 0, trace: Callable[[TraceRecord], None] | None = None
    ) -> None:
        self.rng = random.Random(seed)
        """The simulation's only source of randomness."""
        self.trace = trace
        self.counters: Counter[Verdict] = Counter()
        self._nodes: list[Node] = []
        self._names: dict[str, tuple[IPAddress, ...]] = {}
        self._engine = Engine()
        self.network = Network(self, "internet", ())
        """The public network; :meth:`add_host` and friends attach to it."""
        self._scope: trio.CancelScope | None = None
        self._nursery_manager: Any = None
        self._saved: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"<netsim.Internet {len(self._nodes)} nodes>"

    # --- building ----------------------------------------------------------------------------

    def add_host(
        self,
        *addresses: str | IPAddress,
        name: str | None = None,
        link: Link | None = None,
    ) -> Host:
        """Attach a host to the public network; see :meth:`Network.add_host`."""
        return self.network.add_host(*addresses, name=name, link=link)

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
        """Attach a NAT (a site's gateway) to the public network; see :meth:`Network.add_nat`.

        ``address`` is required unless ``lan=None`` (an IPv6-only site).
        """
        return self.network.add_nat(
            address,
            behavior=behavior,
            lan=lan,
            name=name,
            link=link,
            block_udp=block_udp,
            address6=address6,
            lan6=lan6,
            ipv6=ipv6,
        )

    def add_router(
        self,
        address: str | IPAddress,
        *,
        lan: str | None,
        name: str | None = None,
        link: Link | None = None,
        block_udp: bool = False,
        lan6: str | Sequence[str] | None = None,
    ) -> Router:
        """Attach a router to the public network; see :meth:`Network.add_router`."""
        return self.network.add_router(
            address, lan=lan, name=name, link=link, block_udp=block_udp, lan6=lan6
        )

    def add_name(self, name: str, *addresses: str | IPAddress) -> None:
        """Make ``trio.socket.getaddrinfo(name, ...)`` and ``sendto((name, port))`` give ``addresses``.

        Give an IPv4 and an IPv6 address for a dual-stack name (A and AAAA records):
        ``getaddrinfo`` returns them in the order given (filtered by its ``family``), and a
        socket's ``sendto``/``connect`` uses the first one of its own family. Adding a name again
        replaces its addresses. Raises :class:`NetsimError` without an address or for a
        non-literal one.
        """
        if not addresses:
            raise NetsimError(f"add_name({name!r}) needs at least one address")
        self._names[name.lower().rstrip(".")] = tuple(parse_ip(a) for a in addresses)

    def resolve(self, name: str, family: int = 0) -> IPAddress | None:
        """Return the first address added for ``name`` (of ``family`` if not 0), or None."""
        for address in self.resolve_all(name):
            if not family or family_of(address) == family:
                return address
        return None

    def resolve_all(self, name: str) -> tuple[IPAddress, ...]:
        """Return every address added for ``name`` with :meth:`add_name`, in order (or ``()``)."""
        return self._names.get(name.lower().rstrip("."), ())

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

    def _new_name(self, name: str | None, kind: str) -> str:
        """Return ``name`` if it is free (else raise), or the first free ``<kind><N>``."""
        taken = {node.name for node in self._nodes}
        if name is not None:
            if name in taken:
                raise NetsimError(f"a node named {name!r} already exists")
            return name
        number = 1
        while f"{kind}{number}" in taken:
            number += 1
        return f"{kind}{number}"

    def _register(self, node: Node) -> int:
        if any(existing.name == node.name for existing in self._nodes):
            raise NetsimError(f"a node named {node.name!r} already exists")
        self._nodes.append(node)
        return len(self._nodes)

    def _note(self, where: str, packet: _Packet, verdict: Verdict, detail: str = "") -> None:
        self.counters[verdict] += 1
        if self.trace is not None:
            segment = packet.segment
            summary = ""
            if segment is not None:
                summary = f"[{segment.flags}] seq {segment.seq}"
                if segment.ack is not None:
                    summary += f" ack {segment.ack} win {segment.window}"
            self.trace(
                TraceRecord(
                    time=trio.current_time(),
                    where=where,
                    src=format_endpoint(packet.src),
                    dst=format_endpoint(packet.dst),
                    size=len(packet.payload),
                    verdict=verdict,
                    detail=detail,
                    protocol="udp" if segment is None else "tcp",
                    tcp=summary,
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
