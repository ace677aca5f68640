"""Which relay a connector uses: the hub relay's address to bind at, and the TURN server to
allocate on. Pure functions of what the hub published and what the network showed (the
families we have, where STUN was answered); the connector's shell only acts on the answer.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..keys import PublicKey
from ..relay import TurnServer
from ..rendezvous import HubRelayAddress

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class HubRelay:
    """A hub's own relay, for a connector whose rendezvous is not that hub's URL (netsim, tests,
    a hub reached through another client): its ``address`` as ``GET /v1/hub`` publishes it and
    the hub's ``public_key``, which authenticates the relay's answers. A relay address without an
    IP needs ``host``, the hub's literal address. A relay on both IP versions lists its address
    of the other version in ``others`` (as :attr:`~punchtrio.rendezvous.HubInfo.relays` does);
    the connector binds at the one of a family it can use."""

    address: HubRelayAddress
    public_key: PublicKey
    host: str | None = None
    others: tuple[HubRelayAddress, ...] = ()


def relay_server(
    entries: Iterable[tuple[IPAddress | None, int, int | None]],
    families: Iterable[int],
    hub_hosts: Mapping[int, str],
    *,
    answered: Iterable[int] = (),
) -> tuple[int, Address] | None:
    """Choose which of the hub relay's ``(ip, port, family)`` entries to bind at; return its
    index and the ``(ip, port)`` to reach it at, or ``None`` when no entry is reachable.

    ``families`` are the IP versions we can send in, in order of preference; those in
    ``answered`` (where STUN got an answer, so UDP to the hub host gets through) come first,
    the rest keep their order (then the relay is reached over TCP, and any family may do). An
    entry with an ``ip`` is reached at it, in its family; one without, at ``hub_hosts`` of its
    ``family`` (an untagged one at the hub host's IPv4 address, or its IPv6 address if it has no
    IPv4 one, as untagged STUN entries are read).
    """
    listed = list(entries)
    order = list(families)
    heard = set(answered)
    order = [f for f in order if f in heard] + [f for f in order if f not in heard]
    for want in order:
        for index, (ip, port, family) in enumerate(listed):
            if ip is not None:
                if ip.version == want:
                    return index, (str(ip), port)
                continue
            host: str | None
            if family is not None:
                host = hub_hosts.get(family) if family == want else None
            else:
                untagged = next((f for f in (4, 6) if f in hub_hosts), None)
                host = hub_hosts[want] if untagged == want else None
            if host is not None:
                return index, (host, port)
    return None


def turn_server(
    servers: Sequence[tuple[TurnServer, Address]], families: Iterable[int], *, udp_blocked: bool
) -> tuple[TurnServer, Address] | None:
    """Choose the TURN server to allocate on, from ``(server, address)`` pairs (a server named
    by a host name appears once per address it resolved to), or ``None`` when none fits.

    Only addresses of one of our ``families`` count. Over UDP (``turn:``, transport UDP) unless
    the network drops UDP (``udp_blocked``: no STUN answer); then over TCP
    (``turn:...?transport=tcp``), or TLS (``turns:``) when no TCP one is listed: TLS costs a
    handshake and a second encryption of every datagram, and is there for networks that let
    only TLS out. Among equals, the first listed wins (in ``families`` order for one server's
    addresses).
    """
    order = list(families)
    ranks = {"tcp": 0, "tls": 1} if udp_blocked else {"udp": 0}
    usable = [
        (server, address)
        for server, address in servers
        if server.uri.transport in ranks and ipaddress.ip_address(address[0]).version in order
    ]

    def rank(pair: tuple[TurnServer, Address]) -> tuple[int, int]:
        server, address = pair
        return ranks[server.uri.transport], order.index(ipaddress.ip_address(address[0]).version)

    return min(usable, key=rank, default=None)


def client_tls_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    """The TLS context for a relay over TLS (the hub's relay, or a ``turns:`` server): the one
    the hub is verified with (``verify``, as ``hub_verify`` takes it: ``True`` the system's CA
    store, an :class:`ssl.SSLContext` your own, ``False`` no verification at all)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    context = ssl.create_default_context()
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
