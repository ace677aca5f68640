"""The transport replay filter: a sliding window of counters kept as a ring of 64-bit blocks (RFC 6479)."""

from __future__ import annotations

_BLOCK_BITS = 64
_RING_BLOCKS = 128
_RING_MASK = _RING_BLOCKS - 1

WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS
"""How far below the highest counter seen a counter may be and still be accepted once: 8128."""


class ReplayWindow:
    """Accepts each counter at most once, and none more than :data:`WINDOW_SIZE` below the highest.

    Call :meth:`accept` only after the packet authenticated, so forged counters cannot move the
    window. ``highest`` is the largest counter accepted so far (0 initially).
    """

    __slots__ = ("_ring", "highest")

    def __init__(self) -> None:
        self._ring = [0] * _RING_BLOCKS
        self.highest = 0

    def accept(self, counter: int) -> bool:
        """Record ``counter`` and return ``True``, or return ``False`` if it is a replay or too old."""
        ring = self._ring
        highest = self.highest
        if counter > highest:
            # A new highest counter cannot have been seen: bits above the old highest are clear.
            block = counter >> 6
            current = highest >> 6
            if block != current:
                gap = block - current
                if gap > _RING_BLOCKS:
                    gap = _RING_BLOCKS
                for i in range(current + 1, current + 1 + gap):
                    ring[i & _RING_MASK] = 0
            self.highest = counter
            ring[block & _RING_MASK] |= 1 << (counter & 63)
            return True
        if highest - counter > WINDOW_SIZE:
            return False
        i = (counter >> 6) & _RING_MASK
        bit = 1 << (counter & 63)
        word = ring[i]
        if word & bit:
            return False
        ring[i] = word | bit
        return True
