"""Token buckets per key: the one rate limiter of the STUN server, the hub, WireGuard and the relay.

Sans-IO: :meth:`TokenBuckets.allow` takes ``(key, now)`` (``now`` in the caller's seconds, from
any monotonic clock) and answers whether the key may go ahead; nothing here sleeps or reads a
clock. :func:`address_key` turns a source address into the key every caller limits by: an IPv4
address on its own, an IPv6 address by its /64 (one subscriber's whole prefix shares a bucket, as
one home shares one IPv4 address), an IPv4-mapped IPv6 address as its IPv4 address.

Memory is bounded by ``max_keys``. When the table is full and a new key arrives, every bucket
that has refilled to ``burst`` is forgotten (a full bucket and a new one decide the same, so
forgetting it changes no answer); if none has, the new key is refused. So the guarantee below
holds for every key, whatever other keys do: no key is ever allowed more than
``burst + rate * elapsed`` in any interval of ``elapsed`` seconds. The other choice, forgetting
the least recently used bucket, would hand a fresh burst to each of ``max_keys + 1`` sources
taking turns, that is no limit at all; refusing new keys while the table is full of limited
sources is what Linux's WireGuard rate limiter does too. Sweeps of the table happen only when it
is full, at most every ``burst / rate / 4`` seconds and never before some bucket can have
refilled, so a flood of new sources costs O(1) per refused key.
"""

from __future__ import annotations

import ipaddress
import math
import socket

__all__ = ["TokenBuckets", "address_key"]

_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET


def address_key(host: str) -> bytes:
    """Return the bucket key of the source address ``host`` (text, as a socket reports it).

    IPv4: its 4 bytes. IPv6: the first 8 bytes (its /64); an IPv6 zone (``fe80::1%eth0``) is
    ignored and an IPv4-mapped address (``::ffff:192.0.2.1``) is its IPv4 address. Anything that
    is not an IP address (a Unix socket path, ``"unknown"``) is its UTF-8 text, so it shares one
    bucket per spelling. Never raises.
    """
    try:  # the common case first, without an ipaddress object (a flood calls this)
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


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens per second, holding at most ``burst``.

    A new key starts with a full bucket. :meth:`allow` takes ``cost`` tokens (default 1: one
    request, datagram or handshake; the relay charges payload bytes). ``max_keys`` bounds how
    many keys are tracked; see the module docstring for what happens when the table is full.
    ``rate`` may be changed while in use (the relay lowers it to a fair share). Raises
    :class:`ValueError` unless ``rate`` and ``burst`` are positive and finite and ``max_keys``
    is at least 1.
    """

    __slots__ = ("_buckets", "_burst", "_last_sweep", "_max_keys", "_rate", "_soonest_full")

    def __init__(self, *, rate: float, burst: float, max_keys: int) -> None:
        _check_positive(rate=rate, burst=burst)
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._max_keys = max_keys
        # key -> [last update, tokens then]; a list, updated in place (the relay's per-packet path).
        self._buckets: dict[bytes, list[float]] = {}
        # No bucket can have refilled before this time (a lower bound; -inf: unknown).
        self._soonest_full = -math.inf
        self._last_sweep = -math.inf

    @property
    def rate(self) -> float:
        """Tokens added to every bucket per second; setting it raises :class:`ValueError` unless
        the value is positive and finite."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        _check_positive(rate=value)
        self._rate = float(value)
        self._soonest_full = -math.inf  # a higher rate refills buckets sooner than computed

    @property
    def burst(self) -> float:
        """Tokens a bucket holds at most (and a new key starts with)."""
        return self._burst

    @property
    def max_keys(self) -> int:
        """Keys tracked at most."""
        return self._max_keys

    def __len__(self) -> int:
        """Return how many keys are tracked now."""
        return len(self._buckets)

    def allow(self, key: bytes, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from the bucket of ``key`` at ``now`` (seconds); return whether
        it had them.

        A refused call takes nothing, so a ``cost`` above ``burst`` is always refused. A new key
        is refused while the table holds ``max_keys`` buckets none of which has refilled.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if cost > self._burst:
                return False
            if len(self._buckets) >= self._max_keys and not self._forget_refilled(now):
                return False
            self._buckets[key] = [now, self._burst - cost]
            full_at = now + cost / self._rate
            if full_at < self._soonest_full:
                self._soonest_full = full_at
            return True
        tokens = bucket[1] + (now - bucket[0]) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        bucket[0] = now
        if tokens < cost:
            bucket[1] = tokens
            return False
        bucket[1] = tokens - cost
        return True

    def _forget_refilled(self, now: float) -> bool:
        """Forget every bucket that is full again at ``now``; return whether there is room."""
        if now < self._soonest_full or now < self._last_sweep + self._burst / self._rate / 4:
            return False
        rate, burst = self._rate, self._burst
        kept: dict[bytes, list[float]] = {}
        soonest = math.inf
        for key, (last, tokens) in self._buckets.items():
            full_at = last + (burst - tokens) / rate
            if full_at > now:
                kept[key] = [last, tokens]
                soonest = min(soonest, full_at)
        self._buckets = kept
        # A bucket's refill time only moves later as it is used, and a new bucket lowers the
        # bound in allow(), so nothing can be forgotten before ``soonest``.
        self._soonest_full = soonest
        self._last_sweep = now
        return len(kept) < self._max_keys


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive and finite, not {value!r}")
