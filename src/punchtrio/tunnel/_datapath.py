"""The userspace tunnel's data path: a sans-IO WireGuard device driven over UDP sockets and a TUN.

The shell owns three readable descriptors (the IPv4 and IPv6 UDP sockets and the TUN fd) and one
timer. When a descriptor is readable it is drained in a tight non-blocking loop, every packet handed
to the :class:`~punchtrio.wireguard.Device`, and the results written out: no ``await`` per packet.

Who drains them depends on the clock and the device (see :class:`UserspaceTunnel`): the *data
thread* (``_turns``) sleeps on the descriptors itself and takes turns with Trio's run loop, or
Trio tasks wait with :func:`trio.lowlevel.wait_readable` and linger briefly after a batch. Both run
the same batch functions below; only the waiting differs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import trio

from ..wireguard import Device, PeerStats
from ._tun import TunDevice
from ._tunwriter import TunWriter
from ._turns import RunLoopTurns, clock_is_real
from ._udp import (
    GRO_CMSG_SPACE,
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    GSO_SIZE,
    NO_GSO,
    UDP_SEGMENT,
    enable_gro,
    gro_size,
)

Address = tuple[str, int]

BATCH = 256
"""Most packets handled from one descriptor before the loop checkpoints (fairness between tasks)."""

HANDSHAKE_READS = 64
"""Most datagrams read from a handshake socket (see :func:`split_handshakes`) per turn."""

HANDSHAKES_PER_BATCH = 8
"""Queued handshake messages processed after each batch of UDP datagrams, once its transport
data is decrypted and handed to the TUN: a handshake flood gets this share, never more, and what
is left waits for the next batch or the device's timer. With handshake sockets (see
:func:`split_handshakes`) only their batches process handshakes: a transport batch then ends as
soon as its packets are handed on."""

HANDSHAKE_SHARE = 0.25
"""Most of the data thread's time spent on handshake work (reading the handshake sockets,
processing queued messages) while transport data flows (within :data:`TRANSPORT_RECENT`), as a
fraction (a quarter); with no transport data, handshakes may take all of it.

A flood would otherwise keep the thread busy all the time, reading messages to drop them, and a
thread that never sleeps waits for the CPU when a packet comes (the scheduler favours threads
that slept). After each turn of handshake work the handshake sockets rest three times as long
as the turn took: the kernel drops what overruns their buffers, at no cost to the process, and
the thread is idle, or on transport data, the rest of the time. Under a flood this bounds the
handshakes answered (cookie replies, DH) to what a quarter of one core can do while the tunnel
carries traffic; a legitimate initiation the kernel dropped is retried after REKEY_TIMEOUT."""

TRANSPORT_RECENT = 0.1
"""Seconds after the last transport datagram or TUN packet during which :data:`HANDSHAKE_SHARE`
applies (100 ms)."""

THREAD_TIMER_INTERVAL = 0.001
"""Seconds between two :meth:`WireGuardDevice.handle_timer` calls by the data thread at most
while it also serves a handshake socket (1 ms): the timer's share of the queue comes on top of
the handshake batches', so it is spaced out while a flood keeps that socket readable."""

_READ_SIZE = 65535
_MIN_REST = 0.001  # epoll's resolution: a shorter rest would sleep a whole millisecond anyway

LINGER = 0.001
"""Seconds a Trio-thread reader waits on its own descriptors after a batch (1 ms; 0 turns it off).

Only without the data thread. A reply crossing back (a ping answered by the kernel during our TUN
write, a TCP ACK) usually comes within this window and is then served without a pass through
Trio's scheduler. The wait sleeps in the kernel, not on the CPU, but holds the Trio thread."""

LINGER_ROUNDS = 16
"""Most waits inside one linger before a Trio-thread reader passes through Trio's scheduler."""

THREAD_BATCHES = 4
"""Most batches the data thread serves from one descriptor in one turn (fairness with Trio)."""


class WireGuardDevice(Protocol):
    """What the shell needs from a sans-IO WireGuard device (see :class:`punchtrio.wireguard.Device`)."""

    under_load: bool

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bytes | None: ...
    def process_handshakes(self, now: float, limit: int) -> bool: ...
    @property
    def handshake_queue_room(self) -> int: ...  # read only when there are handshake sockets
    def send_packet(self, packet: bytes, now: float) -> tuple[bytes, Address] | None: ...
    def datagrams_to_send(self) -> list[tuple[bytes, Address]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Any: ...
    def peer_stats(self) -> Mapping[bytes, Any]: ...


@runtime_checkable
class HandsOffToTrio(Protocol):
    """A device whose methods sometimes need the Trio thread (:class:`punchtrio.mux.MuxedDevice`).

    Such a device still gets the data thread: while the thread runs, the tunnel calls
    ``set_handoff(handoff)``, and the device passes each call that needs Trio to
    ``handoff(call)`` instead of making it. The tunnel makes the calls on the Trio thread, in
    order, writes each ``bytes`` result (an IP packet) to the TUN, and sends what the device
    queued; it calls ``set_handoff(None)`` once the thread has stopped.
    """

    def set_handoff(self, handoff: Callable[[Callable[[], object]], None] | None) -> None: ...


@dataclass
class TunnelCounters:
    """Counts kept by the shell (the device keeps per-peer byte counts).

    ``datagrams_received``/``datagrams_sent`` count UDP datagrams; ``packets_to_tun`` and
    ``packets_from_tun`` count IP packets; ``udp_batches``/``tun_batches`` count the drain loops
    that moved them (packets per batch is what the shell amortises its checkpoint over);
    ``udp_reads`` counts socket reads (fewer than datagrams when UDP GRO coalesced them);
    ``sent_by_type`` counts sent WireGuard messages by type (1 initiation, 2 response, 3 cookie
    reply, 4 transport); the ``*_errors`` count packets lost because the kernel refused them (a full
    buffer, no route) or a read failed (an ICMP error queued on the socket, a truncated read).
    """

    datagrams_received: int = 0
    datagrams_sent: int = 0
    packets_from_tun: int = 0
    packets_to_tun: int = 0
    udp_batches: int = 0
    udp_reads: int = 0
    tun_batches: int = 0
    receive_errors: int = 0
    send_errors: int = 0
    tun_write_errors: int = 0
    sent_by_type: dict[int, int] = field(default_factory=dict)


class UserspaceTunnel:
    """A running tunnel: ``device`` (sans-IO WireGuard) over UDP ``sockets`` and a TUN ``tun``.

    Built by :func:`open_userspace_tunnel`; constructing it directly is for other shells (a shared
    multiplexed socket) and tests. :meth:`serve` runs until cancelled; the caller owns closing the
    descriptors. ``on_event`` is called (on the Trio thread) with every event the device reports.
    ``gso`` lets the shell send runs of equal-sized datagrams to one peer as one UDP GSO
    ``sendmsg`` (Linux >= 4.18; it falls back to one ``sendto`` per datagram by itself when the
    kernel refuses). ``gro`` asks the kernel to hand over such runs in one read (UDP GRO, Linux >=
    5.0), split by the shell. Both apply only when every socket is a real :class:`socket.socket`.

    ``data_thread`` chooses who waits on the descriptors. ``None`` (the default) uses the data
    thread for a :class:`punchtrio.wireguard.Device`, whose methods never call into Trio, and for
    a device that hands such calls to the Trio thread (:class:`HandsOffToTrio`, such as the
    connector's :class:`punchtrio.mux.MuxedDevice`); ``True`` uses it for any device (its methods
    then run off the Trio thread, in turns with Trio's run loop: they must not call Trio unless
    handed off); ``False`` never. It is never used with socket-like stand-ins
    (netsim) or a clock that is not the kernel's (a test's ``MockClock``), which cannot see a
    thread. Without it, Trio tasks read, and ``linger`` is how long, in seconds, a reader keeps
    waiting on its own descriptors after a batch before handing the thread back to Trio (see
    :data:`LINGER`; 0 turns it off; real sockets only). :attr:`data_path` says which ran.

    ``handshake_sockets`` are receive-only siblings of ``sockets`` that the kernel hands every
    non-transport datagram (see :func:`split_handshakes`); the shell reads at most
    :data:`HANDSHAKE_READS` from one per turn, so a handshake flood fills their buffer, not the
    transport socket's, and the excess is dropped by the kernel.
    """

    def __init__(
        self,
        device: WireGuardDevice,
        tun: TunDevice | Any,
        sockets: list[socket.socket],
        *,
        on_event: Callable[[object], None] | None = None,
        gso: bool = True,
        gro: bool = True,
        linger: float = LINGER,
        handshake_sockets: Sequence[socket.socket] = (),
        data_thread: bool | None = None,
    ) -> None:
        self.device = device
        self.tun = tun
        self.counters = TunnelCounters()
        self.on_event = on_event
        self._socket4 = next((s for s in sockets if s.family == socket.AF_INET), None)
        self._socket6 = next((s for s in sockets if s.family == socket.AF_INET6), None)
        self._sockets = sockets
        self._handshake_sockets = list(handshake_sockets)
        self._listen_port = int(sockets[0].getsockname()[1]) if sockets else 0
        self._timer_scope: trio.CancelScope | None = None
        # GSO and GRO need the kernel: socket-like stand-ins (netsim) get the plain path.
        self._real = all(isinstance(sock, socket.socket) for sock in sockets)
        self._gso = gso and self._real
        self._gro = gro and self._real
        self._tun_writer = TunWriter(tun.fileno(), self.counters)
        self._armed = math.inf
        self._linger = max(0.0, linger) if self._real else 0.0
        self._data_thread = data_thread
        self._poller: select.epoll | None = None
        self._now: Callable[[], float] = trio.current_time
        # One batch function per descriptor: the readers, the linger and the data thread call them.
        self._batches: dict[int, Callable[[], tuple[bool, list[bytes] | None]]] = {}
        # What the data thread leaves for the Trio thread: events, and whether the timer moved.
        self._handoff_events: list[object] = []
        self._handoff_calls: list[Callable[[], object]] = []
        self._handoff_due = False
        self._handoff_wake: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._turns: RunLoopTurns | None = None
        self._wake_w: int | None = None  # the data thread's wake-up pipe while it runs
        self._wake_r: int | None = None
        self.data_path = ""
        """Which data path :meth:`serve` runs: ``"thread"`` (the data thread), ``"trio"`` (Trio
        tasks), or ``""`` before it starts."""

    @property
    def name(self) -> str:
        """The TUN interface's name."""
        return str(self.tun.name)

    @property
    def listen_port(self) -> int:
        """The local UDP port WireGuard listens on."""
        return self._listen_port

    @property
    def data_thread_turns(self) -> int:
        """Turns the data thread has taken so far (0 when it does not run)."""
        return self._turns.turns if self._turns is not None else 0

    def peer_stats(self) -> Mapping[bytes, PeerStats]:
        """Return per-peer statistics (endpoint, rx/tx bytes, last handshake), keyed by public key."""
        return self.device.peer_stats()

    @property
    def sockets(self) -> list[socket.socket]:
        """The UDP sockets the tunnel sends and receives on (one per address family)."""
        return list(self._sockets)

    def flush(self) -> None:
        """Send what the device queued, hand out its events and re-arm its timer.

        Call it (from the Trio thread) after changing the device outside the data path, e.g. a
        peer added or a persistent keepalive turned on through the UAPI socket.
        """
        self._flush()

    def receive_relayed(self, data: bytes, addr: Address) -> None:
        """Handle one datagram that reached us by another transport as if the socket had read it.

        For paths that do not arrive on the UDP sockets (a relay over TCP or TLS): ``data`` goes
        through the device's receive path with ``addr`` as its source, a decrypted packet goes to
        the TUN (dropped and counted in ``tun_write_errors`` if the writer's backlog is full: the
        stream's reader never waits on the TUN), and what the device queued in answer is sent.
        Call it from the Trio thread while :meth:`serve` runs.
        """
        counters = self.counters
        counters.datagrams_received += 1
        now = trio.current_time()
        packet = self.device.receive_datagram(data, addr, now)
        if packet is not None:
            writer = self._tun_writer
            if not writer.write_now(packet) and not writer.offer([packet]):
                counters.tun_write_errors += 1
        self.device.process_handshakes(now, HANDSHAKES_PER_BATCH)
        self._flush()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Move packets until cancelled; reports started once the descriptors are being watched."""
        clock = trio.lowlevel.current_clock()
        real_clock = clock_is_real(clock)
        wanted = self._data_thread
        if wanted is None:
            wanted = isinstance(self.device, (Device, HandsOffToTrio))
        threaded = wanted and self._real and real_clock
        self.data_path = "thread" if threaded else "trio"
        self._tun_writer.inline = not real_clock
        self._now = clock.current_time if threaded else trio.current_time
        flush = self._flush_from_thread if threaded else self._flush
        batches = self._batches
        tun_fd = self.tun.fileno()
        tun_batch = batches[tun_fd] = self._tun_batch_function(flush)
        for sock in self._sockets:
            batches[sock.fileno()] = self._udp_batch(sock, flush=flush, answer=tun_batch)
        for sock in self._handshake_sockets:
            batches[sock.fileno()] = self._udp_batch(
                sock, HANDSHAKE_READS, handshakes=True, flush=flush
            )
        if threaded or self._linger:
            self._poller = select.epoll()
            for fd in batches:
                self._poller.register(fd, select.EPOLLIN)
        try:
            async with trio.open_nursery() as nursery:
                if threaded:
                    await nursery.start(self._serve_on_thread)
                else:
                    for sock in [*self._sockets, *self._handshake_sockets]:
                        nursery.start_soon(self._udp_reader, sock)
                    nursery.start_soon(self._tun_reader, tun_fd)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._tun_writer.run)
                self._flush()
                task_status.started()
        finally:
            if self._poller is not None:
                self._poller.close()
                self._poller = None
            batches.clear()

    # --- the data thread ---------------------------------------------------------------------

    async def _serve_on_thread(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the data thread (and the task that takes its hand-offs) until cancelled."""
        assert self._poller is not None
        stop = threading.Event()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(wake_r, select.EPOLLIN)
        self._batches[wake_r] = self._drain_wake(wake_r)
        self._wake_r = wake_r
        self._token = trio.lowlevel.current_trio_token()
        self._handoff_wake = trio.Event()
        turns = self._turns = RunLoopTurns()
        trio.lowlevel.add_instrument(turns)
        handing_off = self.device if isinstance(self.device, HandsOffToTrio) else None
        if handing_off is not None:
            handing_off.set_handoff(self._hand_off)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._take_handoffs)
                nursery.start_soon(self._stop_thread_when_cancelled, stop, wake_w)
                task_status.started()
                self._wake_w = wake_w
                await trio.to_thread.run_sync(self._thread_loop, turns, stop)
        finally:
            if handing_off is not None:
                handing_off.set_handoff(None)
                self._handoff_calls.clear()  # the datagrams they carried are dropped
            self._wake_w = self._wake_r = None
            self._batches.pop(wake_r, None)
            trio.lowlevel.remove_instrument(turns)
            self._token = None
            os.close(wake_r)
            os.close(wake_w)

    async def _stop_thread_when_cancelled(self, stop: threading.Event, wake: int) -> None:
        try:
            await trio.sleep_forever()
        finally:
            stop.set()
            with contextlib.suppress(BlockingIOError):
                os.write(wake, b"x")

    @staticmethod
    def _drain_wake(fd: int) -> Callable[[], tuple[bool, list[bytes] | None]]:
        """Return a batch function that empties the data thread's wake-up pipe."""

        def batch() -> tuple[bool, list[bytes] | None]:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):
                    pass
            return True, None

        return batch

    def _thread_loop(self, turns: RunLoopTurns, stop: threading.Event) -> None:
        """The data thread: sleep on the descriptors, serve them in turns with Trio's run loop.

        Each turn serves the transport descriptors (UDP sockets, TUN) first, up to
        :data:`THREAD_BATCHES` batches each, then one batch of each readable handshake socket;
        when the device's timer is due (at once while handshake messages are queued), the thread
        calls ``handle_timer`` itself and polls without sleeping until it is not. So the flood's
        work stays on this thread, in small quanta behind transport data, and Trio's thread is
        never woken for it (two threads taking turns with the GIL would delay every packet by up
        to the interpreter's switch interval, 5 ms). Handshake work (those batches and timer
        calls) gets at most :data:`HANDSHAKE_SHARE` of the thread's time while transport data
        flows: after each turn of it, the handshake sockets and a due timer rest in proportion
        to the time it took, while transport descriptors are still served at once.
        """
        assert self._poller is not None
        poller = self._poller
        poll = poller.poll
        batches = self._batches
        put = self._tun_writer.put_blocking
        device = self.device
        now_ = self._now
        handshake_fds = [sock.fileno() for sock in self._handshake_sockets]
        rest_per_second = (1.0 - HANDSHAKE_SHARE) / HANDSHAKE_SHARE
        due = resting = False
        resting_until = last_timer = last_transport = -math.inf
        spent = 0.0  # seconds of handshake work since the last rest
        wake = self._wake_r
        while not stop.is_set():
            timeout = -1.0
            if resting:
                left = resting_until - now_()
                if left > 0:
                    timeout = left
                else:
                    resting = False
                    for fd in handshake_fds:
                        poller.modify(fd, select.EPOLLIN)
            if due and not resting:
                timeout = 0.0
            ready = poll(timeout)
            stalled = None
            turns.acquire()
            try:
                if stop.is_set():
                    return
                later = []
                for fd, _flags in ready:
                    if fd in handshake_fds:
                        later.append(fd)  # behind the transport descriptors, one batch each
                        continue
                    batch = batches.get(fd)
                    if batch is None:
                        continue
                    if fd != wake:
                        last_transport = now_()
                    for _ in range(THREAD_BATCHES):
                        drained, stalled = batch()
                        if drained or stalled is not None or turns.loop_waiting:
                            break
                    if stalled is not None:
                        break
                if stalled is None and not resting:
                    began = now_()
                    worked = bool(later)
                    for fd in later:
                        stalled = batches[fd]()[1]
                        if stalled is not None:
                            break
                    now = now_()
                    deadline = device.get_timer()
                    if (
                        stalled is None
                        and deadline is not None
                        and deadline <= now
                        and (not later or now - last_timer >= THREAD_TIMER_INTERVAL)
                    ):
                        last_timer = now
                        worked = True
                        device.handle_timer(now)
                        self._flush_from_thread()
                        deadline = device.get_timer()
                    ended = now_()
                    due = deadline is not None and deadline <= ended
                    if not (rest_per_second > 0 and ended - last_transport < TRANSPORT_RECENT):
                        spent = 0.0
                    elif worked:
                        # epoll sleeps whole milliseconds: short turns add up to one rest.
                        spent += ended - began
                        if spent * rest_per_second >= _MIN_REST:
                            resting_until = ended + spent * rest_per_second
                            resting = True
                            spent = 0.0
                            for fd in handshake_fds:
                                poller.modify(fd, 0)  # the kernel keeps (or drops) what arrives
            finally:
                turns.release()
            if stalled is not None:
                put(stalled, stop)  # out of turn: the run loop goes on while the writer catches up

    def _flush_from_thread(self) -> None:
        """:meth:`_flush` for the data thread: events and timer changes go to the Trio thread."""
        device = self.device
        queued = device.datagrams_to_send()
        if queued:
            self._count_sent(queued)
            self._send_batch(queued)
        due = False
        if self.on_event is not None:
            while (event := device.next_event()) is not None:
                self._handoff_events.append(event)
                due = True
        deadline = device.get_timer()
        # A deadline already past is the data thread's own (see _thread_loop): Trio's timer
        # takes only those still ahead.
        if deadline is not None and deadline < self._armed and deadline > self._now():
            self._armed = deadline
            due = True
        if due:
            self._request_handoff()

    def _hand_off(self, call: Callable[[], object]) -> None:
        """The device's handoff (see :class:`HandsOffToTrio`), from either thread in its turn."""
        self._handoff_calls.append(call)
        self._request_handoff()

    def _request_handoff(self) -> None:
        if not self._handoff_due and self._token is not None:
            self._handoff_due = True
            try:
                self._token.run_sync_soon(self._wake_handoffs)
            except trio.RunFinishedError:
                pass

    def _wake_handoffs(self) -> None:
        if self._handoff_wake is not None:
            self._handoff_wake.set()

    async def _take_handoffs(self) -> None:
        """On the Trio thread: deliver the data thread's events, move the timer, make the
        device's handed-off calls."""
        while True:
            assert self._handoff_wake is not None
            await self._handoff_wake.wait()
            self._handoff_wake = trio.Event()
            self._handoff_due = False
            if self._timer_scope is not None:
                self._timer_scope.deadline = self._armed
            self._deliver_handoff_events()
            if self._handoff_calls:
                self._make_handoff_calls()

    def _make_handoff_calls(self) -> None:
        """Make the handed-off calls in order (and those they hand off in turn), write the IP
        packets they return to the TUN, and send what the device queued in answer."""
        counters = self.counters
        writer = self._tun_writer
        while self._handoff_calls:
            calls, self._handoff_calls = self._handoff_calls, []
            packets = [p for call in calls if type(p := call()) is bytes]
            if packets and not writer.offer(packets):
                counters.tun_write_errors += len(packets)  # the backlog is full: dropped
        self.device.process_handshakes(trio.current_time(), HANDSHAKES_PER_BATCH)
        self._flush()

    def _deliver_handoff_events(self) -> None:
        events, self._handoff_events = self._handoff_events, []
        if self.on_event is not None:
            for event in events:
                self.on_event(event)

    # --- Trio-thread readers -----------------------------------------------------------------

    async def _udp_reader(self, sock: socket.socket) -> None:
        await self._read(sock.fileno())

    async def _tun_reader(self, fd: int) -> None:
        await self._read(fd)

    async def _read(self, fd: int) -> None:
        """Wait until ``fd`` is readable, drain it batch by batch, linger, and wait again."""
        batch = self._batches[fd]
        linger = self._linger_loop
        put = self._tun_writer.put
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                drained, stalled = batch()
                if drained and stalled is None:
                    stalled = linger()
                    if stalled is None:
                        break
                if stalled is not None:
                    await put(stalled)
                else:
                    await trio.lowlevel.checkpoint()

    def _linger_loop(self) -> list[bytes] | None:
        """Serve what becomes readable within :data:`LINGER` without a pass through Trio.

        Returns a batch the TUN writer had no room for (the caller waits to queue it), else None.
        """
        poller = self._poller
        if poller is None or not self._linger:
            return None
        poll = poller.poll
        batches = self._batches
        for _ in range(LINGER_ROUNDS):
            ready = poll(self._linger)
            if not ready:
                return None
            for fd, _flags in ready:
                batch = batches.get(fd)
                if batch is not None:
                    stalled = batch()[1]
                    if stalled is not None:
                        return stalled
        return None

    # --- batches (either thread) ---------------------------------------------------------------

    def _udp_batch(
        self,
        sock: socket.socket,
        limit: int = BATCH,
        *,
        handshakes: bool = False,
        flush: Callable[[], None],
        answer: Callable[[], object] | None = None,
    ) -> Callable[[], tuple[bool, list[bytes] | None]]:
        """Return a function that reads one batch from ``sock`` and returns ``(drained, stalled)``.

        ``stalled`` is the batch of decrypted packets the TUN writer had no room for, else None.
        ``answer`` (the TUN's batch) runs right after the first packet is written to the TUN:
        what the kernel answered during that write (an echo reply, a TCP ACK) is then read and
        sent before the rest of this batch, not after it and a pass through the poll.
        """
        receive = self.device.receive_datagram
        process_handshakes = self.device.process_handshakes
        counters = self.counters
        gro = self._gro and enable_gro(sock)
        recvmsg = sock.recvmsg if gro else None
        recvfrom = sock.recvfrom
        offer = self._tun_writer.offer
        write_now = self._tun_writer.write_now
        now_ = self._now

        device = self.device
        # With handshake sockets, transport batches leave the queue to their batches and the timer.
        quantum = HANDSHAKES_PER_BATCH if handshakes or not self._handshake_sockets else 0

        def batch() -> tuple[bool, list[bytes] | None]:
            now = now_()
            drained = False
            reads = received = errors = 0
            # A handshake socket is read no faster than the device's queue drains: what the
            # queue could not take would be read only to be dropped; the kernel drops it instead.
            most = min(limit, device.handshake_queue_room) if handshakes else limit
            packets: list[bytes] = []
            keep = packets.append
            try:
                while reads < most:
                    if recvmsg is not None:
                        # With UDP GRO one read may hold many datagrams of one size from one
                        # sender, back to back; the control message gives that size.
                        data, ancdata, flags, addr = recvmsg(_READ_SIZE, GRO_CMSG_SPACE)
                        reads += 1
                        size = gro_size(ancdata) if ancdata else 0
                        if flags & socket.MSG_TRUNC:
                            errors += 1
                            continue
                    else:
                        data, addr = recvfrom(_READ_SIZE)
                        reads += 1
                        size = 0
                    addr = addr[:2]
                    if reads == 1 and (not size or len(data) <= size):
                        # The first datagram is written before the next read, as above.
                        received += 1
                        packet = receive(data, addr, now)
                        if packet is not None:
                            if not write_now(packet):
                                keep(packet)
                            elif answer is not None:
                                answer()
                    elif size and len(data) > size:
                        for i in range(0, len(data), size):
                            received += 1
                            packet = receive(data[i : i + size], addr, now)
                            if packet is not None:
                                keep(packet)
                    else:
                        received += 1
                        packet = receive(data, addr, now)
                        if packet is not None:
                            keep(packet)
            except BlockingIOError:
                drained = True
            except OSError:
                errors += 1  # an ICMP error queued on the socket; the next read goes on
            counters.udp_batches += 1
            counters.udp_reads += reads
            counters.datagrams_received += received
            counters.receive_errors += errors
            stalled = packets if packets and not offer(packets) else None
            # Handshakes after the batch's transport data, a bounded share (the device queued them).
            if quantum:
                process_handshakes(now, quantum)
            flush()
            return drained, stalled

        return batch

    def _tun_batch_function(
        self, flush: Callable[[], None]
    ) -> Callable[[], tuple[bool, list[bytes] | None]]:
        """Return a function that reads, encrypts and sends one batch from the TUN."""
        read = os.read
        fd = self._tun_writer.fd
        device = self.device
        now_ = self._now
        counters = self.counters
        send_batch = self._send_batch

        def batch() -> tuple[bool, list[bytes] | None]:
            try:
                first = read(fd, _READ_SIZE)
            except BlockingIOError:
                # Nothing waiting (a UDP batch's answer that found none): nothing changed in
                # the device, so there is nothing to count or flush.
                return True, None
            # Looked up per batch: a device may swap its send path (a relay route, see MuxedDevice).
            send_packet = device.send_packet
            now = now_()
            drained = False
            count = 0
            out_batch: list[tuple[bytes, Address]] = []
            append = out_batch.append
            try:
                # The first packet goes out before the next read: a lone packet (a ping, an ACK)
                # does not wait for the read that finds the TUN empty.
                out = send_packet(first, now)
                count = 1
                if out is not None:
                    send_batch([out])
                while count < BATCH:
                    packet = read(fd, _READ_SIZE)
                    count += 1
                    out = send_packet(packet, now)
                    if out is not None:
                        append(out)
            except BlockingIOError:
                drained = True
            counters.tun_batches += 1
            counters.packets_from_tun += count
            if out_batch:
                send_batch(out_batch)
            flush()
            return drained, None

        return batch

    def _send_batch(self, batch: list[tuple[bytes, Address]]) -> None:
        """Send datagrams; runs of equal size to one address go out as one UDP GSO ``sendmsg``."""
        counters = self.counters
        i, n = 0, len(batch)
        while i < n:
            data, addr = batch[i]
            size = len(data)
            j = i + 1
            if self._gso and size:
                # The kernel cuts a GSO send into ``size`` pieces; only the last may be shorter.
                limit = min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // size)
                while j < limit and batch[j][1] == addr:
                    length = len(batch[j][0])
                    if length > size:
                        break
                    j += 1
                    if length < size:
                        break
            sock = self._socket6 if ":" in addr[0] else self._socket4
            try:
                if sock is None:
                    raise OSError(f"no UDP socket for the address family of {addr[0]}")
                if j - i == 1:
                    sock.sendto(data, addr)
                else:
                    segment = [(socket.SOL_UDP, UDP_SEGMENT, GSO_SIZE.pack(size))]
                    sock.sendmsg([d for d, _ in batch[i:j]], segment, 0, addr)
                counters.datagrams_sent += j - i
            except OSError as exc:
                if j - i > 1 and exc.errno in NO_GSO:
                    self._gso = False  # this kernel or route cannot segment: one by one from now
                    continue
                if j - i > 1 and exc.errno == errno.EMSGSIZE and sock is not None:
                    # Segments above the route's MTU (a relay frame around a full-sized
                    # datagram): the kernel fragments them only when they go one by one.
                    for datagram, _ in batch[i:j]:
                        try:
                            sock.sendto(datagram, addr)
                            counters.datagrams_sent += 1
                        except OSError:
                            counters.send_errors += 1
                    i = j
                    continue
                counters.send_errors += j - i
            i = j

    def _count_sent(self, queued: list[tuple[bytes, Address]]) -> None:
        by_type = self.counters.sent_by_type
        for data, _ in queued:
            if data:
                by_type[data[0]] = by_type.get(data[0], 0) + 1

    def _flush(self) -> None:
        """Send what the device queued, hand its events out and re-arm the timer."""
        device = self.device
        queued = device.datagrams_to_send()
        if queued:
            self._count_sent(queued)
            self._send_batch(queued)
        if self.on_event is not None:
            if self._handoff_events:  # the data thread's come first, to keep the order
                self._deliver_handoff_events()
            while (event := device.next_event()) is not None:
                self.on_event(event)
        deadline = device.get_timer()
        if deadline is not None and self._wake_w is not None and deadline <= self._now():
            # Due now (handshake messages queued): the data thread serves it, not Trio's thread.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"t")
            return
        # Only an earlier deadline re-arms the timer: a later one lets it fire early, which the
        # device allows, instead of moving the cancel scope on nearly every packet.
        if deadline is not None and deadline < self._armed:
            self._armed = deadline
            if self._timer_scope is not None:
                self._timer_scope.deadline = deadline

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._armed) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self.device.handle_timer(trio.current_time())
            self._armed = math.inf  # _flush stores the device's next deadline
            self._flush()
