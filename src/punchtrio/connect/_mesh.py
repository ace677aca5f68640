"""A mesh: connect to every peer of our network, following joins and leaves.

:class:`MeshPolicy` decides (sans-IO): given a :class:`~punchtrio.rendezvous.PeerListing`, which
peers to add and which to remove. :func:`follow_directory` is its Trio shell: it long-polls the
rendezvous' listing (:class:`~punchtrio.rendezvous.PeerDirectory`) and applies each plan to a
:class:`~punchtrio.connect.Connector` (``Connector(..., all_peers=True)`` runs it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..rendezvous import PeerDirectory, PeerListing, RendezvousError

log = logging.getLogger("punchtrio.connect")

MESH_RETRY = 2.0
"""Seconds before the listing is asked for again after the rendezvous refused it (doubling up to
:data:`MESH_RETRY_MAX`)."""

MESH_RETRY_MAX = 60.0
"""Longest pause between two refused listings, in seconds."""

LEFT_REASON = "its record left the network (deleted or expired)"
"""The ``reason`` of a :class:`~punchtrio.connect.PeerRemoved` for a peer that left the listing."""


@dataclass(frozen=True)
class MeshPlan:
    """What a listing changes: names to ``add`` and to ``remove`` (each sorted)."""

    add: tuple[str, ...]
    remove: tuple[str, ...]


class MeshPolicy:
    """Which peers a mesh connects to: every listed peer except ``own`` (our name).

    ``pinned`` names (peers given explicitly) are never removed; they are not added by a listing
    either, since the caller already did. A truncated listing (more peers than the hub lists)
    removes only names that sort before its last entry: the ones after it are not known to have
    left. Feed each listing to :meth:`update`; :attr:`members` is what the policy added and
    has not removed.
    """

    def __init__(self, own: str, *, pinned: Iterable[str] = ()) -> None:
        self.own = own
        self.pinned = frozenset(pinned)
        self.members: set[str] = set()
        """The peers this policy added (and has not removed)."""

    def update(self, listing: PeerListing) -> MeshPlan:
        """Return what changes with ``listing``, and take it as the new state."""
        listed = listing.names - {self.own}
        add = sorted(listed - self.members - self.pinned)
        gone = self.members - listed
        if listing.truncated and listing.peers:
            last = listing.peers[-1].name
            gone = {name for name in gone if name < last}
        remove = sorted(gone)
        self.members.update(add)
        self.members.difference_update(remove)
        return MeshPlan(tuple(add), tuple(remove))


class MeshTarget(Protocol):
    """What :func:`follow_directory` drives: a :class:`~punchtrio.connect.Connector`."""

    def add(self, peer: str) -> None:
        """Start connecting to ``peer``."""
        ...

    def remove(self, peer: str, *, reason: str = ...) -> None:
        """Forget ``peer``."""
        ...


async def follow_directory(
    target: MeshTarget,
    directory: PeerDirectory,
    policy: MeshPolicy,
    *,
    retry: float = MESH_RETRY,
    retry_max: float = MESH_RETRY_MAX,
) -> None:
    """Apply ``policy`` to every listing ``directory`` reports, until cancelled.

    The first listing is asked for at once, then each change is long-polled. A refused
    listing (say, the hub refuses to list an open network) is logged and asked for again after
    ``retry`` seconds, doubling up to ``retry_max``: a fault of the hub must not end the mesh.
    """
    tag = ""
    failures = 0
    while True:
        try:
            listing = await directory.watch_peers(tag)
        except RendezvousError as exc:
            pause = min(retry * 2**failures, retry_max)
            failures += 1
            log.warning("listing the network's peers failed: %s; again in %g s", exc, pause)
            await trio.sleep(pause)
            continue
        failures = 0
        tag = listing.tag
        plan = policy.update(listing)
        for name in plan.remove:
            target.remove(name, reason=LEFT_REASON)
        for name in plan.add:
            target.add(name)
