"""The event loop of a simulation: one Trio task delivers every packet at its due time.

Determinism under Trio's randomised scheduler: sockets never touch shared state or the RNG; they
append what they send to a pending list. The engine task waits until every other task is blocked
(``trio.testing.wait_all_tasks_blocked``), so everything sent at this instant has been queued; then it
processes the pending packets in a canonical order (sender, source, destination, payload) and the
timed events in (due time, sequence) order. Every RNG draw and NAT decision happens here, in an
order that does not depend on how Trio happened to order the tasks.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ._addresses import Endpoint


@dataclass(frozen=True)
class Emission:
    """A datagram a socket sent, waiting for the engine: ``host_index`` orders equal-time sends.

    ``tcp`` marks a TCP socket's request to send (its segments are made in the engine).
    """

    time: float
    host_index: int
    src: Endpoint
    dst: Endpoint
    payload: bytes
    deliver: Callable[[Emission], None]
    tcp: bool = False

    def sort_key(self) -> tuple[Any, ...]:
        """Return the canonical processing order, independent of Trio's task order."""
        return (
            self.time,
            self.host_index,
            self.src[0].version,
            int(self.src[0]),
            self.src[1],
            self.dst[0].version,
            int(self.dst[0]),
            self.dst[1],
            self.payload,
            self.tcp,
        )


class Engine:
    """Timed events and pending emissions of one simulation, run by :meth:`run` in one task."""

    def __init__(self) -> None:
        self._pending: list[Emission] = []
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._sleep_scope: trio.CancelScope | None = None

    def submit(self, emission: Emission) -> None:
        """Queue a datagram sent by a socket (any task); the engine handles it at this instant."""
        self._pending.append(emission)
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()

    def schedule(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args)`` ``delay`` seconds from now (engine task only)."""
        self._seq += 1
        heapq.heappush(self._heap, (trio.current_time() + delay, self._seq, callback, args))

    def clear(self) -> None:
        """Forget every pending and scheduled packet."""
        self._pending.clear()
        self._heap.clear()

    async def run(self) -> None:
        """Deliver packets forever; cancel the enclosing scope to stop."""
        import trio.testing  # here, not at the top: it loads pytest when installed

        while True:
            await trio.testing.wait_all_tasks_blocked()
            if self._step(trio.current_time()):
                continue
            deadline = self._heap[0][0] if self._heap else math.inf
            with trio.CancelScope(deadline=deadline) as scope:
                self._sleep_scope = scope
                await trio.sleep_forever()
            self._sleep_scope = None

    def _step(self, now: float) -> bool:
        progressed = False
        while self._pending or (self._heap and self._heap[0][0] <= now):
            progressed = True
            if self._pending:
                batch = sorted(self._pending, key=Emission.sort_key)
                self._pending.clear()
                for emission in batch:
                    emission.deliver(emission)
                continue
            _, _, callback, args = heapq.heappop(self._heap)
            callback(*args)
        return progressed
