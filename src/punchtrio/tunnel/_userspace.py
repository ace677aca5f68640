"""The userspace tunnel: punchtrio's sans-IO WireGuard driven over a UDP socket and a TUN device.

The shell owns three readable descriptors (the IPv4 and IPv6 UDP sockets and the TUN fd) and one
timer. When a descriptor is readable it is drained in a tight non-blocking loop, every packet handed
to the :class:`~punchtrio.wireguard.Device`, and the results written out, before one checkpoint per
batch: no ``await`` per packet.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import queue
import select
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..wireguard import ConfigError as WireGuardConfigError
from ..wireguard import Device, PeerConfig, PeerStats, Timers
from ._netlink import configure_interface
from ._tun import TunDevice, TunnelError
from ._uapi_server import UAPI_DIRECTORY, start_uapi
from ._wgquick import ConfigError, PeerSection, WgQuickConfig

Address = tuple[str, int]

BATCH = 256
"""Most packets handled from one descriptor before the loop checkpoints (fairness between tasks)."""

HANDSHAKE_READS = 64
"""Most datagrams read from a handshake socket (see :func:`split_handshakes`) per turn."""

HANDSHAKES_PER_BATCH = 8
"""Queued handshake messages processed after each batch of UDP datagrams, once its transport
data is decrypted and handed to the TUN: a handshake flood gets this share, never more, and what
is left waits for the next batch or the device's timer."""

SOCKET_BUFFER = 4 << 20
"""Send and receive buffer asked for on the UDP sockets (4 MiB); bursts of a fast flow fit."""

GSO_MAX_SEGMENTS = 64
"""Most datagrams sent in one UDP GSO ``sendmsg`` (the kernel's UDP_MAX_SEGMENTS on older kernels)."""

GSO_MAX_BYTES = 65000
"""Most payload bytes in one UDP GSO ``sendmsg`` (below the 65507-byte UDP limit)."""

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_GSO_SIZE = struct.Struct("=H")
_NO_GSO = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_READ_SIZE = 65535

TUN_WRITE_BACKLOG = 8
"""Batches of decrypted packets that may wait for the TUN writer thread."""

INLINE_TUN_WRITES = 4
"""Batches this small are written by the reader itself when the writer thread is idle."""

LINGER = 0.001
"""Seconds the data path waits on its own descriptors after a batch (1 ms; 0 turns it off).

Measured on a 2-core VM: a packet that finds the process asleep in Trio's run loop pays about
70 us of cold Python (Trio's scheduler) before the shell reads it; one that arrives while the
shell sleeps in :meth:`select.epoll.poll` on its own descriptors pays a few. A reply crossing back
(a ping answered by the kernel during our TUN write, a TCP ACK) usually comes within this window.
The wait sleeps in the kernel, not on the CPU."""

IDLE_WAIT = 0.02
"""Longest single wait (seconds) the shell does in place of Trio's own sleep while traffic is recent.

When Trio's internals are reachable (its epoll object, the default clock), the data path also
waits on Trio's epoll fd and up to Trio's next deadline, so it sleeps where Trio would have slept
and returns to Trio as soon as another task has I/O, a timer or a thread result to handle. Only
a task woken in the same scheduler batch as the reader can be held up, by at most this long."""

ACTIVE_WINDOW = 1.0
"""Seconds after the last packet during which the data path keeps waiting in place of Trio.

After this long without traffic the shell goes back to Trio's own wait: an idle tunnel costs
no wake-ups; the first packet after the pause pays Trio's wake-up once."""

LINGER_ROUNDS = 16
"""Most waits inside one linger before the shell passes through Trio's scheduler again."""


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
    descriptors. ``on_event`` is called with every event the device reports. ``gso`` lets the
    shell send runs of equal-sized datagrams to one peer as one UDP GSO ``sendmsg`` (Linux >= 4.18;
    it falls back to one ``sendto`` per datagram by itself when the kernel refuses). ``gro`` asks
    the kernel to hand over such runs in one read (UDP GRO, Linux >= 5.0), split by the shell. Both
    apply only when every socket is a real :class:`socket.socket`. ``linger`` is how long, in
    seconds, the shell keeps waiting on its own descriptors after a batch before handing the
    thread back to Trio (see :data:`LINGER` and :data:`IDLE_WAIT`; 0 turns both off; real sockets
    only). ``handshake_sockets`` are receive-only siblings of ``sockets`` that the kernel hands
    every non-transport datagram (see :func:`split_handshakes`); the shell reads at most
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
        real = all(isinstance(sock, socket.socket) for sock in sockets)
        self._gso = gso and real
        self._gro = gro and real
        self._tun_writer = _TunWriter(tun.fileno(), self.counters)
        self._armed = math.inf
        self._linger = max(0.0, linger) if real else 0.0
        self._poller: select.epoll | None = None
        self._trio: _TrioHook | None = None  # Trio's internals, while serving, when reachable
        self._active_until = -math.inf
        self._contended = False  # the last linger gave way to runnable tasks
        # One batch function per descriptor: the readers and the linger both call them.
        self._batches: dict[int, Callable[[], tuple[bool, list[bytes] | None]]] = {}

    @property
    def name(self) -> str:
        """The TUN interface's name."""
        return str(self.tun.name)

    @property
    def listen_port(self) -> int:
        """The local UDP port WireGuard listens on."""
        return self._listen_port

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
        """Move packets until cancelled; reports started once every reader is waiting."""
        batches = self._batches
        for sock in self._sockets:
            batches[sock.fileno()] = self._udp_batch(sock)
        for sock in self._handshake_sockets:
            batches[sock.fileno()] = self._udp_batch(sock, HANDSHAKE_READS, handshakes=True)
        tun_fd = self.tun.fileno()
        batches[tun_fd] = self._tun_batch
        if self._linger:
            self._poller = select.epoll()
            for fd in batches:
                self._poller.register(fd, select.EPOLLIN)
            self._trio = _TrioHook.find()
            if self._trio is not None:
                self._poller.register(self._trio.fd, select.EPOLLIN)
        try:
            async with trio.open_nursery() as nursery:
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
            self._trio = None
            batches.clear()

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
            self._active_until = trio.current_time() + ACTIVE_WINDOW
            while True:
                drained, stalled = batch()
                if drained and stalled is None:
                    stalled, stay = linger()
                    if stalled is None and not stay:
                        break
                if stalled is not None:
                    await put(stalled)
                else:
                    await trio.lowlevel.checkpoint()

    def _linger_loop(self) -> tuple[list[bytes] | None, bool]:
        """Serve what becomes readable soon without going through Trio's scheduler.

        Returns ``(stalled, stay)``: ``stalled`` is a batch the TUN writer had no room for (the
        caller waits to queue it); ``stay`` asks the caller to checkpoint and come back (Trio has
        work, or traffic is recent) rather than sleep in Trio's own wait.
        """
        poller = self._poller
        if poller is None:
            return None, False
        poll = poller.poll
        batches = self._batches
        hook = self._trio
        trio_fd = hook.fd if hook is not None else -1
        for _ in range(LINGER_ROUNDS):
            timeout = self._linger
            recent = hook is not None and trio.current_time() < self._active_until
            if recent:
                assert hook is not None
                budget = hook.time_to_wait()
                if budget is None:
                    # Give way once; if tasks are still runnable when we come back (another
                    # lingering reader or tunnel), sleep in Trio instead of taking turns.
                    if self._contended:
                        self._contended = False
                        return None, False
                    self._contended = True
                    return None, True
                self._contended = False
                timeout = min(IDLE_WAIT, budget)
                if timeout <= 0:
                    return None, True
            ready = poll(timeout)
            if not ready:
                return None, recent
            busy = False
            for fd, _flags in ready:
                if fd == trio_fd:
                    busy = True
                    continue
                batch = batches.get(fd)
                if batch is not None:
                    stalled = batch()[1]
                    if stalled is not None:
                        return stalled, True
            if busy:
                return None, True  # another task has I/O: through Trio, then back here
            if hook is not None:
                self._active_until = trio.current_time() + ACTIVE_WINDOW
        return None, True

    def _udp_batch(
        self, sock: socket.socket, limit: int = BATCH, *, handshakes: bool = False
    ) -> Callable[[], tuple[bool, list[bytes] | None]]:
        """Return a function that reads one batch from ``sock`` and returns ``(drained, stalled)``.

        ``stalled`` is the batch of decrypted packets the TUN writer had no room for, else None.
        """
        receive = self.device.receive_datagram
        process_handshakes = self.device.process_handshakes
        counters = self.counters
        gro = self._gro and _enable_gro(sock)
        recvmsg = sock.recvmsg if gro else None
        recvfrom = sock.recvfrom
        offer = self._tun_writer.offer
        write_now = self._tun_writer.write_now
        flush = self._flush

        device = self.device

        def batch() -> tuple[bool, list[bytes] | None]:
            now = trio.current_time()
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
                        data, ancdata, flags, addr = recvmsg(_READ_SIZE, _GRO_CMSG_SPACE)
                        reads += 1
                        size = _gro_size(ancdata) if ancdata else 0
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
                        if packet is not None and not write_now(packet):
                            keep(packet)
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
            process_handshakes(now, HANDSHAKES_PER_BATCH)
            flush()
            return drained, stalled

        return batch

    def _tun_batch(self) -> tuple[bool, list[bytes] | None]:
        """Read, encrypt and send one batch from the TUN; return ``(drained, None)``."""
        read = os.read
        fd = self._tun_writer.fd
        send_packet = self.device.send_packet
        now = trio.current_time()
        drained = False
        count = 0
        batch: list[tuple[bytes, Address]] = []
        append = batch.append
        try:
            # The first packet goes out before the next read: a lone packet (a ping, an ACK)
            # does not wait for the read that finds the TUN empty.
            out = send_packet(read(fd, _READ_SIZE), now)
            count = 1
            if out is not None:
                self._send_batch([out])
            while count < BATCH:
                packet = read(fd, _READ_SIZE)
                count += 1
                out = send_packet(packet, now)
                if out is not None:
                    append(out)
        except BlockingIOError:
            drained = True
        counters = self.counters
        counters.tun_batches += 1
        counters.packets_from_tun += count
        if batch:
            self._send_batch(batch)
        self._flush()
        return drained, None

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
                    segment = [(socket.SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))]
                    sock.sendmsg([d for d, _ in batch[i:j]], segment, 0, addr)
                counters.datagrams_sent += j - i
            except OSError as exc:
                if j - i > 1 and exc.errno in _NO_GSO:
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

    def _flush(self) -> None:
        """Send what the device queued, hand its events out and re-arm the timer."""
        device = self.device
        queued = device.datagrams_to_send()
        if queued:
            by_type = self.counters.sent_by_type
            for data, _ in queued:
                if data:
                    by_type[data[0]] = by_type.get(data[0], 0) + 1
            self._send_batch(queued)
        if self.on_event is not None:
            while (event := device.next_event()) is not None:
                self.on_event(event)
        deadline = device.get_timer()
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


class _TunWriter:
    """Writes decrypted packets to the TUN on a worker thread, batch by batch, in order.

    A TUN write runs the inner packet through the kernel's stack (for TCP, the whole receive path)
    inside the ``write`` call, and releases the GIL meanwhile; on its own thread it overlaps with
    receiving and decrypting the next batch. At most :data:`TUN_WRITE_BACKLOG` batches wait; a
    full backlog makes the reader wait, so the UDP socket buffer, not memory, absorbs a burst.
    """

    def __init__(self, fd: int, counters: TunnelCounters) -> None:
        self.fd = fd
        self._counters = counters
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(TUN_WRITE_BACKLOG)
        self._put_lock = trio.StrictFIFOLock()

    def offer(self, packets: list[bytes]) -> bool:
        """Write or queue one batch; return False (nothing done) when the backlog is full.

        A small batch while the thread has nothing left to write is written here at once: waking
        the thread would cost more than the writes (and add latency to a lone packet). Order is
        kept because ``unfinished_tasks`` only drops after a queued batch is fully written.
        """
        if len(packets) <= INLINE_TUN_WRITES and not self._queue.unfinished_tasks:
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
        to the batch, so the Trio thread never waits on it.
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
        """Queue one batch, waiting (on a thread) for room in the backlog.

        Waiters queue in arrival order: a reader may have read another socket's batch while
        lingering, and that socket's own reader must not overtake it.
        """
        async with self._put_lock:
            await trio.to_thread.run_sync(self._queue.put, packets)

    async def run(self) -> None:
        """Run the writer thread until cancelled; it finishes the queued batches first."""
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


class _TrioHook:
    """What the data path reads from the running Trio loop to wait in its place.

    The epoll fd Trio sleeps on, its run queue and its deadlines. This reaches into Trio's
    internals; :meth:`find` returns None for any other Trio layout, I/O backend or clock (a
    test's ``MockClock``, whose time is not the kernel's), and the shell lingers only
    :data:`LINGER` at a time.
    """

    __slots__ = ("_clock", "_deadlines", "_entry_queue", "_runq", "fd")

    def __init__(self, runner: Any) -> None:
        self.fd: int = runner.io_manager._epoll.fileno()
        self._runq = runner.runq
        self._deadlines = runner.deadlines
        self._clock = runner.clock
        self._entry_queue = runner.entry_queue

    @classmethod
    def find(cls) -> _TrioHook | None:
        """Return the hook for the current Trio run, or None when it is out of reach."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock

            runner = GLOBAL_RUN_CONTEXT.runner
            if type(runner.clock) is not SystemClock:
                return None
            hook = cls(runner)
            hook.time_to_wait()
        except Exception:  # any change in Trio's internals: plain lingering
            return None
        return hook if isinstance(hook.fd, int) and hook.fd >= 0 else None

    def time_to_wait(self) -> float | None:
        """Seconds until Trio's next deadline, or None when a task or callback is ready to run."""
        if self._runq or self._entry_queue.size():
            return None
        return float(self._deadlines.next_deadline() - self._clock.current_time())


def _enable_gro(sock: socket.socket) -> bool:
    """Turn on UDP GRO for ``sock``; return whether the kernel accepted it."""
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def _gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    for level, kind, value in ancdata:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


def peer_config(section: PeerSection) -> PeerConfig:
    """Return the device's :class:`~punchtrio.wireguard.PeerConfig` for one ``[Peer]`` section."""
    return PeerConfig(
        public_key=section.public_key,
        preshared_key=section.preshared_key,
        allowed_ips=section.allowed_ips,
        endpoint=section.endpoint,
        persistent_keepalive=(
            float(section.persistent_keepalive) if section.persistent_keepalive else None
        ),
    )


def add_peers(device: Device, config: WgQuickConfig) -> None:
    """Add every ``[Peer]`` of ``config`` to ``device``, in file order.

    Raises :class:`ConfigError` (``FILE:LINE: why``, naming the ``[Peer]`` line) if the device
    refuses a peer (our own key, a low-order key, an allowed IP another peer has); the peers
    before it stay added.
    """
    for section in config.peers:
        try:
            device.add_peer(peer_config(section))
        except WireGuardConfigError as exc:
            raise ConfigError(f"{config.source}:{section.line}: {exc}") from None


def bind_udp(port: int | None, *, reuse_port: bool = False) -> list[socket.socket]:
    """Return non-blocking UDP sockets bound to ``port`` on every IPv4 and IPv6 address.

    ``None`` or 0 lets the kernel pick a port (the IPv6 socket takes the same one). IPv6 is skipped
    when the host has it disabled. ``reuse_port`` sets ``SO_REUSEPORT`` first, so that
    :func:`split_handshakes` can bind siblings. Raises :class:`TunnelError` if the port is taken.
    """
    sockets: list[socket.socket] = []
    try:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(v4)
        if reuse_port:
            v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        v4.bind(("0.0.0.0", port or 0))
        port = v4.getsockname()[1]
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            v6 = None
        if v6 is not None:
            sockets.append(v6)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if reuse_port:
                v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                v6.bind(("::", port))
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:  # IPv6 disabled on this host
                    raise
                sockets.remove(v6)
                v6.close()
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise TunnelError(f"cannot bind UDP port {port or 0}: {exc.strerror}") from None
    for sock in sockets:
        sock.setblocking(False)
        for forced, plain in _BUFFER_OPTIONS:
            try:  # the FORCE variants pass net.core.*mem_max but need CAP_NET_ADMIN
                sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
            except OSError:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    return sockets


_BUFFER_OPTIONS = (
    (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
    (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
)

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)

# Classic BPF run by the kernel on each datagram for the port's reuseport group, with the UDP
# payload at offset 0: WireGuard transport (first byte 4) -> socket 0 of the group (the transport
# socket), anything else -> socket 1 (the handshake socket). Empty datagrams abort to socket 0.
_STEER_PROGRAM = b"".join(
    struct.pack("=HBBI", *insn)
    for insn in (
        (0x30, 0, 0, 0),  # ldb [0]
        (0x15, 0, 1, 4),  # jeq #4, next, skip one
        (0x06, 0, 0, 0),  # ret #0
        (0x06, 0, 0, 1),  # ret #1
    )
)


def split_handshakes(sockets: Sequence[socket.socket]) -> list[socket.socket]:
    """Bind a handshake socket beside each of ``sockets`` and steer non-transport datagrams to it.

    Each of ``sockets`` must have been bound with ``reuse_port`` (:func:`bind_udp`) and be the only
    member of its port's reuseport group. A sibling is bound to the same address and port, and a
    classic BPF program attached to the group sends WireGuard transport datagrams to the original
    socket and everything else (handshake messages, cookie replies, probes, STUN) to the sibling,
    whose small buffer the kernel simply drops from when a flood overruns it. Returns the
    non-blocking siblings, in order; on a kernel that refuses any step, closes what it made and
    returns ``[]`` (everything then arrives on ``sockets``, as without the split).
    """
    made: list[socket.socket] = []
    program = ctypes.create_string_buffer(_STEER_PROGRAM)
    fprog = struct.pack("@HP", len(_STEER_PROGRAM) // 8, ctypes.addressof(program))
    try:
        for sock in sockets:
            sibling = socket.socket(sock.family, socket.SOCK_DGRAM)
            made.append(sibling)
            if sock.family == socket.AF_INET6:
                sibling.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sibling.bind(sock.getsockname()[:2])
            sibling.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError:
        for sibling in made:
            sibling.close()
        return []
    return made


@contextlib.asynccontextmanager
async def open_userspace_tunnel(
    config: WgQuickConfig,
    *,
    name: str = "",
    timers: Timers | None = None,
    on_event: Callable[[object], None] | None = None,
    uapi_directory: str | None = UAPI_DIRECTORY,
) -> AsyncIterator[UserspaceTunnel]:
    """Bring up the tunnel ``config`` describes and yield it while it runs.

    Creates the TUN device ``name`` (``""``: the kernel picks ``tunN``) with the config's addresses,
    MTU and one route per allowed IP, binds the listen port and starts the data path. ``timers``
    overrides the protocol's timers (tests shorten them). The WireGuard UAPI socket
    ``uapi_directory/NAME.sock`` (default ``/var/run/wireguard``, where ``wg`` looks; ``None``:
    none) is served while the tunnel runs; if it cannot be (another process serves that path),
    ``on_event`` gets a :class:`UapiUnavailable` and the tunnel runs without. On exit, including cancellation, the
    tasks stop and the device (with its addresses and routes) and the sockets are gone. Raises
    :class:`ConfigError` (naming the ``[Peer]`` line) if the device refuses a peer (our own key, a
    low-order key, an allowed IP another peer has), and :class:`TunnelError` if any part cannot be
    set up; nothing is left behind in either case.
    """
    interface = config.interface
    device = Device(
        interface.private_key,
        timers=timers if timers is not None else Timers(),
        mtu=interface.mtu,
        defer_handshakes=True,
    )
    add_peers(device, config)
    with contextlib.ExitStack() as stack:
        sockets = bind_udp(interface.listen_port, reuse_port=True)
        for sock in sockets:
            stack.enter_context(sock)
        handshake_sockets = split_handshakes(sockets)
        for sock in handshake_sockets:
            stack.enter_context(sock)
        tun = stack.enter_context(TunDevice(name))
        configure_interface(
            tun.name,
            addresses=interface.addresses,
            routes=[net for section in config.peers for net in section.allowed_ips],
            mtu=interface.mtu,
        )
        tunnel = UserspaceTunnel(
            device, tun, sockets, on_event=on_event, handshake_sockets=handshake_sockets
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            if uapi_directory is not None:
                await start_uapi(
                    nursery, tunnel, device, directory=uapi_directory, on_unavailable=on_event
                )
            try:
                yield tunnel
            finally:
                nursery.cancel_scope.cancel()
