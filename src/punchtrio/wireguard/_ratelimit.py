"""Per-source rate limiting of handshake messages while the device is under load.

The buckets are :class:`punchtrio._token_bucket.TokenBuckets`, the project's one token-bucket
implementation (the STUN server, the hub and the relay limit with it too); this module holds
WireGuard's limits and its address-tuple interface.
"""

from __future__ import annotations

from .._token_bucket import TokenBuckets, address_key
from ._config import Address

PACKETS_PER_SECOND = 20
"""Handshake messages per second accepted from one source while under load (as the reference)."""
PACKETS_BURSTABLE = 5
"""Messages one source may send at once before the rate applies."""

MAX_SOURCES = 8192
"""Sources tracked at most; while all are still limited, new sources are refused."""


def source_key(addr: Address) -> bytes:
    """Return what a source is limited by: its IPv4 address, or the /64 of its IPv6 address.

    An IPv4-mapped IPv6 address counts as its IPv4 address; the port never matters.
    """
    return address_key(addr[0])


class RateLimiter:
    """A token bucket per source: ``rate`` messages per second, bursts of ``burst``.

    The unit is the caller's: :meth:`allow` takes one token per handshake message from an address;
    :meth:`allow_key` takes ``cost`` tokens from the bucket of any byte-string key. ``rate`` may
    be changed while in use; ``max_sources`` bounds the table: a bucket is forgotten once it has
    refilled, and while every tracked source is still limited a new source is refused, so no
    source ever gets more than ``burst + rate * seconds``. Raises :class:`ValueError` unless
    ``rate`` and ``burst`` are positive and ``max_sources`` is at least 1.
    """

    def __init__(
        self,
        rate: float = PACKETS_PER_SECOND,
        burst: int = PACKETS_BURSTABLE,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self._buckets = TokenBuckets(rate=rate, burst=burst, max_keys=max_sources)

    @property
    def rate(self) -> float:
        """Tokens added per second to every bucket (must stay positive)."""
        return self._buckets.rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._buckets.rate = value

    def allow(self, addr: Address, now: float) -> bool:
        """Take one token for ``addr`` at ``now`` (seconds); return whether there was one."""
        return self._buckets.allow(address_key(addr[0]), now)

    def allow_key(self, key: bytes, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from the bucket of ``key`` at ``now``; return whether it had them.

        A refused call takes nothing. A new key starts with a full bucket (``burst``), so a
        ``cost`` above ``burst`` is always refused.
        """
        return self._buckets.allow(key, now, cost)
