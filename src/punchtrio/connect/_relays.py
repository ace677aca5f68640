"""Relayed paths of a connector: which relay links exist, how WireGuard and probes reach them.

A *link* is one transport to one relay: the hub's relay over UDP (through the shared socket), the
hub's relay over TCP or TLS (a stream of its own). Each bound link gives every known peer one
relayed path, named in WireGuard's endpoint table and in the puncher by a *virtual address* from
240.0.0.0/4 (reserved by RFC 1112 and never routed; candidates in it are refused, so no record can
claim one). :class:`RelayLinks` owns that naming and keeps three tables in step: the mux's routes
(what is sent to a virtual address is wrapped for its relay), the puncher's relayed pairs (with the
link's preference), and the reverse map used when a relayed datagram arrives. It does no I/O: the
connector's shell calls it and sends what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..mux import Route, RouteTable, Wrap
from ..punch import Puncher

Address = tuple[str, int]
Transport = Literal["udp", "tcp", "tls"]

PREFERENCE: dict[Transport, int] = {"udp": 0, "tcp": 2, "tls": 2}
"""Preference of a hub relay link by transport, lower first; TURN over UDP would sit at 1, between
the hub's relay over UDP and any relay over a stream, which adds head-of-line blocking."""

VIRTUAL_PORT = 1
"""The port of every virtual address (the address alone tells the paths apart)."""


class RelayClient(Protocol):
    """What a link needs from a relay protocol core (:class:`punchtrio.relay.HubRelayClient`)."""

    @property
    def bound(self) -> bool: ...

    def wrap(self, destination: bytes, payload: bytes) -> bytes: ...


@dataclass(eq=False)
class RelayLink:
    """One transport to one relay. ``send(frame)`` puts one frame on the transport; ``error``
    says why the link is not bound, once that is known (refused, unreachable)."""

    index: int
    name: str
    transport: Transport
    server: Address
    client: RelayClient
    send: Callable[[bytes], object]
    error: str | None = None
    virtual: dict[bytes, Address] = field(default_factory=dict)
    peers: dict[Address, bytes] = field(default_factory=dict)

    @property
    def preference(self) -> int:
        """This link's rank among relayed paths (:data:`PREFERENCE`)."""
        return PREFERENCE[self.transport]

    def address_of(self, peer: bytes) -> Address:
        """The virtual address naming the path to ``peer`` over this link (made on first use)."""
        address = self.virtual.get(peer)
        if address is None:
            n = len(self.virtual) + 1
            if n >= 1 << 16:
                raise OverflowError("a relay link names at most 65535 peers")
            first = 240 + (self.index >> 8)
            address = (f"{first}.{self.index & 255}.{n >> 8}.{n & 255}", VIRTUAL_PORT)
            self.virtual[peer] = address
            self.peers[address] = peer
        return address


class RelayLinks:
    """The relay links of one connector and the relayed path of every peer over each."""

    def __init__(self, device: RouteTable, puncher: Puncher) -> None:
        self._device = device
        self._puncher = puncher
        self._links: list[RelayLink] = []
        self._keys: set[bytes] = set()

    @property
    def links(self) -> tuple[RelayLink, ...]:
        """Every link, bound or not."""
        return tuple(self._links)

    def add_link(
        self,
        name: str,
        transport: Transport,
        server: Address,
        client: RelayClient,
        send: Callable[[bytes], object],
    ) -> RelayLink:
        """Add a link (not yet bound: it carries nothing until :meth:`update` sees it bound)."""
        if len(self._links) >= 16 * 256:
            raise OverflowError("too many relay links")
        link = RelayLink(len(self._links), name, transport, server, client, send)
        self._links.append(link)
        return link

    def add_peer(self, key: bytes, now: float) -> None:
        """Give the peer with this public key a relayed path over every bound link."""
        self._keys.add(key)
        self._apply(key, now)

    def remove_peer(self, key: bytes) -> None:
        """Forget the peer with this public key: its relayed paths lose their routes, and
        datagrams relayed from it are dropped (the puncher has forgotten it already)."""
        if key in self._keys:
            self._keys.discard(key)
            for link in self._links:
                address = link.virtual.get(key)
                if address is not None:
                    self._device.set_route(address, None)

    def update(self, now: float) -> None:
        """Re-read which links are bound and update every peer's relayed paths."""
        for key in self._keys:
            self._apply(key, now)

    def source(self, link: RelayLink, peer: bytes) -> Address | None:
        """The address a datagram relayed from ``peer`` over ``link`` comes from, or ``None`` if
        ``peer`` is not one of ours (such datagrams are dropped)."""
        if peer not in self._keys:
            return None
        return link.address_of(peer)

    def link_of(self, address: Address) -> RelayLink | None:
        """Return the link a virtual address belongs to, or ``None`` for any other address."""
        for link in self._links:
            if address in link.peers:
                return link
        return None

    def _apply(self, key: bytes, now: float) -> None:
        paths: dict[Address, int] = {}
        for link in self._links:
            address = link.address_of(key)
            if link.client.bound:
                paths[address] = link.preference
                wrap = self._wrapper(link, key) if link.transport == "udp" else None
                self._device.set_route(address, self._sender(link, key), wrap=wrap)
            else:
                self._device.set_route(address, None)
        self._puncher.set_relays(key, paths, now)

    @staticmethod
    def _sender(link: RelayLink, key: bytes) -> Route:
        # A link's client and transport are read at each send: a stream that reconnects
        # replaces both.
        def relay(datagram: bytes) -> None:
            link.send(link.client.wrap(key, datagram))

        return relay

    @staticmethod
    def _wrapper(link: RelayLink, key: bytes) -> Wrap:
        # Over UDP the tunnel sends the frame itself, so a burst of frames to the relay leaves
        # in GSO runs like any other burst (the relay reads them with UDP GRO).
        server = link.server

        def wrap(datagram: bytes) -> tuple[bytes, Address]:
            return link.client.wrap(key, datagram), server

        return wrap
