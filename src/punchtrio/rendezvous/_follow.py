"""A relay process's view of who is registered, followed from a shared store.

With ``punchtrio hub --workers N --redis URL --relay ADDR``, the HTTP workers register peers in
Redis and one relay process carries their datagrams; it cannot see the workers' registrations,
so it mirrors each network's live records from the store into its
:class:`~punchtrio.rendezvous.KeyDirectory`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from ._hub import KeyDirectory
from ._listing import listing_tag
from ._store import Store, StoredPeer, StoreError

log = logging.getLogger("punchtrio.hub")

FOLLOW_EVERY = 30.0
"""Seconds between two full reads of a network's records even when nothing changed (a refresh
that changes nothing but the expiry wakes no listing)."""
FOLLOW_PAUSE = 0.2
"""Seconds between two reads of one network while it changes (one read per burst of writes)."""
FOLLOW_RETRY = 1.0
"""Seconds before reading again after the store failed (the directory keeps what it had)."""


async def follow_registrations(
    store: Store,
    directory: KeyDirectory,
    network_ids: Sequence[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``directory`` equal to the live records of each of ``network_ids`` (``""``: the open
    network) in ``store``, until cancelled. Reports started once every network was read once (or
    failed to be: then it goes on trying every :data:`FOLLOW_RETRY` seconds).

    A new record reaches the directory within about :data:`FOLLOW_PAUSE` plus the store's
    wake-up (a peer whose bind is refused before that retries it), a deleted or expired one
    leaves it as the store wakes the listing.
    """
    async with trio.open_nursery() as nursery:
        for network_id in network_ids:
            await nursery.start(_follow, store, directory, network_id)
        task_status.started()


async def _follow(
    store: Store,
    directory: KeyDirectory,
    network_id: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    tag: str | None = None
    started = False
    while True:
        try:
            if tag is None:
                peers: tuple[StoredPeer, ...] = await store.list_peers(network_id)
            else:
                peers = ()
                with trio.move_on_after(FOLLOW_EVERY) as waited:
                    peers = await store.wait_listing(network_id, tag)
                if waited.cancelled_caught:
                    peers = await store.list_peers(network_id)
        except StoreError as exc:
            log.warning("relay: cannot read the registrations of the store: %s", exc)
            tag = None
            if not started:
                started = True
                task_status.started()
            await trio.sleep(FOLLOW_RETRY)
            continue
        directory.replace(network_id, ((p.name, p.public_key.raw, p.expires_at) for p in peers))
        tag = listing_tag((p.name, p.revision) for p in peers)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(FOLLOW_PAUSE)
