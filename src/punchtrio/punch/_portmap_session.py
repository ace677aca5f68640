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
from collections.abc import Awaitable, Callable

import httpx
import trio

from ._portmap import PORT, MappingFailed, MappingLost, MappingObtained, PortMapEvent, PortMapper

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


async def keep_port_mapped(
    mapper: PortMapper,
    *,
    on_event: Callable[[PortMapEvent], None] | None = None,
    upnp: bool = True,
    upnp_listen: float = 2.0,
) -> None:
    """Keep ``mapper``'s port mapped until cancelled: PCP or NAT-PMP first, then UPnP IGD.

    Runs a :class:`PortMapSession`; if its first attempt fails without a mapping (no answer, or
    a refusal) and ``upnp`` is on, searches the LAN for an IGD (``upnp_listen`` seconds) and, if
    one maps the port, stops the PCP/NAT-PMP session and keeps the UPnP mapping instead (one
    mapping at a time, deleted when this ends). When there is no IGD or it refuses, the
    PCP/NAT-PMP session goes on with its own retries. ``on_event`` gets every
    :class:`~punchtrio.punch.MappingObtained` / ``MappingFailed`` / ``MappingLost`` of the
    mechanism that runs. Raises :class:`OSError` when there is no route to the gateway.
    """
    from ._upnp import UpnpError
    from ._upnp_session import UpnpMapping, discover_igd

    failed = trio.Event()
    held = False

    def forward(event: PortMapEvent) -> None:
        nonlocal held
        if isinstance(event, MappingObtained):
            held = True
        elif isinstance(event, MappingLost):
            held = False
        elif isinstance(event, MappingFailed) and not held:
            failed.set()
        if on_event is not None:
            on_event(event)

    async with trio.open_nursery() as nursery:
        first = await nursery.start(_cancellable, PortMapSession(mapper, on_event=forward).run)
        if not upnp:
            return
        await failed.wait()
        try:
            service = await discover_igd(listen=upnp_listen)
        except OSError:  # no multicast route: no IGD to find
            return
        if service is None or held:
            return
        client = mapper.client_ip or address_towards(mapper.gateway[0])
        mapping = UpnpMapping(service, client, mapper.internal_port, on_event=on_event)
        try:
            await nursery.start(mapping.run)
        except (UpnpError, httpx.HTTPError):
            return  # the PCP/NAT-PMP session keeps trying
        first.cancel()


async def _cancellable(
    run: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run`` (a ``task_status``-taking task) in a scope handed back once it started."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            task_status.started(scope)
