"""``open_connector``: a :class:`~punchtrio.connect.Connector` for the duration of an
``async with`` block, whose errors leave as themselves (never wrapped in exception groups)."""

from __future__ import annotations

import contextlib
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from ..keys import PrivateKey, PublicKey
from ..punch import PortMapSettings, PunchSettings
from ..relay import TurnServer
from ..rendezvous import NetworkSecret, Rendezvous
from ._config import TunnelConfig
from ._connector import Connector, TunnelBackendName
from ._memif import MemoryInterface
from ._relay_choice import HubRelay

Address = tuple[str, int]


@contextlib.asynccontextmanager
async def open_connector(
    name: str,
    private_key: PrivateKey,
    rendezvous: Rendezvous | str,
    tunnel: TunnelConfig | str,
    *,
    peers: Iterable[str] = (),
    interface: MemoryInterface | None = None,
    stun_servers: Sequence[Address] | None = None,
    punch: PunchSettings | None = None,
    wait_timeout: float = 120.0,
    handshake_timeout: float = 15.0,
    stun_rto: float = 0.5,
    stun_attempts: int = 3,
    restun_interval: float = 300.0,
    retry_backoff: float | None = 2.0,
    network_secret: NetworkSecret | None = None,
    hub_verify: ssl.SSLContext | bool = True,
    hub_public_key: PublicKey | None = None,
    hub_relay: HubRelay | None = None,
    relay: bool = True,
    relay_stream_after: float = 3.0,
    turn_servers: Sequence[TurnServer] = (),
    socket_factory: Callable[[int, int], Any] | None = None,
    wall_clock: Callable[[], float] = time.time,
    all_peers: bool = False,
    port_mapping: bool | str = False,
    port_mapping_settings: PortMapSettings | None = None,
    backend: TunnelBackendName = "userspace",
    stop_signals: Iterable[int] = (),
) -> AsyncIterator[Connector]:
    """Run a :class:`Connector` (same arguments) for the duration of the ``async with`` block.

    The pipeline runs in a nursery inside the block; leaving the block (normally, by an exception
    or by cancellation) stops it and removes everything: the record at the rendezvous, the tasks,
    the socket and any TUN device. Yields the running connector.

    ``stop_signals`` (default none), e.g. ``(signal.SIGTERM,)``: when one arrives, the block is
    cancelled, the teardown runs as for any exit, and the ``async with`` ends normally, so a
    service stopped by systemd deletes its hub record instead of leaving it for its TTL. Trio
    receives signals only in the main thread: elsewhere this raises :class:`RuntimeError`.
    """
    connector = Connector(
        name,
        private_key,
        rendezvous,
        tunnel,
        peers=peers,
        interface=interface,
        stun_servers=stun_servers,
        punch=punch,
        wait_timeout=wait_timeout,
        handshake_timeout=handshake_timeout,
        stun_rto=stun_rto,
        stun_attempts=stun_attempts,
        restun_interval=restun_interval,
        retry_backoff=retry_backoff,
        network_secret=network_secret,
        hub_verify=hub_verify,
        hub_public_key=hub_public_key,
        hub_relay=hub_relay,
        relay=relay,
        relay_stream_after=relay_stream_after,
        turn_servers=turn_servers,
        socket_factory=socket_factory,
        wall_clock=wall_clock,
        all_peers=all_peers,
        port_mapping=port_mapping,
        port_mapping_settings=port_mapping_settings,
        backend=backend,
    )
    # Every error leaves as itself (a PunchtrioError for what goes wrong in the connector), never
    # wrapped in an exception group: the caller's `except TunnelError:` must see it.
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            signals = tuple(stop_signals)
            if signals:
                await nursery.start(_stop_on, signals, nursery.cancel_scope)
            try:
                await nursery.start(connector.run)
            except Exception as exc:  # the port, the TUN device: nothing was started
                failure = exc
                nursery.cancel_scope.cancel()
            if failure is None:
                try:
                    yield connector
                except Exception as exc:
                    failure = exc  # re-raised below as it is
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One leaf leaves as itself, KeyboardInterrupt included (Ctrl-C in the caller's loop
        # is a KeyboardInterrupt, not a group); several stay a group.
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        raise leaves[0] from None
    if failure is not None:
        raise failure


async def _stop_on(
    signals: tuple[int, ...],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Cancel ``scope`` when one of ``signals`` arrives (listening before it reports started)."""
    with trio.open_signal_receiver(*signals) as received:
        task_status.started()
        async for _ in received:
            scope.cancel()
            return


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
