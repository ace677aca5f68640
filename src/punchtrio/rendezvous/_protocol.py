"""The ``Rendezvous`` interface the connector depends on, and the errors every backend raises.

A rendezvous backend is one local peer's view of a meeting place: it registers the peer's record
(name, WireGuard public key, candidate endpoints, allowed IPs), looks other peers up, waits for them
to appear, and carries short signalling messages between two peers. punchtrio ships three backends:
:class:`~punchtrio.rendezvous.HubClient` (our hub), :class:`~punchtrio.rendezvous.PeerHubClient`
(legacy peer-hub servers) and :class:`~punchtrio.rendezvous.MemoryRendezvous` (in-process; the
documented example and a test double). ``docs/rendezvous-client.md`` shows how to write your own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from .._exceptions import PunchtrioError
from ..keys import PublicKey
from ._listing import PeerListing
from ._models import Endpoint, PeerRecord, SignalMessage, ValidationError, validate_name

AllowedIP = str | ipaddress.IPv4Network | ipaddress.IPv6Network
"""An allowed-IP prefix as canonical CIDR text (``"10.0.0.2/32"``) or an ``ipaddress`` network."""


class RendezvousError(PunchtrioError):
    """Base class of the errors a rendezvous backend raises on purpose."""


class PeerNotFoundError(RendezvousError):
    """The peer does not exist, or is not visible to us (the two look the same on purpose).

    The CLI exits with status 3 on this error.
    """

    exit_code = 3


class RendezvousRefusedError(RendezvousError):
    """The backend refused a request and changed nothing: invalid input, a name held by another key,
    allowed IPs overlapping another peer's, failed authentication, a full hub.

    ``status`` is the HTTP status when the backend speaks HTTP (else ``None``); ``reason`` the
    backend's one-line reason, which is also the message. The CLI exits with status 4.
    """

    exit_code = 4

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class RendezvousUnavailableError(RendezvousError):
    """The backend could not be reached (or stayed busy) through every allowed retry.

    Waits never raise it: they keep retrying until the caller cancels them. The CLI exits with 5.
    """

    exit_code = 5


class RendezvousProtocolError(RendezvousError):
    """The backend answered something that breaks its API: invalid JSON, an invalid record, a record
    for another name than asked, a hub key that differs from the pinned one. Nothing is trusted from
    such an answer. The CLI exits with status 6.
    """

    exit_code = 6


class NotRegisteredError(RendezvousError):
    """The operation needs this peer's own record (signalling), and it has not registered yet."""


class SignallingNotSupportedError(RendezvousError):
    """The backend cannot carry signalling messages (peer-hub's API has none)."""


@runtime_checkable
class Rendezvous(Protocol):
    """One local peer's view of a rendezvous backend: register, look up, wait, signal.

    The peer's ``name`` and ``public_key`` are fixed when the backend object is made. Methods are
    Trio-cancellable: a wait has no timeout of its own, wrap it in ``trio.move_on_after`` (or
    ``fail_after``). Implementations must never return data they have not validated: records are
    :class:`PeerRecord` objects (validated on construction) whose ``name`` is the one asked for.
    """

    @property
    def name(self) -> str:
        """This peer's name (``[a-z0-9][a-z0-9._-]{0,62}``)."""
        ...

    @property
    def public_key(self) -> PublicKey:
        """This peer's WireGuard public key; the backend registers the record under it."""
        ...

    async def register(
        self, endpoints: Iterable[Endpoint] = (), allowed_ips: Iterable[AllowedIP] = ()
    ) -> PeerRecord:
        """Register or refresh this peer's record and return it as stored.

        Calling it again replaces the endpoints and allowed IPs. Backends whose records expire keep
        the record alive from then on until :meth:`unregister` (or closing the backend).
        Raises :class:`RendezvousRefusedError` (nothing changed), :class:`RendezvousUnavailableError`.
        """
        ...

    async def lookup(self, name: str) -> PeerRecord:
        """Return the current record of peer ``name``.

        Raises :class:`PeerNotFoundError`, :class:`RendezvousRefusedError`,
        :class:`RendezvousUnavailableError`.
        """
        ...

    async def wait_for_peer(self, name: str, *, newer_than: int = 0) -> PeerRecord:
        """Return the record of peer ``name`` the moment it exists with a revision above
        ``newer_than`` (0: any record), at once if it already does.

        There is no polling interval where the backend can notify; a lost connection is retried
        with backoff for as long as the caller waits. Raises :class:`RendezvousRefusedError`.
        """
        ...

    async def send_signal(self, recipient: str, data: str) -> None:
        """Send ``data`` (text, at most 2048 UTF-8 bytes) to peer ``recipient``, from this peer.

        This peer must be registered. Raises :class:`NotRegisteredError`, :class:`PeerNotFoundError`,
        :class:`RendezvousRefusedError` (for example the recipient's queue is full),
        :class:`SignallingNotSupportedError`, :class:`RendezvousUnavailableError`.
        """
        ...

    async def receive_signal(self, sender: str | None = None) -> SignalMessage:
        """Wait for the next message sent to this peer and return it (``sender=None``: from anyone,
        else only from ``sender``; messages from others stay queued for other calls).

        This peer must be registered. Raises :class:`NotRegisteredError`,
        :class:`SignallingNotSupportedError`, :class:`RendezvousRefusedError`.
        """
        ...

    async def unregister(self) -> None:
        """Delete this peer's record (a no-op if it has none) and stop refreshing it."""
        ...

    async def aclose(self) -> None:
        """Release the backend's resources (connections, tasks). It does not unregister."""
        ...


@runtime_checkable
class PeerDirectory(Protocol):
    """A rendezvous backend that can list the peers of its network (for a mesh).

    :class:`~punchtrio.rendezvous.HubClient` (with a network secret) and
    :class:`~punchtrio.rendezvous.MemoryRendezvous` are directories; peer-hub servers are not.
    """

    async def list_peers(self) -> PeerListing:
        """Return the current listing (ourselves included). Raises :class:`RendezvousError`."""
        ...

    async def watch_peers(self, since: str = "") -> PeerListing:
        """Return the listing once its tag differs from ``since`` (``""``: at once); waits
        retry lost connections for as long as the caller waits. Raises
        :class:`RendezvousRefusedError`, :class:`RendezvousProtocolError`."""
        ...


def checked_name(name: str) -> str:
    """Return ``name`` if it is a valid peer name; raise :class:`RendezvousRefusedError` if not."""
    try:
        return validate_name(name)
    except ValidationError as exc:
        raise RendezvousRefusedError(str(exc)) from None
