"""Where the hub keeps its state: the :class:`Store` protocol and the in-memory :class:`MemoryStore`.

Every operation is keyed by ``(network_id, name)`` and is either one read or one conditional write
(create-or-refresh-if-owner, delete-if-owner, append-if-room, remember-nonce-if-absent), so a shared
implementation (Redis with Lua scripts, pub/sub for wake-ups) can serve several hub replicas.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .._exceptions import PunchtrioError
from ..keys import PublicKey
from ._listing import listing_tag
from ._models import (
    Endpoint,
    IPNetwork,
    PeerRecord,
    RegisterRequest,
    SignalMessage,
    address_span,
    trusted,
)

Clock = Callable[[], float]
"""A wall clock returning Unix seconds (``time.time`` by default)."""

_EXPIRY_SLACK = 0.001
"""Seconds a listing wait sleeps past the first expiry, so the record is gone when it looks."""


class StoreError(PunchtrioError):
    """Base class of the refusals a store raises; the hub maps each to one HTTP status."""


class NameTakenError(StoreError):
    """The name is registered to another key (409)."""


class AllowedIPsConflictError(StoreError):
    """The allowed IPs overlap another peer's in the same network (409)."""


class StoreFullError(StoreError):
    """A global bound is reached: peers, waiters, queued messages or remembered nonces (503)."""


class QueueFullError(StoreError):
    """The recipient's message queue is full (429)."""


@dataclass(frozen=True)
class StoreLimits:
    """Bounds on a store's memory; every one is enforced with an error, never by dropping data.

    ``max_peers``: records in all networks. ``max_waiters``: open long polls (peer and message
    waits). ``max_queued_per_peer`` / ``max_queued``: signalling messages per recipient / in all.
    ``message_ttl``: seconds a queued message lives. ``max_nonces``: remembered request nonces.
    """

    max_peers: int = 200_000
    max_waiters: int = 10_000
    max_queued_per_peer: int = 32
    max_queued: int = 100_000
    message_ttl: float = 60.0
    max_nonces: int = 1_000_000


@dataclass(frozen=True, slots=True)
class StoredPeer:
    """A record as a store holds it: the registration, its owner and its absolute expiry.

    ``expires_at`` is the hub's wall clock in Unix seconds; ``revision`` grows on every change of
    the content (key, endpoints, allowed IPs), and is seeded from the clock in microseconds so it also
    grows across restarts of a memory store.
    """

    network_id: str
    name: str
    public_key: PublicKey
    endpoints: tuple[Endpoint, ...]
    allowed_ips: tuple[IPNetwork, ...]
    revision: int
    expires_at: float

    def to_record(self, now: float) -> PeerRecord:
        """Return the wire record as of ``now`` (Unix seconds).

        The fields are not checked again: a store holds only records built from validated
        registrations (and a shared store parses what it reads back).
        """
        return trusted(
            PeerRecord,
            self.name,
            self.public_key,
            self.endpoints,
            self.allowed_ips,
            self.revision,
            max(0.0, self.expires_at - now),
        )


@dataclass(frozen=True)
class StoreStats:
    """Gauges for ``/metrics``: records, open waits and queued messages."""

    peers: int
    waiters: int
    queued: int


class Store(Protocol):
    """The hub's state. Implementations must make each method atomic with respect to the others.

    Names live in per-network namespaces (``network_id`` is ``""`` on an open hub). Methods raise
    the :class:`StoreError` subclasses documented on each; waits block until satisfied and are
    cancelled by the caller's timeout.
    """

    async def put(
        self, network_id: str, name: str, request: RegisterRequest, ttl: float
    ) -> tuple[StoredPeer, bool]:
        """Create or refresh ``name`` for ``request.public_key``; return the record and whether it
        was created. Raises :class:`NameTakenError`, :class:`AllowedIPsConflictError`,
        :class:`StoreFullError` (no change in every case)."""
        ...

    async def get(self, network_id: str, name: str) -> StoredPeer | None:
        """Return the live record of ``name``, or ``None``."""
        ...

    async def wait(self, network_id: str, name: str, since: int) -> StoredPeer:
        """Return the record of ``name`` as soon as it exists with a revision above ``since``.
        Raises :class:`StoreFullError` when too many waits are open."""
        ...

    async def delete(self, network_id: str, name: str, owner: PublicKey) -> bool:
        """Delete ``name`` if ``owner`` holds it; ``False`` if it does not exist.
        Raises :class:`NameTakenError` if another key holds it."""
        ...

    async def list_peers(self, network_id: str) -> tuple[StoredPeer, ...]:
        """Return every live record of ``network_id`` (any order)."""
        ...

    async def wait_listing(self, network_id: str, since: str) -> tuple[StoredPeer, ...]:
        """Return the live records of ``network_id`` as soon as their
        :func:`~punchtrio.rendezvous.listing_tag` differs from ``since`` (a peer joined, changed
        or left, also by expiry). Raises :class:`StoreFullError` when too many waits are open."""
        ...

    async def push_message(
        self, network_id: str, recipient: str, message: SignalMessage, sender_key: PublicKey
    ) -> int | None:
        """Queue ``message`` for ``recipient``; return its queue length, or ``None`` if the recipient
        does not exist. Raises :class:`NameTakenError` if ``message.sender`` is not a live name of
        ``sender_key``, :class:`QueueFullError`, :class:`StoreFullError`."""
        ...

    async def pop_messages(
        self, network_id: str, name: str, owner: PublicKey, *, wait: bool
    ) -> tuple[SignalMessage, ...] | None:
        """Take every queued message of ``name`` (``None`` if ``name`` does not exist); with ``wait``,
        block until there is at least one. Raises :class:`NameTakenError` if another key holds
        ``name``, :class:`StoreFullError` when too many waits are open."""
        ...

    async def remember_nonce(self, nonce: bytes, lifetime: float) -> bool:
        """Remember ``nonce`` for at least ``lifetime`` seconds; ``False`` if it was already known.
        Raises :class:`StoreFullError` when the nonce memory is full."""
        ...

    def stats(self) -> StoreStats:
        """Return the current gauges."""
        ...


class _PrefixIndex:
    """Disjoint address ranges of one IP version in one network, sorted by start, with owners.

    Because stored ranges never overlap each other, their ends are sorted too, so the ranges that
    overlap ``[a, b]`` are found by bisecting for ``b`` and walking back while ``end >= a``.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.entries: list[tuple[int, int, str]] = []

    def conflicts(self, network: IPNetwork, owner: str) -> bool:
        first, last = address_span(network)
        index = bisect.bisect_right(self.starts, last) - 1
        while index >= 0 and self.entries[index][1] >= first:
            if self.entries[index][2] != owner:
                return True
            index -= 1
        return False

    def add(self, network: IPNetwork, owner: str) -> None:
        start, last = address_span(network)
        index = bisect.bisect_left(self.starts, start)
        self.starts.insert(index, start)
        self.entries.insert(index, (start, last, owner))

    def remove(self, network: IPNetwork) -> None:
        start = int(network.network_address)
        index = bisect.bisect_left(self.starts, start)
        if index < len(self.starts) and self.starts[index] == start:
            del self.starts[index]
            del self.entries[index]


@dataclass
class _Waitable:
    event: trio.Event = field(default_factory=trio.Event)
    users: int = 0


_Key = tuple[str, str]


class MemoryStore:
    """A :class:`Store` in this process's memory, bounded by :class:`StoreLimits`.

    ``clock`` gives Unix seconds (default ``time.time``; tests pass a fake). Operations never await
    between their check and their write, so each is atomic under Trio; waits sleep on a
    :class:`trio.Event` that the matching write sets (no polling). Expired records are removed lazily
    through a heap ordered by expiry, so memory follows the live population.
    """

    def __init__(self, limits: StoreLimits | None = None, *, clock: Clock = time.time) -> None:
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._peers: dict[_Key, StoredPeer] = {}
        self._expiry: list[tuple[float, str, str]] = []
        self._indexes: dict[tuple[str, int], _PrefixIndex] = {}
        self._revision = int(clock() * 1_000_000)
        self._peer_waits: dict[_Key, _Waitable] = {}
        self._members: dict[str, dict[str, None]] = {}  # network -> its names, for listings
        self._message_waits: dict[_Key, _Waitable] = {}
        self._waiters = 0
        self._queues: dict[_Key, collections.deque[tuple[float, SignalMessage]]] = {}
        self._queued = 0
        self._nonces: set[bytes] = set()
        self._old_nonces: set[bytes] = set()
        self._nonce_epoch = clock()

    # records

    async def put(
        self, network_id: str, name: str, request: RegisterRequest, ttl: float
    ) -> tuple[StoredPeer, bool]:
        """See :meth:`Store.put`."""
        now = self._expire()
        key = (network_id, name)
        old = self._peers.get(key)
        if old is not None and old.public_key != request.public_key:
            raise NameTakenError("name is registered to another key")
        if old is None and len(self._peers) >= self.limits.max_peers:
            raise StoreFullError("the hub holds its maximum number of peers")
        for network in request.allowed_ips:
            if self._index(network_id, network.version).conflicts(network, name):
                raise AllowedIPsConflictError(
                    f"allowed_ips: {network} overlaps another peer's allowed IPs"
                )
        changed = old is None or (old.endpoints, old.allowed_ips) != (
            request.endpoints,
            request.allowed_ips,
        )
        if changed:
            self._revision = max(self._revision + 1, int(now * 1_000_000))
        peer = StoredPeer(
            network_id,
            name,
            request.public_key,
            request.endpoints,
            request.allowed_ips,
            self._revision if changed or old is None else old.revision,
            now + ttl,
        )
        if old is not None:
            self._unindex(old)
        else:
            heapq.heappush(self._expiry, (peer.expires_at, network_id, name))
        for network in peer.allowed_ips:
            self._index(network_id, network.version).add(network, name)
        self._peers[key] = peer
        self._members.setdefault(network_id, {})[name] = None
        if changed:
            self._wake(self._peer_waits, key)
            self._wake(self._peer_waits, (network_id, ""))  # listings of the network
        return peer, old is None

    async def get(self, network_id: str, name: str) -> StoredPeer | None:
        """See :meth:`Store.get`."""
        self._expire()
        return self._peers.get((network_id, name))

    async def wait(self, network_id: str, name: str, since: int) -> StoredPeer:
        """See :meth:`Store.wait`."""
        key = (network_id, name)
        while True:
            self._expire()
            peer = self._peers.get(key)
            if peer is not None and peer.revision > since:
                return peer
            await self._sleep(self._peer_waits, key)

    async def delete(self, network_id: str, name: str, owner: PublicKey) -> bool:
        """See :meth:`Store.delete`."""
        self._expire()
        peer = self._peers.get((network_id, name))
        if peer is None:
            return False
        if peer.public_key != owner:
            raise NameTakenError("name is registered to another key")
        self._remove(peer)
        return True

    async def list_peers(self, network_id: str) -> tuple[StoredPeer, ...]:
        """See :meth:`Store.list_peers`."""
        self._expire()
        names = self._members.get(network_id, {})
        return tuple(self._peers[network_id, name] for name in names)

    async def wait_listing(self, network_id: str, since: str) -> tuple[StoredPeer, ...]:
        """See :meth:`Store.wait_listing`; wakes on writes, and at the first expiry."""
        while True:
            peers = await self.list_peers(network_id)
            if listing_tag((p.name, p.revision) for p in peers) != since:
                return peers
            first = min((p.expires_at for p in peers), default=math.inf)
            with trio.move_on_after(max(0.0, first - self._clock()) + _EXPIRY_SLACK):
                await self._sleep(self._peer_waits, (network_id, ""))

    # signalling messages

    async def push_message(
        self, network_id: str, recipient: str, message: SignalMessage, sender_key: PublicKey
    ) -> int | None:
        """See :meth:`Store.push_message`."""
        now = self._expire()
        sender = self._peers.get((network_id, message.sender))
        if sender is None or sender.public_key != sender_key:
            raise NameTakenError("from must be a name registered to the signing key")
        key = (network_id, recipient)
        if key not in self._peers:
            return None
        queue = self._queues.setdefault(key, collections.deque())
        self._drop_stale(queue, now)
        if len(queue) >= self.limits.max_queued_per_peer:
            raise QueueFullError("the recipient's message queue is full")
        if self._queued >= self.limits.max_queued:
            raise StoreFullError("the hub holds its maximum number of messages")
        queue.append((now + self.limits.message_ttl, message))
        self._queued += 1
        self._wake(self._message_waits, key)
        return len(queue)

    async def pop_messages(
        self, network_id: str, name: str, owner: PublicKey, *, wait: bool
    ) -> tuple[SignalMessage, ...] | None:
        """See :meth:`Store.pop_messages`."""
        key = (network_id, name)
        while True:
            now = self._expire()
            peer = self._peers.get(key)
            if peer is None:
                return None
            if peer.public_key != owner:
                raise NameTakenError("name is registered to another key")
            queue = self._queues.pop(key, None)
            if queue is not None:
                self._queued -= len(queue)
                messages = tuple(m for expires, m in queue if expires > now)
                if messages or not wait:
                    return messages
            elif not wait:
                return ()
            await self._sleep(self._message_waits, key)

    # replay protection

    async def remember_nonce(self, nonce: bytes, lifetime: float) -> bool:
        """See :meth:`Store.remember_nonce`.

        Two generations of nonces rotate every ``lifetime`` seconds, so a nonce is remembered for
        between ``lifetime`` and twice that.
        """
        now = self._clock()
        if now - self._nonce_epoch >= lifetime:
            young = now - self._nonce_epoch < 2 * lifetime
            self._old_nonces = self._nonces if young else set()
            self._nonces = set()
            self._nonce_epoch = now
        if nonce in self._nonces or nonce in self._old_nonces:
            return False
        if len(self._nonces) + len(self._old_nonces) >= self.limits.max_nonces:
            raise StoreFullError("the hub is busy; retry later")
        self._nonces.add(nonce)
        return True

    def stats(self) -> StoreStats:
        """See :meth:`Store.stats`."""
        return StoreStats(len(self._peers), self._waiters, self._queued)

    # internals

    def _index(self, network_id: str, version: int) -> _PrefixIndex:
        index = self._indexes.get((network_id, version))
        if index is None:
            index = self._indexes[network_id, version] = _PrefixIndex()
        return index

    def _unindex(self, peer: StoredPeer) -> None:
        for network in peer.allowed_ips:
            key = (peer.network_id, network.version)
            index = self._indexes[key]
            index.remove(network)
            if not index.starts:
                del self._indexes[key]

    def _remove(self, peer: StoredPeer) -> None:
        key = (peer.network_id, peer.name)
        del self._peers[key]
        members = self._members[peer.network_id]
        del members[peer.name]
        if not members:
            del self._members[peer.network_id]
        self._wake(self._peer_waits, (peer.network_id, ""))
        self._unindex(peer)
        queue = self._queues.pop(key, None)
        if queue is not None:
            self._queued -= len(queue)

    def _expire(self) -> float:
        """Drop every record whose expiry has passed; return the clock's current reading."""
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, network_id, name = heapq.heappop(self._expiry)
            peer = self._peers.get((network_id, name))
            if peer is None:
                continue
            if peer.expires_at <= now:
                self._remove(peer)
            else:
                # Refreshed since this entry was pushed: one heap entry per record, re-armed.
                heapq.heappush(self._expiry, (peer.expires_at, network_id, name))
        return now

    def _drop_stale(
        self, queue: collections.deque[tuple[float, SignalMessage]], now: float
    ) -> None:
        while queue and queue[0][0] <= now:
            queue.popleft()
            self._queued -= 1

    async def _sleep(self, waits: dict[_Key, _Waitable], key: _Key) -> None:
        if self._waiters >= self.limits.max_waiters:
            raise StoreFullError("the hub holds its maximum number of open waits")
        waitable = waits.get(key)
        if waitable is None:
            waitable = waits[key] = _Waitable()
        waitable.users += 1
        self._waiters += 1
        try:
            await waitable.event.wait()
        finally:
            self._waiters -= 1
            waitable.users -= 1
            if waitable.users == 0 and waits.get(key) is waitable:
                del waits[key]

    @staticmethod
    def _wake(waits: dict[_Key, _Waitable], key: _Key) -> None:
        waitable = waits.pop(key, None)
        if waitable is not None:
            waitable.event.set()
