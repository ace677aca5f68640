"""The Trio shell of the hub's relay: one UDP socket and one TCP (or TLS) listener on one port.

:class:`HubRelayService` drains the UDP socket in a tight non-blocking loop (no ``await`` per
datagram), feeds :class:`~punchtrio.relay.HubRelayServer`, and sends what it queues: UDP with
``sendto`` (a full socket buffer drops and counts), streams through one
:class:`~punchtrio.relay.BoundedWriter` per connection (a slow reader drops and counts, never
blocks the relay). Nothing here touches the hub's HTTP stack.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
import ssl
import sys

import trio

from .._exceptions import PunchtrioError
from ._hub_frames import HubRelayFrameError, HubStreamDecoder, encode_hub_stream_frame
from ._hub_server import TICK, HubRelayServer
from ._stream import DEFAULT_MAX_BUFFER, BoundedWriter

BATCH = 256
"""Datagrams taken off the UDP socket before the shell flushes and yields to other tasks."""
UNBOUND_TIMEOUT = 20.0
"""Seconds a TCP connection may stay open without binding a key."""
TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS client has to complete its handshake."""
MAX_STREAMS = 4096
"""Most TCP/TLS connections open at once; more are closed on arrival and counted."""
_SOCKET_BUFFER = 4 * 1024 * 1024
_READ_SIZE = 65536


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
    """Serves one :class:`~punchtrio.relay.HubRelayServer` on UDP and TCP at ``address``.

    ``address`` is ``(ip, port)``; port 0 lets the kernel pick one free for both UDP and TCP.
    ``tls`` (a server context, see :func:`server_tls_context`) makes the TCP side TLS;
    ``max_buffer`` bounds what is queued for each TCP client (bytes, default 256 KiB).

    :attr:`counters`: ``udp_send_dropped`` (socket buffer full), ``send_errors``,
    ``stream_dropped`` frames (a client's queue was full), ``streams`` accepted,
    ``streams_refused`` (over :data:`MAX_STREAMS`), ``stream_framing_errors``,
    ``stream_timeouts`` (no bind within :data:`UNBOUND_TIMEOUT`, or no TLS handshake).
    """

    def __init__(
        self,
        server: HubRelayServer,
        address: tuple[str, int],
        *,
        tls: ssl.SSLContext | None = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        self.server = server
        self.address = address
        self.tls = tls
        self.max_buffer = max_buffer
        self.bound: tuple[str, int] | None = None
        """The bound ``(ip, port)`` once serving."""
        self._sock: socket.socket | None = None
        self._writers: dict[int, BoundedWriter] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("udp_send_dropped", "send_errors", "stream_dropped", "streams", "streams_refused",
             "stream_framing_errors", "stream_timeouts"),
            0,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"HubRelayService({self.address!r}, tls={self.tls is not None})"

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound ``(ip, port)`` through ``task_status``, serve until cancelled.

        Raises :class:`HubRelayServeError` with a one-line reason if UDP or TCP cannot be bound.
        """
        sock, listeners = await self._bind()
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.bound = (host, port)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp_loop, sock)
                nursery.start_soon(self._timer_loop)
                await nursery.start(trio.serve_listeners, self._handle_stream, listeners)
                task_status.started((host, port))
        finally:
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

    async def _bind(self) -> tuple[socket.socket, list[trio.SocketListener]]:
        ip, port = self.address
        where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        for _attempt in range(8 if port == 0 else 1):
            sock = _udp_socket(family)
            try:
                sock.setblocking(False)
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
                    except OSError:
                        pass
                sock.bind((ip, port))
                chosen = sock.getsockname()[1]
                listeners = await trio.open_tcp_listeners(chosen, host=ip)
            except OSError as exc:
                sock.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the kernel's free UDP port is taken on TCP: pick another
                raise HubRelayServeError(
                    f"cannot serve the relay on {where}: {exc.strerror or exc}"
                ) from None
            return sock, listeners
        raise HubRelayServeError(f"cannot serve the relay on {where}: no free port")

    # the data path

    def _flush(self) -> None:
        out = self.server.datagrams_to_send()
        if not out:
            return
        # One sendto per frame: GSO bursts overran the peer's socket in the lab.
        sendto = self._sock.sendto if self._sock is not None else None
        writers = self._writers
        counters = self.counters
        for frame, route in out:
            if isinstance(route, int):
                writer = writers.get(route)
                if writer is not None and not writer.send_nowait(encode_hub_stream_frame(frame)):
                    counters["stream_dropped"] += 1
            elif sendto is not None:
                try:
                    sendto(frame, route)
                except BlockingIOError:
                    counters["udp_send_dropped"] += 1
                except OSError:
                    counters["send_errors"] += 1

    async def _udp_loop(self, sock: socket.socket) -> None:
        recvfrom = sock.recvfrom
        receive = self.server.receive_datagram
        flush = self._flush
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(BATCH):
                try:
                    data, source = recvfrom(_READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # a queued ICMP error; the next read goes on
                receive(data, source[:2], now)
            flush()

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
        self._writers[stream_id] = writer
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_stream, writer, stream, nursery.cancel_scope)
                await self._read_stream(stream, stream_id)
                nursery.cancel_scope.cancel()
        finally:
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


def _udp_socket(family: int) -> socket.socket:
    """A non-blocking-capable UDP socket: the simulated host's inside :mod:`punchtrio.netsim`
    (so the relay runs unchanged in a simulation), else the kernel's."""
    # No simulation runs unless punchtrio.netsim was imported: don't import it here.
    netsim = sys.modules.get("punchtrio.netsim")
    host = netsim.current_host() if netsim is not None else None
    if host is not None:
        return host.nonblocking_socket(family, socket.SOCK_DGRAM)  # type: ignore[no-any-return]
    return socket.socket(family, socket.SOCK_DGRAM)
