"""The client side of the hub's relay, sans-IO: binding a key to a transport, wrapping data.

:class:`HubRelayClient` runs the bind exchange (HELLO, CHALLENGE, BIND, BOUND or REFUSED) with the
relay, keeps the binding alive by binding again before it expires, and wraps and unwraps data
frames. It does no I/O: a shell sends :meth:`HubRelayClient.datagrams_to_send` to the relay (one
UDP datagram each, or each framed by :func:`~punchtrio.relay.encode_hub_stream_frame` on the
TCP stream), feeds what arrives to :meth:`HubRelayClient.receive_frame` and re-arms one timer.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..keys import PrivateKey, PublicKey
from ..rendezvous import NetworkSecret, keyed_mac, peer_mac_key
from ._hub_frames import (
    CHANNEL_HEADER_LEN,
    DATA_HEADER_LEN,
    DELIVER_CHANNEL_PREFIX,
    DELIVER_PREFIX,
    KEY_LEN,
    MAX_CHANNEL_FRAME,
    MAX_FRAME,
    NO_NETWORK,
    REFUSAL_REASONS,
    SEND_PREFIX,
    Bound,
    Challenge,
    Channel,
    FrameType,
    HubRelayFrameError,
    Refused,
    bind_body,
    bind_mac_message,
    bound_mac_message,
    channel_mac_message,
    channel_prefix,
    encode_hello,
    parse_control,
)

RETRY_INITIAL = 1.0
"""Seconds before the first bind attempt is repeated when the relay does not answer."""
RETRY_MAX = 30.0
"""Longest wait between bind attempts, in seconds (the wait doubles after every failure)."""
REBIND_FRACTION = 1 / 3
"""A binding is renewed after this fraction of its lifetime (so two renewals can be lost)."""


@dataclass(frozen=True)
class RelayBound:
    """The relay accepted the bind: data frames flow for ``lifetime`` seconds unless renewed
    (the client renews by itself)."""

    lifetime: float


@dataclass(frozen=True)
class RelayRefused:
    """The relay refused a bind: ``code`` (a :class:`~punchtrio.relay.RefusalCode`) and its
    one-line ``reason``. The client tries again after its backoff."""

    code: int
    reason: str


_IDLE, _HELLO, _BIND, _WAIT = range(4)


class HubRelayClient:
    """One peer's binding at one hub relay, sans-IO.

    ``private_key`` is the peer's 32-byte WireGuard private key, ``hub_public_key`` the hub's
    32-byte key (``HubInfo.public_key.raw``), ``network_secret`` the network the peer registered
    in (or ``None`` on an open hub). ``wall_clock`` (Unix seconds) stamps binds; set it to the
    hub's corrected clock if the local one is off by more than the hub's auth window.
    ``random`` (n -> n random bytes) jitters renewals by up to 10% so that peers do not renew
    in step. Raises :class:`~punchtrio.keys.InvalidKeyError` for a key of the wrong size and
    :class:`~punchtrio.rendezvous.AuthenticationError` for a low-order hub key.

    Data to a peer goes in keyed frames (its 32-byte key) until the relay names the peer by a
    2-byte channel (a CHANNEL frame, authenticated like BOUND); from then on :meth:`wrap`
    returns the 7-byte-header channel frame, which keeps a full-sized WireGuard datagram of the
    default tunnel MTU inside a 1500-byte IP packet.

    :attr:`counters` (``dict[str, int]``): ``data`` frames delivered, ``malformed`` and
    ``unexpected`` frames dropped, ``bad_mac`` BOUND or CHANNEL frames dropped,
    ``unknown_channel`` data frames dropped (a channel this client was never told of),
    ``binds`` sent, ``bound``, ``refused``, ``expired`` bindings, ``retries``, ``channels``
    learnt.
    """

    def __init__(
        self,
        private_key: bytes,
        hub_public_key: bytes,
        *,
        network_secret: NetworkSecret | None = None,
        wall_clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        private = PrivateKey(bytes(private_key))
        hub = PublicKey(bytes(hub_public_key))
        self.public_key: bytes = private.public_key().raw
        """This peer's public key (the source key the relay stamps on what it forwards)."""
        self._mac_key = peer_mac_key(private, hub, network_secret)
        self._network = (
            NO_NETWORK if network_secret is None else bytes.fromhex(network_secret.network_id)
        )
        self._wall_clock = wall_clock
        self._random = random
        self._outbox: list[bytes] = []
        self._events: list[RelayBound | RelayRefused] = []
        self._state = _IDLE
        self._deadline: float | None = None
        self._retry = RETRY_INITIAL
        self._last_timestamp = 0
        self._pending_timestamp = -1
        self._expires: float | None = None
        self._epoch: int | None = None
        self._send_prefix: dict[bytes, bytes] = {}  # peer key -> SEND_CHANNEL prefix
        self._sources: dict[int, bytes] = {}  # channel -> peer key
        self.bound: bool = False
        """Whether the relay currently holds a binding for this key (as far as the client knows)."""
        self.counters: dict[str, int] = dict.fromkeys(
            ("data", "malformed", "unexpected", "bad_mac", "unknown_channel", "binds", "bound",
             "refused", "expired", "retries", "channels"),
            0,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"HubRelayClient(bound={self.bound})"

    # driving

    def connect(self, now: float) -> None:
        """Start binding at ``now``: queue a HELLO and arm the retry timer."""
        self._hello(now)

    def datagrams_to_send(self) -> list[bytes]:
        """Return (and forget) the control frames to send to the relay, oldest first."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> RelayBound | RelayRefused | None:
        """Return the oldest pending event, or ``None``."""
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` must run next (the shell's clock), or ``None``."""
        deadline = self._deadline
        expires = self._expires
        if deadline is None:
            return expires
        if expires is None:
            return deadline
        return min(deadline, expires)

    def handle_timer(self, now: float) -> None:
        """Expire a binding that was not renewed in time, retry an unanswered bind with backoff,
        or start renewing a binding."""
        if self._expires is not None and now >= self._expires:
            self._expires = None
            if self.bound:
                self.bound = False
                self.counters["expired"] += 1
        if self._deadline is None or now < self._deadline:
            return
        if self._state in (_HELLO, _BIND):
            self.counters["retries"] += 1
            self._retry = min(self._retry * 2, RETRY_MAX)
        self._hello(now)

    # frames

    def wrap(self, destination: bytes, payload: bytes) -> bytes:
        """Return the data frame carrying ``payload`` to the peer with public key ``destination``:
        a channel frame once the relay has named the peer by a channel, else a keyed frame.

        The relay forwards it only while this client is bound and ``destination`` is a bound peer
        of the same network, with at most :data:`~punchtrio.relay.MAX_PAYLOAD` bytes of payload.
        Raises :class:`ValueError` if ``destination`` is not 32 bytes.
        """
        prefix = self._send_prefix.get(destination)
        if prefix is not None:
            return b"".join((prefix, payload))
        if len(destination) != KEY_LEN:
            raise ValueError("a destination is a 32-byte public key")
        return b"".join((SEND_PREFIX, destination, payload))

    def channel_of(self, destination: bytes) -> int | None:
        """Return the channel number the relay gave the peer ``destination``, or ``None``."""
        prefix = self._send_prefix.get(destination)
        return None if prefix is None else (prefix[5] << 8) | prefix[6]

    def receive_frame(self, data: bytes, now: float) -> tuple[bytes, bytes] | None:
        """Handle one frame from the relay received at ``now``.

        Returns ``(source public key, payload)`` for a data frame; ``None`` for a control frame
        (handled here) or a bad one (dropped and counted). Never raises.
        """
        if data.startswith(DELIVER_CHANNEL_PREFIX):
            if self._state == _IDLE or not CHANNEL_HEADER_LEN <= len(data) <= MAX_CHANNEL_FRAME:
                self.counters["unexpected" if self._state == _IDLE else "malformed"] += 1
                return None
            source = self._sources.get((data[5] << 8) | data[6])
            if source is None:
                self.counters["unknown_channel"] += 1
                return None
            self.counters["data"] += 1
            return source, data[CHANNEL_HEADER_LEN:]
        if data.startswith(DELIVER_PREFIX):
            if self._state == _IDLE or not DATA_HEADER_LEN <= len(data) <= MAX_FRAME:
                self.counters["unexpected" if self._state == _IDLE else "malformed"] += 1
                return None
            self.counters["data"] += 1
            return data[5:DATA_HEADER_LEN], data[DATA_HEADER_LEN:]
        try:
            frame = parse_control(data)
        except HubRelayFrameError:
            self.counters["malformed"] += 1
            return None
        if isinstance(frame, Challenge):
            self._on_challenge(frame, now)
        elif isinstance(frame, Bound):
            self._on_bound(frame, data, now)
        elif isinstance(frame, Refused):
            self._on_refused(frame, now)
        elif isinstance(frame, Channel):
            self._on_channel(frame, data)
        else:
            self.counters["unexpected"] += 1
        return None

    # internals

    def _hello(self, now: float) -> None:
        self._state = _HELLO
        self._outbox.append(encode_hello(self.public_key))
        self._deadline = now + self._retry

    def _on_challenge(self, frame: Challenge, now: float) -> None:
        if self._state != _HELLO:
            self.counters["unexpected"] += 1
            return
        timestamp = max(int(self._wall_clock() * 1000), self._last_timestamp + 1)
        self._last_timestamp = timestamp
        self._pending_timestamp = timestamp
        body = bind_body(self.public_key, self._network, frame.cookie, timestamp)
        self._outbox.append(body + keyed_mac(self._mac_key, bind_mac_message(body)))
        self.counters["binds"] += 1
        self._state = _BIND
        self._deadline = now + self._retry

    def _on_bound(self, frame: Bound, data: bytes, now: float) -> None:
        if self._state != _BIND or frame.timestamp != self._pending_timestamp:
            self.counters["unexpected"] += 1
            return
        expected = keyed_mac(self._mac_key, bound_mac_message(data[: -len(frame.mac)]))
        if not hmac.compare_digest(expected, frame.mac):
            self.counters["bad_mac"] += 1
            return
        lifetime = frame.lifetime_ms / 1000
        if frame.epoch != self._epoch:  # a new channel table at the relay: ours names nothing
            self._epoch = frame.epoch
            self._send_prefix.clear()
            self._sources.clear()
        self.bound = True
        self.counters["bound"] += 1
        self._state = _WAIT
        self._retry = RETRY_INITIAL
        self._expires = now + lifetime
        jitter = 0.9 + 0.2 * self._random(1)[0] / 255
        self._deadline = now + lifetime * REBIND_FRACTION * jitter
        self._events.append(RelayBound(lifetime))

    def _on_channel(self, frame: Channel, data: bytes) -> None:
        if not self.bound or frame.epoch != self._epoch or frame.channel == 0:
            self.counters["unexpected"] += 1
            return
        expected = keyed_mac(self._mac_key, channel_mac_message(data[: -len(frame.mac)]))
        if not hmac.compare_digest(expected, frame.mac):
            self.counters["bad_mac"] += 1
            return
        if self._sources.get(frame.channel) == frame.public_key:
            return  # a repeat
        self._send_prefix[frame.public_key] = channel_prefix(FrameType.SEND_CHANNEL, frame.channel)
        self._sources[frame.channel] = frame.public_key
        self.counters["channels"] += 1

    def _on_refused(self, frame: Refused, now: float) -> None:
        # Unauthenticated (the relay cannot always compute our MAC key), so a refusal only
        # schedules a retry; it never drops a live binding.
        if self._state != _BIND or frame.timestamp != self._pending_timestamp:
            self.counters["unexpected"] += 1
            return
        self.counters["refused"] += 1
        self._pending_timestamp = -1
        self._state = _WAIT
        self._deadline = now + self._retry
        self._retry = min(self._retry * 2, RETRY_MAX)
        reason = REFUSAL_REASONS.get(frame.code, f"refused (code {frame.code})")
        self._events.append(RelayRefused(frame.code, reason))
