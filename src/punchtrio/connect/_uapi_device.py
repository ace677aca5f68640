"""The connect core's WireGuard device when wireguard-go moves the packets (sans-IO).

:class:`ConnectCore <punchtrio.connect.ConnectCore>` drives a WireGuard device: it adds and removes
peers, sets endpoints when a path is chosen, starts handshakes, reads statistics, and waits for
handshake events. With punchtrio's own WireGuard that device is :class:`~punchtrio.wireguard.Device`.
With wireguard-go it is :class:`UapiDevice`: the same calls, turned into ``set=1`` requests for
wireguard-go's UAPI socket, and the events recovered from its ``get=1`` replies.

The shell (``_uapi_shell``) owns the socket, the process and the loopback proxies; this module
decides what to ask and what a reply means:

- **Requests.** Every call queues a change; :meth:`UapiDevice.next_request` merges what is queued
  into one ``set=1`` text.
- **Starting a handshake.** UAPI has no "initiate" operation, so :meth:`initiate_handshake` removes
  the peer and adds it again in one request. The new peer has no session and its persistent
  keepalive goes from 0 to on, which makes wireguard-go send a keepalive at once, and with no
  session that keepalive starts a handshake. Setting the first endpoint does the same (the
  keepalive is turned on with it), which is how the initiating side's first handshake starts.
- **Events.** :meth:`observe` reads a ``get=1`` reply: a peer whose last handshake moved forward
  gives a :class:`~punchtrio.wireguard.HandshakeCompleted`.
- **Relayed paths.** A relayed path is named by an address WireGuard never reaches itself (the
  relay's virtual address, a TURN relayed address, a birthday socket). wireguard-go is given a
  loopback proxy's address for it instead (:meth:`set_proxy`); statistics and events translate it
  back, so the core only ever sees the addresses it set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .._endpoint import format_endpoint
from ..mux import Route, Wrap
from ..tunnel import DeviceInfo
from ..wireguard import ConfigError, HandshakeCompleted, PeerConfig, PeerStats

Address = tuple[str, int]

FAST_POLL = 0.1
"""Seconds between ``get=1`` reads while a handshake is expected (a peer has none yet, or a
change was sent within :data:`FAST_POLL_FOR`)."""
SLOW_POLL = 1.0
"""Seconds between ``get=1`` reads otherwise (statistics, a rekey)."""
FAST_POLL_FOR = 15.0
"""Seconds after a change during which reads stay fast (the handshake timeout's length)."""
SESSION_LIFETIME = 180.0
"""Seconds a handshake keeps a session usable (WireGuard's REJECT_AFTER_TIME)."""
INITIATE_INTERVAL = 5.0
"""Seconds between two handshakes :meth:`UapiDevice.initiate_handshake` starts for one peer,
unless the peer restarted (WireGuard's REKEY_TIMEOUT)."""


@dataclass
class _Peer:
    config: PeerConfig
    keepalive: int
    endpoint: Address | None = None
    keepalive_on: bool = False
    learned: bool = False  # wireguard-go knows an endpoint (it answered the peer's handshake)
    seen: Address | None = None  # the endpoint wireguard-go last reported (paths translated)
    last_handshake: float | None = None
    initiated_at: float = -math.inf


class UapiDevice:
    """A WireGuard device that wireguard-go runs, for :class:`~punchtrio.connect.ConnectCore`.

    Offers the core's calls (:meth:`add_peer`, :meth:`remove_peer`, :meth:`set_endpoint`,
    :meth:`initiate_handshake`, :meth:`peer_stats`, :meth:`peers`, :meth:`next_event`) and the
    relayed-path table of :class:`~punchtrio.mux.MuxedDevice` (:meth:`set_route`, :meth:`routed`).
    ``public_key`` is ours; ``wall_clock()`` is Unix time (for "a handshake within the last 180 s"). ``changed()`` is
    called whenever there is something new for the shell: a request to send or a route to proxy.
    Raises :class:`~punchtrio.wireguard.ConfigError` as :class:`~punchtrio.wireguard.Device` does
    (an unknown peer, a peer added twice).
    """

    def __init__(
        self,
        *,
        public_key: bytes,
        wall_clock: Callable[[], float],
        changed: Callable[[], object] = lambda: None,
    ) -> None:
        self.public_key = public_key
        """Our own public key (32 bytes), which wireguard-go derives from the private key."""
        self._wall_clock = wall_clock
        self.changed = changed
        """Called when a request or a route change is waiting (the shell wakes up)."""
        self._peers: dict[bytes, _Peer] = {}
        self._queue: list[tuple[str, bytes]] = []  # (operation, peer key), in order
        self._events: list[HandshakeCompleted] = []
        self._stats: dict[bytes, PeerStats] = {}
        self._routes: dict[Address, Route] = {}
        self._proxies: dict[Address, Address] = {}  # relayed path -> loopback proxy
        self._proxied: dict[Address, Address] = {}  # loopback proxy -> relayed path
        self._fast_until = -math.inf

    # -- the core's calls --------------------------------------------------------------------

    def add_peer(self, config: PeerConfig) -> None:
        """Add a peer (no endpoint yet). Raises :class:`ConfigError` if it is one already."""
        if config.public_key in self._peers:
            raise ConfigError("already a peer")
        keepalive = math.ceil(config.persistent_keepalive or 0)
        self._peers[config.public_key] = _Peer(config, min(keepalive, 65535), config.endpoint)
        self._push("add", config.public_key)

    def remove_peer(self, public_key: bytes) -> None:
        """Remove a peer. Raises :class:`ConfigError` if unknown."""
        if self._peers.pop(public_key, None) is None:
            raise ConfigError("no such peer")
        self._stats.pop(public_key, None)
        self._queue = [(op, key) for op, key in self._queue if key != public_key]
        self._push("remove", public_key)

    def set_endpoint(self, public_key: bytes, endpoint: Address) -> None:
        """Send to ``endpoint`` from now on; the first endpoint also turns the persistent
        keepalive on, which starts a handshake. Raises :class:`ConfigError` if the peer is
        unknown."""
        peer = self._peer(public_key)
        peer.endpoint = (str(endpoint[0]), int(endpoint[1]))
        self._push("endpoint", public_key)

    def initiate_handshake(self, public_key: bytes, now: float, *, restarted: bool = False) -> None:
        """Start a new handshake at once: the peer is removed and added again (no session, the
        keepalive turned on). At most once per :data:`INITIATE_INTERVAL` unless ``restarted``;
        nothing happens before the peer has an endpoint. Raises :class:`ConfigError` if the peer
        is unknown."""
        peer = self._peer(public_key)
        if peer.endpoint is None or (not restarted and now - peer.initiated_at < INITIATE_INTERVAL):
            return
        peer.initiated_at = now
        self._push("fresh", public_key)

    def peer_stats(self) -> dict[bytes, PeerStats]:
        """Return each peer's statistics as the last ``get=1`` reported them (endpoints of relayed
        paths translated back); a peer not read yet has zeros."""
        now = self._wall_clock()
        out = {}
        for key, peer in self._peers.items():
            stats = self._stats.get(key)
            if stats is None:
                stats = PeerStats(key, peer.endpoint, 0, 0, None, 0, False)
            last = stats.last_handshake
            has_session = last is not None and now - last < SESSION_LIFETIME
            if has_session != stats.has_session:
                stats = PeerStats(
                    key, stats.endpoint, stats.rx_bytes, stats.tx_bytes, last, stats.handshakes,
                    has_session,
                )  # fmt: skip
            out[key] = stats
        return out

    def peer_config(self, public_key: bytes) -> PeerConfig:
        """Return the peer's configuration as added. Raises :class:`ConfigError` if unknown."""
        return self._peer(public_key).config

    def peers(self) -> list[bytes]:
        """Return the public keys of all peers."""
        return list(self._peers)

    def next_event(self) -> HandshakeCompleted | None:
        """Return the next :class:`~punchtrio.wireguard.HandshakeCompleted`, or ``None``."""
        return self._events.pop(0) if self._events else None

    # -- relayed paths -----------------------------------------------------------------------

    def set_route(self, address: Address, route: Route | None, *, wrap: Wrap | None = None) -> None:
        """Send what WireGuard sends to ``address`` through ``route(datagram)`` (``None``
        removes it), as :meth:`MuxedDevice.set_route <punchtrio.mux.MuxedDevice.set_route>`;
        ``wrap`` is ignored (the proxy sends one datagram at a time)."""
        if route is None:
            self._routes.pop(address, None)
        else:
            self._routes[address] = route
        self.changed()

    def routed(self, address: Address) -> Route | None:
        """Return the route set for ``address``, or ``None``."""
        return self._routes.get(address)

    @property
    def routes(self) -> Mapping[Address, Route]:
        """Every relayed path's route, by the address that names it."""
        return self._routes

    def set_proxy(self, address: Address, proxy: Address | None) -> None:
        """Tell wireguard-go ``proxy`` (a loopback ``(ip, port)``) wherever the core says
        ``address``; ``None`` forgets it. Called by the shell as it opens and closes proxies."""
        old = self._proxies.pop(address, None)
        if old is not None:
            self._proxied.pop(old, None)
        if proxy is not None:
            self._proxies[address] = proxy
            self._proxied[proxy] = address
            for key, peer in self._peers.items():  # an endpoint set before its proxy existed
                if peer.endpoint == address:
                    self._push("endpoint", key)

    def proxy_of(self, address: Address) -> Address | None:
        """Return the loopback proxy standing for ``address``, or ``None``."""
        return self._proxies.get(address)

    # -- the shell's side --------------------------------------------------------------------

    def next_request(self, now: float) -> str | None:
        """Return one ``set=1`` request with every queued change (ending with the empty line),
        or ``None`` if nothing is queued. ``now`` is the core's clock (reads stay fast for
        :data:`FAST_POLL_FOR` after it)."""
        if not self._queue:
            return None
        queue, self._queue = self._queue, []
        lines = ["set=1"]
        for op, key in queue:
            peer = self._peers.get(key)
            if op == "remove":
                if peer is None:
                    lines += [f"public_key={key.hex()}", "remove=true"]
                continue
            if peer is None:
                continue
            if op == "fresh":
                lines += [f"public_key={key.hex()}", "remove=true"]
                peer.keepalive_on, peer.learned, peer.last_handshake = False, False, None
                self._stats.pop(key, None)
            if op in ("add", "fresh"):
                lines += self._section(peer, allowed_ips=True)
            lines += self._section(peer, allowed_ips=False)
        self._fast_until = now + FAST_POLL_FOR
        return "\n".join(lines) + "\n\n"

    def _section(self, peer: _Peer, *, allowed_ips: bool) -> list[str]:
        config = peer.config
        lines = [f"public_key={config.public_key.hex()}"]
        if allowed_ips:
            if config.preshared_key is not None:
                lines.append(f"preshared_key={config.preshared_key.hex()}")
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={network}" for network in config.allowed_ips]
            lines.append("persistent_keepalive_interval=0")
            return lines
        target = self._wireguard_endpoint(peer.endpoint)
        if target is not None:
            lines.append(f"endpoint={format_endpoint(target)}")
        if not peer.keepalive_on and peer.keepalive and (target is not None or peer.learned):
            # Off to on: wireguard-go sends a keepalive now, which starts a handshake if there
            # is no session.
            lines.append(f"persistent_keepalive_interval={peer.keepalive}")
            peer.keepalive_on = True
        return lines

    def _wireguard_endpoint(self, address: Address | None) -> Address | None:
        if address is None:
            return None
        if address in self._routes:
            return self._proxies.get(address)  # None until the shell opened its proxy
        return address

    def observe(self, info: DeviceInfo, now: float) -> None:
        """Take a ``get=1`` reply read at ``now`` (the core's clock): statistics, and a
        :class:`HandshakeCompleted` for each peer whose last handshake moved forward (its
        keepalive is turned on then if it was not, so the side that answered the first handshake
        holds the NAT mapping too). Peers we do not know are ignored."""
        for found in info.peers:
            peer = self._peers.get(found.public_key)
            if peer is None:
                continue
            endpoint = found.endpoint
            if endpoint is not None:
                endpoint = self._proxied.get(endpoint, endpoint)
                peer.learned, peer.seen = True, endpoint
            last = found.last_handshake
            self._stats[found.public_key] = PeerStats(
                found.public_key,
                endpoint,
                found.rx_bytes,
                found.tx_bytes,
                last,
                1 if last is not None else 0,
                False,
            )
            if last is None or (peer.last_handshake is not None and last <= peer.last_handshake):
                continue
            peer.last_handshake = last
            if endpoint is not None:
                self._events.append(HandshakeCompleted(found.public_key, endpoint))
            if not peer.keepalive_on and peer.keepalive:
                self._fast_until = max(self._fast_until, now)
                self._queue.append(("keepalive", found.public_key))
                self.changed()

    def poll_interval(self, now: float) -> float:
        """Seconds until the shell should read ``get=1`` again: :data:`FAST_POLL` while a
        handshake is expected, else :data:`SLOW_POLL`."""
        if now < self._fast_until or any(p.last_handshake is None for p in self._peers.values()):
            return FAST_POLL
        return SLOW_POLL

    def full_request(self) -> str:
        """Return one ``set=1`` that gives a fresh wireguard-go every peer as it stands (after a
        restart: its peers replaced, endpoints and keepalives set again). A peer's endpoint is
        the one set, else the one the old wireguard-go last reported; turning the keepalive on
        there starts a new handshake at once, since the new process has no session."""
        self._queue = []
        lines = ["set=1", "replace_peers=true"]
        for peer in self._peers.values():
            peer.keepalive_on, peer.learned, peer.last_handshake = False, False, None
            if peer.endpoint is None:  # one wireguard-go learnt: the new one starts there
                peer.endpoint = peer.seen
            lines += self._section(peer, allowed_ips=True)
            lines += self._section(peer, allowed_ips=False)
        self._stats.clear()
        return "\n".join(lines) + "\n\n"

    def _peer(self, public_key: bytes) -> _Peer:
        peer = self._peers.get(public_key)
        if peer is None:
            raise ConfigError("no such peer")
        return peer

    def _push(self, op: str, key: bytes) -> None:
        self._queue.append((op, key))
        self.changed()
