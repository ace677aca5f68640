"""The Trio shell of UPnP IGD port mapping against a fake gateway on the loopback: an SSDP
responder (the search address pointed at it), a small HTTP server answering the description and
the SOAP actions, and a PCP server that refuses, for the fallback of :func:`keep_port_mapped`.

Real sockets and a jumping clock do not mix (the clock would jump while a loopback answer is on its
way), so the timed tests use ``mock_clock``, which stands still until the test jumps it: a renewal
happens exactly when the test moves the clock past half the lease. ``tests/lab/test_hard_nat_lab.py``
runs the same code against a real miniupnpd."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import httpx
import pytest
import trio
import trio.testing

from punchtrio.punch import (
    IgdService,
    MappingFailed,
    MappingLost,
    MappingObtained,
    PortMapEvent,
    PortMapper,
    UpnpError,
    UpnpMapping,
    _upnp_session,
    discover_igd,
    keep_port_mapped,
)

from .test_punch_portmap import pcp_reply
from .test_punch_upnp import description, soap_answer

LOOPBACK = "127.0.0.1"
EXTERNAL_IP = "203.0.113.9"
SERVICE_TYPE = "urn:schemas-upnp-org:service:WANIPConnection:1"
FAULT_TEXT = {718: "ConflictInMappingEntry", 501: "ActionFailed"}


def soap_fault(code: int) -> bytes:
    return soap_answer(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        f'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode>'
        f"<errorDescription>{FAULT_TEXT[code]}</errorDescription></UPnPError></detail>"
        "</s:Fault>"
    )


@dataclass
class Call:
    """One SOAP action the fake gateway answered: its name, arguments and virtual time."""

    action: str
    args: dict[str, str]
    at: float


@dataclass
class FakeIgd:
    """A gateway's HTTP side: ``GET /rootDesc.xml`` and SOAP at ``/ctl/IPConn``. ``faults``
    holds, per action, the UPnP error codes to answer with (``None``: success), used up in order;
    ``external_ip`` is what ``GetExternalIPAddress`` says."""

    external_ip: str = EXTERNAL_IP
    faults: dict[str, list[int | None]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    descriptions: int = 0
    port: int = 0

    @property
    def location(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/rootDesc.xml"

    @property
    def service(self) -> IgdService:
        return IgdService(SERVICE_TYPE, f"http://{LOOPBACK}:{self.port}/ctl/IPConn")

    def actions(self) -> list[str]:
        return [c.action for c in self.calls]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
            self.port = listeners[0].socket.getsockname()[1]
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            while len(body) < int(headers.get("content-length", "0")):
                body += await stream.receive_some(4096)
            status, answer = self._answer(method, path, headers, body)
            await stream.send_all(
                f"HTTP/1.1 {status}\r\nContent-Type: text/xml\r\n"
                f"Content-Length: {len(answer)}\r\nConnection: close\r\n\r\n".encode()
                + answer
            )

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[str, bytes]:
        if method == "GET" and path == "/rootDesc.xml":
            self.descriptions += 1
            return "200 OK", description("/ctl/IPConn")
        assert (method, path) == ("POST", "/ctl/IPConn")
        kind, _, action = headers["soapaction"].strip('"').partition("#")
        assert kind == SERVICE_TYPE
        element = ET.fromstring(body).find(
            f"{{http://schemas.xmlsoap.org/soap/envelope/}}Body/{{{SERVICE_TYPE}}}{action}"
        )
        assert element is not None
        args = {child.tag: child.text or "" for child in element}
        self.calls.append(Call(action, args, trio.current_time()))
        queue = self.faults.get(action, [])
        code = queue.pop(0) if queue else None
        if code is not None:
            return "500 Internal Server Error", soap_fault(code)
        out = f"<NewExternalIPAddress>{self.external_ip}</NewExternalIPAddress>"
        inner = out if action == "GetExternalIPAddress" else ""
        return "200 OK", soap_answer(
            f'<u:{action}Response xmlns:u="{SERVICE_TYPE}">{inner}</u:{action}Response>'
        )


@dataclass
class FakeSsdp:
    """Answers each M-SEARCH with ``answers`` (each formatted with the IGD's location)."""

    answers: list[str]
    searches: list[bytes] = field(default_factory=list)
    answered: trio.Event = field(default_factory=trio.Event)
    address: tuple[str, int] = (LOOPBACK, 0)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((LOOPBACK, 0))
            self.address = sock.getsockname()
            task_status.started()
            while True:
                data, source = await sock.recvfrom(2048)
                self.searches.append(data)
                for answer in self.answers:
                    await sock.sendto(answer.encode(), source)
                self.answered.set()


def ssdp_answer(location: str) -> str:
    return (
        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
        "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        f"LOCATION: {location}\r\n\r\n"
    )


def held(mapping: UpnpMapping) -> MappingObtained | None:
    """The mapping ``mapping`` holds now (a call, so that type checkers do not narrow it)."""
    return mapping.mapping


async def settle() -> None:
    """Let every task run until all wait (loopback answers arrive within the same wait)."""
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()


# -- discover_igd ------------------------------------------------------------------------------


async def test_the_search_skips_answers_it_cannot_use_and_returns_the_gateways_service(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    igd = FakeIgd()
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        ssdp = FakeSsdp(
            [
                "NOTIFY * HTTP/1.1\r\n\r\n",  # not an answer
                ssdp_answer(f"http://192.0.2.1:{igd.port}/rootDesc.xml"),  # another host
                ssdp_answer(f"http://{LOOPBACK}:1/rootDesc.xml"),  # nothing listens there
                ssdp_answer(igd.location),
            ]
        )
        await nursery.start(ssdp.serve)
        monkeypatch.setattr(_upnp_session, "SSDP_ADDRESS", ssdp.address)
        service = await discover_igd(listen=2.0)
        nursery.cancel_scope.cancel()
    assert service == igd.service
    assert igd.descriptions == 1
    (search,) = ssdp.searches
    assert search.startswith(b"M-SEARCH * HTTP/1.1\r\n")
    assert b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n" in search
    assert b"MX: 2\r\n" in search


async def test_the_search_returns_none_when_no_usable_answer_comes_within_listen(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    ssdp = FakeSsdp([ssdp_answer("http://192.0.2.1:5000/rootDesc.xml")])
    found: list[IgdService | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(ssdp.serve)
        monkeypatch.setattr(_upnp_session, "SSDP_ADDRESS", ssdp.address)

        async def search() -> None:
            found.append(await discover_igd(listen=3.0))

        nursery.start_soon(search)
        await ssdp.answered.wait()
        await settle()
        mock_clock.jump(2.9)
        await settle()
        assert found == []  # still listening
        mock_clock.jump(0.2)
        await settle()
        assert found == [None]
        nursery.cancel_scope.cancel()
    assert len(ssdp.searches) == 1


# -- UpnpMapping -------------------------------------------------------------------------------


async def test_a_mapping_is_made_renewed_at_half_the_lease_and_deleted_when_cancelled(
    mock_clock: trio.testing.MockClock,
) -> None:
    igd = FakeIgd()
    got: list[PortMapEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        start = trio.current_time()
        mapping = UpnpMapping(igd.service, LOOPBACK, 51820, lease=600, on_event=got.append)
        async with trio.open_nursery() as inner:
            await inner.start(mapping.run)
            assert mapping.mapping == MappingObtained((EXTERNAL_IP, 51820), 600, "upnp")
            assert got == [mapping.mapping]
            assert igd.actions() == ["GetExternalIPAddress", "AddPortMapping"]
            assert igd.calls[1].args == {
                "NewRemoteHost": "",
                "NewExternalPort": "51820",
                "NewProtocol": "UDP",
                "NewInternalPort": "51820",
                "NewInternalClient": LOOPBACK,
                "NewEnabled": "1",
                "NewPortMappingDescription": "punchtrio",
                "NewLeaseDuration": "600",
            }
            await settle()
            mock_clock.jump(299.0)
            await settle()
            assert len(igd.calls) == 2  # not renewed before half the lease
            mock_clock.jump(1.0)
            await settle()
            assert igd.actions() == ["GetExternalIPAddress", "AddPortMapping", "AddPortMapping"]
            assert igd.calls[2].args == igd.calls[1].args
            assert igd.calls[2].at == pytest.approx(start + 300.0)
            mock_clock.jump(300.0)
            await settle()
            assert len(igd.calls) == 4  # and again after another half
            inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    assert igd.calls[-1].action == "DeletePortMapping"
    assert igd.calls[-1].args == {
        "NewRemoteHost": "",
        "NewExternalPort": "51820",
        "NewProtocol": "UDP",
    }
    assert held(mapping) is None
    assert got == [MappingObtained((EXTERNAL_IP, 51820), 600, "upnp")]


async def test_a_refused_renewal_loses_the_mapping_ends_the_run_and_still_deletes(
    mock_clock: trio.testing.MockClock,
) -> None:
    igd = FakeIgd(faults={"AddPortMapping": [None, 501]})
    got: list[PortMapEvent] = []
    ended = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        mapping = UpnpMapping(igd.service, LOOPBACK, 51820, lease=100, on_event=got.append)

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            await mapping.run(task_status=task_status)
            ended.set()

        await nursery.start(run)
        await settle()
        mock_clock.jump(50.0)
        await settle()
        assert ended.is_set()
        nursery.cancel_scope.cancel()
    assert got == [
        MappingObtained((EXTERNAL_IP, 51820), 100, "upnp"),
        MappingLost(
            (EXTERNAL_IP, 51820), "renewal failed: the gateway refused AddPortMapping: ActionFailed"
        ),
    ]
    assert igd.actions() == [
        "GetExternalIPAddress",
        "AddPortMapping",
        "AddPortMapping",
        "DeletePortMapping",
    ]
    assert mapping.mapping is None


async def test_a_port_held_by_someone_else_is_mapped_at_a_random_port_instead() -> None:
    igd = FakeIgd(faults={"AddPortMapping": [718]})
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        mapping = UpnpMapping(igd.service, LOOPBACK, 51820)
        async with trio.open_nursery() as inner:
            await inner.start(mapping.run)
            assert mapping.mapping is not None
            ip, port = mapping.mapping.external
            inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    assert ip == EXTERNAL_IP
    assert 1025 <= port <= 65535
    assert port != 51820
    asked = [c.args["NewExternalPort"] for c in igd.calls if c.action == "AddPortMapping"]
    assert asked == ["51820", str(port)]
    assert igd.calls[-1].action == "DeletePortMapping"
    assert igd.calls[-1].args["NewExternalPort"] == str(port)


@pytest.mark.parametrize(
    ("igd", "message", "code", "actions"),
    [
        (
            FakeIgd(faults={"AddPortMapping": [718, 718]}),
            "ConflictInMappingEntry",
            718,
            ["GetExternalIPAddress", "AddPortMapping", "AddPortMapping"],
        ),
        (
            FakeIgd(faults={"AddPortMapping": [501]}),
            "ActionFailed",
            501,
            ["GetExternalIPAddress", "AddPortMapping"],
        ),
        (FakeIgd(external_ip=""), "external address", None, ["GetExternalIPAddress"]),
    ],
    ids=["every-port-taken", "refused", "no-external-address"],
)
async def test_a_gateway_that_will_not_map_raises_upnp_error_and_deletes_nothing(
    igd: FakeIgd, message: str, code: int | None, actions: list[str]
) -> None:
    got: list[PortMapEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        mapping = UpnpMapping(igd.service, LOOPBACK, 51820, attempts=2, on_event=got.append)
        with pytest.raises(UpnpError, match=message) as caught:
            await mapping.run()
        nursery.cancel_scope.cancel()
    assert caught.value.code == code
    assert igd.actions() == actions
    assert got == []
    assert mapping.mapping is None


async def test_an_unreachable_gateway_raises_an_http_error() -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM) as sock:
        await sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    service = IgdService(SERVICE_TYPE, f"http://{LOOPBACK}:{port}/ctl/IPConn")
    mapping = UpnpMapping(service, LOOPBACK, 51820)
    with pytest.raises(httpx.HTTPError):
        await mapping.run()
    assert mapping.mapping is None


# -- keep_port_mapped: PCP refused, then UPnP ---------------------------------------------------


@dataclass
class RefusingPcp:
    """A PCP server that answers every MAP request with NOT_AUTHORIZED (result 2)."""

    requests: list[bytes] = field(default_factory=list)
    address: tuple[str, int] = (LOOPBACK, 0)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((LOOPBACK, 0))
            self.address = sock.getsockname()
            task_status.started()
            while True:
                data, source = await sock.recvfrom(1100)
                self.requests.append(data)
                await sock.sendto(pcp_reply(data, result=2), source)


REFUSED = MappingFailed("the gateway refused the PCP mapping: not authorized")


async def _keep(
    monkeypatch: pytest.MonkeyPatch,
    mock_clock: trio.testing.MockClock,
    igd: FakeIgd,
    *,
    upnp: bool,
    then: float,
) -> tuple[list[PortMapEvent], list[PortMapEvent], RefusingPcp, FakeSsdp]:
    """Run keep_port_mapped against the refusing PCP server, the SSDP responder and ``igd``;
    return the events once it settled, those after ``then`` more seconds, and the servers."""
    pcp = RefusingPcp()
    got: list[PortMapEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        await nursery.start(pcp.serve)
        ssdp = FakeSsdp([ssdp_answer(igd.location)])
        await nursery.start(ssdp.serve)
        monkeypatch.setattr(_upnp_session, "SSDP_ADDRESS", ssdp.address)
        mapper = PortMapper(LOOPBACK, None, 51820)
        mapper.gateway = pcp.address  # the PCP port of this test's server, not 5351
        async with trio.open_nursery() as inner:
            inner.start_soon(lambda: keep_port_mapped(mapper, on_event=got.append, upnp=upnp))
            await settle()
            first = list(got)
            mock_clock.jump(then)
            await settle()
            inner.cancel_scope.cancel()  # the servers still answer the deletes
        nursery.cancel_scope.cancel()
    return first, got[len(first) :], pcp, ssdp


async def test_a_refused_pcp_mapping_falls_back_to_upnp_which_replaces_the_pcp_session(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    igd = FakeIgd()
    # 400 s later: past the PCP session's retry (300 s), before the UPnP renewal (1800 s).
    first, later, pcp, ssdp = await _keep(monkeypatch, mock_clock, igd, upnp=True, then=400.0)
    assert first == [REFUSED, MappingObtained((EXTERNAL_IP, 51820), 3600, "upnp")]
    assert later == []
    assert len(ssdp.searches) == 1
    assert len(pcp.requests) == 1  # the PCP session stopped: no retry after 300 s
    assert igd.actions() == ["GetExternalIPAddress", "AddPortMapping", "DeletePortMapping"]
    assert igd.calls[1].args["NewInternalClient"] == LOOPBACK
    assert igd.calls[1].args["NewInternalPort"] == "51820"


async def test_without_upnp_or_when_the_igd_refuses_the_pcp_session_goes_on_retrying(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    igd = FakeIgd()
    first, later, pcp, ssdp = await _keep(monkeypatch, mock_clock, igd, upnp=False, then=300.0)
    assert (first, later) == ([REFUSED], [REFUSED])
    assert len(pcp.requests) == 2  # retried after 300 s
    assert ssdp.searches == []
    assert igd.calls == []

    refusing = FakeIgd(faults={"AddPortMapping": [501]})
    first, later, pcp, ssdp = await _keep(monkeypatch, mock_clock, refusing, upnp=True, then=300.0)
    assert (first, later) == ([REFUSED], [REFUSED])
    assert len(pcp.requests) == 2
    assert len(ssdp.searches) == 1
    assert refusing.actions() == ["GetExternalIPAddress", "AddPortMapping"]
