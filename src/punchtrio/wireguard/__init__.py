"""WireGuard, sans-IO: messages, the Noise IKpsk2 handshake, cookies, sessions, timers and routing.

:class:`Device` is the protocol core a shell drives with ``(datagram, address, now)`` and IP
packets; see ``docs/wireguard.md`` for the API, the state tables and the timer test setting.
"""

from ._config import Address, ConfigError, PeerConfig, Timers
from ._device import DROP_REASONS, Device, PeerStats
from ._events import EndpointChanged, Event, HandshakeCompleted, HandshakeFailed, KeysZeroed
from ._messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    CookieReply,
    Initiation,
    MessageError,
    Response,
    Transport,
    parse_message,
)
from ._noise import HandshakeError
from ._ratelimit import RateLimiter, source_key

__all__ = [
    "COOKIE_REPLY_SIZE",
    "DROP_REASONS",
    "INITIATION_SIZE",
    "RESPONSE_SIZE",
    "TRANSPORT_HEADER_SIZE",
    "Address",
    "ConfigError",
    "CookieReply",
    "Device",
    "EndpointChanged",
    "Event",
    "HandshakeCompleted",
    "HandshakeError",
    "HandshakeFailed",
    "Initiation",
    "KeysZeroed",
    "MessageError",
    "PeerConfig",
    "PeerStats",
    "RateLimiter",
    "Response",
    "Timers",
    "Transport",
    "parse_message",
    "source_key",
]
