"""The bounded queue of received handshake messages and the under-load state it drives.

A device hands every handshake message (initiation, response, cookie reply) to this queue instead
of processing it on the spot, so a flood of them cannot get ahead of transport data: the shell
processes a few queued messages after each batch of transport data. The queue's depth is what
tells the device it is under load, as in WireGuard's reference implementations: the state is
entered when :attr:`HandshakeQueue.depth` reaches the threshold (an eighth of the queue by
default) and left only once the depth has stayed below it for a whole cooldown (1 s), so a
flood that pauses for a moment does not switch cookies off and on.

The states and their transitions, in one table (:data:`TRANSITIONS`)::

    state       condition (checked on every enqueue and every processed message)   next state
    normal      depth >= threshold                                                   under_load (until = now + cooldown)
    normal      depth <  threshold                                                   normal
    under_load  depth >= threshold                                                   under_load (until = now + cooldown)
    under_load  depth <  threshold and now <  until                                  under_load
    under_load  depth <  threshold and now >= until                                  normal
"""

from __future__ import annotations

from collections import deque
from typing import Final

from ._config import Address

HANDSHAKE_QUEUE_SIZE: Final = 1024
"""Handshake messages that may wait for processing; more are dropped (``handshake_queue_full``)."""

UNDER_LOAD_COOLDOWN: Final = 1.0
"""Seconds the device stays under load after the queue was last at or above the threshold."""

NORMAL: Final = "normal"
UNDER_LOAD: Final = "under_load"

TRANSITIONS: Final[dict[tuple[str, bool, bool], str]] = {
    # (state, depth >= threshold, now < until) -> next state
    (NORMAL, True, False): UNDER_LOAD,
    (NORMAL, True, True): UNDER_LOAD,
    (NORMAL, False, False): NORMAL,
    (NORMAL, False, True): NORMAL,
    (UNDER_LOAD, True, False): UNDER_LOAD,
    (UNDER_LOAD, True, True): UNDER_LOAD,
    (UNDER_LOAD, False, True): UNDER_LOAD,
    (UNDER_LOAD, False, False): NORMAL,
}
"""The under-load state machine: ``(state, deep, cooling) -> next state`` (see the module doc)."""

Queued = tuple[bytes, Address, int, bool]
"""One waiting message: its bytes, source address, message type (1, 2 or 3), and whether its
source already paid a rate-limiter token for it."""


class HandshakeQueue:
    """A FIFO of at most ``size`` handshake messages and the under-load state of its device.

    ``threshold`` is the depth (messages) at which the device is under load (default ``size // 8``,
    as wireguard-go and Linux); ``cooldown`` (seconds) is how long it stays so after the depth was
    last at or above the threshold. Raises :class:`ValueError` for a size or threshold below 1 or
    a negative cooldown.
    """

    __slots__ = ("_items", "_size", "_threshold", "_until", "cooldown", "state")

    def __init__(
        self,
        size: int = HANDSHAKE_QUEUE_SIZE,
        *,
        threshold: int | None = None,
        cooldown: float = UNDER_LOAD_COOLDOWN,
    ) -> None:
        if size < 1:
            raise ValueError("the handshake queue holds at least one message")
        limit = size // 8 if threshold is None else threshold
        if limit < 1:
            raise ValueError("the under-load threshold is at least one message")
        if cooldown < 0:
            raise ValueError("the under-load cooldown cannot be negative")
        self._items: deque[Queued] = deque()
        self._size = size
        self._threshold = max(1, limit)
        self._until = float("-inf")
        self.cooldown = cooldown
        """Seconds the state stays ``under_load`` after the depth was last at the threshold."""
        self.state: str = NORMAL
        """``"normal"`` or ``"under_load"``, as of the last :meth:`under_load` call."""

    @property
    def depth(self) -> int:
        """Messages waiting."""
        return len(self._items)

    @property
    def threshold(self) -> int:
        """Depth (messages) at which the device is under load."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: int) -> None:
        if value < 1:
            raise ValueError("the under-load threshold is at least one message")
        self._threshold = value

    @property
    def room(self) -> int:
        """Messages that can still be queued."""
        return self._size - len(self._items)

    def full(self) -> bool:
        """Return whether the queue has no room for another message."""
        return len(self._items) >= self._size

    def under_load(self, now: float) -> bool:
        """Step the state machine at ``now`` (monotonic seconds); return whether it is under load."""
        deep = len(self._items) >= self._threshold
        if deep:
            self._until = now + self.cooldown
        self.state = TRANSITIONS[(self.state, deep, now < self._until)]
        return self.state == UNDER_LOAD

    def put(self, data: bytes, addr: Address, kind: int, charged: bool) -> None:
        """Append one message (the caller checked :meth:`full`)."""
        self._items.append((data, addr, kind, charged))

    def pop(self) -> Queued | None:
        """Remove and return the oldest message, or ``None`` when empty."""
        return self._items.popleft() if self._items else None

    def clear(self) -> None:
        """Forget every waiting message."""
        self._items.clear()
