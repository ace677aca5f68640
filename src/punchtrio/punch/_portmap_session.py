"""The Trio shell of :class:`~punchtrio.punch.PortMapper`: one small socket to the gateway.

The requests go from a socket of their own, connected to the gateway's port 5351, not from the
WireGuard socket: PCP and NAT-PMP name the port to map inside the request, so the source port does
not matter, and the gateway's answers then never reach the mux.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket as _socket
from collections.abc import Callable

import trio

from ._portmap import PORT, PortMapEvent, PortMapper

_DELETE_TIMEOUT = 0.5
"""Seconds the delete request may take to leave when the session is cancelled."""


def default_gateway() -> str | None:
    """Return the IPv4 default route's gateway address (netlink, no root needed), or ``None``."""
    from pyroute2 import IPRoute  # imported here: pyroute2 is slow to import

    with IPRoute() as ipr:
        for route in ipr.get_default_routes(family=_socket.AF_INET):
            gateway = route.get_attr("RTA_GATEWAY")
            if gateway:
                return str(gateway)
    return None


def address_towards(gateway: str) -> str:
    """Return our own address on the route to ``gateway`` (what the gateway sees as the source).

    Raises :class:`OSError` when there is no route.
    """
    family = _socket.AF_INET6 if ipaddress.ip_address(gateway).version == 6 else _socket.AF_INET
    with _socket.socket(family, _socket.SOCK_DGRAM) as sock:
        sock.connect((gateway, PORT))  # no datagram is sent: this only picks the route
        return str(sock.getsockname()[0])


class PortMapSession:
    """Run ``mapper`` until cancelled: send its requests, feed it the answers, time it.

    ``on_event`` is called with every :class:`~punchtrio.punch.MappingObtained`,
    :class:`~punchtrio.punch.MappingFailed` and :class:`~punchtrio.punch.MappingLost`. When the
    session ends (cancellation included) it sends the request that deletes the mapping, waiting
    at most 0.5 s, and closes its socket.
    """

    def __init__(
        self, mapper: PortMapper, *, on_event: Callable[[PortMapEvent], None] | None = None
    ) -> None:
        self.mapper = mapper
        self._on_event = on_event

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Map, refresh and finally delete; reports started once the socket is connected.

        Raises :class:`OSError` if the socket cannot be made or connected (no route to the
        gateway).
        """
        mapper = self.mapper
        family = _socket.AF_INET6 if ":" in mapper.gateway[0] else _socket.AF_INET
        with trio.socket.socket(family, _socket.SOCK_DGRAM) as sock:
            await sock.connect(mapper.gateway)
            if mapper.client_ip is None:  # the source address the route to the gateway gave us
                mapper.client_ip = str(sock.getsockname()[0])
            mapper.start(trio.current_time())
            task_status.started()
            try:
                await self._loop(sock)
            finally:
                mapper.close(trio.current_time())
                with trio.move_on_after(_DELETE_TIMEOUT) as scope:
                    scope.shield = True
                    await self._flush(sock)

    async def _flush(self, sock: trio.socket.SocketType) -> None:
        for data in self.mapper.datagrams_to_send():
            with contextlib.suppress(OSError):  # the protocol retransmits
                await sock.send(data)
        while (event := self.mapper.next_event()) is not None:
            if self._on_event is not None:
                self._on_event(event)

    async def _loop(self, sock: trio.socket.SocketType) -> None:
        mapper = self.mapper
        while True:
            await self._flush(sock)
            deadline = mapper.get_timer()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                try:
                    data = await sock.recv(1100)
                except OSError:
                    continue  # an ICMP error for an earlier request (no server there)
                mapper.receive_datagram(data, mapper.gateway, trio.current_time())
                continue
            mapper.handle_timer(trio.current_time())
