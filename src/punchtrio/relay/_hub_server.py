"""The hub's relay, sans-IO: binds transports to authenticated keys and forwards between them.

:class:`HubRelayServer` takes frames from UDP sources (``(ip, port)``) and TCP/TLS connections
(integer stream ids from :meth:`HubRelayServer.open_stream`) with the time they arrived, and
queues what to send (``(frame, route)``; a route is a UDP address or a stream id). It forwards a
data frame only from a bound transport, stamped with that transport's own key, to a bound peer of
the same network, within the sender's byte rate; everything else is dropped and counted by
reason. It never sends anything to a route that did not send to it first, and answers an unbound
source only with frames no larger than what it received. The design is in ``docs/relay.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._exceptions import PunchtrioError
from .._token_bucket import TokenBuckets, address_key
from ..keys import PrivateKey, PublicKey
from ..rendezvous import NetworkSecret, hub_mac_key, keyed_mac
from ._hub_frames import (
    CHANNEL_HEADER_LEN,
    COOKIE_LEN,
    DATA_HEADER_LEN,
    DELIVER_PREFIX,
    MAX_CHANNEL_FRAME,
    MAX_FRAME,
    NO_NETWORK,
    SEND_CHANNEL_PREFIX,
    SEND_PREFIX,
    Bind,
    FrameType,
    Hello,
    HubRelayFrameError,
    RefusalCode,
    bind_mac_message,
    bound_body,
    bound_mac_message,
    channel_body,
    channel_mac_message,
    channel_prefix,
    encode_challenge,
    encode_refused,
    parse_control,
)

Route = tuple[str, int] | int
"""Where a frame goes: a UDP ``(ip, port)``, or the id of a TCP/TLS stream."""

KeyLookup = Callable[[bytes, str, float], bool]
"""``registered(public_key, network_id, wall_time)``: whether the 32-byte key has a live record
at the hub in the network (``network_id`` as 32 hex digits, ``""`` on an open hub) at
``wall_time`` (Unix seconds)."""

MiB = 1024 * 1024

COOKIE_SLOT = 30.0
"""Seconds per cookie period; a cookie is accepted in its period and the next (30-60 s)."""
TICK = 1.0
"""Seconds between housekeeping runs: expiry, fair share, replay memory."""
CHANNEL_ANNOUNCE_INTERVAL = 1.0
"""Seconds between two CHANNEL frames for one peer of one binding, while the client still sends
keyed data frames to that peer (the first CHANNEL may have been lost)."""
MAX_CHANNELS = 4096
"""Channels one binding holds at most; peers beyond them stay on keyed data frames."""

DROP_REASONS = (
    "unbound",
    "unknown_destination",
    "cross_network",
    "oversized",
    "malformed",
    "rate_limited",
    "unknown_channel",
)
"""Why a frame is dropped (the keys of :attr:`HubRelayServer.dropped`)."""


_BIND_SOURCES = 8192  # source addresses whose bind rate is tracked at once


@dataclass(frozen=True)
class HubRelayLimits:
    """Limits of a hub relay (seconds, bytes, bytes per second).

    ``lifetime``: how long a binding lives unless renewed (90). ``window``: accepted distance
    between a bind's timestamp and the hub's clock (60). ``rate``/``burst``: token bucket of
    payload bytes per source key (64 MiB/s, 8 MiB; about 1 Gbit/s for one pair both ways).
    ``total_rate``: bytes per second shared by all senders (256 MiB/s): each active sender's rate
    is ``min(rate, total_rate / active senders)``, recomputed every second; 0 disables the share.
    ``max_bindings``: bound transports at most (65536). ``bind_rate``/``bind_burst``: binds per
    second per source IP (IPv6 /64), which cost an X25519 each (20, 5).
    """

    lifetime: float = 90.0
    window: float = 60.0
    rate: float = 64 * MiB
    burst: float = 8 * MiB
    total_rate: float = 256 * MiB
    max_bindings: int = 65536
    bind_rate: float = 20.0
    bind_burst: int = 5

    def __post_init__(self) -> None:
        for name in ("lifetime", "window", "rate", "burst", "bind_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.total_rate < 0 or self.max_bindings < 1 or self.bind_burst < 1:
            raise ValueError("total_rate must be >= 0, max_bindings and bind_burst >= 1")


class _Channels:
    """One binding's channel table: number <-> peer key, and which numbers the client uses."""

    __slots__ = ("announced", "by_number", "epoch", "numbers", "short")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.by_number: dict[int, bytes] = {}
        self.numbers: dict[bytes, int] = {}
        self.announced: dict[bytes, float] = {}
        # peer key -> DELIVER_CHANNEL prefix, once the client sent on that channel (it knows it)
        self.short: dict[bytes, bytes] = {}


class _Binding:
    __slots__ = (
        "active", "channels", "deliver", "expires", "key", "mac_key", "network", "peers", "route",
    )  # fmt: skip

    def __init__(
        self,
        key: bytes,
        network: bytes,
        route: Route,
        expires: float,
        peers: dict[bytes, _Binding],
        mac_key: bytes,
        channels: _Channels,
    ) -> None:
        self.key = key
        self.network = network
        self.route = route
        self.expires = expires
        self.peers = peers
        self.mac_key = mac_key
        self.channels = channels
        self.deliver = DELIVER_PREFIX + key
        self.active = False


class HubRelayServer:
    """The relay core of one hub.

    ``hub_key`` is the hub's static X25519 key (the one ``GET /v1/hub`` publishes); ``networks``
    its network secrets (none: an open hub, where binds name no network); ``registered`` answers
    whether a key has a live record (:data:`KeyLookup`, e.g.
    :meth:`punchtrio.rendezvous.KeyDirectory.is_registered`). ``limits`` defaults to
    :class:`HubRelayLimits`. ``wall_clock`` (Unix seconds) checks bind timestamps; ``random``
    (n -> n bytes) makes the cookie secret. The ``now`` passed to every method is the shell's
    monotonic clock in seconds.

    :attr:`counters`: ``forwarded`` frames and ``forwarded_bytes`` (payload), ``hello``,
    ``bound`` binds, ``refused_<reason>`` binds (``not_registered``, ``authentication``,
    ``stale``, ``bad_cookie``, ``full``, ``rate_limited``), ``expired`` bindings,
    ``channels`` announced (CHANNEL frames sent).
    :attr:`dropped`: frames dropped by reason (:data:`DROP_REASONS`).
    """

    def __init__(
        self,
        hub_key: PrivateKey,
        networks: tuple[NetworkSecret, ...] = (),
        *,
        registered: KeyLookup,
        limits: HubRelayLimits | None = None,
        wall_clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.limits = limits = limits or HubRelayLimits()
        self._hub_key = hub_key
        self._networks = {bytes.fromhex(n.network_id): n for n in networks}
        self._registered = registered
        self._wall_clock = wall_clock
        self._random = random
        self._cookie_secret = random(32)
        self._lifetime_ms = int(limits.lifetime * 1000)
        self._outbox: list[tuple[bytes, Route]] = []
        self._by_route: dict[Route, _Binding] = {}
        self._peers: dict[bytes, dict[bytes, _Binding]] = {}
        self._key_count: dict[bytes, int] = {}
        self._last_timestamp: dict[bytes, int] = {}
        self._mac_keys: dict[tuple[bytes, bytes], bytes] = {}
        self._streams: dict[int, tuple[str, int]] = {}
        self._next_stream = 1
        self._limiter = TokenBuckets(
            rate=limits.rate, burst=int(limits.burst), max_keys=limits.max_bindings
        )
        self._bind_limiter = TokenBuckets(
            rate=limits.bind_rate, burst=limits.bind_burst, max_keys=_BIND_SOURCES
        )
        self._next_tick: float | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ("forwarded", "forwarded_bytes", "hello", "bound", "expired", "channels",
             *(f"refused_{code.name.lower()}" for code in RefusalCode)),
            0,
        )  # fmt: skip
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    def __repr__(self) -> str:
        return f"HubRelayServer(bound={len(self._by_route)})"

    # state

    @property
    def bound_peers(self) -> int:
        """The number of bound transports."""
        return len(self._by_route)

    @property
    def share_rate(self) -> float:
        """The byte rate each sender is limited to now (the fair share, at most ``rate``)."""
        return self._limiter.rate

    def is_bound(self, route: Route) -> bool:
        """Whether ``route`` is bound to a key."""
        return route in self._by_route

    # transports

    def open_stream(self, address: tuple[str, int], now: float) -> int:
        """Register a new TCP/TLS connection from ``address``; return its stream id (a route)."""
        stream_id = self._next_stream
        self._next_stream += 1
        self._streams[stream_id] = address
        self._tick_from(now)
        return stream_id

    def close_stream(self, stream_id: int) -> None:
        """Forget a connection and its binding (no error if unknown)."""
        self._streams.pop(stream_id, None)
        binding = self._by_route.get(stream_id)
        if binding is not None:
            self._unbind(binding)

    # sans-IO interface

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        """Handle one UDP datagram from ``addr`` received at ``now``. Never raises."""
        self._receive(data, addr, now)

    def receive_stream_frame(self, stream_id: int, data: bytes, now: float) -> None:
        """Handle one frame decoded from stream ``stream_id`` at ``now``. Never raises; a frame
        from a stream that is not open is dropped as unbound."""
        if stream_id not in self._streams:
            self.dropped["unbound"] += 1
            return
        self._receive(data, stream_id, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Route]]:
        """Return (and forget) the frames to send, each with its route, oldest first."""
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` must run next, or ``None`` before any traffic."""
        return self._next_tick

    def handle_timer(self, now: float) -> None:
        """Housekeeping: expire bindings, recompute the fair share, forget old timestamps."""
        self._next_tick = now + TICK
        expired = [b for b in self._by_route.values() if b.expires <= now]
        for binding in expired:
            self._unbind(binding)
        self.counters["expired"] += len(expired)
        active = 0
        for binding in self._by_route.values():
            if binding.active:
                active += 1
                binding.active = False
        limits = self.limits
        rate = limits.rate
        if limits.total_rate > 0 and active:
            rate = min(rate, limits.total_rate / active)
        self._limiter.rate = rate
        horizon = int((self._wall_clock() - limits.window) * 1000)
        if self._last_timestamp:
            self._last_timestamp = {
                key: stamp for key, stamp in self._last_timestamp.items() if stamp >= horizon
            }

    def metrics_lines(self) -> list[str]:
        """Return the relay's counters as Prometheus text lines for the hub's ``/metrics``."""
        counters = self.counters
        lines = [
            "# HELP punchtrio_hub_relay_bound_peers Transports bound to the hub's relay.",
            "# TYPE punchtrio_hub_relay_bound_peers gauge",
            f"punchtrio_hub_relay_bound_peers {len(self._by_route)}",
            "# HELP punchtrio_hub_relay_forwarded_frames_total Data frames the relay forwarded.",
            "# TYPE punchtrio_hub_relay_forwarded_frames_total counter",
            f"punchtrio_hub_relay_forwarded_frames_total {counters['forwarded']}",
            "# HELP punchtrio_hub_relay_forwarded_bytes_total Payload bytes the relay forwarded.",
            "# TYPE punchtrio_hub_relay_forwarded_bytes_total counter",
            f"punchtrio_hub_relay_forwarded_bytes_total {counters['forwarded_bytes']}",
            "# HELP punchtrio_hub_relay_dropped_frames_total Frames the relay dropped, by reason.",
            "# TYPE punchtrio_hub_relay_dropped_frames_total counter",
        ]
        lines += [
            f'punchtrio_hub_relay_dropped_frames_total{{reason="{reason}"}} {count}'
            for reason, count in self.dropped.items()
        ]
        lines += [
            "# HELP punchtrio_hub_relay_binds_total Bind requests by result.",
            "# TYPE punchtrio_hub_relay_binds_total counter",
            f'punchtrio_hub_relay_binds_total{{result="bound"}} {counters["bound"]}',
        ]
        lines += [
            f'punchtrio_hub_relay_binds_total{{result="{code.name.lower()}"}} '
            f"{counters['refused_' + code.name.lower()]}"
            for code in RefusalCode
        ]
        lines += [
            "# HELP punchtrio_hub_relay_expired_total Bindings that expired unrenewed.",
            "# TYPE punchtrio_hub_relay_expired_total counter",
            f"punchtrio_hub_relay_expired_total {counters['expired']}",
        ]
        return lines

    # internals

    def _data_sender(
        self, route: Route, size: int, limit: int, header: int, now: float
    ) -> _Binding | None:
        """The live binding a data frame of ``size`` bytes from ``route`` may use, or ``None``
        with the drop counted (unbound, oversized past ``limit``, shorter than ``header``)."""
        binding = self._by_route.get(route)
        if binding is None or binding.expires <= now:
            self.dropped["unbound"] += 1
        elif size > limit:
            self.dropped["oversized"] += 1
        elif size < header:
            self.dropped["malformed"] += 1
        else:
            return binding
        return None

    def _receive(self, data: bytes, route: Route, now: float) -> None:
        if data.startswith(SEND_CHANNEL_PREFIX):
            binding = self._data_sender(
                route, len(data), MAX_CHANNEL_FRAME, CHANNEL_HEADER_LEN, now
            )
            if binding is not None:
                channels = binding.channels
                number = (data[5] << 8) | data[6]
                destination = channels.by_number.get(number)
                if destination is None:
                    self.dropped["unknown_channel"] += 1
                    return
                if destination not in channels.short:
                    channels.short[destination] = channel_prefix(FrameType.DELIVER_CHANNEL, number)
                self._forward(binding, destination, data, CHANNEL_HEADER_LEN, now)
            return
        if data.startswith(SEND_PREFIX):
            binding = self._data_sender(route, len(data), MAX_FRAME, DATA_HEADER_LEN, now)
            if binding is not None:
                destination = data[5:DATA_HEADER_LEN]
                if self._forward(binding, destination, data, DATA_HEADER_LEN, now):
                    self._offer_channel(binding, destination, now)
            return
        self._tick_from(now)
        try:
            frame = parse_control(data)
        except HubRelayFrameError:
            self.dropped["malformed"] += 1
            return
        if isinstance(frame, Hello):
            self.counters["hello"] += 1
            self._outbox.append(
                (encode_challenge(self._cookie(route, frame.public_key, now)), route)
            )
        elif isinstance(frame, Bind):
            self._bind(frame, data, route, now)
        else:  # CHALLENGE, BOUND, REFUSED: relay-to-client frames
            self.dropped["malformed"] += 1

    def _forward(
        self, binding: _Binding, destination: bytes, data: bytes, header: int, now: float
    ) -> bool:
        """Forward the payload of ``data`` (after ``header`` bytes) from ``binding`` to its peer
        ``destination``; return whether the peer is a live binding of the same network."""
        peer = binding.peers.get(destination)
        if peer is None or peer.expires <= now:
            reason = "unknown_destination"
            if peer is None and destination in self._key_count:
                reason = "cross_network"
            self.dropped[reason] += 1
            return False
        size = len(data) - header
        binding.active = True
        if not self._limiter.allow(binding.key, now, size):
            self.dropped["rate_limited"] += 1
            return True
        # The peer gets the short form once it has sent on its own channel to this sender.
        prefix = peer.channels.short.get(binding.key) or binding.deliver
        self._outbox.append((b"".join((prefix, memoryview(data)[header:])), peer.route))
        counters = self.counters
        counters["forwarded"] += 1
        counters["forwarded_bytes"] += size
        return True

    def _offer_channel(self, binding: _Binding, destination: bytes, now: float) -> None:
        """Tell a client that still sends keyed frames to ``destination`` its channel number
        (assigning one on first use), at most once per :data:`CHANNEL_ANNOUNCE_INTERVAL`."""
        channels = binding.channels
        if destination in channels.short:
            return
        number = channels.numbers.get(destination)
        if number is None:
            number = len(channels.numbers) + 1
            if number > MAX_CHANNELS:
                return
            channels.numbers[destination] = number
            channels.by_number[number] = destination
        elif now - channels.announced.get(destination, -CHANNEL_ANNOUNCE_INTERVAL) < (
            CHANNEL_ANNOUNCE_INTERVAL
        ):
            return
        channels.announced[destination] = now
        body = channel_body(channels.epoch, number, destination)
        self._outbox.append(
            (body + keyed_mac(binding.mac_key, channel_mac_message(body)), binding.route)
        )
        self.counters["channels"] += 1

    def _tick_from(self, now: float) -> None:
        if self._next_tick is None:
            self._next_tick = now + TICK

    def _cookie(self, route: Route, key: bytes, now: float, slot_offset: int = 0) -> bytes:
        slot = int(now // COOKIE_SLOT) - slot_offset
        if isinstance(route, int):
            ip, port = self._streams.get(route, ("", 0))
            source = f"tcp {route} {ip} {port} {slot}"
        else:
            source = f"udp {route[0]} {route[1]} {slot}"
        return hashlib.blake2s(
            source.encode() + key, key=self._cookie_secret, digest_size=COOKIE_LEN
        ).digest()

    def _refuse(self, frame: Bind, route: Route, code: RefusalCode) -> None:
        self.counters[f"refused_{code.name.lower()}"] += 1
        self._outbox.append((encode_refused(frame.timestamp, code), route))

    def _bind(self, frame: Bind, data: bytes, route: Route, now: float) -> None:
        key = frame.public_key
        if not (
            hmac.compare_digest(frame.cookie, self._cookie(route, key, now))
            or hmac.compare_digest(frame.cookie, self._cookie(route, key, now, 1))
        ):
            self._refuse(frame, route, RefusalCode.BAD_COOKIE)
            return
        address = self._streams.get(route, ("", 0)) if isinstance(route, int) else route
        if not self._bind_limiter.allow(address_key(address[0]), now):
            self._refuse(frame, route, RefusalCode.RATE_LIMITED)
            return
        network_bytes = frame.network
        if self._networks:
            network = self._networks.get(network_bytes)
            if network is None:
                self._refuse(frame, route, RefusalCode.AUTHENTICATION)
                return
            network_id = network_bytes.hex()
        elif network_bytes != NO_NETWORK:
            self._refuse(frame, route, RefusalCode.AUTHENTICATION)
            return
        else:
            network, network_id = None, ""
        mac_key = self._mac_key(key, network_bytes, network)
        body = data[: -len(frame.mac)]
        if mac_key is None or not hmac.compare_digest(
            keyed_mac(mac_key, bind_mac_message(body)), frame.mac
        ):
            self._refuse(frame, route, RefusalCode.AUTHENTICATION)
            return
        wall = self._wall_clock()
        if abs(frame.timestamp / 1000 - wall) > self.limits.window or frame.timestamp <= (
            self._last_timestamp.get(key, -1)
        ):
            self._refuse(frame, route, RefusalCode.STALE)
            return
        if not self._registered(key, network_id, wall):
            self._refuse(frame, route, RefusalCode.NOT_REGISTERED)
            return
        peers = self._peers.get(network_bytes)
        old = None if peers is None else peers.get(key)
        same_route = self._by_route.get(route)
        if old is None and same_route is None and len(self._by_route) >= self.limits.max_bindings:
            self._refuse(frame, route, RefusalCode.FULL)
            return
        for stale in (old, same_route):
            if stale is not None:
                self._unbind(stale)
        if old is not None and old.route == route:
            channels = old.channels  # a renewal: the client's channels stay valid
        else:
            channels = _Channels(int.from_bytes(self._random(4), "big"))
        peers = self._peers.setdefault(network_bytes, {})
        binding = _Binding(
            key, network_bytes, route, now + self.limits.lifetime, peers, mac_key, channels
        )
        peers[key] = binding
        self._by_route[route] = binding
        self._key_count[key] = self._key_count.get(key, 0) + 1
        self._last_timestamp[key] = frame.timestamp
        self.counters["bound"] += 1
        reply = bound_body(frame.timestamp, self._lifetime_ms, channels.epoch)
        self._outbox.append((reply + keyed_mac(mac_key, bound_mac_message(reply)), route))

    def _mac_key(
        self, key: bytes, network_bytes: bytes, network: NetworkSecret | None
    ) -> bytes | None:
        cache_key = (key, network_bytes)
        mac_key = self._mac_keys.get(cache_key)
        if mac_key is None:
            try:
                mac_key = hub_mac_key(self._hub_key, PublicKey(key), network)
            except PunchtrioError:  # a low-order point
                return None
            if len(self._mac_keys) >= self.limits.max_bindings:
                self._mac_keys.pop(next(iter(self._mac_keys)))
            self._mac_keys[cache_key] = mac_key
        return mac_key

    def _unbind(self, binding: _Binding) -> None:
        if self._by_route.get(binding.route) is binding:
            del self._by_route[binding.route]
        peers = binding.peers
        if peers.get(binding.key) is binding:
            del peers[binding.key]
            if not peers:
                self._peers.pop(binding.network, None)
            count = self._key_count.get(binding.key, 0) - 1
            if count > 0:
                self._key_count[binding.key] = count
            else:
                self._key_count.pop(binding.key, None)
