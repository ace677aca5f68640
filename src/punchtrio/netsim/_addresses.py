"""IP literals and socket addresses as the simulator parses them: literals only, never DNS."""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from .._endpoint import format_endpoint
from .._exceptions import PunchtrioError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]

__all__ = [
    "LOOPBACK",
    "Endpoint",
    "IPAddress",
    "NetsimError",
    "family_of",
    "format_endpoint",
    "parse_ip",
    "parse_sockaddr",
    "to_sockaddr",
]

LOOPBACK: dict[int, IPAddress] = {
    socket.AF_INET: ipaddress.IPv4Address("127.0.0.1"),
    socket.AF_INET6: ipaddress.IPv6Address("::1"),
}


class NetsimError(PunchtrioError):
    """A simulated topology or simulation call is invalid (bad address, bad parameter, wrong scope)."""


def parse_ip(text: str | IPAddress, *, what: str = "address") -> IPAddress:
    """Return ``text`` as an IPv4 or IPv6 address; raise :class:`NetsimError` unless it is a literal."""
    if isinstance(text, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return text
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise NetsimError(f"{what} must be an IP literal, got {text!r}") from None


def family_of(address: IPAddress) -> socket.AddressFamily:
    """Return ``AF_INET`` or ``AF_INET6`` for ``address``."""
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def to_sockaddr(family: int, endpoint: Endpoint) -> tuple[Any, ...]:
    """Return ``endpoint`` as the address tuple a stdlib socket of ``family`` would return."""
    ip, port = endpoint
    if family == socket.AF_INET6:
        return (str(ip), port, 0, 0)
    return (str(ip), port)


def parse_sockaddr(
    family: int,
    address: object,
    *,
    allow_wildcard: bool,
    resolve: Callable[[str], IPAddress | None] | None = None,
) -> tuple[IPAddress | None, int]:
    """Parse a socket address tuple for a socket of ``family``; ``None`` means the wildcard address.

    The host part must be an IP literal of the socket's family (``""`` is the wildcard where
    ``allow_wildcard``); other names are looked up with ``resolve`` and otherwise refused. Raises the
    errors a stdlib socket would: :class:`TypeError` for a malformed tuple, :class:`OverflowError`
    for a port outside 0-65535, :class:`socket.gaierror` for an unknown name and :class:`OSError`
    for an address of the wrong family.
    """
    arity = (2,) if family == socket.AF_INET else (2, 3, 4)
    if not isinstance(address, tuple) or len(address) not in arity:
        raise TypeError(f"address must be a tuple of {' or '.join(map(str, arity))} items")
    host, port = address[0], address[1]
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError("port must be an integer")
    if not 0 <= port <= 65535:
        raise OverflowError("port must be 0-65535")
    if not isinstance(host, str):
        raise TypeError("host must be a string")
    if host in ("", "0.0.0.0", "::") and allow_wildcard:
        if (host == "0.0.0.0" and family != socket.AF_INET) or (
            host == "::" and family != socket.AF_INET6
        ):
            raise OSError(errno.EAFNOSUPPORT, "address family mismatched")
        return None, port
    ip = _literal(host)
    if ip is None and resolve is not None:
        ip = resolve(host)
    if ip is None:
        raise socket.gaierror(
            socket.EAI_NONAME, f"netsim resolves no names: {host!r} is not an IP literal"
        ) from None
    if family_of(ip) != family:
        raise OSError(errno.EAFNOSUPPORT, f"{host!r} is not an address of this socket's family")
    return ip, port


@functools.lru_cache(maxsize=4096)
def _literal(host: str) -> IPAddress | None:
    """Parse an IP literal (cached: the same few addresses are parsed for every packet)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
