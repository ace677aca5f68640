"""The connector's UDP sockets: one per IP family, on one port, behind one ``sendto``.

Design decision: one socket per family (AF_INET, and AF_INET6 with ``IPV6_V6ONLY=1``), both bound
to the same port and both read by the tunnel into the one mux, rather than one dual-stack AF_INET6
socket, because a dual-stack socket names IPv4 peers ``::ffff:a.b.c.d`` (an address every candidate,
probe and endpoint comparison would have to normalise), depends on ``net.ipv6.bindv6only``, and the
per-packet cost is the same (``benchmarks/dualstack.py``; ``docs/connect.md``).

:class:`SocketSet` is what the connector's parts hold instead of one socket: its :meth:`~SocketSet.sendto`
picks the socket of the destination's family, so STUN, probes, relay frames and TURN go out on the
right one, and the tunnel gets :attr:`~SocketSet.sockets` (it already sends on the socket of each
datagram's family).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import trio

from .._socket_buffers import grow_socket_buffers
from ..relay import TurnServer
from ..tunnel import TunnelError

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PORT_ATTEMPTS = 8
"""Tries at finding an ephemeral port free in both families (``listen_port=0``)."""

# Errors meaning "this host has no such family" (the family is left out, not an error).
_NO_FAMILY = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


class SocketSet:
    """The connector's bound UDP sockets, at most one per family, all on :attr:`port`.

    ``sockets`` are non-blocking and bound; the first one's port is :attr:`port`. :meth:`sendto`
    sends on the socket of the destination's family and raises :class:`OSError`
    (``EAFNOSUPPORT``) when there is none, as a socket of the wrong family would.
    """

    def __init__(self, sockets: list[Any]) -> None:
        if not sockets:
            raise ValueError("a socket set needs at least one socket")
        self.sockets = sockets
        """The sockets, IPv4 first."""
        self._by_family: dict[int, Any] = {}
        for sock in sockets:
            self._by_family[4 if sock.family == socket.AF_INET else 6] = sock

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions there is a socket for (``(4, 6)``, ``(4,)`` or ``(6,)``)."""
        return tuple(sorted(self._by_family))

    @property
    def port(self) -> int:
        """The UDP port every socket is bound to."""
        return int(self.sockets[0].getsockname()[1])

    @property
    def real(self) -> bool:
        """Whether every socket is a kernel socket (not a :mod:`punchtrio.netsim` stand-in)."""
        return all(isinstance(sock, socket.socket) for sock in self.sockets)

    def socket_for(self, family: int) -> Any | None:
        """Return the socket of IP version ``family`` (4 or 6), or ``None``."""
        return self._by_family.get(family)

    def getsockname(self) -> Address:
        """Return the first socket's bound ``(ip, port)`` (the port is every socket's)."""
        name = self.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def sendto(self, data: bytes, address: Address) -> int:
        """Send ``data`` to ``address`` on the socket of its family; return the bytes sent.

        Raises :class:`OSError` as the socket does (no route, full buffer), and
        ``OSError(EAFNOSUPPORT)`` when there is no socket of that family.
        """
        sock = self._by_family.get(6 if ":" in address[0] else 4)
        if sock is None:
            raise OSError(errno.EAFNOSUPPORT, f"no UDP socket for the family of {address[0]}")
        return int(sock.sendto(data, address))

    def close(self) -> None:
        """Close every socket."""
        for sock in self.sockets:
            sock.close()


def bind_error(port: int, exc: OSError) -> str:
    """One line on why the UDP port could not be bound, naming the fix."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"UDP port {port} is already in use (another `punchtrio up` or WireGuard?): stop it "
            "or choose another port (listen_port=, --listen-port)"
        )
    if exc.errno == errno.EACCES:
        return f"UDP port {port} needs privileges: run as root or choose a port above 1023"
    return f"cannot bind UDP port {port}: {exc.strerror or exc}"


def _bind(factory: Callable[[int, int], Any], family: int, port: int) -> Any | None:
    """A non-blocking socket of ``family`` bound to ``port`` on every address; ``None`` if this
    host has no such family. Raises :class:`OSError` for other failures (port in use)."""
    try:
        sock = factory(family, socket.SOCK_DGRAM)
    except OSError as exc:
        if exc.errno in _NO_FAMILY:
            return None
        raise
    try:
        sock.setblocking(False)
        grow_socket_buffers(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::", port))
        else:
            sock.bind(("0.0.0.0", port))
    except OSError as exc:
        sock.close()
        if exc.errno in _NO_FAMILY:
            return None
        raise
    except BaseException:
        sock.close()
        raise
    return sock


def open_sockets(
    factory: Callable[[int, int], Any], port: int, *, families: tuple[int, ...] = (4, 6)
) -> SocketSet:
    """Bind one UDP socket per IP version in ``families`` to ``port`` (0: one the kernel picks,
    the same for both) and return them as a :class:`SocketSet`.

    ``factory(family, type)`` makes a socket (:class:`socket.socket`, or a netsim host's
    ``nonblocking_socket``). A family the host lacks (no IPv6 stack, IPv6 disabled, no IPv4
    stack) is left out; IPv4 is bound first. Raises :class:`~punchtrio.tunnel.TunnelError` with
    one line naming the fix when the port cannot be had in a family the host has, or no family
    can be bound at all.
    """
    wanted = [f for f in (4, 6) if f in families]
    attempts = PORT_ATTEMPTS if port == 0 else 1
    for attempt in range(attempts):
        bound: list[Any] = []
        chosen = port
        try:
            for version in wanted:
                family = socket.AF_INET if version == 4 else socket.AF_INET6
                sock = _bind(factory, family, chosen)
                if sock is None:
                    continue
                bound.append(sock)
                chosen = int(sock.getsockname()[1])
        except OSError as exc:
            for sock in bound:
                sock.close()
            if port == 0 and exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                continue  # the kernel's pick for IPv4 is taken in IPv6: pick again
            raise TunnelError(bind_error(port or chosen, exc)) from None
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        if not bound:
            raise TunnelError(f"cannot bind UDP port {port}: this host has neither IPv4 nor IPv6")
        return SocketSet(bound)
    raise AssertionError("unreachable")  # pragma: no cover


def addresses_by_family(host: str) -> dict[int, str]:
    """Return ``host``'s first address of each IP version, ``{4: "203.0.113.1", 6: "2001:db8::1"}``.

    A literal is its own only address; a name is resolved (blocking: call it in a worker thread).
    An unresolvable name (or one too long for IDNA) gives ``{}``.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return {ip.version: str(ip)}
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return {}
    found: dict[int, str] = {}
    for family, _, _, _, sockaddr in infos:
        version = 4 if family == socket.AF_INET else 6 if family == socket.AF_INET6 else 0
        if version and version not in found:
            found[version] = str(sockaddr[0])
    return dict(sorted(found.items()))


def stun_servers(
    entries: Iterable[tuple[IPAddress | None, int, int | None]], hub_hosts: Mapping[int, str]
) -> list[Address]:
    """Return the STUN server addresses to ask, from the hub's ``(ip, port, family)`` entries.

    An entry with an ``ip`` is used as it is. One without (the hub's STUN on every address of the
    hub) is at the hub's own host: with a ``family`` (a hub serving both families tags each),
    at ``hub_hosts[family]`` if the hub host has an address of that family, else left out; without
    one, at the hub host's IPv4 address, or its IPv6 address if it has no IPv4 one.
    """
    servers: list[Address] = []
    for ip, port, family in entries:
        if ip is not None:
            servers.append((str(ip), port))
            continue
        if family is not None:
            host = hub_hosts.get(family)
        else:
            host = next((hub_hosts[f] for f in (4, 6) if f in hub_hosts), None)
        if host is not None and (host, port) not in servers:
            servers.append((host, port))
    return servers


def reachable_families(
    socket_families: Iterable[int], addresses: Iterable[IPAddress]
) -> tuple[int, ...]:
    """Return the IP versions worth gathering and probing in: those there is a socket for and,
    when the host's usable ``addresses`` are known (not empty), an address of.

    An IPv6-only host still opens an IPv4 socket (the kernel has the stack) but has no IPv4
    address: STUN and probes over IPv4 would only wait for timeouts, so IPv4 is left out. Returns
    ``socket_families`` as they are when no address is known (netlink refused).
    """
    have = tuple(sorted(set(socket_families)))
    versions = {ip.version for ip in addresses}
    if not versions:
        return have
    return tuple(f for f in have if f in versions) or have


def family_of(ip: str) -> int:
    """Return the IP version (4 or 6) of an address text."""
    return 6 if ":" in ip else 4


async def url_addresses(url: str | None) -> dict[int, str]:
    """Return the address of each IP version of ``url``'s host (see :func:`addresses_by_family`).

    A literal host is answered at once; a name is resolved in a worker thread, so a slow resolver
    does not stall the tunnel. ``None`` or a URL without a host gives ``{}``.
    """
    host = urlsplit(url or "").hostname or ""
    if not host:
        return {}
    with contextlib.suppress(ValueError):  # a literal needs no resolver
        ip = ipaddress.ip_address(host)
        return {ip.version: str(ip)}
    return await trio.to_thread.run_sync(addresses_by_family, host, abandon_on_cancel=True)


async def turn_addresses(servers: Sequence[TurnServer]) -> list[tuple[TurnServer, Address]]:
    """Each TURN server with the address of each family it is at: a literal as it is, a host
    name resolved in a worker thread (one that does not resolve is left out)."""
    pairs: list[tuple[TurnServer, Address]] = []
    for server in servers:
        literal = server.uri.address
        if literal is not None:
            pairs.append((server, (str(literal[0]), int(literal[1]))))
            continue
        resolved = await trio.to_thread.run_sync(
            addresses_by_family, server.uri.host, abandon_on_cancel=True
        )
        pairs += [(server, (ip, server.uri.port)) for ip in resolved.values()]
    return pairs
