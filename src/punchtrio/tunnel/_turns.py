"""Turns between Trio's run loop and the userspace tunnel's data thread, on Trio's public API.

Why a thread at all: a packet that finds the process asleep in Trio's ``epoll_wait`` pays about
70 us of cold Python in Trio's scheduler before the task that reads it runs; one that wakes a
thread sleeping in its own :meth:`select.epoll.poll` pays a few (docs/tunnel.md, Latency). So the
data thread sleeps on the tunnel's descriptors and serves them itself.

Why turns: the sans-IO device and the shell's state are not thread-safe, and Trio code (timers,
the UAPI socket, the connector) uses them too. Trio's run loop runs no task and no callback
between the public :class:`trio.abc.Instrument` hooks ``before_io_wait`` and ``after_io_wait``:
there it only waits for I/O and marks tasks runnable. :class:`RunLoopTurns` holds a lock while
the loop runs tasks and lets go of it for exactly that window, and the data thread holds it for
each batch. At most one of the two touches the device at any time, as if there were one thread;
neither polls the other, and an idle tunnel costs no wake-ups.
"""

from __future__ import annotations

import sys
import threading

import trio


class RunLoopTurns(trio.abc.Instrument):
    """An instrument that gives the data thread turns while Trio's run loop waits for I/O.

    Construct and add it (:func:`trio.lowlevel.add_instrument`) from a task: the loop is running
    tasks, so the lock starts taken on its behalf. The data thread calls :meth:`acquire` before
    touching shared state and :meth:`release` after, and checks :attr:`loop_waiting` between
    batches to give the loop its turn back promptly. Remove the instrument only after the data
    thread has stopped.
    """

    def __init__(self) -> None:
        # The lock is taken directly (``with self._lock``: no Python frames, unlike entering
        # the condition), since the data thread takes it first thing after every wake-up.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._owner = _LOOP
        self._thread_waiting = False
        self.loop_waiting = False
        """True while the run loop, back from waiting for I/O, waits for the data thread's batch."""
        self.turns = 0
        """Turns the data thread took (a test checks that the thread is serving)."""

    def before_io_wait(self, timeout: float) -> None:
        """The run loop is about to wait for I/O: the data thread may take its turn."""
        with self._lock:
            self._owner = _FREE
            if self._thread_waiting:
                self._cond.notify_all()

    def after_io_wait(self, timeout: float) -> None:
        """The run loop is back from waiting: wait until the data thread's batch is done.

        A data thread that was already waiting for a turn gets this one first, and a thread
        ending its turn while the loop waits hands the turn straight to the loop: a run loop
        that never sleeps (always a runnable task) and a busy data thread alternate.
        """
        with self._lock:
            self.loop_waiting = True
            while self._owner is not _LOOP:
                if self._owner is _FREE and not self._thread_waiting:
                    self._owner = _LOOP
                    break
                self._cond.wait()
            self.loop_waiting = False

    def acquire(self) -> None:
        """Take a turn from the data thread: block until the run loop waits for I/O."""
        with self._lock:
            if self._owner is not _FREE:
                self._thread_waiting = True
                while self._owner is not _FREE:
                    self._cond.wait()
                self._thread_waiting = False
            self._owner = _THREAD
            self.turns += 1

    def release(self) -> None:
        """End the data thread's turn (handing it to the run loop if that is waiting)."""
        with self._lock:
            if self.loop_waiting:
                self._owner = _LOOP
                self._cond.notify_all()
            else:
                self._owner = _FREE


_LOOP = "loop"
_FREE = "free"
_THREAD = "thread"


def clock_is_real(clock: trio.abc.Clock) -> bool:
    """Return whether ``clock`` keeps the kernel's time (a thread's waits are then real waits).

    A :class:`trio.testing.MockClock`, or any clock whose deadline one second ahead is not about
    one second of sleep, is virtual: work on another thread is invisible to it.
    """
    testing = sys.modules.get("trio.testing")  # a MockClock exists only once it was imported
    if testing is not None and isinstance(clock, testing.MockClock):
        return False
    return 0.9 < clock.deadline_to_sleep_time(clock.current_time() + 1.0) <= 1.0
