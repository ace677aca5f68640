"""Per-source rate limiting of handshake messages while the device is under load."""

from __future__ import annotations

import ipaddress
import socket

from ._config import Address

PACKETS_PER_SECOND = 20
"""Handshake messages per second accepted from one source while under load (as the reference)."""
PACKETS_BURSTABLE = 5
"""Messages one source may send at once before the rate applies."""
_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET

MAX_SOURCES = 8192
"""Sources tracked at most; beyond this, new sources are refused until old entries expire."""


def source_key(addr: Address) -> bytes:
    """Return what a source is limited by: its IPv4 address, or the /64 of its IPv6 address."""
    host = addr[0]
    try:  # the common case first, without building an ipaddress object (a flood calls this)
        return _inet_pton(_AF_INET, host)
    except OSError:
        pass
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host.encode("utf-8", "replace")
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return mapped.packed if mapped is not None else ip.packed[:8]
    return ip.packed


class RateLimiter:
    """A token bucket per source: ``rate`` messages per second, bursts of ``burst``.

    The unit is the caller's: :meth:`allow` takes one token per handshake message from an address;
    :meth:`allow_key` takes ``cost`` tokens from the bucket of any byte-string key (the hub's relay
    limits bytes per second per public key with it). ``rate`` may be changed while in use (the
    relay lowers it to a fair share when many peers send); ``max_sources`` bounds the table.
    """

    def __init__(
        self,
        rate: float = PACKETS_PER_SECOND,
        burst: int = PACKETS_BURSTABLE,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max = max_sources
        self._buckets: dict[bytes, list[float]] = {}
        self._last_gc = float("-inf")

    @property
    def rate(self) -> float:
        """Tokens added per second to every bucket (must stay positive)."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._rate = value

    def allow(self, addr: Address, now: float) -> bool:
        """Take one token for ``addr`` at ``now``; return whether there was one."""
        return self.allow_key(source_key(addr), now)

    def allow_key(self, key: bytes, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from the bucket of ``key`` at ``now``; return whether it had them.

        A refused call takes nothing. A new key starts with a full bucket (``burst``), so a
        ``cost`` above ``burst`` is always refused.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max or now - self._last_gc >= 1.0:
                self._collect(now)
            if len(self._buckets) >= self._max or cost > self._burst:
                return False
            self._buckets[key] = [now, self._burst - cost]
            return True
        last, tokens = bucket
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        bucket[0] = now
        if tokens < cost:
            bucket[1] = tokens
            return False
        bucket[1] = tokens - cost
        return True

    def _collect(self, now: float) -> None:
        # A bucket untouched for burst/rate seconds is full again: forgetting it changes nothing.
        horizon = self._burst / self._rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[0] < horizon}
        self._last_gc = now
