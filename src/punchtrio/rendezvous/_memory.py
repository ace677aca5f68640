"""An in-process rendezvous backend: the documented example backend and a test double.

Peers of one :class:`MemoryHub` meet inside one Trio program: waits wake on Trio events the moment a
record appears, nothing touches the network, and the rules follow the HTTP hub's (a name is bound
to its first key, allowed IPs never overlap, inputs are validated, messages are bounded).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable

import trio

from ..keys import PublicKey
from ._listing import MAX_LISTED_PEERS, PeerListing
from ._models import (
    Endpoint,
    PeerRecord,
    RegisterRequest,
    SignalMessage,
    ValidationError,
    parse_allowed_ip,
    validate_name,
)
from ._protocol import (
    AllowedIP,
    NotRegisteredError,
    PeerNotFoundError,
    RendezvousRefusedError,
    checked_name,
)

MEMORY_EXPIRES_IN = 3600.0
"""``expires_in`` reported by :class:`MemoryRendezvous` records, in seconds: they never expire, but
a record states a lifetime, and an hour is what a refresh loop would handle without churning."""


class MemoryHub:
    """The shared meeting place of :class:`MemoryRendezvous` peers in one process.

    ``max_queued`` bounds each peer's queue of signalling messages (32, as the hub's default).
    Records do not expire: they live until their owner unregisters.
    """

    def __init__(self, *, max_queued: int = 32) -> None:
        self.max_queued = max_queued
        self._records: dict[str, PeerRecord] = {}
        self._revisions = itertools.count(1)
        self._queues: dict[str, collections.deque[SignalMessage]] = {}
        self._changed = trio.Event()

    def records(self) -> tuple[PeerRecord, ...]:
        """Return every live record (for tests and debugging)."""
        return tuple(self._records.values())

    def peer(self, name: str, public_key: PublicKey) -> MemoryRendezvous:
        """Return a backend for the local peer ``name`` with key ``public_key`` on this hub."""
        return MemoryRendezvous(self, name, public_key)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class MemoryRendezvous:
    """A :class:`~punchtrio.rendezvous.Rendezvous` backend for one peer of a :class:`MemoryHub`.

    ``name`` is validated like the hub does (:class:`ValidationError`). It never raises
    :class:`~punchtrio.rendezvous.RendezvousUnavailableError`: the hub is this process.
    """

    def __init__(self, hub: MemoryHub, name: str, public_key: PublicKey) -> None:
        self._hub = hub
        self._name = validate_name(name)
        self._public_key = public_key

    @property
    def name(self) -> str:
        """This peer's name."""
        return self._name

    @property
    def public_key(self) -> PublicKey:
        """This peer's WireGuard public key."""
        return self._public_key

    async def register(
        self, endpoints: Iterable[Endpoint] = (), allowed_ips: Iterable[AllowedIP] = ()
    ) -> PeerRecord:
        """Create or replace this peer's record; see :meth:`Rendezvous.register`.

        Raises :class:`RendezvousRefusedError` if the name belongs to another key, if the input is
        invalid, or if the allowed IPs overlap another peer's.
        """
        await trio.lowlevel.checkpoint()
        try:
            request = RegisterRequest(
                self._public_key,
                tuple(endpoints),
                tuple(parse_allowed_ip(str(n)) for n in allowed_ips),
            )
        except ValidationError as exc:
            raise RendezvousRefusedError(str(exc)) from None
        hub = self._hub
        old = hub._records.get(self._name)
        if old is not None and old.public_key != self._public_key:
            raise RendezvousRefusedError("name is registered to another key")
        for other in hub._records.values():
            if other.name == self._name:
                continue
            for mine in request.allowed_ips:
                if any(
                    mine.version == theirs.version and mine.overlaps(theirs)
                    for theirs in other.allowed_ips
                ):
                    raise RendezvousRefusedError(
                        f"allowed_ips: {mine} overlaps another peer's allowed IPs"
                    )
        unchanged = old is not None and (old.endpoints, old.allowed_ips) == (
            request.endpoints,
            request.allowed_ips,
        )
        revision = old.revision if unchanged and old is not None else next(hub._revisions)
        record = PeerRecord(
            self._name,
            self._public_key,
            request.endpoints,
            request.allowed_ips,
            revision,
            MEMORY_EXPIRES_IN,
        )
        hub._records[self._name] = record
        if not unchanged:
            hub._notify()
        return record

    async def lookup(self, name: str) -> PeerRecord:
        """Return peer ``name``'s record. Raises :class:`PeerNotFoundError`."""
        await trio.lowlevel.checkpoint()
        record = self._hub._records.get(checked_name(name))
        if record is None:
            raise PeerNotFoundError(f"no such peer: {name}")
        return record

    async def wait_for_peer(self, name: str, *, newer_than: int = 0) -> PeerRecord:
        """Return peer ``name``'s record as soon as its revision exceeds ``newer_than``."""
        name = checked_name(name)
        await trio.lowlevel.checkpoint()
        while True:
            record = self._hub._records.get(name)
            if record is not None and record.revision > newer_than:
                return record
            await self._hub._changed.wait()

    async def list_peers(self) -> PeerListing:
        """Return every peer of the hub, ourselves included (see ``HubClient.list_peers``)."""
        await trio.lowlevel.checkpoint()
        return self._listing()

    async def watch_peers(self, since: str = "") -> PeerListing:
        """Return the listing as soon as its tag differs from ``since`` (``""``: at once)."""
        await trio.lowlevel.checkpoint()
        while True:
            listing = self._listing()
            if listing.tag != since:
                return listing
            await self._hub._changed.wait()

    def _listing(self) -> PeerListing:
        records = sorted(self._hub._records.values(), key=lambda r: r.name)
        return PeerListing.of(
            ((r.name, r.revision, r.expires_in) for r in records[:MAX_LISTED_PEERS]),
            truncated=len(records) > MAX_LISTED_PEERS,
        )

    async def send_signal(self, recipient: str, data: str) -> None:
        """Queue ``data`` for ``recipient``. Raises :class:`NotRegisteredError`,
        :class:`PeerNotFoundError`, :class:`RendezvousRefusedError` (queue full, invalid data)."""
        await trio.lowlevel.checkpoint()
        self._require_registered()
        recipient = checked_name(recipient)
        if recipient not in self._hub._records:
            raise PeerNotFoundError(f"no such peer: {recipient}")
        try:
            message = SignalMessage(self._name, data)
        except ValidationError as exc:
            raise RendezvousRefusedError(str(exc)) from None
        queue = self._hub._queues.setdefault(recipient, collections.deque())
        if len(queue) >= self._hub.max_queued:
            raise RendezvousRefusedError("the recipient's message queue is full")
        queue.append(message)
        self._hub._notify()

    async def receive_signal(self, sender: str | None = None) -> SignalMessage:
        """Return the next message for this peer (from ``sender`` only, if given)."""
        await trio.lowlevel.checkpoint()
        while True:
            self._require_registered()
            queue = self._hub._queues.get(self._name, collections.deque())
            for index, message in enumerate(queue):
                if sender is None or message.sender == sender:
                    del queue[index]
                    return message
            await self._hub._changed.wait()

    async def unregister(self) -> None:
        """Delete this peer's record and its queued messages (a no-op without a record)."""
        await trio.lowlevel.checkpoint()
        record = self._hub._records.get(self._name)
        if record is not None and record.public_key == self._public_key:
            del self._hub._records[self._name]
            self._hub._queues.pop(self._name, None)
            self._hub._notify()

    async def aclose(self) -> None:
        """Nothing to release; the record stays (as with every backend)."""
        await trio.lowlevel.checkpoint()

    def _require_registered(self) -> None:
        record = self._hub._records.get(self._name)
        if record is None or record.public_key != self._public_key:
            raise NotRegisteredError(f"{self._name} is not registered")
