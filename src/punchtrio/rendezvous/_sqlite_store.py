"""A :class:`~punchtrio.rendezvous.Store` that survives restarts: memory for decisions, SQLite on disk.

:class:`SqliteStore` is a :class:`~punchtrio.rendezvous.MemoryStore` whose records (names bound to
keys, endpoints, allowed IPs, revisions, expiry times) are also written to one SQLite database in
WAL mode. Every decision is the memory store's (atomic under Trio, no disk read on any request);
a write that changes a record is acknowledged only once the record's new state is committed and
synced (``synchronous=FULL``). Commits run in a worker thread, and the writes that arrive while one
commit is in flight go together into the next transaction (group commit), so one fsync serves
many registrations. At start the live records are loaded back.

Signalling messages and request nonces stay in memory only: messages live a minute, and no nonce
from before a restart can matter because the hub refuses every request signed before it started
(see ``docs/security.md``).
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .._exceptions import PunchtrioError
from ..keys import PublicKey
from ._models import (
    Endpoint,
    EndpointType,
    RegisterRequest,
    parse_allowed_ip,
)
from ._store import Clock, MemoryStore, StoredPeer, StoreError, StoreLimits

log = logging.getLogger("punchtrio.rendezvous")

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the database layout this module reads and writes."""

SWEEP_INTERVAL = 60.0
"""Seconds between deletions of expired rows from the database (they are never loaded anyway)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    network_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    endpoints   TEXT NOT NULL,
    allowed_ips TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (network_id, name)
) WITHOUT ROWID;
"""

_Key = tuple[str, str]
_Row = tuple[str, str, str, str, str, int, float]


class StateOpenError(StoreError):
    """The state database cannot be opened or read: the message names the file and the cause."""


@dataclass
class _Batch:
    """Keys whose current state one transaction writes, and the event their writers wait on."""

    keys: dict[_Key, None] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


class SqliteStore(MemoryStore):
    """A :class:`Store` kept in memory and in the SQLite database ``path`` (created if missing).

    ``limits`` and ``clock`` (Unix seconds) as for :class:`MemoryStore`. One hub process owns a
    database at a time (the caller locks it; ``punchtrio hub --state-dir`` does). ``put`` and
    ``delete`` return once the change is durable; if the commit fails (a full disk), they raise
    :class:`StoreError` (the hub answers 503) and the change, already in effect in memory, is
    written again with the next commit. Opening reads every live record back (a blocking read,
    done once before serving). Raises :class:`StateOpenError` when the file cannot be opened, is not
    this store's database, or holds an invalid record. Call :meth:`close` when done.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        limits: StoreLimits | None = None,
        *,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(limits, clock=clock)
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except sqlite3.Error as exc:
            raise StateOpenError(f"cannot open the hub's state {self.path}: {exc}") from None
        try:
            self._prepare()
            self._load()
        except sqlite3.Error as exc:
            self._db.close()
            raise StateOpenError(f"cannot read the hub's state {self.path}: {exc}") from None
        except StateOpenError:
            self._db.close()
            raise
        self._pending = _Batch()
        self._unsaved: dict[_Key, None] = {}
        self._committing = False
        self._progress = trio.Event()
        self._swept_at = clock()
        self.commits = 0
        """Transactions committed since opening (a gauge for tests and benchmarks)."""

    # setup

    def _prepare(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if version not in (0, SCHEMA_VERSION) or (version == 0 and tables - {"records"}):
            raise StateOpenError(
                f"{self.path} is not a punchtrio hub state database (or a newer layout)"
            )
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateOpenError(f"{self.path}: the file system does not support WAL mode")
        # FULL: in WAL mode, every commit syncs the log, so an acknowledged write survives a power
        # loss too (NORMAL survives a crash of the process, not of the machine).
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _load(self) -> None:
        now = self._clock()
        self._db.execute("DELETE FROM records WHERE expires_at <= ?", (now,))
        rows = self._db.execute(
            "SELECT network_id, name, public_key, endpoints, allowed_ips, revision, expires_at "
            "FROM records"
        ).fetchall()
        for number, row in enumerate(rows, 1):
            try:
                peer = _peer_from_row(row)
            except (PunchtrioError, ValueError, TypeError, KeyError) as exc:
                raise StateOpenError(
                    f"{self.path}: record {number} ({row[1]!r}) is invalid: {exc}"
                ) from None
            self._restore(peer)

    def _restore(self, peer: StoredPeer) -> None:
        """Put a loaded record back into the memory structures (no checks: the database held a
        consistent state)."""
        key = (peer.network_id, peer.name)
        self._peers[key] = peer
        self._members.setdefault(peer.network_id, {})[peer.name] = None
        heapq.heappush(self._expiry, (peer.expires_at, peer.network_id, peer.name))
        for network in peer.allowed_ips:
            self._index(peer.network_id, network.version).add(network, peer.name)
        self._revision = max(self._revision, peer.revision)

    # writes: memory first, then durable before the answer

    async def put(
        self, network_id: str, name: str, request: RegisterRequest, ttl: float
    ) -> tuple[StoredPeer, bool]:
        """See :meth:`Store.put`; returns once the record is on disk. Raises :class:`StoreError`
        if it cannot be written."""
        peer, created = await super().put(network_id, name, request, ttl)
        await self._save((network_id, name))
        return peer, created

    async def delete(self, network_id: str, name: str, owner: PublicKey) -> bool:
        """See :meth:`Store.delete`; returns once the deletion is on disk. Raises
        :class:`StoreError` if it cannot be written."""
        deleted = await super().delete(network_id, name, owner)
        if deleted:
            await self._save((network_id, name))
        return deleted

    async def _save(self, key: _Key) -> None:
        """Wait until a transaction written after now holds ``key``'s current state.

        The first writer that finds no commit in flight commits the pending batch (in a worker
        thread); the others wait for it and the next one takes the batch gathered meanwhile.
        """
        batch = self._pending
        batch.keys[key] = None
        while not batch.done.is_set():
            if self._committing:
                await self._progress.wait()
                continue
            self._committing = True
            try:
                await self._commit(self._take_pending())
            finally:
                self._committing = False
                self._progress.set()
                self._progress = trio.Event()
        if batch.error is not None:
            raise StoreError(f"the hub could not save its state: {batch.error}")

    def _take_pending(self) -> _Batch:
        batch = self._pending
        self._pending = _Batch()
        for key in self._unsaved:
            batch.keys.setdefault(key, None)
        self._unsaved.clear()
        return batch

    async def _commit(self, batch: _Batch) -> None:
        """Write the current state of ``batch``'s keys in one transaction; always sets ``done``."""
        upserts: list[_Row] = []
        deletes: list[_Key] = []
        for key in batch.keys:
            peer = self._peers.get(key)
            if peer is None:
                deletes.append(key)
            else:
                upserts.append(_row_of(peer))
        now = self._clock()
        sweep = now - self._swept_at >= SWEEP_INTERVAL
        if sweep:
            self._swept_at = now
        try:
            await trio.to_thread.run_sync(self._write, upserts, deletes, now if sweep else None)
        except sqlite3.Error as exc:
            batch.error = str(exc) or type(exc).__name__
            self._unsaved.update(batch.keys)
            log.error("cannot write the hub's state to %s: %s", self.path, batch.error)
        else:
            self.commits += 1
        finally:
            batch.done.set()

    def _write(self, upserts: list[_Row], deletes: list[_Key], sweep_before: float | None) -> None:
        """One transaction (in a worker thread; only one runs at a time)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                upserts,
            )
            db.executemany("DELETE FROM records WHERE network_id = ? AND name = ?", deletes)
            if sweep_before is not None:
                db.execute("DELETE FROM records WHERE expires_at <= ?", (sweep_before,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database (every acknowledged write is already in it)."""
        self._db.close()


def _row_of(peer: StoredPeer) -> _Row:
    endpoints = json.dumps([[e.type.value, e.address] for e in peer.endpoints])
    allowed = json.dumps([str(n) for n in peer.allowed_ips])
    key = peer.public_key.to_base64()
    return (peer.network_id, peer.name, key, endpoints, allowed, peer.revision, peer.expires_at)


def _peer_from_row(row: tuple[object, ...]) -> StoredPeer:
    network_id, name, key, endpoints, allowed, revision, expires_at = row
    if not (isinstance(network_id, str) and isinstance(name, str) and isinstance(key, str)):
        raise TypeError("a text column holds another type")
    if not (isinstance(endpoints, str) and isinstance(allowed, str)):
        raise TypeError("a list column is not JSON text")
    if not (isinstance(revision, int) and isinstance(expires_at, (int, float))):
        raise TypeError("revision or expiry is not a number")
    return StoredPeer(
        network_id,
        name,
        PublicKey.from_base64(key),
        tuple(Endpoint.parse(str(a), EndpointType(t)) for t, a in json.loads(endpoints)),
        tuple(parse_allowed_ip(str(n)) for n in json.loads(allowed)),
        revision,
        float(expires_at),
    )
