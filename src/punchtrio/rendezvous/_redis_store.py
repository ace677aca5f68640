"""A :class:`~punchtrio.rendezvous.Store` in Redis, so several hub replicas serve one population.

Every write is one Lua script (atomic in Redis): create-or-refresh-if-owner with the allowed-IP
overlap check, delete-if-owner, append-if-room, take-all. Expiry is handled by the scripts (a sorted
set of expiry times is purged at the start of each), so a record and its allowed-IP index entries
always disappear together. Writes publish a wake-up on one channel; each replica runs one listener
thread that sets the matching local Trio events, so long polls never poll.

redis-py's client is synchronous here (its asyncio client does not run under Trio): commands run in
Trio worker threads. Install the ``redis`` extra to use it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..keys import PublicKey
from ._models import (
    Endpoint,
    EndpointType,
    IPNetwork,
    RegisterRequest,
    SignalMessage,
    address_span,
    parse_allowed_ip,
)
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

# KEYS: record, expiry zset, revision counter, v4 index, v6 index.
# ARGV: now, expires_at, key, content json, max_peers, record-key prefix, name, ranges...
# A range is "version|start_hex|end_hex" with fixed-width hex, so lexicographic order is numeric.
_PUT = """
local now = tonumber(ARGV[1])
local prefix = ARGV[6]
local name = ARGV[7]
local function purge()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for _, member in ipairs(expired) do
    local raw = redis.call('GET', prefix .. member)
    if raw then
      local rec = cjson.decode(raw)
      for _, r in ipairs(rec.ranges) do
        redis.call('ZREM', rec.net .. ':ip' .. string.sub(r, 1, 1), string.sub(r, 3) .. '|' .. member)
      end
      redis.call('DEL', prefix .. member, prefix .. member .. ':q')
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
purge()
local old = redis.call('GET', KEYS[1])
if old then
  old = cjson.decode(old)
  if old.key ~= ARGV[3] then return {'taken'} end
elseif redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  return {'full'}
end
local member = string.sub(KEYS[1], string.len(prefix) + 1)
for i = 8, #ARGV do
  local r = ARGV[i]
  local index = (string.sub(r, 1, 1) == '4') and KEYS[4] or KEYS[5]
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
local changed = (not old) or old.content ~= ARGV[4]
if changed then
  local floor = math.floor(now * 1000000)
  if redis.call('INCR', KEYS[3]) < floor then
    redis.call('SET', KEYS[3], string.format('%.0f', floor))
  end
  revision = redis.call('GET', KEYS[3])
end
if old then
  for _, r in ipairs(old.ranges) do
    local index = (string.sub(r, 1, 1) == '4') and KEYS[4] or KEYS[5]
    redis.call('ZREM', index, string.sub(r, 3) .. '|' .. member)
  end
end
local ranges = {}
for i = 8, #ARGV do
  local r = ARGV[i]
  local index = (string.sub(r, 1, 1) == '4') and KEYS[4] or KEYS[5]
  redis.call('ZADD', index, 0, string.sub(r, 3) .. '|' .. member)
  table.insert(ranges, r)
end
local net = string.sub(KEYS[4], 1, string.len(KEYS[4]) - 4)
local rec = {key = ARGV[3], content = ARGV[4], revision = revision, expires_at = ARGV[2],
             ranges = ranges, net = net}
redis.call('SET', KEYS[1], cjson.encode(rec))
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), member)
return {old and 'refreshed' or 'created', revision, tostring(redis.call('ZCARD', KEYS[2])),
        changed and 'changed' or 'same'}
"""

# KEYS: record, expiry zset.  ARGV: now, record-key prefix.  Returns the record JSON or nil.
_GET = """
local now = tonumber(ARGV[1])
local member = string.sub(KEYS[1], string.len(ARGV[2]) + 1)
local score = redis.call('ZSCORE', KEYS[2], member)
if (not score) or tonumber(score) <= now then return false end
return redis.call('GET', KEYS[1])
"""

# KEYS: record, expiry zset, queue.  ARGV: now, prefix, owner key.
_DELETE = """
local now = tonumber(ARGV[1])
local member = string.sub(KEYS[1], string.len(ARGV[2]) + 1)
local score = redis.call('ZSCORE', KEYS[2], member)
local raw = redis.call('GET', KEYS[1])
if (not raw) or (not score) or tonumber(score) <= now then return 'missing' end
local rec = cjson.decode(raw)
if rec.key ~= ARGV[3] then return 'taken' end
for _, r in ipairs(rec.ranges) do
  redis.call('ZREM', rec.net .. ':ip' .. string.sub(r, 1, 1), string.sub(r, 3) .. '|' .. member)
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], member)
return 'deleted'
"""

# KEYS: sender record, recipient record, expiry zset, recipient queue.
# ARGV: now, prefix, sender key, message json, per-peer limit, message expiry.
_PUSH = """
local now = tonumber(ARGV[1])
local function live(key)
  local member = string.sub(key, string.len(ARGV[2]) + 1)
  local score = redis.call('ZSCORE', KEYS[3], member)
  if (not score) or tonumber(score) <= now then return nil end
  local raw = redis.call('GET', key)
  return raw and cjson.decode(raw)
end
local sender = live(KEYS[1])
if (not sender) or sender.key ~= ARGV[3] then return {'taken'} end
if not live(KEYS[2]) then return {'missing'} end
while true do
  local head = redis.call('LINDEX', KEYS[4], 0)
  if (not head) or tonumber(string.match(head, '^([%d.]+) ')) > now then break end
  redis.call('LPOP', KEYS[4])
end
if redis.call('LLEN', KEYS[4]) >= tonumber(ARGV[5]) then return {'full'} end
local length = redis.call('RPUSH', KEYS[4], ARGV[6] .. ' ' .. ARGV[4])
return {'queued', tostring(length)}
"""

# KEYS: record, expiry zset, queue.  ARGV: now, prefix, owner key.
_POP = """
local now = tonumber(ARGV[1])
local member = string.sub(KEYS[1], string.len(ARGV[2]) + 1)
local score = redis.call('ZSCORE', KEYS[2], member)
local raw = redis.call('GET', KEYS[1])
if (not raw) or (not score) or tonumber(score) <= now then return {'missing'} end
if cjson.decode(raw).key ~= ARGV[3] then return {'taken'} end
local items = redis.call('LRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[3])
local result = {'ok'}
for _, item in ipairs(items) do
  local expires, body = string.match(item, '^([%d.]+) (.*)$')
  if tonumber(expires) > now then table.insert(result, body) end
end
return result
"""


def _range_text(network: IPNetwork) -> str:
    width = 8 if network.version == 4 else 32
    start, end = address_span(network)
    first, last = format(start, f"0{width}x"), format(end, f"0{width}x")
    return f"{network.version}|{first}|{last}"


class RedisStore:
    """A :class:`Store` in a Redis server at ``url`` (``redis://host:port/db``), shared by replicas.

    ``prefix`` namespaces every key; ``limits`` as for :class:`MemoryStore` except ``max_queued``
    and ``max_nonces``, which Redis's own ``maxmemory`` bounds instead. Call
    ``await nursery.start(store.run)`` before serving: it runs the wake-up listener. Redis errors
    propagate as :class:`StoreError`.
    """

    def __init__(
        self,
        url: str,
        limits: StoreLimits | None = None,
        *,
        prefix: str = "punchtrio",
        clock: Clock = time.time,
    ) -> None:
        import redis

        self.limits = limits or StoreLimits()
        self._redis = redis.Redis.from_url(url, socket_timeout=10)
        self._prefix = prefix
        self._clock = clock
        self._channel = f"{prefix}:wake"
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in (
                ("put", _PUT),
                ("get", _GET),
                ("delete", _DELETE),
                ("push", _PUSH),
                ("pop", _POP),
            )
        }
        self._events: dict[str, tuple[trio.Event, list[int]]] = {}
        self._waiters = 0
        self._peers = 0
        self._stop = threading.Event()

    # keys

    def _record_key(self, network_id: str, name: str) -> str:
        return f"{self._prefix}:r:{network_id}:{name}"

    def _common(self, network_id: str) -> tuple[str, str, str, str]:
        net = f"{self._prefix}:n:{network_id}"
        return f"{self._prefix}:expiry", f"{self._prefix}:revision", f"{net}:ip4", f"{net}:ip6"

    async def _script(self, name: str, keys: list[str], args: Sequence[str | int | float]) -> Any:
        script = self._scripts[name]
        return await self._call(lambda: script(keys=keys, args=args))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        import redis

        try:
            return await trio.to_thread.run_sync(fn)
        except redis.RedisError as exc:
            raise StoreError(f"the hub's store is unavailable: {exc}") from None

    # Store protocol

    async def put(
        self, network_id: str, name: str, request: RegisterRequest, ttl: float
    ) -> tuple[StoredPeer, bool]:
        """See :meth:`Store.put`."""
        now = self._clock()
        expiry, revision_key, ip4, ip6 = self._common(network_id)
        content = json.dumps(
            [[e.type.value, e.address] for e in request.endpoints]
            + [str(n) for n in request.allowed_ips]
        )
        args: list[str | int | float] = [
            repr(now),
            repr(now + ttl),
            request.public_key.to_base64(),
            content,
            self.limits.max_peers,
            f"{self._prefix}:r:",
            name,
            *(_range_text(n) for n in request.allowed_ips),
        ]
        keys = [self._record_key(network_id, name), expiry, revision_key, ip4, ip6]
        result = await self._script("put", keys, args)
        outcome = result[0].decode()
        if outcome == "taken":
            raise NameTakenError("name is registered to another key")
        if outcome == "full":
            raise StoreFullError("the hub holds its maximum number of peers")
        if outcome == "overlap":
            raise AllowedIPsConflictError("allowed_ips overlap another peer's allowed IPs")
        self._peers = int(result[2])
        peer = StoredPeer(
            network_id,
            name,
            request.public_key,
            request.endpoints,
            request.allowed_ips,
            int(result[1]),
            now + ttl,
        )
        if result[3] == b"changed":
            await self._publish(network_id, name)
        return peer, outcome == "created"

    async def get(self, network_id: str, name: str) -> StoredPeer | None:
        """See :meth:`Store.get`."""
        expiry = self._common(network_id)[0]
        keys = [self._record_key(network_id, name), expiry]
        args = [repr(self._clock()), f"{self._prefix}:r:"]
        raw = await self._script("get", keys, args)
        if raw is None:
            return None
        record = json.loads(raw)
        content = json.loads(record["content"])
        endpoints = tuple(
            Endpoint.parse(item[1], EndpointType(item[0]))
            for item in content
            if isinstance(item, list)
        )
        allowed = tuple(parse_allowed_ip(item) for item in content if isinstance(item, str))
        return StoredPeer(
            network_id,
            name,
            PublicKey.from_base64(record["key"]),
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
        expiry = self._common(network_id)[0]
        record = self._record_key(network_id, name)
        keys = [record, expiry, f"{record}:q"]
        args = [repr(self._clock()), f"{self._prefix}:r:", owner.to_base64()]
        outcome = (await self._script("delete", keys, args)).decode()
        if outcome == "taken":
            raise NameTakenError("name is registered to another key")
        return bool(outcome == "deleted")

    async def push_message(
        self, network_id: str, recipient: str, message: SignalMessage, sender_key: PublicKey
    ) -> int | None:
        """See :meth:`Store.push_message`."""
        now = self._clock()
        expiry = self._common(network_id)[0]
        target = self._record_key(network_id, recipient)
        keys = [self._record_key(network_id, message.sender), target, expiry, f"{target}:q"]
        args: list[str | int | float] = [
            repr(now),
            f"{self._prefix}:r:",
            sender_key.to_base64(),
            json.dumps(message.to_json()),
            self.limits.max_queued_per_peer,
            repr(now + self.limits.message_ttl),
        ]
        result = await self._script("push", keys, args)
        outcome = result[0].decode()
        if outcome == "taken":
            raise NameTakenError("from must be a name registered to the signing key")
        if outcome == "missing":
            return None
        if outcome == "full":
            raise QueueFullError("the recipient's message queue is full")
        await self._publish(network_id, recipient, kind="m")
        return int(result[1])

    async def pop_messages(
        self, network_id: str, name: str, owner: PublicKey, *, wait: bool
    ) -> tuple[SignalMessage, ...] | None:
        """See :meth:`Store.pop_messages`."""
        expiry = self._common(network_id)[0]
        record = self._record_key(network_id, name)
        keys = [record, expiry, f"{record}:q"]
        while True:
            with self._waiting(f"m|{network_id}|{name}") as event:
                args = [repr(self._clock()), f"{self._prefix}:r:", owner.to_base64()]
                result = await self._script("pop", keys, args)
                outcome = result[0].decode()
                if outcome == "missing":
                    return None
                if outcome == "taken":
                    raise NameTakenError("name is registered to another key")
                messages = tuple(SignalMessage.from_json(json.loads(m)) for m in result[1:])
                if messages or not wait:
                    return messages
                await event.wait()

    async def remember_nonce(self, nonce: bytes, lifetime: float) -> bool:
        """See :meth:`Store.remember_nonce` (``SET NX`` with an expiry)."""
        key = f"{self._prefix}:nonce:{nonce.hex()}"
        milliseconds = max(1, int(lifetime * 1000))
        return bool(await self._call(lambda: self._redis.set(key, b"", nx=True, px=milliseconds)))

    def stats(self) -> StoreStats:
        """Peers as of this replica's last write, and this replica's open waits."""
        return StoreStats(self._peers, self._waiters, 0)

    # wake-ups

    async def _publish(self, network_id: str, name: str, *, kind: str = "p") -> None:
        channel, text = self._channel, f"{kind}|{network_id}|{name}"
        await self._call(lambda: self._redis.publish(channel, text))

    def _waiting(self, key: str) -> _Waiting:
        if self._waiters >= self.limits.max_waiters:
            raise StoreFullError("the hub holds its maximum number of open waits")
        return _Waiting(self, key)

    def _wake(self, key: str) -> None:
        entry = self._events.pop(key, None)
        if entry is not None:
            entry[0].set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for wake-ups from every replica until cancelled (start it before serving)."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        await self._call(lambda: pubsub.subscribe(self._channel))
        token = trio.lowlevel.current_trio_token()
        self._stop.clear()

        def listen() -> None:
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=0.5)
                if message is not None and message["type"] == "message":
                    key = message["data"].decode("utf-8", "replace")
                    try:
                        trio.from_thread.run_sync(self._wake, key, trio_token=token)
                    except trio.RunFinishedError:
                        return

        task_status.started()
        try:
            await trio.to_thread.run_sync(listen, abandon_on_cancel=True)
        finally:
            self._stop.set()

    def close(self) -> None:
        """Stop the listener thread and close the connection pool."""
        self._stop.set()
        self._redis.close()


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
