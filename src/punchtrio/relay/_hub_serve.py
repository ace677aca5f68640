"""The Trio shell of the hub's relay: one UDP socket and one TCP (or TLS) listener on one port.

:class:`HubRelayService` drains the UDP socket in a tight non-blocking loop (no ``await`` per
datagram; with UDP GRO one read takes a whole burst, split here into its datagrams), feeds
:class:`~punchtrio.relay.HubRelayServer`, and sends what it queues: UDP in one GSO ``sendmsg``
per run of equal-sized frames to one peer (a full socket buffer drops and counts), streams
through one
:class:`~punchtrio.relay.BoundedWriter` per connection (a slow reader drops and counts, never
blocks the relay). Nothing here touches the hub's HTTP stack.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
import ssl
import struct
import sys
from collections.abc import Callable

import trio

from .._endpoint import format_endpoint
from .._exceptions import PunchtrioError
from .._socket_buffers import grow_socket_buffers
from ._hub_frames import HubRelayFrameError, HubStreamDecoder, encode_hub_stream_frame
from ._hub_server import TICK, HubRelayServer
from ._stream import DEFAULT_MAX_BUFFER, BoundedWriter, kernel_fd

BATCH = 256
"""Datagrams taken off the UDP socket (after splitting GRO reads) before the shell flushes and
yields to other tasks."""
GSO_MAX_SEGMENTS = 64
"""Most frames sent in one UDP GSO ``sendmsg`` (the kernel's limit on older kernels)."""
GSO_MAX_BYTES = 65000
"""Most bytes sent in one UDP GSO ``sendmsg`` (below the 65507-byte UDP limit)."""
UNBOUND_TIMEOUT = 20.0
"""Seconds a TCP connection may stay open without binding a key."""
TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS client has to complete its handshake."""
MAX_STREAMS = 4096
"""Most TCP/TLS connections open at once; more are closed on arrival and counted."""
_READ_SIZE = 65536
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_UDP_GRO = getattr(socket, "UDP_GRO", 104)
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
_NO_GSO = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


class HubRelayServeError(PunchtrioError):
    """The relay cannot start: its address cannot be bound, or TLS files cannot be loaded."""

    exit_code = 3


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Return a server TLS context for the relay's TCP listener from PEM files.

    Raises :class:`HubRelayServeError` if they cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise HubRelayServeError(f"cannot load the relay's TLS certificate or key: {exc}") from None
    return context


class HubRelayService:
    """Serves one :class:`~punchtrio.relay.HubRelayServer` on UDP and TCP at each of ``addresses``.

    Each address is ``(ip, port)``, at most one per IP version (a dual-stack relay gives an IPv4
    and an IPv6 one; IPv6 sockets are IPv6-only, so each family has its own). Every address is
    served on one port: port 0 lets the kernel pick one free for UDP and TCP on all of them, and
    a different port on a second address is refused. Raises :class:`ValueError` for no address,
    two of one family or different ports.
    ``tls`` (a server context, see :func:`server_tls_context`) makes the TCP side TLS;
    ``max_buffer`` bounds what is queued for each TCP client (bytes, default 256 KiB).

    ``gso`` sends runs of equal-sized frames to one peer as one UDP GSO ``sendmsg`` and ``gro``
    asks the kernel to hand a burst from one peer over in one read (Linux; both default on, both
    apply to a kernel socket only, and GSO turns itself off if the kernel refuses it).

    :attr:`counters`: ``udp_send_dropped`` (socket buffer full), ``send_errors``,
    ``stream_dropped`` frames (a client's queue was full), ``streams`` accepted,
    ``streams_refused`` (over :data:`MAX_STREAMS`), ``stream_framing_errors``,
    ``stream_timeouts`` (no bind within :data:`UNBOUND_TIMEOUT`, or no TLS handshake),
    ``udp_reads`` and ``udp_sends`` (system calls; fewer than frames when GRO and GSO batch them).
    """

    def __init__(
        self,
        server: HubRelayServer,
        *addresses: tuple[str, int],
        tls: ssl.SSLContext | None = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        gso: bool = True,
        gro: bool = True,
    ) -> None:
        versions = [ipaddress.ip_address(ip).version for ip, _ in addresses]
        if not addresses or len(set(versions)) != len(versions):
            raise ValueError("a relay serves one to two addresses, at most one per IP version")
        if len({port for _, port in addresses}) != 1:
            raise ValueError("a relay serves every address on one port")
        self.server = server
        self.addresses = addresses
        self.tls = tls
        self.max_buffer = max_buffer
        self.gso = gso
        self.gro = gro
        self._gso_max_frame = 0xFFFF  # larger frames exceeded a route's MTU: sent one by one
        self.bound: tuple[tuple[str, int], ...] = ()
        """The bound ``(ip, port)`` of each address once serving."""
        self._socks: dict[int, socket.socket] = {}  # by IP version
        self._writers: dict[int, BoundedWriter] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("udp_send_dropped", "send_errors", "stream_dropped", "streams", "streams_refused",
             "stream_framing_errors", "stream_timeouts", "udp_reads", "udp_sends"),
            0,
        )  # fmt: skip

    def __repr__(self) -> str:
        where = ", ".join(repr(address) for address in self.addresses)
        return f"HubRelayService({where}, tls={self.tls is not None})"

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every address, report the first bound ``(ip, port)`` through ``task_status``
        (:attr:`bound` has them all), serve until cancelled.

        Raises :class:`HubRelayServeError` with a one-line reason if UDP or TCP cannot be bound
        on one of them (then none is left bound).
        """
        socks, listeners = await self._bind()
        self._socks = {4 if sock.family == socket.AF_INET else 6: sock for sock in socks}
        real = all(type(sock) is socket.socket for sock in socks)
        self.gso = self.gso and real
        # The GRO reader also reads a socket that refused GRO (no size given: one datagram).
        accepted = [_enable_gro(sock) for sock in socks] if self.gro and real else []
        self.gro = True in accepted
        self.bound = tuple((str(s.getsockname()[0]), int(s.getsockname()[1])) for s in socks)
        try:
            async with trio.open_nursery() as nursery:
                for sock in socks:
                    nursery.start_soon(self._udp_loop, sock)
                nursery.start_soon(self._timer_loop)
                await nursery.start(trio.serve_listeners, self._handle_stream, listeners)
                task_status.started(self.bound[0])
        finally:
            for sock in socks:
                sock.close()
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    def metrics_lines(self) -> list[str]:
        """Return the relay's Prometheus lines: the core's, and the shell's drops."""
        counters = self.counters
        return [
            *self.server.metrics_lines(),
            "# HELP punchtrio_hub_relay_send_dropped_total Frames dropped on the way out "
            "(UDP socket buffer or a TCP client's queue full).",
            "# TYPE punchtrio_hub_relay_send_dropped_total counter",
            f'punchtrio_hub_relay_send_dropped_total{{transport="udp"}} '
            f"{counters['udp_send_dropped'] + counters['send_errors']}",
            f'punchtrio_hub_relay_send_dropped_total{{transport="tcp"}} '
            f"{counters['stream_dropped']}",
            "# HELP punchtrio_hub_relay_streams Open TCP/TLS connections of the relay.",
            "# TYPE punchtrio_hub_relay_streams gauge",
            f"punchtrio_hub_relay_streams {len(self._writers)}",
        ]

    # binding

    async def _bind(self) -> tuple[list[socket.socket], list[trio.SocketListener]]:
        port = self.addresses[0][1]
        for _attempt in range(8 if port == 0 else 1):
            socks: list[socket.socket] = []
            listeners: list[trio.SocketListener] = []
            chosen = port
            try:
                for ip, _ in self.addresses:
                    where = format_endpoint((ip, chosen))
                    sock = _udp_socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
                    socks.append(sock)
                    _prepare(sock)
                    sock.bind((ip, chosen))
                    chosen = sock.getsockname()[1]
                    listeners += await trio.open_tcp_listeners(chosen, host=ip)
            except OSError as exc:
                for sock in socks:
                    sock.close()
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the kernel's free port is taken elsewhere: pick another
                raise HubRelayServeError(
                    f"cannot serve the relay on {where}: {exc.strerror or exc}"
                ) from None
            return socks, listeners
        where = ", ".join(format_endpoint(address) for address in self.addresses)
        raise HubRelayServeError(f"cannot serve the relay on {where}: no free port")

    # the data path

    def _flush(self) -> None:
        out = self.server.datagrams_to_send()
        if not out:
            return
        writers = self._writers
        counters = self.counters
        # Frames for one UDP peer are gathered (in order) so that runs of equal size leave in one
        # GSO send; frames for different peers have no order to keep.
        by_peer: dict[tuple[str, int], list[bytes]] = {}
        for frame, route in out:
            if isinstance(route, int):
                writer = writers.get(route)
                if writer is not None and not writer.send_nowait(encode_hub_stream_frame(frame)):
                    counters["stream_dropped"] += 1
            else:
                frames = by_peer.get(route)
                if frames is None:
                    by_peer[route] = [frame]
                else:
                    frames.append(frame)
        socks = self._socks
        if by_peer and socks:
            send = self._send_runs if self.gso else self._send_each
            for route, frames in by_peer.items():
                sock = socks.get(6 if ":" in route[0] else 4)
                if sock is not None:
                    send(sock, frames, route)

    def _send_each(self, sock: socket.socket, frames: list[bytes], route: tuple[str, int]) -> None:
        sendto = sock.sendto
        counters = self.counters
        counters["udp_sends"] += len(frames)
        for frame in frames:
            try:
                sendto(frame, route)
            except BlockingIOError:
                counters["udp_send_dropped"] += 1
            except OSError:
                counters["send_errors"] += 1

    def _send_runs(self, sock: socket.socket, frames: list[bytes], route: tuple[str, int]) -> None:
        """Send ``frames`` to ``route`` on ``sock``; each run of equal-sized frames (the last of a
        run may be shorter, as GSO allows) goes out in one ``sendmsg`` that the kernel segments."""
        sendmsg = sock.sendmsg
        counters = self.counters
        i, n = 0, len(frames)
        while i < n:
            size = len(frames[i])
            j = i + 1
            limit = min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // size)
            if size > self._gso_max_frame:
                limit = j
            while j < limit:
                length = len(frames[j])
                if length > size:
                    break
                j += 1
                if length < size:
                    break
            run = frames[i:j]
            counters["udp_sends"] += 1
            try:
                if j - i == 1:
                    sendmsg(run, (), 0, route)
                else:
                    sendmsg(run, [(socket.SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, route)
            except BlockingIOError:
                counters["udp_send_dropped"] += j - i
            except OSError as exc:
                if j - i > 1 and exc.errno in _NO_GSO:
                    self.gso = False  # this kernel or route cannot segment: one by one from now
                    self._send_each(sock, frames[i:], route)
                    return
                if j - i > 1 and exc.errno == errno.EMSGSIZE:
                    # A segment above the route's MTU, which the kernel fragments only when
                    # sent on its own: frames this large go one by one from now.
                    self._gso_max_frame = min(self._gso_max_frame, size - 1)
                    self._send_each(sock, frames[i:j], route)
                else:
                    counters["send_errors"] += j - i
            i = j

    async def _udp_loop(self, sock: socket.socket) -> None:
        receive = self.server.receive_datagram
        flush = self._flush
        read = self._gro_reader(sock) if self.gro else self._plain_reader(sock)
        counters = self.counters
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            frames = reads = 0
            while frames < BATCH and reads < BATCH:
                try:
                    got = read()
                except BlockingIOError:
                    break
                except OSError:
                    got = None  # a queued ICMP error; the next read goes on
                reads += 1
                if got is None:
                    continue
                data, source, size = got
                if size and len(data) > size:
                    for offset in range(0, len(data), size):
                        receive(data[offset : offset + size], source, now)
                        frames += 1
                else:
                    receive(data, source, now)
                    frames += 1
            counters["udp_reads"] += reads
            flush()

    @staticmethod
    def _plain_reader(
        sock: socket.socket,
    ) -> Callable[[], tuple[bytes, tuple[str, int], int] | None]:
        recvfrom = sock.recvfrom

        def read() -> tuple[bytes, tuple[str, int], int]:
            data, source = recvfrom(_READ_SIZE)
            return data, source[:2], 0

        return read

    @staticmethod
    def _gro_reader(
        sock: socket.socket,
    ) -> Callable[[], tuple[bytes, tuple[str, int], int] | None]:
        recvmsg = sock.recvmsg

        def read() -> tuple[bytes, tuple[str, int], int] | None:
            data, ancdata, flags, source = recvmsg(_READ_SIZE, _GRO_CMSG_SPACE)
            if flags & socket.MSG_TRUNC:
                return None
            size = 0
            for level, kind, value in ancdata:
                if level == socket.SOL_UDP and kind == _UDP_GRO and len(value) >= 4:
                    size = _GRO_SIZE.unpack_from(value)[0]
            return data, source[:2], size

        return read

    async def _timer_loop(self) -> None:
        server = self.server
        while True:
            deadline = server.get_timer()
            if deadline is None:
                deadline = trio.current_time() + TICK
            await trio.sleep_until(deadline)
            server.handle_timer(trio.current_time())
            self._flush()

    async def _handle_stream(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()[:2]
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        if len(self._writers) >= MAX_STREAMS:
            self.counters["streams_refused"] += 1
            await trio.aclose_forcefully(tcp)
            return
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            tls = trio.SSLStream(tcp, self.tls, server_side=True)
            with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT) as scope:
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, OSError):
                    await trio.aclose_forcefully(tcp)
                    return
            if scope.cancelled_caught:
                self.counters["stream_timeouts"] += 1
                await trio.aclose_forcefully(tcp)
                return
            stream = tls
        self.counters["streams"] += 1
        server = self.server
        stream_id = server.open_stream((str(peer[0]), int(peer[1])), trio.current_time())
        writer = BoundedWriter(self.max_buffer)
        if stream is tcp:
            writer.write_through(kernel_fd(tcp))
        self._writers[stream_id] = writer
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_stream, writer, stream, nursery.cancel_scope)
                await self._read_stream(stream, stream_id)
                nursery.cancel_scope.cancel()
        finally:
            writer.close()
            del self._writers[stream_id]
            server.close_stream(stream_id)
            await trio.aclose_forcefully(stream)

    async def _write_stream(
        self, writer: BoundedWriter, stream: trio.abc.Stream, scope: trio.CancelScope
    ) -> None:
        try:
            await writer.run(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    async def _read_stream(self, stream: trio.abc.Stream, stream_id: int) -> None:
        server = self.server
        decoder = HubStreamDecoder()
        with trio.move_on_after(UNBOUND_TIMEOUT) as watchdog:
            while True:
                try:
                    data = await stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if not data:
                    return
                try:
                    frames = decoder.feed(data if type(data) is bytes else bytes(data))
                except HubRelayFrameError:
                    self.counters["stream_framing_errors"] += 1
                    return
                now = trio.current_time()
                for frame in frames:
                    server.receive_stream_frame(stream_id, frame, now)
                self._flush()
                if watchdog.deadline != math.inf and server.is_bound(stream_id):
                    watchdog.deadline = math.inf
        if watchdog.cancelled_caught:
            self.counters["stream_timeouts"] += 1


def _enable_gro(sock: socket.socket) -> bool:
    """Turn on UDP GRO for ``sock``; return whether the kernel accepted it."""
    try:
        sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 1)
    except OSError:
        return False
    return True


def _prepare(sock: socket.socket) -> None:
    """Make ``sock`` non-blocking with large buffers; an IPv6 one IPv6-only (the IPv4 address, if
    any, has its own socket)."""
    sock.setblocking(False)
    grow_socket_buffers(sock)
    if sock.family == socket.AF_INET6 and type(sock) is socket.socket:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _udp_socket(family: int) -> socket.socket:
    """A non-blocking-capable UDP socket: the simulated host's inside :mod:`punchtrio.netsim`
    (so the relay runs unchanged in a simulation), else the kernel's."""
    # No simulation runs unless punchtrio.netsim was imported: don't import it here.
    netsim = sys.modules.get("punchtrio.netsim")
    host = netsim.current_host() if netsim is not None else None
    if host is not None:
        return host.nonblocking_socket(family, socket.SOCK_DGRAM)  # type: ignore[no-any-return]
    return socket.socket(family, socket.SOCK_DGRAM)
