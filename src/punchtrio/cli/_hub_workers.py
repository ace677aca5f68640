"""``punchtrio hub --workers N``: N forked hub processes accepting on one pre-bound socket.

The supervising process binds the listening socket (so a taken port is one error before anything
starts, and port 0 means one port for all), forks the workers, and then only waits: it runs no
Trio loop and holds no connection, so forking (again, to restart a worker) is safe. Policy
(docs/deploy-hub.md, "More than one process"):

- SIGTERM or SIGINT to the supervisor stops every worker (SIGTERM) and exits 0 once they are gone;
  a worker outlives no supervisor (``PR_SET_PDEATHSIG``: if the supervisor is killed with -9,
  the kernel sends SIGTERM to every worker).
- A worker that dies after running :data:`STARTUP_SECONDS` (a crash, ``kill -9``) is forked again
  after a back-off that grows from :data:`FIRST_BACKOFF` to :data:`MAX_BACKOFF` while crashes
  follow each other quickly; nothing acknowledged is lost, because the shared store holds it.
- A worker that exits non-zero sooner failed to start (bad configuration, the store unreachable):
  it would fail again, so the supervisor stops the others and exits with that worker's status.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("punchtrio.hub")

STARTUP_SECONDS = 3.0
"""A worker exiting non-zero within this many seconds of its start failed to start."""
FIRST_BACKOFF = 0.1
"""Seconds before the first restart of a crashed worker."""
MAX_BACKOFF = 5.0
"""Longest wait before restarting a worker, in seconds (reached after repeated quick crashes)."""

_PR_SET_PDEATHSIG = 1


def run_workers(count: int, worker: Callable[[int], int]) -> int:
    """Fork ``count`` processes that each run ``worker(index)`` (its return: the exit status) and
    supervise them until SIGTERM/SIGINT; return the hub's exit status (0, or the status of a
    worker that failed to start)."""
    parent = os.getpid()
    children: dict[int, tuple[int, float]] = {}
    stopping = False
    failure = 0

    def stop_all(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent(parent)
            status = 1
            try:
                status = worker(index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        children[pid] = (index, time.monotonic())

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            spawn(index)
        log.info("supervising %d workers (pids %s)", count, " ".join(map(str, children)))
        backoff = FIRST_BACKOFF / 2
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index, started = children.pop(pid)
            if stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            ran = time.monotonic() - started
            if code > 0 and ran < STARTUP_SECONDS:
                log.error("worker %d exited with status %d at its start; stopping", index, code)
                failure = code
                stop_all()
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            backoff = FIRST_BACKOFF if ran > 10 * MAX_BACKOFF else min(2 * backoff, MAX_BACKOFF)
            log.warning("worker %d (pid %d) %s; restarting it", index, pid, how)
            time.sleep(backoff)
            if not stopping:
                spawn(index)
    finally:
        stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failure


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGTERM this process when the supervisor dies (Linux); exit at once if
    it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)
