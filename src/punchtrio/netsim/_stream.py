"""Simulated TCP sockets: the Trio shell around the sans-IO :class:`TcpConnection`.

Determinism: like UDP sockets, a stream socket never draws randomness and never schedules engine
timers from an application task. What the application does (connect, send, read, close) only
changes the socket's own buffers and then submits a "kick" to the engine; the engine handles kicks
in its canonical order, and only the engine task asks the core for segments, sends them and arms
timers. Arrivals and timers run in the engine task too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket as _stdlib_socket
import zlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, overload

import trio
from trio.socket import SocketType

from ._addresses import Endpoint, IPAddress, parse_sockaddr, to_sockaddr
from ._engine import Emission
from ._socket import UnsupportedSocketError, _closed_error, _ReadySignal
from ._tcp import TcpConnection, TcpEstablished, TcpSegment, TcpState, TcpTerminated

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._topology import Host

_UNSPECIFIED: dict[int, IPAddress] = {
    _stdlib_socket.AF_INET: ipaddress.IPv4Address("0.0.0.0"),
    _stdlib_socket.AF_INET6: ipaddress.IPv6Address("::"),
}


def initial_sequence_number(local: Endpoint, remote: Endpoint, now: float) -> int:
    """Return the ISN for a connection: a hash of its endpoints plus a 4 µs clock, as RFC 6528.

    Deterministic (no RNG draw, no per-process hash seed), so a seeded simulation repeats exactly.
    """
    key = f"{local[0]}|{local[1]}|{remote[0]}|{remote[1]}".encode()
    return (zlib.crc32(key) + int(now * 250_000)) & 0xFFFFFFFF


def _fresh(error: OSError) -> OSError:
    return type(error)(error.errno, error.strerror)


class TCPSocket(SocketType):
    """A TCP socket on a simulated :class:`Host`: a drop-in ``trio.socket`` stream socket.

    Create one with ``trio.socket.socket(AF_INET, SOCK_STREAM)`` inside ``host.activate()`` (which
    is what ``trio.open_tcp_stream``, ``trio.open_tcp_listeners`` and ``trio.serve_tcp`` do), or
    with :meth:`Host.tcp_socket`. It implements ``bind``, ``listen``, ``accept``, ``connect``,
    ``send``, ``recv``, ``recv_into``, ``shutdown``, ``close``, ``getsockname``, ``getpeername``,
    ``getsockopt``/``setsockopt`` (options are remembered; ``SO_ERROR``, ``SO_TYPE`` and
    ``SO_ACCEPTCONN`` answer as the kernel does; none changes behaviour), ``wait_readable``,
    ``wait_writable``, ``is_readable`` and ``fileno`` (a pipe that polls readable exactly when a
    receive would not block; -1 once closed), so ``trio.SocketStream`` and
    ``trio.SocketListener`` work on it unchanged. ``sendto``, ``recvfrom`` and the other datagram
    calls raise :class:`UnsupportedSocketError`.

    Errors are the kernel's: ``connect`` raises :class:`ConnectionRefusedError` when the peer
    answers with an RST (a closed port) and :class:`TimeoutError` after six unanswered SYNs (127 s,
    as Linux); a reset connection raises :class:`ConnectionResetError`; ``send`` after
    ``shutdown(SHUT_WR)`` raises :class:`BrokenPipeError`; a closed socket raises
    ``OSError(EBADF)``, and a task blocked on it when it closes gets
    :class:`trio.ClosedResourceError`. ``send`` blocks while the send buffer
    (:data:`TCP_SEND_BUFFER` bytes) is full and returns how much it took.
    """

    def __init__(self, host: Host, family: int, proto: int = 0) -> None:
        super().__init__()
        self._host = host
        self._family = _stdlib_socket.AddressFamily(family)
        self._proto = proto
        self._local_ip: IPAddress | None = None
        self._port = 0
        self._local: Endpoint | None = None
        self._peer: Endpoint | None = None
        self._connection: TcpConnection | None = None
        self._listening = False
        self._backlog = 0
        self._accept_queue: deque[TCPSocket] = deque()
        self._embryos = 0
        self._listener: TCPSocket | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._shut_read = False
        self._shut_write = False
        self._options: dict[tuple[int, int], int | bytes] = {}
        self._socket_error = 0
        self._signal: _ReadySignal | None = None
        self._kicked = False
        self._flush_scheduled = False
        self._armed: float | None = None

    # --- properties and simple methods -------------------------------------------------------

    @property
    def family(self) -> _stdlib_socket.AddressFamily:
        """``AF_INET`` or ``AF_INET6``."""
        return self._family

    @property
    def type(self) -> _stdlib_socket.SocketKind:
        """Always ``SOCK_STREAM``."""
        return _stdlib_socket.SOCK_STREAM

    @property
    def proto(self) -> int:
        """The protocol number given at creation (0 or ``IPPROTO_TCP``)."""
        return self._proto

    @property
    def did_shutdown_SHUT_WR(self) -> bool:
        """True once ``shutdown(SHUT_WR)`` (or ``SHUT_RDWR``) was called."""
        return self._shut_write

    @property
    def host(self) -> Host:
        """The simulated host this socket lives on."""
        return self._host

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the simulation ended)."""
        return self._closed

    @property
    def state(self) -> str:
        """The RFC 9293 state name: ``CLOSED``, ``LISTEN``, ``SYN-SENT``, ``ESTABLISHED``, ..."""
        if self._listening and not self._closed:
            return "LISTEN"
        if self._connection is None:
            return TcpState.CLOSED.value
        return self._connection.state.value

    @property
    def port(self) -> int:
        """The bound local port, 0 before binding."""
        return self._port

    @property
    def local_ip(self) -> IPAddress | None:
        """The bound address, or None for the wildcard (or before binding)."""
        return self._local_ip

    def __repr__(self) -> str:
        where = f"{self._local_text()}:{self._port}"
        if self._peer is not None:
            where += f" -> {to_sockaddr(self._family, self._peer)[0]}:{self._peer[1]}"
        return f"<netsim.TCPSocket {self._host.name} {where} {self.state}>"

    def __enter__(self) -> TCPSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fileno(self) -> int:
        """Return a pipe's descriptor that polls readable exactly when a receive would not block.

        -1 once the socket is closed (Trio's ``SocketStream`` relies on that). The pipe is made on
        the first call and lives until :meth:`close`.
        """
        if self._closed:
            return -1
        if self._signal is None:
            self._signal = _ReadySignal()
            self._signal.update(self.is_readable())
        return self._signal.read_fd

    def getsockname(self) -> Any:
        """Return the local ``(ip, port)`` (a 4-tuple for IPv6); the wildcard and 0 before binding."""
        self._check_open()
        ip = self._local[0] if self._local is not None else self._local_ip
        return to_sockaddr(self._family, (ip or _UNSPECIFIED[self._family], self._port))

    def getpeername(self) -> Any:
        """Return the peer's address; ``OSError(ENOTCONN)`` unless connected."""
        self._check_open()
        if self._peer is None or self._connection is None or self._connection.connecting:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return to_sockaddr(self._family, self._peer)

    @overload
    def getsockopt(self, level: int, optname: int) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        """Return an option: ``SO_ERROR`` (read and cleared), ``SO_TYPE``, ``SO_ACCEPTCONN``, or
        a value set with :meth:`setsockopt` (0 or empty bytes otherwise)."""
        self._check_open()
        value: int | bytes
        if level == _stdlib_socket.SOL_SOCKET and optname == _stdlib_socket.SO_ERROR:
            value, self._socket_error = self._socket_error, 0
        elif level == _stdlib_socket.SOL_SOCKET and optname == _stdlib_socket.SO_TYPE:
            value = int(_stdlib_socket.SOCK_STREAM)
        elif level == _stdlib_socket.SOL_SOCKET and optname == _stdlib_socket.SO_ACCEPTCONN:
            value = int(self._listening)
        else:
            value = self._options.get((level, optname), 0 if buflen is None else b"")
        if buflen is None:
            return value if isinstance(value, int) else int.from_bytes(value[:4], "little")
        return value if isinstance(value, bytes) else value.to_bytes(4, "little")[:buflen]

    @overload
    def setsockopt(self, level: int, optname: int, value: int | Buffer) -> None: ...

    @overload
    def setsockopt(self, level: int, optname: int, value: None, optlen: int) -> None: ...

    def setsockopt(
        self, level: int, optname: int, value: int | Buffer | None, optlen: int | None = None
    ) -> None:
        """Remember an option (``TCP_NODELAY``, ``SO_REUSEADDR``, ...); none changes behaviour."""
        self._check_open()
        self._options[(level, optname)] = (
            int(value) if isinstance(value, int) else bytes(value) if value is not None else b""
        )

    # --- readiness ---------------------------------------------------------------------------

    def is_readable(self) -> bool:
        """Return True if a receive (or, listening, an accept) would not block."""
        if self._closed or self._shut_read:
            return True
        if self._listening:
            return bool(self._accept_queue)
        connection = self._connection
        if connection is None or connection.connecting:
            return False
        return bool(
            connection.unread
            or connection.peer_finished
            or connection.error
            or connection.terminated
        )

    def _is_writable(self) -> bool:
        connection = self._connection
        if connection is None:
            return not self._listening
        if connection.connecting:
            return False
        return bool(
            connection.send_space
            or connection.error
            or connection.terminated
            or connection.write_shut
        )

    async def wait_readable(self) -> None:
        """Block until :meth:`is_readable`; raises :class:`trio.ClosedResourceError` on close."""
        await self._wait(self.is_readable)

    async def wait_writable(self) -> None:
        """Block until a send would not block (or would fail at once); connected sockets only
        wait while connecting or while the send buffer is full."""
        await self._wait(self._is_writable)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        self._check_open()
        if ready():
            await trio.lowlevel.checkpoint()
            return
        while not ready():
            await self._lot.park()
            if self._closed:
                raise trio.ClosedResourceError("the netsim socket was closed while waiting")

    def _changed(self) -> None:
        """Wake every task waiting on this socket and refresh the readiness pipe."""
        self._lot.unpark_all()
        if self._signal is not None and not self._closed:
            self._signal.update(self.is_readable())

    # --- binding, listening, connecting ------------------------------------------------------

    async def bind(self, address: Any) -> None:
        """Bind to ``(ip, port)``: one of the host's addresses, loopback, or ``""``/wildcard.

        Port 0 picks an ephemeral port. Raises ``OSError`` with ``EADDRINUSE``,
        ``EADDRNOTAVAIL`` or ``EINVAL`` (already bound), as the kernel does. TCP and UDP ports are
        separate, as in the kernel.
        """
        await trio.lowlevel.checkpoint()
        self._check_open()
        if self._port:
            raise OSError(errno.EINVAL, "Invalid argument (socket already bound)")
        ip, port = parse_sockaddr(self._family, address, allow_wildcard=True)
        self._host.bind(self, ip, port)

    def _bound(self, ip: IPAddress | None, port: int) -> None:
        self._local_ip = ip
        self._port = port

    def listen(self, backlog: int = 128) -> None:
        """Accept connections from now on; at most ``backlog`` (minimum 1) may wait for
        :meth:`accept` or their handshake; further SYNs are dropped (verdict ``buffer-full``).

        Binds an ephemeral port if unbound; ``OSError(EINVAL)`` on a connected socket.
        """
        self._check_open()
        if self._connection is not None:
            raise OSError(errno.EINVAL, "Invalid argument (socket is connected)")
        if not self._port:
            self._host.bind(self, None, 0)
        self._listening = True
        self._backlog = max(1, backlog)

    async def accept(self) -> tuple[SocketType, Any]:
        """Wait for a connection that completed its handshake; return ``(socket, address)``.

        ``OSError(EINVAL)`` unless listening; :class:`trio.ClosedResourceError` if the socket is
        closed while waiting.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        if not self._listening:
            raise OSError(errno.EINVAL, "Invalid argument (socket is not listening)")
        while not self._accept_queue:
            await self._lot.park()
            if self._closed:
                raise trio.ClosedResourceError("the netsim socket was closed while accepting")
        child = self._accept_queue.popleft()
        self._changed()
        await trio.lowlevel.cancel_shielded_checkpoint()
        assert child._peer is not None
        return child, to_sockaddr(self._family, child._peer)

    async def connect(self, address: Any) -> None:
        """Open a connection to ``(ip, port)`` and wait for the handshake; binds if needed.

        Raises :class:`ConnectionRefusedError` (RST from the peer: nothing listens there),
        :class:`TimeoutError` (no answer to six SYNs over 127 s: a NAT or link dropped them),
        ``OSError(EISCONN)`` if already connected, ``EINVAL`` on a listening socket, and
        :class:`socket.gaierror` for a name that is not an IP literal or an added name. If
        cancelled, the socket is closed (as Trio's own sockets do).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        if self._listening:
            raise OSError(errno.EINVAL, "Invalid argument (socket is listening)")
        if self._connection is not None:
            raise OSError(errno.EISCONN, "Transport endpoint is already connected")
        ip, port = parse_sockaddr(
            self._family, address, allow_wildcard=False, resolve=self._resolve
        )
        assert ip is not None
        if port == 0:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused (port 0)")
        if not self._port:
            self._host.bind(self, None, 0)
        local = (self._local_ip or self._host.source_address(self._family, ip), self._port)
        remote = (ip, port)
        now = trio.current_time()
        connection = TcpConnection.active(initial_sequence_number(local, remote, now), now)
        self._host._register_connection(self, local, remote)
        self._local, self._peer, self._connection = local, remote, connection
        self._kick()
        try:
            while connection.connecting:
                await self._lot.park()
                if self._closed:
                    raise trio.ClosedResourceError("the netsim socket was closed while connecting")
        except trio.Cancelled:
            self.close()
            raise
        if connection.error is not None:
            self._socket_error = 0
            raise _fresh(connection.error)
        await trio.lowlevel.cancel_shielded_checkpoint()

    # --- data --------------------------------------------------------------------------------

    async def send(self, data: Buffer, flags: int = 0, /) -> int:
        """Buffer as much of ``data`` as fits, blocking while the send buffer is full; return the
        byte count. Raises :class:`BrokenPipeError` after ``shutdown(SHUT_WR)`` or when not
        connected, and the connection's error (for example :class:`ConnectionResetError`)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        connection = self._connection
        if connection is None or connection.connecting:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe (not connected)")
        view = memoryview(data).cast("B")
        if not view:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return 0
        while True:
            count = connection.write(view)
            if count:
                break
            await self._lot.park()
            if self._closed:
                raise trio.ClosedResourceError("the netsim socket was closed while sending")
        self._kick()
        self._changed()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    async def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        """Return up to ``bufsize`` received bytes, blocking until some arrive; b"" at EOF.

        Raises ``OSError(ENOTCONN)`` when not connected and the connection's error (for example
        :class:`ConnectionResetError`).
        """
        return await self._receive(bufsize)

    async def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int:
        """Like :meth:`recv`, into ``buffer`` (at most ``nbytes`` bytes if given); return the count."""
        view = memoryview(buffer).cast("B")
        limit = len(view) if nbytes <= 0 else min(nbytes, len(view))
        data = await self._receive(limit)
        view[: len(data)] = data
        return len(data)

    async def _receive(self, bufsize: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        connection = self._connection
        if connection is None or connection.connecting:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        while True:
            if self._shut_read or bufsize == 0:
                data = b""
                break
            if connection.unread:
                data = connection.read(bufsize)
                if connection.wants_to_send:
                    self._kick()
                self._changed()
                break
            if connection.error is not None:
                raise _fresh(connection.error)
            if connection.peer_finished or connection.terminated:
                data = b""
                break
            await self._lot.park()
            if self._closed:
                raise trio.ClosedResourceError("the netsim socket was closed while receiving")
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def shutdown(self, flag: int) -> None:
        """``SHUT_WR`` sends a FIN after the buffered data; ``SHUT_RD`` makes receives return b"";
        ``SHUT_RDWR`` does both. ``OSError(ENOTCONN)`` unless connected."""
        self._check_open()
        connection = self._connection
        if connection is None or connection.connecting:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        if flag not in (_stdlib_socket.SHUT_RD, _stdlib_socket.SHUT_WR, _stdlib_socket.SHUT_RDWR):
            raise OSError(errno.EINVAL, "Invalid argument")
        if flag in (_stdlib_socket.SHUT_RD, _stdlib_socket.SHUT_RDWR):
            self._shut_read = True
        if flag in (_stdlib_socket.SHUT_WR, _stdlib_socket.SHUT_RDWR):
            self._shut_write = True
            connection.shutdown_write()
            self._kick()
        self._changed()

    def close(self) -> None:
        """Close the socket and wake any task blocked on it. Idempotent.

        A connection still delivers its buffered data and a FIN afterwards, unless unread data
        was waiting (then it sends an RST, as Linux does). Closing a listener resets the
        connections it had not handed out yet.
        """
        if self._closed:
            return
        self._closed = True
        self._host.unbind(self)
        if self._listening:
            pending = list(self._accept_queue)
            self._accept_queue.clear()
            for child in pending:
                child._reset()
        if self._connection is not None:
            self._connection.close()
            self._kick()
        self._lot.unpark_all()
        if self._signal is not None:
            self._signal.close()
            self._signal = None

    def _reset(self) -> None:
        """Close with an RST, whatever is buffered (a listener closing its unaccepted children)."""
        self._closed = True
        if self._connection is not None:
            self._connection.abort()
            self._kick()

    def _discard(self) -> None:
        """Close at once without sending anything (the simulation is ending)."""
        self._closed = True
        self._host.unbind(self)
        self._host._forget_connection(self)
        self._lot.unpark_all()
        if self._signal is not None:
            self._signal.close()
            self._signal = None

    # --- the engine side ---------------------------------------------------------------------

    def _kick(self) -> None:
        """Ask the engine to run :meth:`_flush` at this instant (from an application task)."""
        if self._kicked:
            return
        self._kicked = True
        host = self._host
        family = int(self._family)
        src = self._local or (self._local_ip or _UNSPECIFIED[family], self._port)
        dst = self._peer or (_UNSPECIFIED[family], 0)
        host.internet._engine.submit(
            Emission(trio.current_time(), host.index, src, dst, b"", self._on_kick, tcp=True)
        )

    def _on_kick(self, emission: Emission) -> None:
        self._kicked = False
        self._flush()

    def _schedule_flush(self) -> None:
        """Flush once after everything else due now (engine task only): acks coalesce."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._host.internet._engine.schedule(0.0, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        """Send what the core wants to send, handle its events and re-arm its timer (engine)."""
        connection = self._connection
        if connection is None or self._local is None or self._peer is None:
            return
        now = trio.current_time()
        for segment in connection.segments_to_send(now):
            self._host._transmit_segment(self._local, self._peer, segment)
        self._events()
        deadline = connection.get_timer()
        if deadline is not None and (self._armed is None or deadline < self._armed):
            self._armed = deadline
            self._host.internet._engine.schedule(max(0.0, deadline - now), self._on_timer, deadline)

    def _on_timer(self, deadline: float) -> None:
        if self._armed == deadline:
            self._armed = None
        connection = self._connection
        if connection is None:
            return
        now = trio.current_time()
        due = connection.get_timer()
        if due is not None and due <= now:
            connection.handle_timer(now)
        self._flush()

    def _events(self) -> None:
        connection = self._connection
        assert connection is not None
        while (event := connection.next_event()) is not None:
            listener = self._listener
            if isinstance(event, TcpEstablished) and listener is not None:
                listener._embryos -= 1
                if listener._closed:
                    self._listener = None
                    connection.abort()
                    self._flush()
                else:
                    self._listener = None  # no longer an embryo; accept() hands it out
                    listener._accept_queue.append(self)
                    listener._changed()
            elif isinstance(event, TcpTerminated):
                if listener is not None:  # never handed out: forget it quietly
                    listener._embryos -= 1
                    self._listener = None
                    self._closed = True
                if event.error is not None:
                    self._socket_error = event.error.errno or 0
                self._host._forget_connection(self)
        self._changed()

    def _segment_arrived(self, segment: TcpSegment) -> None:
        """Give an arriving segment to the core (engine only)."""
        connection = self._connection
        assert connection is not None
        connection.receive_segment(segment, trio.current_time())
        if connection.wants_to_send:
            self._schedule_flush()
        self._events()

    def _backlog_full(self) -> bool:
        return self._embryos + len(self._accept_queue) >= self._backlog

    def _incoming_syn(self, src: Endpoint, dst: Endpoint, segment: TcpSegment) -> None:
        """Start a connection for a SYN to this listener (engine only; see :meth:`_backlog_full`)."""
        now = trio.current_time()
        child = TCPSocket(self._host, self._family, self._proto)
        child._local_ip, child._port = dst[0], dst[1]
        child._local, child._peer = dst, src
        child._connection = TcpConnection.passive(
            initial_sequence_number(dst, src, now), segment, now
        )
        child._listener = self
        child._options = dict(self._options)
        self._embryos += 1
        self._host._register_connection(child, dst, src)
        child._flush()

    # --- not simulated -----------------------------------------------------------------------

    def detach(self) -> int:
        """Not supported: raises ``OSError(EOPNOTSUPP)``."""
        raise OSError(errno.EOPNOTSUPP, "netsim sockets cannot be detached")

    def dup(self) -> SocketType:
        """Not supported: raises ``OSError(EOPNOTSUPP)``."""
        raise OSError(errno.EOPNOTSUPP, "netsim sockets cannot be duplicated")

    async def sendto(self, *args: Any) -> int:
        """Not simulated on stream sockets: raises :class:`UnsupportedSocketError`."""
        raise UnsupportedSocketError(errno.EOPNOTSUPP, "netsim TCP sockets have no sendto")

    async def recvfrom(self, bufsize: int, flags: int = 0, /) -> tuple[bytes, Any]:
        """Not simulated on stream sockets: raises :class:`UnsupportedSocketError`."""
        raise UnsupportedSocketError(errno.EOPNOTSUPP, "netsim TCP sockets have no recvfrom")

    async def recvfrom_into(
        self, buffer: Buffer, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, Any]:
        """Not simulated on stream sockets: raises :class:`UnsupportedSocketError`."""
        raise UnsupportedSocketError(errno.EOPNOTSUPP, "netsim TCP sockets have no recvfrom_into")

    async def sendmsg(self, *args: Any) -> int:
        """Not simulated: raises :class:`UnsupportedSocketError`."""
        raise UnsupportedSocketError(errno.EOPNOTSUPP, "netsim TCP sockets have no sendmsg")

    async def recvmsg(self, *args: Any) -> Any:
        """Not simulated: raises :class:`UnsupportedSocketError`."""
        raise UnsupportedSocketError(errno.EOPNOTSUPP, "netsim TCP sockets have no recvmsg")

    async def recvmsg_into(self, *args: Any) -> Any:
        """Not simulated: raises :class:`UnsupportedSocketError`."""
        raise UnsupportedSocketError(errno.EOPNOTSUPP, "netsim TCP sockets have no recvmsg_into")

    # --- helpers -----------------------------------------------------------------------------

    def _resolve(self, name: str) -> IPAddress | None:
        """Look ``name`` up among the simulation's names, for an address of this socket's family."""
        return self._host.internet.resolve(name, int(self._family))

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error()

    def _local_text(self) -> str:
        ip = self._local[0] if self._local is not None else self._local_ip
        return str(ip or _UNSPECIFIED[self._family])
