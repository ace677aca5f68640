"""The sans-IO WireGuard device: peers, sessions, timers and the per-packet transport paths.

A :class:`Device` never touches a socket, a TUN device or a clock: the shell hands it datagrams and
IP packets with the current monotonic time ``now`` and sends what it returns. Everything that is not
an immediate answer (handshake messages, queued packets, keepalives) is collected for
:meth:`Device.datagrams_to_send`; :meth:`Device.get_timer` says when to call
:meth:`Device.handle_timer` next.

The transport paths (:meth:`Device.send_packet`, type-4 datagrams in
:meth:`Device.receive_datagram`) are written for speed: one dict probe for the session, one
libsodium call (see ``_aead``), plain attribute updates for the timers, no exceptions, no objects
built beyond the packet itself.
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from . import _tai64n
from ._aead import open_ as _open
from ._aead import seal as _seal_message
from ._allowedips import AllowedIPs
from ._config import Address, ConfigError, IPNetwork, PeerConfig, Timers, check_endpoint
from ._cookie import CookieChecker, CookieGenerator
from ._events import EndpointChanged, Event, HandshakeCompleted, HandshakeFailed, KeysZeroed
from ._handshake_queue import HANDSHAKE_QUEUE_SIZE, HandshakeQueue
from ._messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
    MessageError,
    parse_cookie_reply,
    parse_initiation,
    parse_response,
)
from ._noise import (
    HandshakeError,
    InitiatorState,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    dh,
    public_key,
)
from ._ratelimit import RateLimiter
from ._replay import ReplayWindow

DROP_REASONS = (
    "malformed",
    "mac",
    "under_load",
    "rate_limited",
    "cookie",
    "decrypt",
    "low_order",
    "unknown_peer",
    "no_handshake",
    "timestamp",
    "flood",
    "no_session",
    "expired",
    "replay",
    "allowed_ips",
    "no_route",
    "queue_full",
    "handshake_queue_full",
)
"""Names of the counters in :attr:`Device.counters`, one per reason a packet is dropped."""

MAX_STAGED_PACKETS = 128
"""Packets queued per peer while waiting for a session; the oldest is dropped beyond this."""

DEFAULT_MTU = 1420
"""Transport plaintexts are padded to a multiple of 16 but never beyond this (bytes)."""

DEFAULT_LOAD_THRESHOLD = HANDSHAKE_QUEUE_SIZE // 8
"""Queued handshake messages at which a device that defers handshakes is under load (128)."""

HANDSHAKES_PER_TIMER = 16
"""Queued handshake messages :meth:`Device.handle_timer` processes per call at most."""

_HEADER = struct.Struct("<IIQ")
_unpack_header = _HEADER.unpack_from
_pack_counter = struct.Struct("<Q").pack
_source4 = struct.Struct("4s").unpack_from
_source6 = struct.Struct("16s").unpack_from
_PADDING = [bytes(n) for n in range(16)]
_INF = float("inf")
_CONTROL_SIZES = {
    (struct.pack("<I", MESSAGE_INITIATION), INITIATION_SIZE): MESSAGE_INITIATION,
    (struct.pack("<I", MESSAGE_RESPONSE), RESPONSE_SIZE): MESSAGE_RESPONSE,
    (struct.pack("<I", MESSAGE_COOKIE_REPLY), COOKIE_REPLY_SIZE): MESSAGE_COOKIE_REPLY,
}
_NEVER = float("-inf")


class _Keypair:
    """One session: two transport keys, the send counter and the replay window."""

    __slots__ = (
        "created",
        "header",
        "is_initiator",
        "local_index",
        "peer",
        "recv_key",
        "remote_index",
        "replay",
        "send_counter",
        "send_key",
    )

    def __init__(
        self,
        peer: _Peer,
        send_key: bytes,
        recv_key: bytes,
        local_index: int,
        remote_index: int,
        is_initiator: bool,
        now: float,
    ) -> None:
        self.peer = peer
        self.send_key = send_key
        self.recv_key = recv_key
        self.local_index = local_index
        self.remote_index = remote_index
        self.header = struct.pack("<II", MESSAGE_TRANSPORT, remote_index)
        self.is_initiator = is_initiator
        self.created = now
        self.send_counter = 0
        self.replay = ReplayWindow()


class _Peer:
    """Everything the device knows about one peer; timer attributes hold deadlines or ``None``."""

    __slots__ = (
        "allowed_ips",
        "attempt_started",
        "cookie",
        "current",
        "endpoint",
        "handshake",
        "handshakes",
        "jitter",
        "last_handshake",
        "last_initiation_consumed",
        "last_sent_initiation",
        "last_sent_timestamp",
        "last_timestamp",
        "need_another_keepalive",
        "next",
        "persistent_keepalive",
        "preshared_key",
        "previous",
        "public_key",
        "rx_bytes",
        "rx_packets",
        "sent_last_minute_handshake",
        "staged",
        "static_static",
        "t_keepalive",
        "t_new_handshake",
        "t_persistent",
        "t_retransmit",
        "t_zero",
        "tx_bytes",
        "tx_packets",
    )

    def __init__(self, config: PeerConfig, static_static: bytes, cookie_refresh: float) -> None:
        self.public_key = config.public_key
        self.preshared_key = config.preshared_key
        self.allowed_ips = config.allowed_ips
        self.endpoint: Address | None = config.endpoint
        self.persistent_keepalive = config.persistent_keepalive
        self.static_static = static_static
        self.cookie = CookieGenerator(config.public_key, cookie_refresh)
        self.handshake: InitiatorState | None = None
        self.attempt_started: float | None = None
        self.last_sent_initiation = _NEVER
        self.last_initiation_consumed = _NEVER
        self.last_timestamp = bytes(12)
        self.last_sent_timestamp = bytes(12)
        self.previous: _Keypair | None = None
        self.current: _Keypair | None = None
        self.next: _Keypair | None = None
        self.staged: deque[bytes] = deque()
        self.jitter = 0.0
        self.t_retransmit: float | None = None
        self.t_new_handshake: float | None = None
        self.t_keepalive: float | None = None
        self.t_persistent: float | None = None
        self.t_zero: float | None = None
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0
        self.last_handshake: float | None = None
        self.handshakes = 0


@dataclass(frozen=True)
class PeerStats:
    """A snapshot of one peer's traffic and handshake state.

    ``rx_bytes``/``tx_bytes`` count whole authenticated WireGuard datagrams (UDP payload bytes);
    ``last_handshake`` is the wall-clock time (seconds since the epoch, from the device's
    ``wall_clock``) of the last completed handshake, or ``None``; ``handshakes`` counts them.
    ``rx_packets``/``tx_packets`` count transport data messages (keepalives included).
    """

    public_key: bytes
    endpoint: Address | None
    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None
    handshakes: int
    has_session: bool
    rx_packets: int = 0
    tx_packets: int = 0


class Device:
    """A WireGuard interface without I/O: cryptokey routing, handshakes, sessions and timers.

    ``private_key`` is this interface's 32-byte X25519 static key. ``timers`` replaces the
    protocol's constants (see :class:`Timers`). ``random(n)`` supplies ephemeral keys, session
    indices, cookie secrets and jitter (default ``os.urandom``). ``wall_clock()`` returns Unix time
    for TAI64N timestamps and :attr:`PeerStats.last_handshake` (default ``time.time``; it is never
    called on the transport paths). ``mtu`` caps padding.

    ``defer_handshakes`` (default false) chooses how handshake messages are processed. False: at
    once, inside :meth:`receive_datagram` (a caller that drives the device packet by packet). True:
    :meth:`receive_datagram` only queues them (at most ``handshake_queue_size``, 1024 by default;
    more are dropped and counted as ``handshake_queue_full``) and the shell processes them with
    :meth:`process_handshakes` after each batch of transport data, or through the timer
    (:meth:`get_timer` is due at once while messages wait). A deferring device is under load while
    ``load_threshold`` (default 128, an eighth of the queue) or more messages wait, and for
    :data:`~punchtrio.wireguard.UNDER_LOAD_COOLDOWN` (1 s) after; a device processing at once has
    no backlog and is under load only when :attr:`under_load` is set. Raises
    :class:`ConfigError` if the private key is not 32 bytes, or the queue size or threshold is
    below 1.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        timers: Timers = Timers(),  # noqa: B008 - frozen, shared safely
        random: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        mtu: int = DEFAULT_MTU,
        load_threshold: int = DEFAULT_LOAD_THRESHOLD,
        defer_handshakes: bool = False,
        handshake_queue_size: int = HANDSHAKE_QUEUE_SIZE,
    ) -> None:
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise ConfigError("a private key is 32 bytes")
        if private_key == bytes(32):
            raise ConfigError("private key is all zero")
        self._private = private_key
        self.public_key: bytes = public_key(private_key)
        """This device's static public key (32 bytes)."""
        self.timers = timers
        self._random = random
        self._wall_clock = wall_clock
        self._mtu = mtu
        try:
            self._queue = HandshakeQueue(handshake_queue_size, threshold=load_threshold)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._defer = defer_handshakes
        self.under_load = False
        """Set by the shell to force the under-load state (cookies required, sources rate-limited)."""
        self.counters: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        """Dropped packets by reason (see :data:`DROP_REASONS`)."""
        self._peers: dict[bytes, _Peer] = {}
        self._keypairs: dict[int, _Keypair] = {}
        self._handshakes: dict[int, _Peer] = {}
        self._routes: AllowedIPs[_Peer] = AllowedIPs()
        self._route_cache = self._routes.cache
        self._checker = CookieChecker(self.public_key, random, timers.cookie_refresh_time)
        self._limiter = RateLimiter()
        self._out: list[tuple[bytes, Address]] = []
        self._events: deque[Event] = deque()
        self._deadline = _INF
        self._reject_after_time = timers.reject_after_time
        self._reject_after_messages = timers.reject_after_messages
        self._rekey_after_time = timers.rekey_after_time
        self._rekey_after_messages = timers.rekey_after_messages
        self._keepalive_timeout = timers.keepalive_timeout
        self._receive_rekey_age = (
            timers.reject_after_time - timers.keepalive_timeout - timers.rekey_timeout
        )
        self._new_handshake_after = timers.keepalive_timeout + timers.rekey_timeout

    @property
    def load_threshold(self) -> int:
        """Queued handshake messages at which a deferring device is under load (see the class doc).

        Setting a value below 1 raises :class:`ConfigError`.
        """
        return self._queue.threshold

    @load_threshold.setter
    def load_threshold(self, value: int) -> None:
        try:
            self._queue.threshold = value
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def pending_handshakes(self) -> int:
        """Handshake messages waiting for :meth:`process_handshakes` (0 unless deferring)."""
        return self._queue.depth

    @property
    def handshake_queue_room(self) -> int:
        """Handshake messages the queue can still take (a shell reads no more than this)."""
        return self._queue.room

    def is_under_load(self, now: float) -> bool:
        """Return whether handshake messages at ``now`` need a valid mac2 (and are rate-limited).

        True while :attr:`under_load` is set, while at least :attr:`load_threshold` messages are
        queued, and for the cooldown after (see :mod:`punchtrio.wireguard` docs, "Under load").
        """
        return self._queue.under_load(now) or self.under_load

    # ------------------------------------------------------------------ configuration

    def add_peer(self, config: PeerConfig) -> None:
        """Add a peer.

        Raises :class:`ConfigError` (nothing is changed) if the key is ours, already a peer, a
        low-order point, or if one of its allowed IPs is exactly a prefix of another peer; nested
        prefixes are fine (longest prefix wins).
        """
        key = config.public_key
        if key == self.public_key:
            raise ConfigError("a device cannot be its own peer")
        if key in self._peers:
            raise ConfigError("a peer with this public key already exists")
        try:
            ss = dh(self._private, key)
        except HandshakeError:
            raise ConfigError("peer public key is a low-order point") from None
        peer = _Peer(config, ss, self.timers.cookie_refresh_time)
        inserted = []
        try:
            for net in config.allowed_ips:
                self._routes.insert(net, peer)
                inserted.append(net)
        except ConfigError:
            for net in inserted:
                self._routes.remove(net)
            raise
        self._peers[key] = peer
        if peer.endpoint is not None and peer.persistent_keepalive:
            self._arm_persistent_now(peer)

    def remove_peer(self, public_key: bytes) -> None:
        """Remove a peer, its sessions, routes and queued packets. Raises :class:`ConfigError` if unknown."""
        peer = self._peers.pop(public_key, None)
        if peer is None:
            raise ConfigError("no such peer")
        for net in peer.allowed_ips:
            self._routes.remove(net)
        self._clear_handshake(peer)
        self._zero_keys(peer)
        peer.staged.clear()

    def set_endpoint(self, public_key: bytes, endpoint: Address) -> None:
        """Send to ``endpoint`` from now on (no event).

        Raises :class:`ConfigError` if the peer is unknown or ``endpoint`` is not
        ``(IP address, port)``.
        """
        peer = self._peers.get(public_key)
        if peer is None:
            raise ConfigError("no such peer")
        check_endpoint(endpoint)
        had = peer.endpoint
        peer.endpoint = endpoint
        if had is None and peer.persistent_keepalive:
            self._arm_persistent_now(peer)

    def initiate_handshake(self, public_key: bytes, now: float, *, restarted: bool = False) -> None:
        """Start a new handshake with the peer at once, as if its session had expired.

        For a peer known to have lost its session (it restarted): waiting for the rekey timers
        would cost REKEY_TIMEOUT plus KEEPALIVE_TIMEOUT of dropped traffic. The current session
        keeps carrying data until the new one is confirmed. Limited to one initiation per
        REKEY_TIMEOUT, unless ``restarted`` (default false) says the peer is a new run: our last
        initiation went to the run before, which the limit protected, and the new run would
        otherwise wait up to REKEY_TIMEOUT for its first session. Nothing is sent without an
        endpoint. Raises :class:`ConfigError` if the peer is unknown.
        """
        peer = self._peers.get(public_key)
        if peer is None:
            raise ConfigError("no such peer")
        if restarted:
            peer.last_sent_initiation = _NEVER
        self._initiate(peer, now, retry=False)
        self._recompute_deadline()

    def update_peer(self, config: PeerConfig) -> None:
        """Change a peer's preshared key, allowed IPs, endpoint and persistent keepalive in place.

        Its sessions, handshake state and counters are kept. ``config.endpoint`` ``None`` keeps
        the current endpoint (an endpoint is never unset). Turning persistent keepalive on sends
        a keepalive at once (when the endpoint is known), as the reference does. Raises
        :class:`ConfigError` (nothing is changed) if the peer is unknown or one of the new allowed
        IPs is exactly a prefix of another peer.
        """
        peer = self._peers.get(config.public_key)
        if peer is None:
            raise ConfigError("no such peer")
        old, new = peer.allowed_ips, config.allowed_ips
        inserted: list[IPNetwork] = []
        try:
            for net in new:
                if net not in old:
                    self._routes.insert(net, peer)
                    inserted.append(net)
        except ConfigError:
            for net in inserted:
                self._routes.remove(net)
            raise
        for net in old:
            if net not in new:
                self._routes.remove(net)
        peer.allowed_ips = new
        peer.preshared_key = config.preshared_key
        if config.endpoint is not None:
            peer.endpoint = config.endpoint
        had = peer.persistent_keepalive
        peer.persistent_keepalive = config.persistent_keepalive
        if not config.persistent_keepalive:
            peer.t_persistent = None
        elif not had and peer.endpoint is not None:
            self._arm_persistent_now(peer)

    def peer_config(self, public_key: bytes) -> PeerConfig:
        """Return a peer's current configuration (its endpoint as it is now, after roaming).

        Raises :class:`ConfigError` if the peer is unknown.
        """
        peer = self._peers.get(public_key)
        if peer is None:
            raise ConfigError("no such peer")
        return PeerConfig(
            public_key=peer.public_key,
            preshared_key=peer.preshared_key,
            allowed_ips=peer.allowed_ips,
            endpoint=peer.endpoint,
            persistent_keepalive=peer.persistent_keepalive,
        )

    @property
    def private_key(self) -> bytes:
        """This device's 32-byte static private key (for a root-only configuration interface)."""
        return self._private

    def _arm_persistent_now(self, peer: _Peer) -> None:
        # Due immediately: like the reference, a persistent-keepalive peer brings the tunnel up.
        peer.t_persistent = _NEVER
        self._deadline = _NEVER

    def peers(self) -> list[bytes]:
        """Return the public keys of all peers."""
        return list(self._peers)

    def peer_stats(self) -> dict[bytes, PeerStats]:
        """Return a snapshot of every peer's counters, keyed by public key."""
        return {
            key: PeerStats(
                public_key=key,
                endpoint=p.endpoint,
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
                last_handshake=p.last_handshake,
                handshakes=p.handshakes,
                has_session=p.current is not None,
                rx_packets=p.rx_packets,
                tx_packets=p.tx_packets,
            )
            for key, p in self._peers.items()
        }

    # ------------------------------------------------------------------ shell interface

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Return and forget the queued outgoing datagrams (handshakes, keepalives, flushed packets)."""
        out = self._out
        self._out = []
        return out

    def next_event(self) -> Event | None:
        """Return the oldest unread event, or ``None``."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """Return the monotonic time at which :meth:`handle_timer` should be called, or ``None``.

        The deadline may be early (a timer was cancelled since); calling :meth:`handle_timer`
        early is harmless. A deadline in the past means "now": so it is while handshake messages
        are queued.
        """
        return None if self._deadline == _INF else self._deadline

    def process_handshakes(self, now: float, limit: int = HANDSHAKES_PER_TIMER) -> bool:
        """Process at most ``limit`` queued handshake messages, oldest first, at ``now``.

        Their answers (responses, cookie replies, flushed packets) appear in
        :meth:`datagrams_to_send`, their events in :meth:`next_event`, their drops in
        :attr:`counters`. Returns whether messages are still queued. A device that does not defer
        handshakes has none queued: the call does nothing and returns ``False``.
        """
        queue = self._queue
        handle = self._handle_control
        pop = queue.pop
        for _ in range(limit):
            item = pop()
            if item is None:
                return False
            handle(item[0], item[1], item[2], item[3], now)
        return queue.depth > 0

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``: retransmissions, give-ups, keepalives, rekeys, zeroing.

        Also processes up to :data:`HANDSHAKES_PER_TIMER` queued handshake messages.
        """
        if self._queue.depth:
            self.process_handshakes(now, HANDSHAKES_PER_TIMER)
        t = self.timers
        for peer in list(self._peers.values()):
            d = peer.t_retransmit
            if d is not None and d <= now:
                peer.t_retransmit = None
                started = peer.attempt_started
                if started is not None and now - started >= t.rekey_attempt_time:
                    self._give_up(peer, now)
                else:
                    self._initiate(peer, now, retry=True)
            d = peer.t_keepalive
            if d is not None and d <= now:
                peer.t_keepalive = None
                self._send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.t_keepalive = now + t.keepalive_timeout
            d = peer.t_new_handshake
            if d is not None and d <= now:
                peer.t_new_handshake = None
                self._initiate(peer, now, retry=False)
            d = peer.t_zero
            if d is not None and d <= now:
                peer.t_zero = None
                self._clear_handshake(peer)
                peer.staged.clear()
                if self._zero_keys(peer):
                    self._events.append(KeysZeroed(peer.public_key))
            d = peer.t_persistent
            if d is not None and d <= now:
                peer.t_persistent = None
                if peer.persistent_keepalive:
                    self._send_keepalive(peer, now)
                    peer.t_persistent = now + peer.persistent_keepalive
        self._recompute_deadline()

    def _recompute_deadline(self) -> None:
        best = _INF
        for peer in self._peers.values():
            for d in (
                peer.t_retransmit,
                peer.t_keepalive,
                peer.t_new_handshake,
                peer.t_zero,
                peer.t_persistent,
            ):
                if d is not None and d < best:
                    best = d
        self._deadline = _NEVER if self._queue.depth else best

    # ------------------------------------------------------------------ transport: send

    def send_packet(self, packet: bytes, now: float) -> tuple[bytes, Address] | None:
        """Encrypt one IP packet from the TUN device for the peer that routes its destination.

        Returns ``(datagram, endpoint)``, or ``None`` when the packet is dropped (malformed or no
        route; counted) or queued because there is no usable session yet (a handshake is started
        if the peer has an endpoint; its initiation and later the queued packets appear in
        :meth:`datagrams_to_send`). At most :data:`MAX_STAGED_PACKETS` wait per peer; the oldest
        is dropped (counted as ``queue_full``).
        """
        n = len(packet)
        if n >= 20:
            version = packet[0] >> 4
            if version == 4:
                dst = packet[16:20]
            elif version == 6 and n >= 40:
                dst = packet[24:40]
            else:
                self.counters["malformed"] += 1
                return None
        else:
            self.counters["malformed"] += 1
            return None
        peer = self._route_cache.get(dst) or self._routes.lookup(dst)
        if peer is None:
            self.counters["no_route"] += 1
            return None
        kp = peer.current
        endpoint = peer.endpoint
        if (
            kp is None
            or endpoint is None
            or kp.send_counter >= self._reject_after_messages
            or now - kp.created >= self._reject_after_time
        ):
            self._stage(peer, packet, now)
            return None
        return self._seal(peer, kp, packet, now), endpoint

    def _seal(self, peer: _Peer, kp: _Keypair, packet: bytes, now: float) -> bytes:
        counter = kp.send_counter
        kp.send_counter = counter + 1
        n = len(packet)
        pad = -n & 15
        if pad:
            if n + pad > self._mtu:
                pad = max(0, self._mtu - n)
            if pad:
                packet = packet + _PADDING[pad]
        datagram = _seal_message(kp.header, _pack_counter(counter), packet, kp.send_key)
        peer.tx_bytes += len(datagram)
        peer.tx_packets += 1
        # Timers: any authenticated packet sent, data sent, traversal.
        peer.t_keepalive = None
        if n and peer.t_new_handshake is None:
            d = now + self._new_handshake_after + peer.jitter
            peer.t_new_handshake = d
            if d < self._deadline:
                self._deadline = d
        if peer.persistent_keepalive:
            d = now + peer.persistent_keepalive
            peer.t_persistent = d
            if d < self._deadline:
                self._deadline = d
        if counter >= self._rekey_after_messages or (
            kp.is_initiator and now - kp.created >= self._rekey_after_time
        ):
            self._initiate(peer, now, retry=False)
        return datagram

    def _stage(self, peer: _Peer, packet: bytes, now: float) -> None:
        staged = peer.staged
        if len(staged) >= MAX_STAGED_PACKETS:
            staged.popleft()
            self.counters["queue_full"] += 1
        staged.append(packet)
        self._initiate(peer, now, retry=False)

    def _flush_staged(self, peer: _Peer, now: float) -> bool:
        """Send the queued packets with the current session; return whether any were sent."""
        kp = peer.current
        endpoint = peer.endpoint
        if kp is None or endpoint is None or not peer.staged:
            return False
        while peer.staged:
            self._out.append((self._seal(peer, kp, peer.staged.popleft(), now), endpoint))
        return True

    def _send_keepalive(self, peer: _Peer, now: float) -> None:
        kp = peer.current
        endpoint = peer.endpoint
        if (
            kp is None
            or endpoint is None
            or kp.send_counter >= self._reject_after_messages
            or now - kp.created >= self._reject_after_time
        ):
            if not peer.staged:
                self._stage(peer, b"", now)
            elif endpoint is not None:
                self._initiate(peer, now, retry=False)
            return
        if not self._flush_staged(peer, now):
            self._out.append((self._seal(peer, kp, b"", now), endpoint))

    # ------------------------------------------------------------------ transport: receive

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bytes | None:
        """Process one UDP datagram from ``addr``.

        Returns the decrypted inner IP packet to write to the TUN device, or ``None`` for
        keepalives, handshake messages, cookie replies and anything dropped (counted in
        :attr:`counters`). Never raises for any input bytes.
        """
        if len(data) >= TRANSPORT_MIN_SIZE:
            kind, index, counter = _unpack_header(data)
            if kind == MESSAGE_TRANSPORT:
                kp = self._keypairs.get(index)
                if kp is None:
                    self.counters["no_session"] += 1
                    return None
                if (
                    counter >= self._reject_after_messages
                    or now - kp.created >= self._reject_after_time
                ):
                    self.counters["expired"] += 1
                    return None
                plain = _open(data, kp.recv_key)
                if plain is None:
                    self.counters["decrypt"] += 1
                    return None
                if not kp.replay.accept(counter):
                    self.counters["replay"] += 1
                    return None
                peer = kp.peer
                if kp is not peer.current:
                    self._received_with(peer, kp, now)
                peer.rx_bytes += len(data)
                peer.rx_packets += 1
                if addr != peer.endpoint:
                    self._roam(peer, addr)
                # Timers: any authenticated packet received, traversal.
                peer.t_new_handshake = None
                if peer.persistent_keepalive:
                    d = now + peer.persistent_keepalive
                    peer.t_persistent = d
                    if d < self._deadline:
                        self._deadline = d
                current = peer.current
                if (
                    current is not None
                    and current.is_initiator
                    and not peer.sent_last_minute_handshake
                    and now - current.created >= self._receive_rekey_age
                ):
                    peer.sent_last_minute_handshake = True
                    self._initiate(peer, now, retry=False)
                size = len(plain)
                if not size:
                    return None
                # Timers: data received.
                if peer.t_keepalive is None:
                    d = now + self._keepalive_timeout
                    peer.t_keepalive = d
                    if d < self._deadline:
                        self._deadline = d
                else:
                    peer.need_another_keepalive = True
                # Inner packet: its length strips the padding, its source must be the peer's.
                version = plain[0] >> 4
                if version == 4 and size >= 20:
                    length = (plain[2] << 8) | plain[3]
                    src = _source4(plain, 12)[0]
                elif version == 6 and size >= 40:
                    length = ((plain[4] << 8) | plain[5]) + 40
                    src = _source6(plain, 8)[0]
                else:
                    length = 0
                if length < 20 or length > size:
                    self.counters["malformed"] += 1
                    return None
                if self._route_cache.get(src) is not peer and self._routes.lookup(src) is not peer:
                    self.counters["allowed_ips"] += 1
                    return None
                if length != size:
                    del plain[length:]
                return bytes(plain)
        self._receive_control(data, addr, now)
        return None

    def _received_with(self, peer: _Peer, kp: _Keypair, now: float) -> None:
        """A packet authenticated with a session that is not current: confirm a responder's next."""
        if kp is not peer.next:
            return
        old = peer.previous
        if old is not None:
            self._keypairs.pop(old.local_index, None)
        peer.previous = peer.current
        peer.current = kp
        peer.next = None
        self._handshake_complete(peer, now)
        self._flush_staged(peer, now)

    def _roam(self, peer: _Peer, addr: Address) -> None:
        old = peer.endpoint
        peer.endpoint = addr
        self._events.append(EndpointChanged(peer.public_key, old, addr))

    # ------------------------------------------------------------------ handshakes

    def _receive_control(self, data: bytes, addr: Address, now: float) -> None:
        """Check size, type, room and (under load) the source's rate; queue or process at once.

        Everything here is cheap: no MAC, no DH. What a flood sends beyond the queue's room or,
        under load, beyond its source's share of the rate limiter stops here.
        """
        kind = _CONTROL_SIZES.get((bytes(data[:4]), len(data)), 0)
        if kind == 0:
            self.counters["malformed"] += 1
            return
        queue = self._queue
        if queue.full():
            self.counters["handshake_queue_full"] += 1
            return
        charged = queue.under_load(now) or self.under_load
        if charged and not self._limiter.allow(addr, now):
            self.counters["rate_limited"] += 1
            return
        data = bytes(data)  # the shell may hand in a bytearray or memoryview
        if self._defer:
            queue.put(data, addr, kind, charged)
            self._deadline = _NEVER
            return
        self._handle_control(data, addr, kind, charged, now)

    def _handle_control(
        self, data: bytes, addr: Address, kind: int, charged: bool, now: float
    ) -> None:
        """Process one handshake message: mac1, then (under load) mac2 or a cookie reply, then DH.

        ``charged`` says whether the source paid a rate-limiter token when the message was
        queued; under load every message pays exactly one, so what a source costs (DH work,
        cookie replies) is bounded by the limiter's rate.
        """
        if kind == MESSAGE_COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
            return
        if not self._checker.check_mac1(data):
            self.counters["mac"] += 1
            return
        if self._queue.under_load(now) or self.under_load:
            if not charged and not self._limiter.allow(addr, now):
                self.counters["rate_limited"] += 1
                return
            reply = self._checker.check_mac2_or_reply(
                data, int.from_bytes(data[4:8], "little"), addr, now
            )
            if reply is not None:
                self._out.append((reply, addr))
                self.counters["under_load"] += 1
                return
        try:
            if kind == MESSAGE_INITIATION:
                self._receive_initiation(data, addr, now)
            else:
                self._receive_response(data, addr, now)
        except HandshakeError as exc:
            self.counters[exc.reason if exc.reason in self.counters else "decrypt"] += 1
        except MessageError:
            self.counters["malformed"] += 1

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        reply = parse_cookie_reply(data)
        peer = self._handshakes.get(reply.receiver)
        if peer is None:
            kp = self._keypairs.get(reply.receiver)
            peer = kp.peer if kp is not None else None
        if peer is None:
            self.counters["no_handshake"] += 1
            return
        if not peer.cookie.consume_reply(reply, now):
            self.counters["cookie"] += 1

    def _receive_initiation(self, data: bytes, addr: Address, now: float) -> None:
        msg = parse_initiation(data)

        def static_static(key: bytes) -> bytes | None:
            p = self._peers.get(key)
            return p.static_static if p is not None else None

        consumed = consume_initiation(
            msg,
            local_static_private=self._private,
            local_static_public=self.public_key,
            static_static=static_static,
        )
        peer = self._peers[consumed.initiator_static]
        if consumed.timestamp <= peer.last_timestamp:
            self.counters["timestamp"] += 1
            return
        if now - peer.last_initiation_consumed <= self.timers.handshake_initiation_rate:
            self.counters["flood"] += 1
            return
        local_index = self._new_index()
        response, keys = create_response(
            consumed, preshared_key=peer.preshared_key, local_index=local_index, random=self._random
        )
        # Authenticated: commit.
        peer.last_timestamp = consumed.timestamp
        peer.last_initiation_consumed = now
        if addr != peer.endpoint:
            self._roam(peer, addr)
        kp = _Keypair(peer, keys.send, keys.receive, local_index, msg.sender, False, now)
        self._keypairs[local_index] = kp
        old_next, old_previous = peer.next, peer.previous
        for stale in (old_next, old_previous):
            if stale is not None:
                self._keypairs.pop(stale.local_index, None)
        peer.next = kp
        peer.previous = None
        body = response.encode()[:-32]
        self._out.append((peer.cookie.add_macs(body, now), addr))
        peer.tx_bytes += RESPONSE_SIZE
        peer.rx_bytes += INITIATION_SIZE
        # Timers: authenticated received + sent, traversal, session derived.
        peer.t_new_handshake = None
        peer.t_keepalive = None
        self._arm(peer, "t_zero", now + self.timers.zero_key_material_after)
        if peer.persistent_keepalive:
            self._arm(peer, "t_persistent", now + peer.persistent_keepalive)

    def _receive_response(self, data: bytes, addr: Address, now: float) -> None:
        msg = parse_response(data)
        peer = self._handshakes.get(msg.receiver)
        state = peer.handshake if peer is not None else None
        if peer is None or state is None or state.local_index != msg.receiver:
            self.counters["no_handshake"] += 1
            return
        keys = consume_response(
            msg, state, local_static_private=self._private, preshared_key=peer.preshared_key
        )
        self._clear_handshake(peer)
        if addr != peer.endpoint:
            self._roam(peer, addr)
        kp = _Keypair(peer, keys.send, keys.receive, msg.receiver, msg.sender, True, now)
        self._keypairs[kp.local_index] = kp
        # Initiator: the new session is current at once. The session it replaces (an unconfirmed
        # next, else the current one) stays as previous so packets in flight still decrypt.
        retired = [peer.previous]
        if peer.next is not None:
            retired.append(peer.current)
            peer.previous = peer.next
            peer.next = None
        else:
            peer.previous = peer.current
        for stale in retired:
            if stale is not None:
                self._keypairs.pop(stale.local_index, None)
        peer.current = kp
        peer.rx_bytes += RESPONSE_SIZE
        peer.t_new_handshake = None
        if peer.persistent_keepalive:
            self._arm(peer, "t_persistent", now + peer.persistent_keepalive)
        self._arm(peer, "t_zero", now + self.timers.zero_key_material_after)
        self._handshake_complete(peer, now)
        if not self._flush_staged(peer, now):
            endpoint = peer.endpoint
            assert endpoint is not None
            self._out.append((self._seal(peer, kp, b"", now), endpoint))

    def _handshake_complete(self, peer: _Peer, now: float) -> None:
        peer.t_retransmit = None
        peer.attempt_started = None
        peer.sent_last_minute_handshake = False
        peer.handshakes += 1
        peer.last_handshake = self._wall_clock()
        endpoint = peer.endpoint
        assert endpoint is not None
        self._events.append(HandshakeCompleted(peer.public_key, endpoint))

    def _initiate(self, peer: _Peer, now: float, *, retry: bool) -> None:
        """Send a handshake initiation to ``peer`` (rate-limited to one per REKEY_TIMEOUT unless retrying)."""
        t = self.timers
        endpoint = peer.endpoint
        if endpoint is None:
            return
        if not retry:
            if now - peer.last_sent_initiation < t.rekey_timeout:
                return
            if peer.t_retransmit is None or peer.attempt_started is None:
                peer.attempt_started = now
        peer.last_sent_initiation = now
        self._clear_handshake(peer)
        timestamp = _tai64n.encode(self._wall_clock())
        if timestamp <= peer.last_sent_timestamp:
            timestamp = _tai64n.after(peer.last_sent_timestamp)
        peer.last_sent_timestamp = timestamp
        local_index = self._new_index()
        state, msg = create_initiation(
            local_static_public=self.public_key,
            remote_static=peer.public_key,
            static_static=peer.static_static,
            local_index=local_index,
            timestamp=timestamp,
            random=self._random,
        )
        peer.handshake = state
        self._handshakes[local_index] = peer
        self._out.append((peer.cookie.add_macs(msg.encode()[:-32], now), endpoint))
        peer.tx_bytes += INITIATION_SIZE
        peer.jitter = int.from_bytes(self._random(2), "little") / 65536.0 * t.rekey_timeout_jitter
        # Timers: handshake initiated, authenticated packet sent, traversal.
        self._arm(peer, "t_retransmit", now + t.rekey_timeout + peer.jitter)
        peer.t_keepalive = None
        if peer.persistent_keepalive:
            self._arm(peer, "t_persistent", now + peer.persistent_keepalive)

    def _give_up(self, peer: _Peer, now: float) -> None:
        peer.attempt_started = None
        self._clear_handshake(peer)
        peer.staged.clear()
        peer.t_keepalive = None
        if peer.t_zero is None:
            self._arm(peer, "t_zero", now + self.timers.zero_key_material_after)
        self._events.append(HandshakeFailed(peer.public_key))

    def _arm(self, peer: _Peer, timer: str, deadline: float) -> None:
        setattr(peer, timer, deadline)
        if deadline < self._deadline:
            self._deadline = deadline

    def _clear_handshake(self, peer: _Peer) -> None:
        state = peer.handshake
        if state is not None:
            self._handshakes.pop(state.local_index, None)
            state.wipe()
            peer.handshake = None

    def _zero_keys(self, peer: _Peer) -> bool:
        """Drop every session of ``peer``; return whether there was one."""
        had = False
        for kp in (peer.previous, peer.current, peer.next):
            if kp is not None:
                had = True
                self._keypairs.pop(kp.local_index, None)
                kp.send_key = kp.recv_key = bytes(32)
        peer.previous = peer.current = peer.next = None
        return had

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._random(4), "little")
            if index not in self._keypairs and index not in self._handshakes:
                return index
