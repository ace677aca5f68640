"""The Trio shells: run a :class:`Puncher` or a :class:`ReflexiveGatherer` over a shared socket.

Received datagrams come from the mux (a queue from :meth:`punchtrio.mux.Mux.open_queue`); sending
goes straight to the socket, which may be a Trio socket (including a :mod:`punchtrio.netsim`
one) or a non-blocking stdlib-like socket shared with the WireGuard fast path.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import trio

from ..mux import Datagram
from ._candidates import Candidate, IPNetwork, ReflexiveGatherer, ReflexiveResult
from ._puncher import Puncher, PunchEvent

Address = tuple[str, int]

NO_ROUTE = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL}
)
"""Send errors that mean the destination cannot be reached from this host at all."""


async def send_datagram(sock: Any, data: bytes, address: Address) -> None:
    """Send one datagram on ``sock``; a kernel refusal (full buffer, no route) is ignored.

    ``sock`` is a Trio socket (awaited) or a non-blocking stdlib-like socket (called directly).
    """
    try:
        if isinstance(sock, trio.socket.SocketType):
            await sock.sendto(data, address)
        else:
            sock.sendto(data, address)
    except OSError:
        pass  # the protocol retransmits; a lost probe is an unanswered probe


class PunchSession:
    """Run ``puncher`` on ``sock``, fed by ``probes`` (the mux's probe queue), until cancelled.

    ``on_event`` is called with every :class:`PathChosen`, :class:`PathLost` and
    :class:`PunchFailed`. Call :meth:`start` (not ``puncher.start``) from any task so the session
    wakes for the new deadline.
    """

    def __init__(
        self,
        puncher: Puncher,
        sock: Any,
        probes: trio.MemoryReceiveChannel[Datagram],
        *,
        on_event: Callable[[PunchEvent], None] | None = None,
    ) -> None:
        self.puncher = puncher
        self._sock = sock
        self._probes = probes
        self._on_event = on_event
        self._scope: trio.CancelScope | None = None

    def start(
        self,
        public_key: bytes,
        candidates: Iterable[Candidate],
        at: float,
        *,
        local_networks: Iterable[IPNetwork] | None = None,
    ) -> None:
        """Begin punching to a peer at ``at`` (``trio.current_time()`` clock); see
        :meth:`Puncher.start` (and its ``local_networks``), whose errors it raises."""
        self.puncher.start(public_key, candidates, at, local_networks=local_networks)
        if self._scope is not None:
            # Wake at once: the start may have emitted an event (a reclassified path).
            self._scope.deadline = min(self._scope.deadline, at, trio.current_time())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send, receive and time probes until cancelled. Reports started at once."""
        puncher = self.puncher
        task_status.started()
        while True:
            for data, address in puncher.datagrams_to_send():
                await send_datagram(self._sock, data, address)
            while (event := puncher.next_event()) is not None:
                if self._on_event is not None:
                    self._on_event(event)
            deadline = puncher.get_timer()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._scope = scope
                datagram = await self._probes.receive()
            self._scope = None
            if scope.cancelled_caught:
                puncher.handle_timer(trio.current_time())
            else:
                puncher.receive_datagram(datagram.data, datagram.source, datagram.time)


async def gather_reflexive(
    sock: Any,
    replies: trio.MemoryReceiveChannel[Datagram],
    servers: Sequence[Address],
    *,
    rto: float = 0.5,
    rc: int = 7,
    answer_within: float | None = None,
) -> ReflexiveResult:
    """Ask STUN ``servers`` what ``sock`` looks like from outside; return the result.

    ``replies`` is the mux's STUN queue for this socket. Takes at most about ``rto * (2**rc + 3)``
    seconds when nobody answers (defaults: 0.5 s and 7 requests, about 65 s; lower ``rc`` to fail
    faster). With ``answer_within`` (seconds), it gives up when no server has answered by then
    and returns what it has (no mappings; the caller may ask again later). Raises
    ``ValueError`` for an empty or non-literal server list.
    """
    gatherer = ReflexiveGatherer(servers, trio.current_time(), rto=rto, rc=rc)
    give_up = math.inf if answer_within is None else trio.current_time() + answer_within
    while not gatherer.done:
        for data, address in gatherer.datagrams_to_send(trio.current_time()):
            try:
                if isinstance(sock, trio.socket.SocketType):
                    await sock.sendto(data, address)
                else:
                    sock.sendto(data, address)
            except OSError as exc:
                if exc.errno in NO_ROUTE:  # no route there: waiting for answers is pointless
                    gatherer.unreachable(address)
        deadline = gatherer.get_timer()
        with trio.move_on_at(min(give_up, math.inf if deadline is None else deadline)):
            datagram = await replies.receive()
            if gatherer.receive_datagram(datagram.data, datagram.source, datagram.time):
                give_up = math.inf  # someone answered: wait for the others as usual
            continue
        if trio.current_time() >= give_up:
            break
        gatherer.handle_timer(trio.current_time())
    return gatherer.result()
