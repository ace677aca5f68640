"""The userspace tunnel's TUN writer: decrypted packets written on a worker thread, in order.

A TUN write runs the inner packet through the kernel's stack (for TCP, the whole receive path)
inside the ``write`` call, and releases the GIL meanwhile; on its own thread it overlaps with
receiving and decrypting the next batch. Under a clock that is not the kernel's (a test's
``MockClock``) the writer writes every batch where it is handed over instead: a thread is
invisible to virtual time, which could otherwise jump past a timeout while a batch waits.
"""

from __future__ import annotations

import os
import queue
import select
import threading
from typing import Protocol

import trio

TUN_WRITE_BACKLOG = 8
"""Batches of decrypted packets that may wait for the TUN writer thread."""

INLINE_TUN_WRITES = 4
"""Batches this small are written by the reader itself when the writer thread is idle."""

_PUT_POLL = 0.05
"""Seconds between checks of the stop flag while the data thread waits for room (shutdown)."""


class WriteCounters(Protocol):
    """The two counters the writer keeps (a :class:`~punchtrio.tunnel.TunnelCounters` has them)."""

    packets_to_tun: int
    tun_write_errors: int


class TunWriter:
    """Writes decrypted packets to the TUN fd ``fd`` batch by batch, in order, counting into ``counters``.

    At most :data:`TUN_WRITE_BACKLOG` batches wait for the thread; a full backlog makes the reader
    wait, so the UDP socket buffer, not memory, absorbs a burst. Set :attr:`inline` before
    :meth:`run` to write everything on the caller's thread (no worker thread at all).
    """

    def __init__(self, fd: int, counters: WriteCounters) -> None:
        self.fd = fd
        self.inline = False
        """Write every batch where it is handed over (set under a virtual clock)."""
        self._counters = counters
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(TUN_WRITE_BACKLOG)
        self._put_lock = trio.StrictFIFOLock()

    def offer(self, packets: list[bytes]) -> bool:
        """Write or queue one batch; return False (nothing done) when the backlog is full.

        A small batch while the thread has nothing left to write is written here at once: waking
        the thread would cost more than the writes (and add latency to a lone packet). Order is
        kept because ``unfinished_tasks`` only drops after a queued batch is fully written.
        """
        if self.inline or (len(packets) <= INLINE_TUN_WRITES and not self._queue.unfinished_tasks):
            self._write(packets)
            return True
        try:
            self._queue.put_nowait(packets)
        except queue.Full:
            return False
        return True

    def write_now(self, packet: bytes) -> bool:
        """Write one packet here and now if the thread has nothing queued; return whether it did.

        One attempt only: a descriptor that would block (a socketpair stand-in) leaves the packet
        to the batch, so the caller never waits on it.
        """
        if self._queue.unfinished_tasks:
            return False
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            return False
        except OSError:
            self._counters.tun_write_errors += 1
            return True
        self._counters.packets_to_tun += 1
        return True

    async def put(self, packets: list[bytes]) -> None:
        """Queue one batch from the Trio thread, waiting (on a thread) for room in the backlog.

        Waiters queue in arrival order: a reader may have read another socket's batch while
        lingering, and that socket's own reader must not overtake it.
        """
        if self.inline:
            self._write(packets)
            return
        async with self._put_lock:
            await trio.to_thread.run_sync(self._queue.put, packets)

    def put_blocking(self, packets: list[bytes], stop: threading.Event) -> None:
        """Queue one batch from a thread other than Trio's, blocking until there is room.

        Gives up (the batch is dropped) once ``stop`` is set: the writer may be gone.
        """
        while not stop.is_set():
            try:
                self._queue.put(packets, timeout=_PUT_POLL)
            except queue.Full:
                continue
            return

    async def run(self) -> None:
        """Run the writer thread until cancelled; it finishes the queued batches first.

        Returns at once when :attr:`inline` is set.
        """
        if self.inline:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_when_cancelled)
            await trio.to_thread.run_sync(self._write_batches)

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._queue.put(None)  # the thread is always draining, so this waits microseconds

    def _write_batches(self) -> None:
        while (packets := self._queue.get()) is not None:
            self._write(packets)
            self._queue.task_done()

    def _write(self, packets: list[bytes]) -> None:
        write = os.write
        fd = self.fd
        written = errors = 0
        for packet in packets:
            for _ in range(100):
                try:
                    write(fd, packet)
                    written += 1
                    break
                except BlockingIOError:  # a real TUN never says so; socketpairs in tests do
                    select.select([], [fd], [], 0.01)
                except OSError:
                    errors += 1
                    break
            else:
                errors += 1
        counters = self._counters
        counters.packets_to_tun += written
        counters.tun_write_errors += errors
