"""The Trio shell of UPnP IGD port mapping: SSDP over UDP, the description and SOAP over httpx."""

from __future__ import annotations

import contextlib
import random as _random
import socket as _socket
from collections.abc import Callable

import httpx
import trio

from ._portmap import MappingLost, MappingObtained, PortMapEvent
from ._upnp import (
    CONFLICT_IN_MAPPING_ENTRY,
    MAX_DOCUMENT,
    SSDP_ADDRESS,
    IgdService,
    UpnpError,
    add_port_mapping,
    delete_port_mapping,
    msearch,
    parse_description,
    parse_soap_response,
    parse_ssdp_response,
    soap_request,
)

_HTTP_TIMEOUT = 5.0
_DELETE_TIMEOUT = 2.0


async def _fetch(client: httpx.AsyncClient, url: str, **kwargs: object) -> bytes:
    method = "POST" if "content" in kwargs else "GET"
    async with client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
        body = b""
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_DOCUMENT:
                raise UpnpError(f"a UPnP document is at most {MAX_DOCUMENT} bytes")
        return body


async def discover_igd(*, listen: float = 2.0) -> IgdService | None:
    """Search the LAN for an Internet Gateway Device (SSDP multicast), listening ``listen``
    seconds for answers, and return the first usable one's port-mapping service, or ``None``."""
    with trio.socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as sock:
        sock.setsockopt(_socket.IPPROTO_IP, _socket.IP_MULTICAST_TTL, 2)
        await sock.bind(("0.0.0.0", 0))
        await sock.sendto(msearch(mx=max(1, int(listen))), SSDP_ADDRESS)
        async with httpx.AsyncClient(timeout=_HTTP_TIMEOUT, trust_env=False) as client:
            with trio.move_on_after(listen):
                while True:
                    data, source = await sock.recvfrom(2048)
                    try:
                        location = parse_ssdp_response(data, str(source[0]))
                        document = await _fetch(client, location)
                        return parse_description(document, location)
                    except (UpnpError, httpx.HTTPError):
                        continue  # not a gateway, or not one we can use: keep listening
    return None


class UpnpMapping:
    """Map UDP ``internal_port`` of ``internal_client`` on the IGD ``service`` while
    :meth:`run` runs: ``lease`` seconds (default 3600), renewed at half of it, deleted when
    :meth:`run` ends (cancellation included).

    The external port asked for is ``internal_port``; if someone else holds it (UPnP error
    718), up to ``attempts`` - 1 random ports above 1024. ``on_event`` gets
    :class:`~punchtrio.punch.MappingObtained` (``protocol`` ``"upnp"``) and
    :class:`~punchtrio.punch.MappingLost`.
    """

    def __init__(
        self,
        service: IgdService,
        internal_client: str,
        internal_port: int,
        *,
        lease: int = 3600,
        attempts: int = 3,
        on_event: Callable[[PortMapEvent], None] | None = None,
    ) -> None:
        self.service = service
        self.internal_client = internal_client
        self.internal_port = internal_port
        self.lease = lease
        self.attempts = max(1, attempts)
        self._on_event = on_event
        self.mapping: MappingObtained | None = None
        """The mapping held now, or ``None``."""

    async def _call(
        self, client: httpx.AsyncClient, action: str, request: tuple[dict[str, str], bytes]
    ) -> dict[str, str]:
        headers, body = request
        answer = await _fetch(client, self.service.control_url, headers=headers, content=body)
        return parse_soap_response(answer, action)

    async def _add(self, client: httpx.AsyncClient, port: int) -> None:
        request = add_port_mapping(
            self.service,
            external_port=port,
            internal_client=self.internal_client,
            internal_port=self.internal_port,
            lease=self.lease,
        )
        await self._call(client, "AddPortMapping", request)

    def _emit(self, event: PortMapEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Map, renew and finally delete; reports started once mapped.

        Raises :class:`~punchtrio.punch.UpnpError` if the gateway refuses (every port tried) or
        answers nonsense, and :class:`httpx.HTTPError` if it cannot be reached. A failed renewal
        emits :class:`MappingLost` and returns.
        """
        async with httpx.AsyncClient(timeout=_HTTP_TIMEOUT, trust_env=False) as client:
            answer = await self._call(
                client, "GetExternalIPAddress", soap_request(self.service, "GetExternalIPAddress")
            )
            external_ip = answer.get("NewExternalIPAddress", "")
            if not external_ip:
                raise UpnpError("the gateway does not know its external address")
            rng = _random.Random()
            port = self.internal_port
            for attempt in range(self.attempts):
                try:
                    await self._add(client, port)
                    break
                except UpnpError as exc:
                    if exc.code != CONFLICT_IN_MAPPING_ENTRY or attempt == self.attempts - 1:
                        raise
                    port = rng.randint(1025, 65535)
            try:
                self.mapping = MappingObtained((external_ip, port), self.lease, "upnp")
                self._emit(self.mapping)
                task_status.started()
                while True:
                    await trio.sleep(max(1.0, self.lease / 2))
                    try:
                        await self._add(client, port)
                    except (UpnpError, httpx.HTTPError) as exc:
                        self.mapping = None
                        self._emit(MappingLost((external_ip, port), f"renewal failed: {exc}"))
                        return
            finally:
                with trio.move_on_after(_DELETE_TIMEOUT) as scope:
                    scope.shield = True
                    with contextlib.suppress(UpnpError, httpx.HTTPError):
                        request = delete_port_mapping(self.service, port)
                        await self._call(client, "DeletePortMapping", request)
                self.mapping = None
