"""The Trio shell of birthday punching: the hard side's extra sockets, opened and closed on cue.

:class:`BirthdaySockets` carries out what a :class:`~punchtrio.punch.Puncher` asks for
(:class:`OpenSockets`, :class:`KeepSocket`, :class:`CloseSockets`), sends the probes it hands out
for those sockets, and reads them: until one gets through, a datagram is shown to
:meth:`Puncher.birthday_hit`; the socket that got through then carries the peer's path (a route
for what is sent to the peer's endpoint, and everything it reads from there is handed on as if the
main socket had read it). Every socket is closed when the puncher says so, and all of them when
:meth:`BirthdaySockets.run` ends (cancellation included).
"""

from __future__ import annotations

import contextlib
import socket as _socket
import sys
from collections.abc import Callable
from typing import Any

import trio

from ._puncher import CloseSockets, KeepSocket, OpenSockets, Puncher

Address = tuple[str, int]
_MAX_DATAGRAM = 65535
_BATCH = 64


def default_socket_factory() -> Callable[[int, int], Any]:
    """The factory of non-blocking UDP sockets: the simulated host's inside
    :mod:`punchtrio.netsim`, else :class:`socket.socket`."""
    netsim = sys.modules.get("punchtrio.netsim")  # no simulation runs unless it was imported
    host = netsim.current_host() if netsim is not None else None
    return host.nonblocking_socket if host is not None else _socket.socket


class _Extra:
    __slots__ = ("index", "peer", "scope", "sock")

    def __init__(self, peer: bytes, index: int, sock: Any) -> None:
        self.peer = peer
        self.index = index
        self.sock = sock
        self.scope = trio.CancelScope()


class BirthdaySockets:
    """Open, read, keep and close the extra sockets a :class:`Puncher` asks for.

    - ``puncher``: the puncher whose :meth:`~Puncher.next_socket_action` and
      :meth:`~Puncher.socket_datagrams` this shell carries out;
    - ``route(endpoint, sender)``: sets (``sender`` a callable taking a datagram) or removes
      (``None``) the route for what is sent to ``endpoint``
      (:meth:`punchtrio.mux.MuxedDevice.set_route`);
    - ``deliver(data, source)``: handles a datagram as if the main socket had read it (the
      tunnel's :meth:`~punchtrio.tunnel.UserspaceTunnel.receive_relayed`);
    - ``base_port()``: the main socket's port; extra socket ``i`` first tries to bind the port
      ``base_port() + 1 + i`` (then the ones above, then any), so that a NAT that preserves ports
      maps them next to the main one, where the peer probes first;
    - ``socket_factory(family, type)``: makes a non-blocking UDP socket (default
      :func:`default_socket_factory`, looked up when a socket is made).

    Call :meth:`flush` after driving the puncher (the connector does it with every drain);
    :meth:`run` must be running for sockets to be opened (until then actions wait in the
    puncher).
    """

    def __init__(
        self,
        puncher: Puncher,
        *,
        route: Callable[[Address, Callable[[bytes], object] | None], None],
        deliver: Callable[[bytes, Address], None],
        base_port: Callable[[], int],
        socket_factory: Callable[[int, int], Any] | None = None,
    ) -> None:
        self._puncher = puncher
        self._route = route
        self._deliver = deliver
        self._base_port = base_port
        self._factory = socket_factory
        self._nursery: trio.Nursery | None = None
        self._sockets: dict[bytes, dict[int, _Extra]] = {}
        self._kept: dict[bytes, tuple[_Extra, Address]] = {}
        self.open_failures = 0
        """Extra sockets that could not be opened (too many open files, no port)."""
        self.send_errors = 0
        """Probes the kernel refused to send from an extra socket."""

    @property
    def open_count(self) -> int:
        """How many extra sockets are open now, all peers together."""
        return sum(len(group) for group in self._sockets.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry out the puncher's socket actions until cancelled; close every socket on exit."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.flush()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for peer in list(self._sockets):
                self._close_peer(peer)

    def flush(self) -> None:
        """Apply the puncher's socket actions and send its extra-socket probes. Never raises."""
        if self._nursery is None:
            return
        puncher = self._puncher
        while (action := puncher.next_socket_action()) is not None:
            if isinstance(action, OpenSockets):
                self._open(action.peer, action.count)
            elif isinstance(action, KeepSocket):
                self._keep(action.peer, action.socket, action.endpoint)
            elif isinstance(action, CloseSockets):
                self._close_peer(action.peer)
        for peer, index, data, address in puncher.socket_datagrams():
            extra = self._sockets.get(peer, {}).get(index)
            if extra is None:
                continue  # never opened, or closed since
            try:
                extra.sock.sendto(data, address)
            except OSError:
                self.send_errors += 1

    # -- actions ---------------------------------------------------------------------------

    def _open(self, peer: bytes, count: int) -> None:
        assert self._nursery is not None
        self._close_peer(peer)
        factory = self._factory or default_socket_factory()
        group = self._sockets[peer] = {}
        port = self._base_port() + 1 if self._base_port() else 0
        for index in range(count):
            sock, port = self._bind(factory, port)
            if sock is None:
                self.open_failures += 1
                continue
            extra = group[index] = _Extra(peer, index, sock)
            self._nursery.start_soon(self._read, extra)

    def _bind(self, factory: Callable[[int, int], Any], port: int) -> tuple[Any, int]:
        """A socket bound at ``port`` or the next free one above (a few tries), else anywhere."""
        try:
            sock = factory(_socket.AF_INET, _socket.SOCK_DGRAM)
        except OSError:
            return None, port
        try:
            sock.setblocking(False)
            for attempt in range(8):
                wanted = port + attempt if port and port + attempt <= 65535 else 0
                try:
                    sock.bind(("", wanted))
                except OSError:
                    if wanted == 0:
                        raise
                    continue
                return sock, (wanted + 1 if wanted else 0)
            sock.bind(("", 0))
            return sock, 0
        except OSError:
            sock.close()
            return None, port

    def _keep(self, peer: bytes, index: int, endpoint: Address) -> None:
        group = self._sockets.get(peer, {})
        extra = group.pop(index, None)
        for other in list(group.values()):
            self._close(other)
        group.clear()
        if extra is None:
            return
        group[index] = extra
        self._kept[peer] = (extra, endpoint)
        sock = extra.sock

        def send(datagram: bytes) -> None:
            try:
                sock.sendto(datagram, endpoint)
            except OSError:
                self.send_errors += 1

        self._route(endpoint, send)

    def _close_peer(self, peer: bytes) -> None:
        kept = self._kept.pop(peer, None)
        if kept is not None:
            self._route(kept[1], None)
        for extra in self._sockets.pop(peer, {}).values():
            self._close(extra)

    @staticmethod
    def _close(extra: _Extra) -> None:
        extra.scope.cancel()
        sock = extra.sock
        with contextlib.suppress(Exception):  # a netsim socket outside Trio, an fd gone already
            trio.lowlevel.notify_closing(sock)
        sock.close()

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, extra: _Extra) -> None:
        sock = extra.sock
        with extra.scope, contextlib.suppress(trio.ClosedResourceError, OSError):
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(_BATCH):
                    try:
                        data, source = sock.recvfrom(_MAX_DATAGRAM)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue  # a queued ICMP error
                    self._received(extra, data, (str(source[0]), int(source[1])))
                    if extra.scope.cancel_called:
                        return
                await trio.lowlevel.checkpoint()

    def _received(self, extra: _Extra, data: bytes, source: Address) -> None:
        kept = self._kept.get(extra.peer)
        if kept is not None:
            if kept[0] is extra and source == kept[1]:
                self._deliver(data, source)
            return
        if self._puncher.birthday_hit(extra.peer, extra.index, data, source, trio.current_time()):
            self.flush()  # keep this socket, close the others, set the route
            self._deliver(data, source)
