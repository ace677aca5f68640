"""A :class:`~punchtrio.rendezvous.Store` in Redis, so several hub replicas serve one population.

Every write is one Lua script (atomic in Redis): create-or-refresh-if-owner with the allowed-IP
overlap check, delete-if-owner, append-if-room, take-all, remember-nonce-if-absent-and-room. Expiry
is handled by the scripts (a sorted set of expiry times per network is purged at the start of each
write), so a record, its allowed-IP index entries and its queued messages always disappear
together. Writes publish a wake-up on one channel; each replica runs one listener task that sets
the matching local Trio events, so long polls never poll.

Key layout (docs/deploy-hub.md, "More than one process"): everything one request touches lives in
one Redis Cluster hash slot. A network's keys carry the hash tag ``{n:<network id>}``
(``punchtrio:{n:}:r:alice`` on an open hub); the replay cache is one sorted set tagged
``{nonces}``. So ``max_peers`` and ``max_queued`` bound each network (a script may touch one slot
only), and ``max_nonces`` bounds the whole hub.

Commands go through a small Redis client on Trio streams (:mod:`._resp`), in the hub's own loop:
redis-py's asyncio client does not run under Trio, and its synchronous client would cost a hop to
a worker thread and back per command. While :meth:`RedisStore.run` runs, they share one pipelined
connection (the client's :meth:`~._resp.RespClient.run`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import trio

from ..keys import PublicKey
from ._listing import listing_tag
from ._models import (
    Endpoint,
    EndpointType,
    IPNetwork,
    RegisterRequest,
    SignalMessage,
    address_span,
    parse_allowed_ip,
)
from ._resp import RespClient, RespError, Subscription
from ._store import (
    AllowedIPsConflictError,
    Clock,
    NameTakenError,
    QueueFullError,
    StoredPeer,
    StoreError,
    StoreFullError,
    StoreLimits,
    StoreStats,
)

_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 5.0
"""Seconds between attempts to subscribe again after the wake-up subscription was lost."""

_EXPIRY_SLACK = 0.001
"""Seconds a listing wait sleeps past the first expiry, so the record is gone when it looks."""

# Every network script gets the network's keys first, in this order:
# KEYS[1] expiry zset (member: name, score: expiry), KEYS[2] revision counter, KEYS[3] v4 index,
# KEYS[4] v6 index, KEYS[5] count of queued messages; ARGV[1] now, ARGV[2] the network's key base
# ("punchtrio:{n:NET}:"), under which "r:NAME" is a record and "q:NAME" its message queue.
# A range is "version|start_hex|end_hex" with fixed-width hex, so lexicographic order is numeric.
_NETWORK = """
local now = tonumber(ARGV[1])
local base = ARGV[2]
local function unindex(rec, member)
  for _, r in ipairs(rec.ranges) do
    local index = (string.sub(r, 1, 1) == '4') and KEYS[3] or KEYS[4]
    redis.call('ZREM', index, string.sub(r, 3) .. '|' .. member)
  end
end
local function drop_queue(member)
  local queue = base .. 'q:' .. member
  local length = redis.call('LLEN', queue)
  if length > 0 then
    redis.call('DECRBY', KEYS[5], length)
    redis.call('DEL', queue)
  end
end
local function purge()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 512)
  for _, member in ipairs(expired) do
    local raw = redis.call('GET', base .. 'r:' .. member)
    if raw then
      unindex(cjson.decode(raw), member)
      redis.call('DEL', base .. 'r:' .. member)
    end
    drop_queue(member)
    redis.call('ZREM', KEYS[1], member)
  end
end
local function live(member)
  local score = redis.call('ZSCORE', KEYS[1], member)
  if (not score) or tonumber(score) <= now then return nil end
  local raw = redis.call('GET', base .. 'r:' .. member)
  return raw and cjson.decode(raw)
end
"""

# ARGV: 3 expires_at, 4 key, 5 content json, 6 max_peers, 7 name, 8 wake-up channel, 9 wake-up,
# 10... ranges. A change publishes the wake-up (here, not in a second round trip).
_PUT = (
    _NETWORK
    + """
purge()
local member = ARGV[7]
local record = base .. 'r:' .. member
local old = redis.call('GET', record)
if old then
  old = cjson.decode(old)
  if old.key ~= ARGV[4] then return {'taken'} end
elseif redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[6]) then
  return {'full'}
end
for i = 10, #ARGV do
  local r = ARGV[i]
  local index = (string.sub(r, 1, 1) == '4') and KEYS[3] or KEYS[4]
  local first, last = string.match(string.sub(r, 3), '^(%x+)|(%x+)$')
  local found = redis.call('ZREVRANGEBYLEX', index, '[' .. last .. '}', '-', 'LIMIT', 0, 66)
  for _, entry in ipairs(found) do
    local s, e, owner = string.match(entry, '^(%x+)|(%x+)|(.+)$')
    if e < first then break end
    if owner ~= member then return {'overlap', r} end
  end
end
-- Revisions are kept as decimal strings: Lua's number formatting would round them.
local revision = old and old.revision or '0'
local changed = (not old) or old.content ~= ARGV[5]
if changed then
  local floor = math.floor(now * 1000000)
  if redis.call('INCR', KEYS[2]) < floor then
    redis.call('SET', KEYS[2], string.format('%.0f', floor))
  end
  revision = redis.call('GET', KEYS[2])
end
if old then unindex(old, member) end
local ranges = {}
for i = 10, #ARGV do
  local r = ARGV[i]
  local index = (string.sub(r, 1, 1) == '4') and KEYS[3] or KEYS[4]
  redis.call('ZADD', index, 0, string.sub(r, 3) .. '|' .. member)
  table.insert(ranges, r)
end
local rec = {key = ARGV[4], content = ARGV[5], revision = revision, expires_at = ARGV[3],
             ranges = ranges}
redis.call('SET', record, cjson.encode(rec))
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), member)
if changed then redis.call('PUBLISH', ARGV[8], ARGV[9]) end
return {old and 'refreshed' or 'created', revision, tostring(redis.call('ZCARD', KEYS[1])),
        changed and 'changed' or 'same'}
"""
)

# KEYS: expiry zset, record.  ARGV: now, name.  Returns the record JSON or nil.
_GET = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if (not score) or tonumber(score) <= tonumber(ARGV[1]) then return false end
return redis.call('GET', KEYS[2])
"""

# KEYS: expiry zset.  ARGV: now, the network's key base.  Returns name, record JSON, name, ...
_LIST = """
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')
local result = {}
for _, name in ipairs(names) do
  local raw = redis.call('GET', ARGV[2] .. 'r:' .. name)
  if raw then
    table.insert(result, name)
    table.insert(result, raw)
  end
end
return result
"""

# ARGV: 3 name, 4 owner key, 5 wake-up channel, 6 wake-up.
_DELETE = (
    _NETWORK
    + """
local member = ARGV[3]
local rec = live(member)
if not rec then return 'missing' end
if rec.key ~= ARGV[4] then return 'taken' end
unindex(rec, member)
drop_queue(member)
redis.call('DEL', base .. 'r:' .. member)
redis.call('ZREM', KEYS[1], member)
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 'deleted'
"""
)

# ARGV: 3 sender name, 4 sender key, 5 recipient name, 6 message json, 7 per-peer limit,
# 8 message expiry, 9 limit of queued messages in the network, 10 wake-up channel, 11 wake-up.
_PUSH = (
    _NETWORK
    + """
purge()
local sender = live(ARGV[3])
if (not sender) or sender.key ~= ARGV[4] then return {'taken'} end
if not live(ARGV[5]) then return {'missing'} end
local queue = base .. 'q:' .. ARGV[5]
while true do
  local head = redis.call('LINDEX', queue, 0)
  if (not head) or tonumber(string.match(head, '^([%d.]+) ')) > now then break end
  redis.call('LPOP', queue)
  redis.call('DECR', KEYS[5])
end
if redis.call('LLEN', queue) >= tonumber(ARGV[7]) then return {'full'} end
if tonumber(redis.call('GET', KEYS[5]) or '0') >= tonumber(ARGV[9]) then return {'busy'} end
local length = redis.call('RPUSH', queue, ARGV[8] .. ' ' .. ARGV[6])
local queued = redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[10], ARGV[11])
return {'queued', tostring(length), tostring(queued)}
"""
)

# ARGV: 3 name, 4 owner key.
_POP = (
    _NETWORK
    + """
local member = ARGV[3]
local rec = live(member)
if not rec then return {'missing'} end
if rec.key ~= ARGV[4] then return {'taken'} end
local queue = base .. 'q:' .. member
local items = redis.call('LRANGE', queue, 0, -1)
drop_queue(member)
local result = {'ok', tostring(redis.call('GET', KEYS[5]) or '0')}
for _, item in ipairs(items) do
  local expires, body = string.match(item, '^([%d.]+) (.*)$')
  if tonumber(expires) > now then table.insert(result, body) end
end
return result
"""
)

# KEYS: the replay cache (zset, member: nonce, score: expiry).  ARGV: now, nonce, expiry, limit.
# Returns 1 (remembered), 0 (known: a replay) or -1 (the cache is full).
_NONCE = """
local now = tonumber(ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if score and tonumber(score) > now then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[2])
return 1
"""


@functools.lru_cache(maxsize=65536)
def _content(
    key: str, content: str
) -> tuple[PublicKey, tuple[Endpoint, ...], tuple[IPNetwork, ...]]:
    """Parse a stored record's key and content once: lookups and refreshes of a record return the
    same text until it changes, and parsing addresses is most of a lookup's cost."""
    items = json.loads(content)
    endpoints = tuple(
        Endpoint.parse(item[1], EndpointType(item[0])) for item in items if isinstance(item, list)
    )
    allowed = tuple(parse_allowed_ip(item) for item in items if isinstance(item, str))
    return PublicKey.from_base64(key), endpoints, allowed


def _range_text(network: IPNetwork) -> str:
    width = 8 if network.version == 4 else 32
    start, end = address_span(network)
    first, last = format(start, f"0{width}x"), format(end, f"0{width}x")
    return f"{network.version}|{first}|{last}"


class RedisStore:
    """A :class:`Store` in a Redis server at ``url`` (``redis://host:port/db``), shared by replicas.

    ``prefix`` namespaces every key. ``limits`` as for :class:`MemoryStore`, enforced across every
    replica of the store: ``max_peers`` and ``max_queued`` per network (each network's keys share
    one Redis Cluster hash slot), ``max_queued_per_peer``, ``message_ttl`` and ``max_nonces``
    (the replay cache of the whole hub) as documented there; ``max_waiters`` counts this replica's
    open waits. Call ``await nursery.start(store.run)`` before serving: it runs the wake-up
    listener. Redis errors propagate as :class:`StoreError`.
    """

    def __init__(
        self,
        url: str,
        limits: StoreLimits | None = None,
        *,
        prefix: str = "punchtrio",
        clock: Clock = time.time,
    ) -> None:
        self.limits = limits or StoreLimits()
        try:
            self._client = RespClient(url, timeout=10.0)
        except RespError as exc:
            raise StoreError(str(exc)) from None
        self._prefix = prefix
        self._clock = clock
        self._channel = f"{prefix}:wake"
        self._nonces = f"{prefix}:{{nonces}}"
        self._scripts = {
            "put": _PUT,
            "get": _GET,
            "list": _LIST,
            "delete": _DELETE,
            "push": _PUSH,
            "pop": _POP,
            "nonce": _NONCE,
        }
        self._events: dict[str, tuple[trio.Event, list[int]]] = {}
        self._waiters = 0
        self._peers: dict[str, int] = {}
        self._queued: dict[str, int] = {}

    # keys

    def _base(self, network_id: str) -> str:
        """The prefix of every key of ``network_id``: its hash tag keeps them in one slot."""
        return f"{self._prefix}:{{n:{network_id}}}:"

    def _network_keys(self, network_id: str) -> list[str]:
        base = self._base(network_id)
        return [f"{base}{part}" for part in ("expiry", "revision", "ip4", "ip6", "queued")]

    async def _script(
        self, name: str, keys: list[str], args: Sequence[str | bytes | int | float]
    ) -> Any:
        try:
            return await self._client.script(self._scripts[name], keys, list(args))
        except RespError as exc:
            raise StoreError(f"the hub's store is unavailable: {exc}") from None

    # Store protocol

    async def put(
        self, network_id: str, name: str, request: RegisterRequest, ttl: float
    ) -> tuple[StoredPeer, bool]:
        """See :meth:`Store.put` (``max_peers`` counts the records of ``network_id``)."""
        now = self._clock()
        base = self._base(network_id)
        content = json.dumps(
            [[e.type.value, e.address] for e in request.endpoints]
            + [str(n) for n in request.allowed_ips]
        )
        args: list[str | int | float] = [
            repr(now),
            base,
            repr(now + ttl),
            request.public_key.to_base64(),
            content,
            self.limits.max_peers,
            name,
            self._channel,
            f"p|{network_id}|{name}",
            *(_range_text(n) for n in request.allowed_ips),
        ]
        keys = [*self._network_keys(network_id), f"{base}r:{name}"]
        result = await self._script("put", keys, args)
        outcome = result[0].decode()
        if outcome == "taken":
            raise NameTakenError("name is registered to another key")
        if outcome == "full":
            raise StoreFullError("the hub holds its maximum number of peers")
        if outcome == "overlap":
            raise AllowedIPsConflictError("allowed_ips overlap another peer's allowed IPs")
        self._peers[network_id] = int(result[2])
        peer = StoredPeer(
            network_id,
            name,
            request.public_key,
            request.endpoints,
            request.allowed_ips,
            int(result[1]),
            now + ttl,
        )
        return peer, outcome == "created"

    async def get(self, network_id: str, name: str) -> StoredPeer | None:
        """See :meth:`Store.get`."""
        base = self._base(network_id)
        keys = [f"{base}expiry", f"{base}r:{name}"]
        raw = await self._script("get", keys, [repr(self._clock()), name])
        return None if raw is None else self._parse(network_id, name, raw)

    @staticmethod
    def _parse(network_id: str, name: str, raw: bytes) -> StoredPeer:
        record = json.loads(raw)
        key, endpoints, allowed = _content(record["key"], record["content"])
        return StoredPeer(
            network_id,
            name,
            key,
            endpoints,
            allowed,
            int(record["revision"]),
            float(record["expires_at"]),
        )

    async def wait(self, network_id: str, name: str, since: int) -> StoredPeer:
        """See :meth:`Store.wait`."""
        while True:
            with self._waiting(f"p|{network_id}|{name}") as event:
                peer = await self.get(network_id, name)
                if peer is not None and peer.revision > since:
                    return peer
                await event.wait()

    async def delete(self, network_id: str, name: str, owner: PublicKey) -> bool:
        """See :meth:`Store.delete`."""
        args = [
            repr(self._clock()),
            self._base(network_id),
            name,
            owner.to_base64(),
            self._channel,
            f"p|{network_id}|{name}",
        ]
        outcome = (await self._script("delete", self._network_keys(network_id), args)).decode()
        if outcome == "taken":
            raise NameTakenError("name is registered to another key")
        return bool(outcome == "deleted")

    async def list_peers(self, network_id: str) -> tuple[StoredPeer, ...]:
        """See :meth:`Store.list_peers`."""
        base = self._base(network_id)
        result = await self._script("list", [f"{base}expiry"], [repr(self._clock()), base])
        return tuple(
            self._parse(network_id, result[i].decode(), result[i + 1])
            for i in range(0, len(result), 2)
        )

    async def wait_listing(self, network_id: str, since: str) -> tuple[StoredPeer, ...]:
        """See :meth:`Store.wait_listing`; wakes on any replica's writes, and at the first
        expiry."""
        while True:
            with self._waiting(f"l|{network_id}") as event:
                peers = await self.list_peers(network_id)
                if listing_tag((p.name, p.revision) for p in peers) != since:
                    return peers
                first = min((p.expires_at for p in peers), default=math.inf)
                with trio.move_on_after(max(0.0, first - self._clock()) + _EXPIRY_SLACK):
                    await event.wait()

    async def push_message(
        self, network_id: str, recipient: str, message: SignalMessage, sender_key: PublicKey
    ) -> int | None:
        """See :meth:`Store.push_message` (``max_queued`` counts the messages of ``network_id``)."""
        now = self._clock()
        args: list[str | int | float] = [
            repr(now),
            self._base(network_id),
            message.sender,
            sender_key.to_base64(),
            recipient,
            json.dumps(message.to_json()),
            self.limits.max_queued_per_peer,
            repr(now + self.limits.message_ttl),
            self.limits.max_queued,
            self._channel,
            f"m|{network_id}|{recipient}",
        ]
        result = await self._script("push", self._network_keys(network_id), args)
        outcome = result[0].decode()
        if outcome == "taken":
            raise NameTakenError("from must be a name registered to the signing key")
        if outcome == "missing":
            return None
        if outcome == "full":
            raise QueueFullError("the recipient's message queue is full")
        if outcome == "busy":
            raise StoreFullError("the hub holds its maximum number of messages")
        self._queued[network_id] = int(result[2])
        return int(result[1])

    async def pop_messages(
        self, network_id: str, name: str, owner: PublicKey, *, wait: bool
    ) -> tuple[SignalMessage, ...] | None:
        """See :meth:`Store.pop_messages`."""
        keys = self._network_keys(network_id)
        while True:
            with self._waiting(f"m|{network_id}|{name}") as event:
                args = [repr(self._clock()), self._base(network_id), name, owner.to_base64()]
                result = await self._script("pop", keys, args)
                outcome = result[0].decode()
                if outcome == "missing":
                    return None
                if outcome == "taken":
                    raise NameTakenError("name is registered to another key")
                self._queued[network_id] = int(result[1])
                messages = tuple(SignalMessage.from_json(json.loads(m)) for m in result[2:])
                if messages or not wait:
                    return messages
                await event.wait()

    async def remember_nonce(self, nonce: bytes, lifetime: float) -> bool:
        """See :meth:`Store.remember_nonce`: one sorted set for every replica, so a request seen
        by one is refused by all, and ``max_nonces`` bounds them together."""
        now = self._clock()
        args: list[str | bytes | int | float] = [
            repr(now),
            nonce,
            repr(now + lifetime),
            self.limits.max_nonces,
        ]
        outcome = int(await self._script("nonce", [self._nonces], args))
        if outcome < 0:
            raise StoreFullError("the hub is busy; retry later")
        return outcome == 1

    def stats(self) -> StoreStats:
        """Peers and queued messages as of this replica's last write in each network, and this
        replica's open waits."""
        return StoreStats(sum(self._peers.values()), self._waiters, sum(self._queued.values()))

    # wake-ups

    def _waiting(self, key: str) -> _Waiting:
        if self._waiters >= self.limits.max_waiters:
            raise StoreFullError("the hub holds its maximum number of open waits")
        return _Waiting(self, key)

    def _wake(self, key: str) -> None:
        keys = [key]
        if key.startswith("p|"):  # a record changed: listings of its network too
            keys.append("l|" + key[2:].rpartition("|")[0])
        for each in keys:
            entry = self._events.pop(each, None)
            if entry is not None:
                entry[0].set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for wake-ups from every replica until cancelled (start it before serving), and
        carry the store's commands on one pipelined connection meanwhile.

        Raises :class:`StoreError` if Redis cannot be reached at the start. A subscription lost
        later is opened again (after 0.1 s, doubling to 5 s while it fails); each loss and each
        reconnection wakes every open wait here, so none misses what was published meanwhile.
        """
        try:
            subscription = await self._client.subscribe(self._channel)
        except RespError as exc:
            raise StoreError(f"the hub's store is unavailable: {exc}") from None
        async with trio.open_nursery() as nursery:
            await nursery.start(self._client.run)
            task_status.started()
            await self._listen(subscription)

    async def _listen(self, subscription: Subscription) -> None:
        backoff = _FIRST_BACKOFF
        try:
            while True:
                try:
                    data = await subscription.receive()
                except RespError:
                    subscription.close()
                    self._wake_all()
                    while True:
                        await trio.sleep(backoff)
                        backoff = min(2 * backoff, _MAX_BACKOFF)
                        try:
                            subscription = await self._client.subscribe(self._channel)
                        except RespError:
                            continue
                        break
                    backoff = _FIRST_BACKOFF
                    self._wake_all()
                    continue
                self._wake(data.decode("utf-8", "replace"))
        finally:
            subscription.close()

    def _wake_all(self) -> None:
        for event, _ in list(self._events.values()):
            event.set()
        self._events.clear()

    def close(self) -> None:
        """Close the idle connections to Redis (the listener closes its own when cancelled)."""
        self._client.close()


class _Waiting:
    """Registers interest in a key *before* reading Redis, so no wake-up is lost in between."""

    def __init__(self, store: RedisStore, key: str) -> None:
        self.store = store
        self.key = key

    def __enter__(self) -> trio.Event:
        entry = self.store._events.get(self.key)
        if entry is None:
            entry = self.store._events[self.key] = (trio.Event(), [0])
        entry[1][0] += 1
        self.entry = entry
        self.store._waiters += 1
        return entry[0]

    def __exit__(self, *exc: object) -> None:
        self.store._waiters -= 1
        self.entry[1][0] -= 1
        if self.entry[1][0] == 0 and self.store._events.get(self.key) is self.entry:
            del self.store._events[self.key]
