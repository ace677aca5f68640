"""Simulated UDP sockets: the Trio socket interface plus a non-blocking interface for fast paths."""

from __future__ import annotations

import errno
import os
import socket as _stdlib_socket
from collections import deque
from typing import TYPE_CHECKING, Any, overload

import trio
from trio.socket import SocketType

from ._addresses import IPAddress, NetsimError, parse_sockaddr, to_sockaddr

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._topology import Host

RECEIVE_QUEUE_LIMIT = 1024
"""Datagrams a simulated socket queues before it drops arrivals (verdict ``buffer-full``)."""

MAX_DATAGRAM = 65507
"""Largest UDP payload in bytes; ``sendto`` with more raises ``OSError(EMSGSIZE)``."""


class UnsupportedSocketError(NetsimError, OSError):
    """The simulation was asked for a socket it does not simulate (it simulates UDP only)."""


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "Bad file descriptor (netsim socket is closed)")


class UDPSocket(SocketType):
    """A UDP socket on a simulated :class:`Host`: a drop-in ``trio.socket`` socket.

    Create one with ``trio.socket.socket(AF_INET, SOCK_DGRAM)`` inside ``host.activate()``, or with
    :meth:`Host.udp_socket`. It implements ``bind``, ``connect``, ``send``, ``sendto``, ``recv``,
    ``recv_into``, ``recvfrom``, ``recvfrom_into``, ``getsockname``, ``getpeername``, ``close`` and
    the context manager; socket options are accepted and remembered but change nothing. Sending
    before binding binds an ephemeral port, as the kernel does. Operations on a closed socket raise
    ``OSError(EBADF)``; a task blocked in a receive when the socket closes gets
    :class:`trio.ClosedResourceError`.

    For sans-IO cores and fast paths that drain a socket without an ``await`` per datagram, it also
    offers :meth:`sendto_nowait`, :meth:`recvfrom_nowait`, :meth:`recvfrom_into_nowait` (raising
    :class:`BlockingIOError` when empty) and :meth:`wait_readable`.
    """

    def __init__(self, host: Host, family: int) -> None:
        super().__init__()
        self._host = host
        self._family = _stdlib_socket.AddressFamily(family)
        self._local_ip: IPAddress | None = None
        self._port = 0
        self._peer: tuple[IPAddress, int] | None = None
        self._queue: deque[tuple[bytes, tuple[IPAddress, int]]] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._options: dict[tuple[int, int], int | bytes] = {}
        self._signal: _ReadySignal | None = None

    # --- properties and simple methods -------------------------------------------------------

    @property
    def family(self) -> _stdlib_socket.AddressFamily:
        """``AF_INET`` or ``AF_INET6``."""
        return self._family

    @property
    def type(self) -> _stdlib_socket.SocketKind:
        """Always ``SOCK_DGRAM``."""
        return _stdlib_socket.SOCK_DGRAM

    @property
    def proto(self) -> int:
        """Always 0."""
        return 0

    @property
    def did_shutdown_SHUT_WR(self) -> bool:
        """Always False: UDP sockets are not shut down."""
        return False

    @property
    def host(self) -> Host:
        """The simulated host this socket lives on."""
        return self._host

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the simulation ended)."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._local_text()}:{self._port}"
        return f"<netsim.UDPSocket {self._host.name} {state}>"

    def __enter__(self) -> UDPSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fileno(self) -> int:
        """Return -1: a simulated socket has no file descriptor."""
        return -1

    def getsockname(self) -> Any:
        """Return the bound ``(ip, port)`` (a 4-tuple for IPv6); port 0 before binding."""
        self._check_open()
        wildcard = "::" if self._family == _stdlib_socket.AF_INET6 else "0.0.0.0"
        ip = self._local_ip
        if ip is None and self._peer is not None:
            ip = self._host.source_address(self._family, self._peer[0])
        host = str(ip) if ip is not None else wildcard
        if self._family == _stdlib_socket.AF_INET6:
            return (host, self._port, 0, 0)
        return (host, self._port)

    def getpeername(self) -> Any:
        """Return the connected peer's address; ``OSError(ENOTCONN)`` if not connected."""
        self._check_open()
        if self._peer is None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return to_sockaddr(self._family, self._peer)

    @overload
    def getsockopt(self, level: int, optname: int) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        """Return a value set with :meth:`setsockopt` (0 or empty bytes otherwise)."""
        self._check_open()
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
        """Remember an option; the simulation ignores its meaning."""
        self._check_open()
        self._options[(level, optname)] = (
            value if isinstance(value, int) else bytes(value) if value is not None else b""
        )

    def close(self) -> None:
        """Close the socket, free its port and wake any task blocked on it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._host.unbind(self)
        self._lot.unpark_all()
        if self._signal is not None:
            self._signal.close()

    def is_readable(self) -> bool:
        """Return True if a datagram is queued (or the socket is closed, so a read would not block)."""
        return self._closed or bool(self._queue)

    async def wait_writable(self) -> None:
        """Return at once: a simulated socket is always writable."""
        self._check_open()
        await trio.lowlevel.checkpoint()

    async def wait_readable(self) -> None:
        """Block until a datagram is queued; raises :class:`trio.ClosedResourceError` on close."""
        self._check_open()
        if self._queue:
            await trio.lowlevel.checkpoint()
            return
        await self._lot.park()
        if self._closed:
            raise trio.ClosedResourceError("the netsim socket was closed while waiting")

    # --- binding and connecting --------------------------------------------------------------

    async def bind(self, address: Any) -> None:
        """Bind to ``(ip, port)``: ``ip`` is one of the host's addresses, loopback or ``""``.

        Port 0 picks an ephemeral port. Raises ``OSError`` with ``EADDRINUSE``,
        ``EADDRNOTAVAIL`` or ``EINVAL`` (already bound), as the kernel does.
        """
        await trio.lowlevel.checkpoint()
        self._bind_now(address)

    def _bind_now(self, address: Any) -> None:
        self._check_open()
        if self._port:
            raise OSError(errno.EINVAL, "Invalid argument (socket already bound)")
        ip, port = parse_sockaddr(self._family, address, allow_wildcard=True)
        self._host.bind(self, ip, port)

    def _bound(self, ip: IPAddress | None, port: int) -> None:
        self._local_ip = ip
        self._port = port

    async def connect(self, address: Any) -> None:
        """Set the default destination and accept datagrams only from it; binds if needed."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        ip, port = self._parse_destination(address)
        self._autobind()
        if self._local_ip is None:
            self._host.source_address(self._family, ip)  # ENETUNREACH without a route
        self._peer = (ip, port)

    # --- sending -----------------------------------------------------------------------------

    @overload
    async def sendto(self, data: Buffer, address: tuple[object, ...] | str | Buffer, /) -> int: ...

    @overload
    async def sendto(
        self, data: Buffer, flags: int, address: tuple[object, ...] | str | Buffer, /
    ) -> int: ...

    async def sendto(self, *args: Any) -> int:
        """Send one datagram to ``address``: ``sendto(data[, flags], address)``; returns its size."""
        await trio.lowlevel.checkpoint()
        if len(args) == 2:
            return self.sendto_nowait(args[0], args[1])
        if len(args) == 3:
            return self.sendto_nowait(args[0], args[2])
        raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args)} given)")

    async def send(self, data: Buffer, flags: int = 0, /) -> int:
        """Send one datagram to the connected peer; ``OSError(EDESTADDRREQ)`` if not connected."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        if self._peer is None:
            raise OSError(errno.EDESTADDRREQ, "Destination address required")
        return self._emit(bytes(data), self._peer)

    def sendto_nowait(self, data: Buffer, address: Any) -> int:
        """Send one datagram without a checkpoint (sending never blocks); returns its size."""
        self._check_open()
        return self._emit(bytes(data), self._parse_destination(address))

    def _parse_destination(self, address: Any) -> tuple[IPAddress, int]:
        ip, port = parse_sockaddr(
            self._family, address, allow_wildcard=False, resolve=self._resolve
        )
        assert ip is not None
        if port == 0:
            raise OSError(errno.EINVAL, "Invalid argument (destination port 0)")
        return ip, port

    def _emit(self, payload: bytes, dst: tuple[IPAddress, int]) -> int:
        if len(payload) > MAX_DATAGRAM:
            raise OSError(errno.EMSGSIZE, "Message too long")
        self._autobind()
        src_ip = self._local_ip or self._host.source_address(self._family, dst[0])
        self._host.emit((src_ip, self._port), dst, payload)
        return len(payload)

    def _autobind(self) -> None:
        if not self._port:
            self._host.bind(self, None, 0)

    # --- receiving ---------------------------------------------------------------------------

    def deliver(self, payload: bytes, src: tuple[IPAddress, int]) -> bool:
        """Queue an arriving datagram (engine only); return False if the queue is full."""
        if len(self._queue) >= RECEIVE_QUEUE_LIMIT:
            return False
        self._queue.append((payload, src))
        self._lot.unpark()
        if self._signal is not None:
            self._signal.update(True)
        return True

    def accepts_from(self, src: tuple[IPAddress, int]) -> bool:
        """Return False if the socket is connected to another peer."""
        return self._peer is None or self._peer == src

    async def _next(self) -> tuple[bytes, tuple[IPAddress, int]]:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        while not self._queue:
            await self._lot.park()
            if self._closed:
                raise trio.ClosedResourceError("the netsim socket was closed while receiving")
        item = self._queue.popleft()
        if self._signal is not None:
            self._signal.update(bool(self._queue))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    async def recvfrom(self, bufsize: int, flags: int = 0, /) -> tuple[bytes, Any]:
        """Receive one datagram, truncated to ``bufsize`` bytes, and its source address."""
        payload, src = await self._next()
        return payload[:bufsize], to_sockaddr(self._family, src)

    async def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        """Receive one datagram, truncated to ``bufsize`` bytes."""
        payload, _ = await self._next()
        return payload[:bufsize]

    async def recvfrom_into(
        self, buffer: Buffer, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, Any]:
        """Receive one datagram into ``buffer``; return the byte count and the source address."""
        payload, src = await self._next()
        return _copy_into(buffer, nbytes, payload), to_sockaddr(self._family, src)

    async def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int:
        """Receive one datagram into ``buffer``; return the byte count."""
        payload, _ = await self._next()
        return _copy_into(buffer, nbytes, payload)

    def recvfrom_nowait(self, bufsize: int) -> tuple[bytes, Any]:
        """Pop one queued datagram without blocking; raise :class:`BlockingIOError` if none."""
        payload, src = self._pop()
        return payload[:bufsize], to_sockaddr(self._family, src)

    def recvfrom_into_nowait(self, buffer: Buffer, nbytes: int = 0) -> tuple[int, Any]:
        """Like :meth:`recvfrom_into` but without blocking; :class:`BlockingIOError` if empty."""
        payload, src = self._pop()
        return _copy_into(buffer, nbytes, payload), to_sockaddr(self._family, src)

    def _pop(self) -> tuple[bytes, tuple[IPAddress, int]]:
        self._check_open()
        if not self._queue:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        item = self._queue.popleft()
        if self._signal is not None:
            self._signal.update(bool(self._queue))
        return item

    def _readiness_fd(self) -> int:
        if self._signal is None:
            self._signal = _ReadySignal()
            self._signal.update(bool(self._queue))
        return self._signal.read_fd

    # --- not simulated -----------------------------------------------------------------------

    def detach(self) -> int:
        """Not supported: raises ``OSError(EOPNOTSUPP)``."""
        raise OSError(errno.EOPNOTSUPP, "netsim sockets cannot be detached")

    def dup(self) -> SocketType:
        """Not supported: raises ``OSError(EOPNOTSUPP)``."""
        raise OSError(errno.EOPNOTSUPP, "netsim sockets cannot be duplicated")

    def listen(self, backlog: int = 128) -> None:
        """Not supported on UDP: raises ``OSError(EOPNOTSUPP)``."""
        raise OSError(errno.EOPNOTSUPP, "Operation not supported on a UDP socket")

    async def accept(self) -> tuple[SocketType, Any]:
        """Not supported on UDP: raises ``OSError(EOPNOTSUPP)``."""
        raise OSError(errno.EOPNOTSUPP, "Operation not supported on a UDP socket")

    def shutdown(self, flag: int) -> None:
        """Not supported on UDP: raises ``OSError(ENOTCONN)``."""
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    # --- helpers for the host ----------------------------------------------------------------

    def _resolve(self, name: str) -> IPAddress | None:
        """Look ``name`` up among the simulation's names, for an address of this socket's family."""
        return self._host.internet.resolve(name, int(self._family))

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error()

    def _local_text(self) -> str:
        if self._local_ip is not None:
            return str(self._local_ip)
        return "::" if self._family == _stdlib_socket.AF_INET6 else "0.0.0.0"

    @property
    def local_ip(self) -> IPAddress | None:
        """The bound address, or None for the wildcard."""
        return self._local_ip

    @property
    def port(self) -> int:
        """The bound port, 0 before binding."""
        return self._port


def _copy_into(buffer: Buffer, nbytes: int, payload: bytes) -> int:
    view = memoryview(buffer).cast("B")
    limit = len(view) if nbytes <= 0 else min(nbytes, len(view))
    count = min(limit, len(payload))
    view[:count] = payload[:count]
    return count


class _ReadySignal:
    """A pipe that is readable exactly while a socket has queued datagrams (for ``wait_readable``)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._raised = False

    def update(self, readable: bool) -> None:
        if readable and not self._raised:
            os.write(self._write_fd, b"\0")
            self._raised = True
        elif not readable and self._raised:
            os.read(self.read_fd, 1)
            self._raised = False

    def close(self) -> None:
        try:
            trio.lowlevel.notify_closing(self.read_fd)
        except RuntimeError:
            pass  # outside a Trio run nobody can be waiting
        os.close(self.read_fd)
        os.close(self._write_fd)


class NonBlockingSocket:
    """A simulated UDP socket shaped like a non-blocking stdlib :class:`socket.socket`.

    For fast paths written against raw sockets: ``await trio.lowlevel.wait_readable(sock)`` works
    (``fileno()`` is a pipe that is readable exactly while datagrams are queued), then ``recvfrom``,
    ``recvfrom_into``, ``recv`` and ``sendto`` are synchronous and raise :class:`BlockingIOError`
    when nothing is queued, as a non-blocking socket does. ``bind`` and ``connect`` are
    synchronous too. It shares its state with :attr:`trio_socket`, the :class:`UDPSocket` it
    wraps, so Trio code and a raw fast path can share one port, as the multiplexed WireGuard socket
    does. Each instance holds one pipe until :meth:`close` (or the end of the simulation).
    """

    def __init__(self, sock: UDPSocket) -> None:
        self.trio_socket = sock
        self._fd = sock._readiness_fd()

    @property
    def family(self) -> _stdlib_socket.AddressFamily:
        """``AF_INET`` or ``AF_INET6``."""
        return self.trio_socket.family

    @property
    def type(self) -> _stdlib_socket.SocketKind:
        """Always ``SOCK_DGRAM``."""
        return _stdlib_socket.SOCK_DGRAM

    def fileno(self) -> int:
        """Return a descriptor that polls readable while datagrams are queued."""
        self.trio_socket._check_open()
        return self._fd

    def setblocking(self, flag: bool) -> None:
        """Accept ``False``; raise ``OSError(EINVAL)`` for blocking mode, which is not simulated."""
        if flag:
            raise OSError(errno.EINVAL, "netsim raw sockets are always non-blocking")

    def gettimeout(self) -> float:
        """Return 0.0: the socket is non-blocking."""
        return 0.0

    def getsockname(self) -> Any:
        """See :meth:`UDPSocket.getsockname`."""
        return self.trio_socket.getsockname()

    def getpeername(self) -> Any:
        """See :meth:`UDPSocket.getpeername`."""
        return self.trio_socket.getpeername()

    def setsockopt(self, level: int, optname: int, value: int | bytes) -> None:
        """Remember an option; the simulation ignores its meaning."""
        self.trio_socket.setsockopt(level, optname, value)

    def getsockopt(self, level: int, optname: int) -> int:
        """Return a value set with :meth:`setsockopt` (0 otherwise)."""
        return self.trio_socket.getsockopt(level, optname)

    def bind(self, address: Any) -> None:
        """Bind now; errors as :meth:`UDPSocket.bind`."""
        self.trio_socket._bind_now(address)

    def connect(self, address: Any) -> None:
        """Set the default destination now; see :meth:`UDPSocket.connect`."""
        sock = self.trio_socket
        sock._check_open()
        peer = sock._parse_destination(address)
        sock._autobind()
        if sock._local_ip is None:
            sock.host.source_address(sock.family, peer[0])  # ENETUNREACH without a route
        sock._peer = peer

    def sendto(self, data: Buffer, *args: Any) -> int:
        """Send one datagram: ``sendto(data[, flags], address)``; returns its size."""
        if len(args) not in (1, 2):
            raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args) + 1} given)")
        return self.trio_socket.sendto_nowait(data, args[-1])

    def send(self, data: Buffer, flags: int = 0) -> int:
        """Send one datagram to the connected peer."""
        sock = self.trio_socket
        sock._check_open()
        if sock._peer is None:
            raise OSError(errno.EDESTADDRREQ, "Destination address required")
        return sock._emit(bytes(data), sock._peer)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        """Pop one datagram (truncated to ``bufsize``) and its source; BlockingIOError if none."""
        return self.trio_socket.recvfrom_nowait(bufsize)

    def recvfrom_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        """Pop one datagram into ``buffer``; return its size and source; BlockingIOError if none."""
        return self.trio_socket.recvfrom_into_nowait(buffer, nbytes)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Pop one datagram, truncated to ``bufsize``; BlockingIOError if none."""
        return self.trio_socket.recvfrom_nowait(bufsize)[0]

    def close(self) -> None:
        """Close the socket (both views) and its pipe. Idempotent."""
        self.trio_socket.close()

    def __enter__(self) -> NonBlockingSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<netsim.NonBlockingSocket of {self.trio_socket!r}>"
