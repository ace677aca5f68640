"""The UAPI socket's Trio shell: ``/var/run/wireguard/IFACE.sock``, as wireguard-go serves it.

:func:`serve_uapi` listens on the root-only unix socket, frames each connection with
:class:`~punchtrio.tunnel._uapi.UapiConnection` and answers from the running device: ``get=1``
from a snapshot, ``set=1`` through :func:`~punchtrio.tunnel._uapi.plan_set` (checked whole, then
applied in one step of the Trio thread, so the data path never sees half of it).
:func:`bind_unix_listener` is the socket setup it shares with ``punchtrio up``'s control socket.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from ..wireguard import Device
from ._tun import TunnelError
from ._uapi import (
    GetRequest,
    ProtocolViolation,
    RefusedRequest,
    SetRequest,
    UapiConnection,
    UapiError,
    apply_plan,
    device_info,
    format_errno,
    format_get,
    plan_set,
)

UAPI_DIRECTORY = "/var/run/wireguard"
"""Where the ``wg`` tool looks for userspace interfaces' sockets (``IFACE.sock``)."""

SO_MARK = getattr(socket, "SO_MARK", 36)
_READ_SIZE = 65536


class SocketInUseError(TunnelError):
    """A unix socket path is served by another live process (``path`` names it)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is served by another process")
        self.path = path


@dataclass(frozen=True)
class UapiUnavailable:
    """The tunnel runs, but its UAPI socket at ``path`` could not be served: ``reason`` says why
    (another process serves that path, for example a tunnel of the same name in another network
    namespace: the socket directory is shared by all of them)."""

    path: str
    reason: str


class UapiTunnel(Protocol):
    """What the UAPI shell needs from a running tunnel (:class:`UserspaceTunnel` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def listen_port(self) -> int: ...
    @property
    def sockets(self) -> list[socket.socket]: ...
    def flush(self) -> None: ...


def uapi_path(interface: str, directory: str = UAPI_DIRECTORY) -> str:
    """Return the UAPI socket path of ``interface`` (``/var/run/wireguard/IFACE.sock``)."""
    return os.path.join(directory, f"{interface}.sock")


@contextlib.contextmanager
def bind_unix_listener(path: str) -> Iterator[socket.socket]:
    """Listen on a unix stream socket at ``path`` that only root may use, and remove it after.

    The directory is created (mode 0755) if missing; the socket file is mode 0600. A stale file
    (no process accepts on it: one that crashed) is replaced. On exit the file is removed, unless
    another process has replaced it since. Raises :class:`SocketInUseError` if a live process
    serves ``path``, :class:`OSError` if the directory or socket cannot be made.
    """
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o077)
        try:
            try:
                sock.bind(path)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if _served(path):
                    raise SocketInUseError(path) from None
                os.unlink(path)
                sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        identity = _identity(path)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if _identity(path) == identity:
                os.unlink(path)


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.ENOTSOCK, f"{path} is not a socket")
    return info.st_dev, info.st_ino


def _served(path: str) -> bool:
    """Whether some process accepts connections on the unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


class UapiServer:
    """Answers UAPI requests for ``tunnel`` and its WireGuard ``device`` (sans-IO core inside).

    Built by :func:`serve_uapi`; tests drive :meth:`handle` with bytes. ``fwmark`` is the mark
    set on the tunnel's UDP sockets through ``set=1`` (0: none).
    """

    def __init__(self, tunnel: UapiTunnel, device: Device) -> None:
        self.tunnel = tunnel
        self.device = device
        self.fwmark = 0

    def answer(self, request: object) -> bytes:
        """Return the reply to one item from :meth:`UapiConnection.next_request`."""
        if isinstance(request, GetRequest):
            info = device_info(self.device, listen_port=self.tunnel.listen_port, fwmark=self.fwmark)
            return format_get(info)
        if isinstance(request, (RefusedRequest, ProtocolViolation)):
            code = request.error.errno if isinstance(request, RefusedRequest) else request.errno
            return format_errno(code)
        if not isinstance(request, SetRequest):
            raise TypeError(f"not a UAPI request: {request!r}")
        try:
            current = device_info(
                self.device, listen_port=self.tunnel.listen_port, fwmark=self.fwmark
            )
            plan = plan_set(request, current)
            if plan.fwmark is not None:
                self._set_fwmark(plan.fwmark)
            apply_plan(self.device, plan)
        except UapiError as exc:
            return format_errno(exc.errno)
        self.tunnel.flush()  # keepalives now due, timers re-armed
        return format_errno(0)

    def handle(self, connection: UapiConnection, data: bytes) -> tuple[bytes, bool]:
        """Feed ``data`` (``b""``: end of stream) and return ``(reply bytes, close)``."""
        connection.receive_data(data)
        out = bytearray()
        while (request := connection.next_request()) is not None:
            out += self.answer(request)
            if isinstance(request, ProtocolViolation):
                return bytes(out), True
        return bytes(out), not data

    def _set_fwmark(self, mark: int) -> None:
        done: list[socket.socket] = []
        try:
            for sock in self.tunnel.sockets:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                done.append(sock)
        except OSError as exc:
            for sock in done:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
            raise UapiError(exc.errno or errno.EIO, f"cannot set fwmark: {exc}") from None
        self.fwmark = mark

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Answer one connection until the client closes it or breaks the protocol."""
        connection = UapiConnection()
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(_READ_SIZE)
                except trio.BrokenResourceError:
                    return
                reply, close = self.handle(connection, data)
                try:
                    if reply:
                        await stream.send_all(reply)
                except trio.BrokenResourceError:
                    return
                if close:
                    return


async def serve_uapi(
    tunnel: UapiTunnel,
    device: Device,
    *,
    directory: str = UAPI_DIRECTORY,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the UAPI socket of ``tunnel`` (``directory/NAME.sock``) until cancelled.

    Reports started with the socket's path once it listens; the file is removed when this
    returns. Raises :class:`SocketInUseError` if another live process serves that path and
    :class:`TunnelError` if the socket cannot be made (before reporting started: the tunnel is
    not affected).
    """
    path = uapi_path(tunnel.name, directory)
    stack = contextlib.ExitStack()
    try:
        sock = stack.enter_context(bind_unix_listener(path))
    except SocketInUseError:
        raise
    except OSError as exc:
        raise TunnelError(f"cannot serve {path}: {exc.strerror or exc}") from None
    server = UapiServer(tunnel, device)
    with stack:
        await serve_unix_connections(sock, server.serve_connection, path, task_status=task_status)


async def serve_unix_connections(
    sock: socket.socket,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    path: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on a listening unix socket (from :func:`bind_unix_listener`) until cancelled,
    running ``handler`` for each connection in its own task; reports started with ``path``."""
    listening = trio.socket.from_stdlib_socket(sock)
    async with trio.open_nursery() as nursery:
        task_status.started(path)
        while True:
            conn, _ = await listening.accept()
            nursery.start_soon(handler, trio.SocketStream(conn))


async def start_uapi(
    nursery: trio.Nursery,
    tunnel: UapiTunnel,
    device: Device,
    *,
    directory: str = UAPI_DIRECTORY,
    on_unavailable: Callable[[UapiUnavailable], None] | None = None,
) -> str | None:
    """Start :func:`serve_uapi` in ``nursery``; return the socket's path, or ``None`` if it
    could not be served (then ``on_unavailable`` gets a :class:`UapiUnavailable`: the tunnel
    carries on without ``wg show``)."""
    try:
        serve = functools.partial(serve_uapi, directory=directory)
        path: str = await nursery.start(serve, tunnel, device)
    except TunnelError as exc:
        if on_unavailable is not None:
            on_unavailable(UapiUnavailable(uapi_path(tunnel.name, directory), str(exc)))
        return None
    return path
