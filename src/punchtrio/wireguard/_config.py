"""What a caller configures: the protocol's timers and each peer."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field

from .._exceptions import PunchtrioError

Address = tuple[str, int]
"""A UDP endpoint: (IP address literal, port)."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(PunchtrioError, ValueError):
    """A timer, peer or device setting is invalid (bad key length, duplicate peer, prefix clash...)."""


@dataclass(frozen=True)
class Timers:
    """The protocol's time and message limits, named as in the WireGuard paper (seconds, counts).

    The defaults are the protocol's constants. Tests and interop runs may replace them, e.g.
    ``Timers(rekey_after_time=2.0)`` makes the initiator rekey every 2 s; use
    :meth:`Timers.fast` for a consistent shortened set. Raises :class:`ConfigError` if a value is
    not positive or ``rekey_after_time >= reject_after_time``.
    """

    rekey_after_time: float = 120.0
    """An initiator starts a new handshake when its current session is this old (REKEY_AFTER_TIME)."""
    reject_after_time: float = 180.0
    """A session older than this is never used (REJECT_AFTER_TIME)."""
    rekey_attempt_time: float = 90.0
    """Give up on a handshake (HandshakeFailed) after retrying this long (REKEY_ATTEMPT_TIME)."""
    rekey_timeout: float = 5.0
    """Retransmit an unanswered initiation after this long, plus jitter (REKEY_TIMEOUT)."""
    rekey_timeout_jitter: float = 0.333
    """Up to this much random jitter is added to each retransmission (seconds)."""
    keepalive_timeout: float = 10.0
    """Send a keepalive when data was received but nothing sent for this long (KEEPALIVE_TIMEOUT)."""
    cookie_refresh_time: float = 120.0
    """Cookie secrets are replaced, and received cookies expire, after this long."""
    handshake_initiation_rate: float = 0.020
    """At most one initiation per peer is accepted per this interval (50 per second)."""
    rekey_after_messages: int = 2**60
    """Start a new handshake after sending this many messages in one session."""
    reject_after_messages: int = 2**64 - 2**13 - 1
    """Never send or accept a counter at or above this in one session."""

    def __post_init__(self) -> None:
        for timer in dataclasses.fields(self):
            value = getattr(self, timer.name)
            if timer.name == "rekey_timeout_jitter":
                if not (math.isfinite(value) and value >= 0):
                    raise ConfigError("rekey_timeout_jitter must be >= 0")
            elif not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{timer.name} must be positive, got {value!r}")
        if self.rekey_after_time >= self.reject_after_time:
            raise ConfigError("rekey_after_time must be less than reject_after_time")

    @property
    def zero_key_material_after(self) -> float:
        """Key material is dropped this long after the last session was derived (3 x REJECT_AFTER_TIME)."""
        return 3 * self.reject_after_time

    @classmethod
    def fast(cls, rekey_after_time: float = 2.0) -> Timers:
        """Return timers scaled so sessions rekey every ``rekey_after_time`` seconds (test setting).

        Every time limit is multiplied by ``rekey_after_time / 120``, keeping the protocol's
        proportions (reject after 1.5x, retry after 1/24x...). Meant for interop tests that want
        to watch a rekey; never use it on a real network.
        """
        k = rekey_after_time / 120.0
        return cls(
            rekey_after_time=rekey_after_time,
            reject_after_time=180.0 * k,
            rekey_attempt_time=90.0 * k,
            rekey_timeout=5.0 * k,
            rekey_timeout_jitter=0.333 * k,
            keepalive_timeout=10.0 * k,
            cookie_refresh_time=120.0 * k,
            handshake_initiation_rate=min(0.020, 0.020 * k),
        )


def check_endpoint(endpoint: object) -> None:
    """Raise :class:`ConfigError` unless ``endpoint`` is ``(IP address literal, port 1-65535)``
    (an IPv6 socket's 4-tuple is accepted too)."""
    if not (
        isinstance(endpoint, tuple)
        and len(endpoint) in (2, 4)
        and isinstance(endpoint[0], str)
        and isinstance(endpoint[1], int)
        and 0 < endpoint[1] < 65536
    ):
        raise ConfigError(f"endpoint {endpoint!r} is not (address, port)")
    try:
        ipaddress.ip_address(endpoint[0].split("%", 1)[0])
    except ValueError:
        raise ConfigError(f"endpoint address {endpoint[0]!r} is not an IP address") from None


@dataclass(frozen=True)
class PeerConfig:
    """One peer of a :class:`~punchtrio.wireguard.Device`.

    ``public_key`` and ``preshared_key`` are 32 raw bytes; ``allowed_ips`` are the inner source
    addresses accepted from the peer and the destinations routed to it; ``endpoint`` is where to
    send until the peer roams; ``persistent_keepalive`` (seconds, 1-65535) sends a keepalive when
    nothing else was sent for that long. Raises :class:`ConfigError` on malformed values.
    """

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Address | None = None
    persistent_keepalive: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise ConfigError("a peer public key is 32 bytes")
        if self.preshared_key is not None and (
            not isinstance(self.preshared_key, bytes) or len(self.preshared_key) != 32
        ):
            raise ConfigError("a preshared key is 32 bytes")
        for net in self.allowed_ips:
            if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise ConfigError(f"allowed IP {net!r} is not an IPv4Network or IPv6Network")
        if self.endpoint is not None:
            check_endpoint(self.endpoint)
        if self.persistent_keepalive is not None and not (
            math.isfinite(self.persistent_keepalive) and 0 < self.persistent_keepalive <= 65535
        ):
            raise ConfigError("persistent_keepalive must be between 1 and 65535 seconds")
