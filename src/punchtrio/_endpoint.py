"""Endpoints as text and the one rule set for which addresses a peer may be reached at.

``format_endpoint`` writes ``IPv4:port`` or ``[IPv6]:port`` (the only way punchtrio prints an
endpoint), ``parse_endpoint`` reads the same forms back, and ``check_endpoint_address`` is the rule
the hub (``rendezvous``) and the connector (``punch`` candidates) both apply, so a record the
connector would publish is one the hub accepts and the other way round.
"""

from __future__ import annotations

import ipaddress
import re

from ._exceptions import PunchtrioError

__all__ = [
    "EndpointError",
    "check_endpoint_address",
    "format_endpoint",
    "parse_endpoint",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PORT = re.compile(r"[0-9]{1,5}")
_IPV4_TEXT = re.compile(r"[0-9.]{7,15}")
_IPV6_TEXT = re.compile(r"[0-9a-fA-F:.]{2,45}")

# IPv6 ranges that carry an IPv4 address at a fixed place: an endpoint there is checked as that
# IPv4 address too, so ::127.0.0.1, 64:ff9b::7f00:1 or 2002:7f00:1:: are loopback like 127.0.0.1.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated by RFC 4291: refused outright
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 (SIIT)
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 in the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: local use, formats vary
_DISCARD_ONLY = ipaddress.IPv6Network("100::/64")  # RFC 6666: a black hole by design


class EndpointError(PunchtrioError, ValueError):
    """An endpoint's text cannot be parsed, or its address is one no peer can be reached at.

    The message is one line naming the address and why (``fe80::1 is link-local without a scope
    id``); the hub and the connector wrap it in their own errors.
    """


def format_endpoint(endpoint: tuple[IPAddress | str, int]) -> str:
    """Format ``(ip, port)`` as ``IPv4:port`` or ``[IPv6]:port`` (a scope id stays: ``[fe80::1%eth0]:5``).

    ``ip`` may be an address object or its text; text is written as given (no normalisation), so
    ``("::1", 7777)`` from a socket prints ``[::1]:7777``. Extra items of a socket address (IPv6
    flow info, scope id) are ignored.
    """
    text, port = str(endpoint[0]), endpoint[1]
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def parse_endpoint(text: object, *, what: str = "endpoint") -> tuple[IPAddress, int]:
    """Parse ``IPv4:port`` or ``[IPv6]:port`` into ``(ip, port)``; the port is 1-65535.

    Only literal addresses (no names, no zone index, at most 64 characters). Only the syntax is
    checked; see :func:`check_endpoint_address` for which addresses a peer may use. Raises
    :class:`EndpointError` whose message starts with ``what``.
    """
    if not isinstance(text, str) or len(text) > 64:
        raise EndpointError(f"{what} must be a string IP:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise EndpointError(f"{what} must be IPv4:port or [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise EndpointError(f"{what} must be IPv4:port or [IPv6]:port")
    pattern = _IPV6_TEXT if ":" in host else _IPV4_TEXT
    try:
        if not pattern.fullmatch(host):
            raise ValueError(host)
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise EndpointError(f"{what} must be a literal IP address") from None
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise EndpointError(f"{what} must have a port from 1 to 65535")
    return ip, int(port)


def check_endpoint_address(ip: IPAddress) -> IPAddress:
    """Return ``ip`` if a remote peer can be reached at it; raise :class:`EndpointError` otherwise.

    Refused, in both families: unspecified (``0.0.0.0``, ``::``), loopback (``127.0.0.0/8``,
    ``::1``), multicast (``224.0.0.0/4``, ``ff00::/8``) and link-local (``169.254.0.0/16``,
    ``fe80::/10``; a scope id means nothing to a remote peer, so one with a scope id is refused
    too). IPv4 only: broadcast and reserved (``240.0.0.0/4``). IPv6 only: IPv4-mapped
    (``::ffff:0:0/96``), the deprecated IPv4-compatible (``::/96``), local-use NAT64
    (``64:ff9b:1::/48``) and discard-only (``100::/64``). An IPv6 address that embeds an IPv4 address
    at a fixed place (NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo ``2001::/32``,
    IPv4-translated ``::ffff:0:0:0/96``) is refused if that IPv4 address would be. Private, ULA
    (``fc00::/7``) and documentation addresses are accepted, as in IPv4 (host candidates on a LAN,
    and the examples of the docs).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        _check_ipv6(ip)
    if ip.is_unspecified:
        raise EndpointError(f"{ip} is unspecified")
    if ip.is_loopback:
        raise EndpointError(f"{ip} is loopback")
    if ip.is_multicast:
        raise EndpointError(f"{ip} is multicast")
    if ip.is_link_local:
        if isinstance(ip, ipaddress.IPv6Address) and not ip.scope_id:
            raise EndpointError(f"{ip} is link-local without a scope id")
        raise EndpointError(f"{ip} is link-local")
    if isinstance(ip, ipaddress.IPv4Address) and ip.packed == b"\xff" * 4:
        raise EndpointError(f"{ip} is the broadcast address")
    if isinstance(ip, ipaddress.IPv4Address) and ip.is_reserved:
        raise EndpointError(f"{ip} is reserved (240.0.0.0/4)")
    return ip


def _check_ipv6(ip: ipaddress.IPv6Address) -> None:
    bare = ipaddress.IPv6Address(int(ip))  # without a scope id, for the range tests
    if bare.ipv4_mapped is not None:
        raise EndpointError(f"{ip} is an IPv4-mapped IPv6 address")
    if bare in _IPV4_COMPATIBLE and not (bare.is_unspecified or bare.is_loopback):
        raise EndpointError(f"{ip} is an IPv4-compatible IPv6 address (deprecated)")
    if bare in _NAT64_LOCAL:
        raise EndpointError(f"{ip} is a local-use NAT64 address")
    if bare in _DISCARD_ONLY:
        raise EndpointError(f"{ip} is discard-only (100::/64)")
    embedded: list[ipaddress.IPv4Address] = []
    if bare in _NAT64_WELL_KNOWN or bare in _IPV4_TRANSLATED:
        embedded.append(ipaddress.IPv4Address(int(bare) & 0xFFFFFFFF))
    if bare.sixtofour is not None:
        embedded.append(bare.sixtofour)
    if bare.teredo is not None:
        embedded.extend(bare.teredo)
    for inner in embedded:
        try:
            check_endpoint_address(inner)
        except EndpointError as exc:
            raise EndpointError(f"{exc} (embedded in {ip})") from None
