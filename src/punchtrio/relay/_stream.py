"""A framed TCP (or TLS) connection to a relay, with bounded writes that never block the caller.

:class:`RelayStream` is the Trio shell shared by the hub relay's TCP transport and TURN over
TCP/TLS: it connects, decodes the byte stream into frames with a :class:`StreamDecoder`, and
sends already-framed bytes queued by :meth:`RelayStream.send_nowait`. :class:`BoundedWriter` is
the bounded, drop-when-full send queue under it, also used by the hub relay's server for each of
its TCP clients, so a slow reader costs a fixed amount of memory and never stalls anyone else.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import trio

from .._endpoint import format_endpoint
from .._exceptions import PunchtrioError

DEFAULT_MAX_BUFFER = 256 * 1024
"""Default bound, in bytes, of what one connection queues for sending (the hub relay's queue per
TCP client: it holds thousands of them)."""
STREAM_MAX_BUFFER = 1024 * 1024
"""Default bound, in bytes, of :class:`RelayStream`'s send queue: a peer's one connection to its
relay. Design decision: four times the server's, because the tunnel hands it a whole batch read
from the TUN at once; with 256 KiB a single TCP stream through the tunnel lost about 11 % of its
datagrams to this queue and ran at 200-230 Mbit/s in the NAT lab, with 1 MiB it lost under 1 %
and ran at 260-290 Mbit/s (2 and 4 MiB: no faster)."""
_READ_SIZE = 65536


class RelayStreamError(PunchtrioError):
    """A relay's TCP/TLS connection cannot be opened, failed, was closed, or broke its framing."""


class StreamDecoder(Protocol):
    """Turns a stream's bytes, however they were split into reads, into frames."""

    def feed(self, data: bytes) -> list[bytes]:
        """Return the frames completed by ``data``; raise a
        :class:`~punchtrio.PunchtrioError` subclass on a framing violation."""
        ...


class BoundedWriter:
    """A send queue of at most ``max_buffer`` bytes in front of a Trio stream.

    :meth:`send_nowait` never waits: it queues whole chunks while they fit and refuses (and
    counts in ``dropped`` / ``dropped_bytes``) any that do not, so frames are never cut. A task
    runs :meth:`run` to move the queue into the stream. ``sent_bytes`` counts what was handed
    to the stream.

    With :meth:`write_through` (a plain TCP socket's descriptor), a chunk that does not fit
    first pushes the queue into the kernel's socket buffer in one non-blocking write, while the
    task is not in the middle of a send: a burst larger than the queue (a batch of packets read
    from the TUN at once) is then dropped only if the connection itself is full.
    ``direct_writes`` counts those writes.

    :meth:`send_nowait` may be called from another thread than Trio's (the userspace tunnel's
    data thread, which takes turns with Trio's run loop while the loop waits for I/O): it then
    wakes :meth:`run` through the run's :class:`trio.lowlevel.TrioToken`, once per burst, so
    the frames queued during one batch leave in one send as soon as the loop runs again.
    ``thread_wakes`` counts those wake-ups.

    Design decision: wake the loop from the data thread rather than set the event there,
    because a task made runnable from another thread while the loop sleeps in its I/O wait
    is only noticed at the loop's next I/O event: queued frames then waited for an unrelated
    packet (an incoming frame, a timer), and the queue overflowed meanwhile.
    """

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1 byte")
        self.max_buffer = max_buffer
        self.sent_bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self._buffer = bytearray()
        self._wake = trio.Event()
        self._closed = False
        self._fd = -1
        self._sending = False
        self.direct_writes = 0
        self.thread_wakes = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._wake_pending = False

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet handed to the stream."""
        return len(self._buffer)

    def write_through(self, fd: int) -> None:
        """Let :meth:`send_nowait` write a full queue straight to ``fd``, a connected,
        non-blocking stream socket that :meth:`run`'s stream writes to unencrypted (``-1``
        turns it off)."""
        self._fd = fd

    def send_nowait(self, data: bytes) -> bool:
        """Queue ``data``; return ``False`` (and count a drop) if it does not fit or the writer
        is closed."""
        buffer = self._buffer
        if len(buffer) + len(data) > self.max_buffer and self._fd >= 0 and not self._sending:
            self._push()
        if self._closed or len(buffer) + len(data) > self.max_buffer:
            self.dropped += 1
            self.dropped_bytes += len(data)
            return False
        buffer += data
        if not self._wake.is_set():
            self._notify()
        return True

    def _notify(self) -> None:
        """Wake :meth:`run`: directly from Trio's thread, through the token from any other."""
        token = self._token
        if token is None or threading.get_ident() == self._trio_thread:
            self._wake.set()
        elif not self._wake_pending:
            self._wake_pending = True
            self.thread_wakes += 1
            try:
                token.run_sync_soon(self._wake_from_thread)
            except trio.RunFinishedError:
                self._wake_pending = False

    def _wake_from_thread(self) -> None:
        self._wake_pending = False
        self._wake.set()

    def close(self) -> None:
        """Refuse further data (what is queued is still written if :meth:`run` goes on)."""
        self._closed = True
        self._fd = -1
        self._wake.set()

    def _push(self) -> None:
        """Write what the queue holds to the socket without waiting (part of it if the socket
        buffer is nearly full); errors are left for :meth:`run`'s next send to raise."""
        buffer = self._buffer
        if self._closed or not buffer:
            return
        try:
            written = os.write(self._fd, buffer)
        except OSError:  # full (EAGAIN) or broken: the task's send reports a broken stream
            return
        self.direct_writes += 1
        self.sent_bytes += written
        del buffer[:written]

    async def run(self, stream: trio.abc.SendStream) -> None:
        """Write the queue into ``stream`` until cancelled or closed and drained.

        Raises what ``stream.send_all`` raises (``trio.BrokenResourceError`` and the like).
        """
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        buffer = self._buffer
        while True:
            if not buffer:
                if self._closed:
                    return
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            chunk = bytes(buffer)
            buffer.clear()
            self._sending = True
            try:
                await stream.send_all(chunk)
            finally:
                self._sending = False
            self.sent_bytes += len(chunk)


class RelayStream:
    """One framed TCP or TLS connection to a relay at ``address`` ``(host, port)``.

    ``decoder_factory`` makes the stream's :class:`StreamDecoder` (for the hub relay:
    :class:`~punchtrio.relay.HubStreamDecoder`); ``tls``, a client :class:`ssl.SSLContext`, turns
    TLS on, checked against ``server_hostname`` (default: the host of ``address``);
    ``max_buffer`` (bytes, default :data:`STREAM_MAX_BUFFER`, 1 MiB) bounds what
    :meth:`send_nowait` queues. Data queued
    before :meth:`run` connects is sent once connected.

    :attr:`counters`: ``frames`` received, ``received_bytes``; ``sent_bytes``, ``dropped`` and
    ``dropped_bytes`` of the send queue (read them through :attr:`counters`).
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        decoder_factory: Callable[[], StreamDecoder],
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_buffer: int = STREAM_MAX_BUFFER,
    ) -> None:
        self.address = address
        self._decoder_factory = decoder_factory
        self._tls = tls
        self._server_hostname = server_hostname
        self._writer = BoundedWriter(max_buffer)
        self._frames = 0
        self._received = 0
        self.connected = False
        """Whether the connection is up (set by :meth:`run`)."""

    def __repr__(self) -> str:
        return f"RelayStream({format_endpoint(self.address)}, tls={self._tls is not None})"

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of the counters (see the class docstring)."""
        writer = self._writer
        return {
            "frames": self._frames,
            "received_bytes": self._received,
            "sent_bytes": writer.sent_bytes,
            "dropped": writer.dropped,
            "dropped_bytes": writer.dropped_bytes,
        }

    def send_nowait(self, data: bytes) -> bool:
        """Queue already-framed ``data``; ``False`` (and counted) if the bounded buffer is full.

        Never blocks and never raises.
        """
        return self._writer.send_nowait(data)

    async def run(
        self,
        on_frame: Callable[[bytes, float], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, report started, then call ``on_frame(frame, now)`` for every frame received
        (``now`` is ``trio.current_time()``) until cancelled.

        Raises :class:`RelayStreamError` with a one-line reason if the connection cannot be
        opened (or the TLS handshake fails), breaks, is closed by the relay, or breaks the
        decoder's framing (a :class:`~punchtrio.PunchtrioError` from the decoder is re-raised as
        one). Cancelling closes the connection.
        """
        host, port = self.address
        where = format_endpoint((host, port))
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise RelayStreamError(f"cannot connect to relay {where}: {_reason(exc)}") from None
        stream: trio.abc.Stream = tcp
        try:
            if self._tls is not None:
                tls = trio.SSLStream(tcp, self._tls, server_hostname=self._server_hostname or host)
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                    cause = exc.__cause__ if exc.__cause__ is not None else exc
                    raise RelayStreamError(
                        f"TLS handshake with relay {where} failed: {_reason(cause)}"
                    ) from None
                stream = tls
            else:
                self._writer.write_through(kernel_fd(tcp))
            decoder = self._decoder_factory()
            self.connected = True
            task_status.started()
            failure: list[RelayStreamError] = []

            async def guarded(job: Callable[[], Awaitable[None]]) -> None:
                try:
                    await job()
                except RelayStreamError as exc:  # re-raised below, outside the nursery
                    failure.append(exc)
                    nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, partial(self._write, stream, where))
                await guarded(partial(self._read, stream, decoder, on_frame, where))
            if failure:
                raise failure[0]
        finally:
            self.connected = False
            self._writer.close()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _read(
        self,
        stream: trio.abc.ReceiveStream,
        decoder: StreamDecoder,
        on_frame: Callable[[bytes, float], None],
        where: str,
    ) -> None:
        while True:
            try:
                data = await stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                raise RelayStreamError(
                    f"connection to relay {where} broke: {_reason(cause)}"
                ) from None
            if not data:
                raise RelayStreamError(f"relay {where} closed the connection")
            self._received += len(data)
            try:
                frames = decoder.feed(data if type(data) is bytes else bytes(data))
            except PunchtrioError as exc:
                raise RelayStreamError(f"relay {where} broke the stream framing: {exc}") from None
            now = trio.current_time()
            self._frames += len(frames)
            for frame in frames:
                on_frame(frame, now)

    async def _write(self, stream: trio.abc.SendStream, where: str) -> None:
        try:
            await self._writer.run(stream)
        except (trio.BrokenResourceError, OSError) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise RelayStreamError(f"connection to relay {where} broke: {_reason(cause)}") from None


def kernel_fd(stream: trio.SocketStream) -> int:
    """The descriptor of ``stream``'s kernel socket, or ``-1`` when it is not one (a simulated
    socket of :mod:`punchtrio.netsim`, whose descriptor only signals readiness)."""
    # Trio wraps a kernel socket in its own class around a socket.socket; netsim's do not.
    if isinstance(getattr(stream.socket, "_sock", None), socket.socket):
        return stream.socket.fileno()
    return -1


def _reason(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return str(strerror)
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number in errno.errorcode:
        return errno.errorcode[number]
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
