"""Port mapping (PCP, NAT-PMP): the wire formats (hypothesis), the sans-IO mapper against a fake
gateway (fallback, retransmission, refresh, loss, restart, delete), and the Trio shell over a
real loopback socket. ``tests/lab/test_hard_nat_lab.py`` runs it against a real miniupnpd."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from punchtrio.punch import (
    MappingFailed,
    MappingLost,
    MappingObtained,
    NatPmpResponse,
    PcpResponse,
    PortMapError,
    PortMapEvent,
    PortMapper,
    PortMapSession,
    PortMapSettings,
    VersionMismatch,
    address_towards,
    encode_natpmp_request,
    encode_pcp_map,
    parse_natpmp_response,
    parse_pcp_response,
)

GATEWAY = ("192.168.1.1", 5351)
CLIENT = "192.168.1.20"
EXTERNAL = "198.51.100.7"


def _ip16(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed


def pcp_reply(request: bytes, *, result: int = 0, lifetime: int | None = None, epoch: int = 100,
              port: int = 40000, external: str = EXTERNAL) -> bytes:  # fmt: skip
    """A PCP MAP response to ``request`` (RFC 6887 § 7.2, § 11.1) as a server would send it."""
    granted = struct.unpack_from("!I", request, 4)[0] if lifetime is None else lifetime
    nonce, internal = request[24:36], struct.unpack_from("!H", request, 40)[0]
    header = struct.pack("!BBBBII", 2, 0x81, 0, result, granted, epoch) + b"\0" * 12
    return header + nonce + struct.pack("!B3xHH", 17, internal, port) + _ip16(external)


def natpmp_reply(request: bytes, *, result: int = 0, epoch: int = 100, port: int = 40001,
                 lifetime: int | None = None) -> bytes:  # fmt: skip
    """A NAT-PMP response to ``request`` (RFC 6886 § 3.2, § 3.3)."""
    if request[1] == 0:
        return struct.pack("!BBHI", 0, 128, result, epoch) + ipaddress.IPv4Address(EXTERNAL).packed
    internal, _, asked = struct.unpack_from("!HHI", request, 4)
    granted = asked if lifetime is None else lifetime
    return struct.pack("!BBHIHHI", 0, 129, result, epoch, internal, port, granted)


NATPMP_UNSUPPORTED = struct.pack("!BBHI", 0, 128 + 1, 1, 5)  # what a NAT-PMP-only box answers PCP


@dataclass
class Gateway:
    """A fake gateway: ``speaks`` pcp, natpmp or nothing; answers what ``mapper`` sends. Its
    epoch is ``epoch`` plus the seconds of ``now``, as a running gateway's grows."""

    speaks: str
    requests: list[bytes] = field(default_factory=list)
    epoch: int = 100

    def exchange(self, mapper: PortMapper, now: float) -> None:
        for data in mapper.datagrams_to_send():
            self.requests.append(data)
            reply = self.answer(data, self.epoch + int(now))
            if reply is not None:
                mapper.receive_datagram(reply, GATEWAY, now)

    def answer(self, data: bytes, epoch: int) -> bytes | None:
        if data[0] == 2:
            if self.speaks == "pcp":
                return pcp_reply(data, epoch=epoch)
            return NATPMP_UNSUPPORTED if self.speaks == "natpmp" else None
        if self.speaks == "natpmp":
            return natpmp_reply(data, epoch=epoch)
        return None


def events(mapper: PortMapper) -> list[PortMapEvent]:
    out = []
    while (event := mapper.next_event()) is not None:
        out.append(event)
    return out


def run_until(mapper: PortMapper, gateway: Gateway, now: float, until: float) -> float:
    """Drive timers up to ``until``, exchanging with ``gateway`` at each; return the last time."""
    while (deadline := mapper.get_timer()) is not None and deadline <= until:
        now = deadline
        mapper.handle_timer(now)
        gateway.exchange(mapper, now)
    return now


# -- wire formats -----------------------------------------------------------------------------


def test_a_pcp_map_request_has_the_rfc_layout() -> None:
    data = encode_pcp_map(
        nonce=bytes(range(12)), client_ip=CLIENT, internal_port=51820, lifetime=7200
    )
    assert len(data) == 60
    assert data[:4] == bytes((2, 1, 0, 0))
    assert struct.unpack_from("!I", data, 4) == (7200,)
    assert data[8:24] == _ip16(CLIENT)
    assert data[24:36] == bytes(range(12))
    assert data[36] == 17
    assert data[37:40] == b"\0\0\0"
    assert struct.unpack_from("!HH", data, 40) == (51820, 0)
    assert data[44:60] == _ip16("0.0.0.0")


def test_natpmp_requests_have_the_rfc_layout() -> None:
    assert encode_natpmp_request(0) == b"\0\0"
    assert encode_natpmp_request(1, 51820, 7200) == struct.pack(
        "!BBHHHI", 0, 1, 0, 51820, 51820, 7200
    )
    # A delete asks for lifetime 0 and external port 0 (RFC 6886 § 3.4).
    assert encode_natpmp_request(1, 51820, 0) == struct.pack("!BBHHHI", 0, 1, 0, 51820, 0, 0)
    with pytest.raises(PortMapError):
        encode_natpmp_request(2)
    with pytest.raises(PortMapError):
        encode_natpmp_request(1, 0, 10)


def _not_ipv4_mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None


@given(
    nonce=st.binary(min_size=12, max_size=12),
    port=st.integers(1, 65535),
    external=st.integers(1, 65535),
    lifetime=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 2**32 - 1),
    # An IPv4-mapped IPv6 address is how PCP writes IPv4: it reads back as IPv4 (tested below).
    ip=st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).filter(_not_ipv4_mapped).map(str),
)
def test_pcp_responses_round_trip(
    nonce: bytes, port: int, external: int, lifetime: int, epoch: int, ip: str
) -> None:
    request = encode_pcp_map(nonce=nonce, client_ip=CLIENT, internal_port=port, lifetime=lifetime)
    reply = parse_pcp_response(pcp_reply(request, epoch=epoch, port=external, external=ip))
    assert reply == PcpResponse(
        0, lifetime, epoch, nonce, 17, port, external, str(ipaddress.ip_address(ip))
    )


@given(
    port=st.integers(1, 65535),
    external=st.integers(1, 65535),
    lifetime=st.integers(1, 2**32 - 1),
    epoch=st.integers(0, 2**32 - 1),
)
def test_natpmp_responses_round_trip(port: int, external: int, lifetime: int, epoch: int) -> None:
    request = encode_natpmp_request(1, port, lifetime)
    reply = parse_natpmp_response(natpmp_reply(request, epoch=epoch, port=external))
    assert reply == NatPmpResponse(1, 0, epoch, None, port, external, lifetime)
    address = parse_natpmp_response(natpmp_reply(encode_natpmp_request(0), epoch=epoch))
    assert address == NatPmpResponse(0, 0, epoch, external_ip=EXTERNAL)


@given(st.binary(max_size=1200))
def test_the_parsers_raise_only_portmap_error(data: bytes) -> None:
    for parse in (parse_pcp_response, parse_natpmp_response):
        try:
            parse(data)
        except PortMapError:
            pass


@given(st.binary(min_size=60, max_size=60), st.integers(0, 59), st.integers(0, 255))
def test_mutated_pcp_responses_parse_or_raise_portmap_error(
    noise: bytes, at: int, value: int
) -> None:
    request = encode_pcp_map(nonce=noise[:12], client_ip=CLIENT, internal_port=1, lifetime=1)
    data = bytearray(pcp_reply(request))
    data[at] = value
    try:
        parse_pcp_response(bytes(data))
    except PortMapError:
        pass


def test_pcp_writes_ipv4_as_ipv4_mapped_ipv6_and_reads_it_back_as_ipv4() -> None:
    request = encode_pcp_map(nonce=b"n" * 12, client_ip=CLIENT, internal_port=1, lifetime=1)
    assert request[8:24] == b"\0" * 10 + b"\xff\xff" + bytes((192, 168, 1, 20))
    reply = parse_pcp_response(pcp_reply(request, external="::ffff:198.51.100.9"))
    assert isinstance(reply, PcpResponse)
    assert reply.external_ip == "198.51.100.9"


def test_each_protocol_recognises_the_others_unsupported_version() -> None:
    assert parse_pcp_response(NATPMP_UNSUPPORTED) == VersionMismatch(0)
    pcp_unsupported = struct.pack("!BBBBII", 2, 0x80, 0, 1, 0, 0) + b"\0" * 16
    assert parse_natpmp_response(pcp_unsupported) == VersionMismatch(2)
    with pytest.raises(PortMapError, match="request, not a response"):
        parse_pcp_response(
            encode_pcp_map(nonce=b"x" * 12, client_ip=CLIENT, internal_port=1, lifetime=1)
        )


def test_settings_and_addresses_are_checked() -> None:
    for bad in (
        {"lifetime": 0},
        {"attempts": 0},
        {"refresh": 1.0},
        {"pcp": False, "natpmp": False},
    ):
        with pytest.raises(PortMapError):
            PortMapSettings(**bad)
    with pytest.raises(PortMapError, match="literal"):
        PortMapper("router.local", CLIENT, 51820)
    with pytest.raises(PortMapError, match="out of range"):
        PortMapper(GATEWAY[0], CLIENT, 0)


# -- the mapper -------------------------------------------------------------------------------


def test_pcp_maps_refreshes_with_the_same_nonce_and_deletes_on_close() -> None:
    mapper = PortMapper(GATEWAY[0], CLIENT, 51820, settings=PortMapSettings(lifetime=120))
    gateway = Gateway("pcp")
    mapper.start(0.0)
    gateway.exchange(mapper, 0.0)
    assert events(mapper) == [MappingObtained((EXTERNAL, 40000), 120, "pcp")]
    assert mapper.get_timer() == 60.0  # half the lifetime
    run_until(mapper, gateway, 0.0, 130.0)
    assert len(gateway.requests) == 3  # the first request and two refreshes
    assert {r[24:36] for r in gateway.requests} == {gateway.requests[0][24:36]}
    # A refresh suggests the endpoint it holds; an unchanged mapping is not reported again.
    assert gateway.requests[1][42:44] == struct.pack("!H", 40000)
    assert events(mapper) == []
    mapper.close(130.0)
    (delete,) = mapper.datagrams_to_send()
    assert struct.unpack_from("!I", delete, 4) == (0,)
    assert delete[24:36] == gateway.requests[0][24:36]
    assert mapper.mapping is None
    assert mapper.get_timer() is None


def test_a_natpmp_gateway_gets_natpmp_after_its_unsupported_version_reply() -> None:
    mapper = PortMapper(GATEWAY[0], CLIENT, 51820)
    gateway = Gateway("natpmp")
    mapper.start(0.0)
    gateway.exchange(mapper, 0.0)  # PCP -> "unsupported version" -> NAT-PMP at once
    gateway.exchange(mapper, 0.0)
    assert events(mapper) == [MappingObtained((EXTERNAL, 40001), 7200, "natpmp")]
    assert [r[:2] for r in gateway.requests] == [b"\x02\x01", b"\0\0", b"\0\x01"]
    mapper.close(1.0)
    assert mapper.datagrams_to_send() == [encode_natpmp_request(1, 51820, 0)]


def test_a_silent_gateway_is_retried_then_natpmp_then_failed_then_retried_later() -> None:
    mapper = PortMapper(GATEWAY[0], CLIENT, 51820)
    gateway = Gateway("nothing")
    mapper.start(0.0)
    gateway.exchange(mapper, 0.0)
    times = [0.0]
    while not (found := events(mapper)):
        now = mapper.get_timer()
        assert now is not None
        mapper.handle_timer(now)
        gateway.exchange(mapper, now)
        times.append(now)
    assert found == [MappingFailed("the gateway did not answer")]
    # PCP at 0, .25, .75, 1.75; then NAT-PMP (address + map) at 3.75, 4, 4.5, 5.5; give up at 7.5.
    assert times == [0.0, 0.25, 0.75, 1.75, 3.75, 4.0, 4.5, 5.5, 7.5]
    assert sum(r[0] == 2 for r in gateway.requests) == 4
    assert sum(r[0] == 0 for r in gateway.requests) == 8
    assert mapper.get_timer() == 7.5 + 300.0
    gateway.speaks = "pcp"
    run_until(mapper, gateway, 7.5, 307.5)
    assert events(mapper) == [MappingObtained((EXTERNAL, 40000), 7200, "pcp")]


def test_a_refusal_is_reported_with_its_name() -> None:
    mapper = PortMapper(GATEWAY[0], CLIENT, 51820)
    mapper.start(0.0)
    (request,) = mapper.datagrams_to_send()
    mapper.receive_datagram(pcp_reply(request, result=2), GATEWAY, 0.01)
    assert events(mapper) == [MappingFailed("the gateway refused the PCP mapping: not authorized")]


def test_answers_from_elsewhere_or_to_another_request_are_ignored() -> None:
    mapper = PortMapper(GATEWAY[0], CLIENT, 51820)
    mapper.start(0.0)
    (request,) = mapper.datagrams_to_send()
    other = encode_pcp_map(nonce=b"n" * 12, client_ip=CLIENT, internal_port=51820, lifetime=60)
    mapper.receive_datagram(pcp_reply(request), ("192.168.1.66", 5351), 0.01)
    mapper.receive_datagram(pcp_reply(request), (GATEWAY[0], 5352), 0.01)
    mapper.receive_datagram(pcp_reply(other), GATEWAY, 0.01)
    mapper.receive_datagram(b"\x02\x81garbage", GATEWAY, 0.01)
    assert events(mapper) == []
    assert mapper.mapping is None
    mapper.receive_datagram(pcp_reply(request), GATEWAY, 0.02)
    assert mapper.mapping == MappingObtained((EXTERNAL, 40000), 7200, "pcp")


def test_a_failed_refresh_loses_the_mapping() -> None:
    mapper = PortMapper(GATEWAY[0], CLIENT, 51820, settings=PortMapSettings(lifetime=100))
    gateway = Gateway("pcp")
    mapper.start(0.0)
    gateway.exchange(mapper, 0.0)
    events(mapper)
    gateway.speaks = "nothing"
    run_until(mapper, gateway, 0.0, 80.0)
    # Refreshing keeps to the protocol that works: no NAT-PMP detour, lost 1.75 s after 50 s.
    assert events(mapper) == [MappingLost((EXTERNAL, 40000), "the gateway did not answer")]
    assert all(r[0] == 2 for r in gateway.requests)
    assert mapper.mapping is None


def test_a_gateway_restart_seen_in_the_epoch_is_lost_then_mapped_again() -> None:
    mapper = PortMapper(GATEWAY[0], CLIENT, 51820, settings=PortMapSettings(lifetime=100))
    gateway = Gateway("pcp", epoch=1000)
    mapper.start(0.0)
    gateway.exchange(mapper, 0.0)
    events(mapper)
    gateway.epoch = -45  # rebooted 5 s before the refresh at 50 s: its epoch restarted
    run_until(mapper, gateway, 0.0, 50.0)
    assert events(mapper) == [
        MappingLost((EXTERNAL, 40000), "the gateway restarted"),
        MappingObtained((EXTERNAL, 40000), 100, "pcp"),
    ]


# -- the Trio shell ---------------------------------------------------------------------------


async def test_the_session_maps_over_a_real_socket_and_deletes_when_cancelled() -> None:
    gateway_sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await gateway_sock.bind(("127.0.0.1", 5351))
    seen: list[bytes] = []
    got: list[object] = []
    obtained, deleted = trio.Event(), trio.Event()
    mapper = PortMapper("127.0.0.1", address_towards("127.0.0.1"), 51820)

    async def serve() -> None:
        while True:
            data, source = await gateway_sock.recvfrom(1100)
            seen.append(data)
            if not struct.unpack_from("!I", data, 4)[0]:
                deleted.set()
            else:
                await gateway_sock.sendto(pcp_reply(data, external="127.0.0.1"), source)

    with gateway_sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)

            def on_event(event: object) -> None:
                got.append(event)
                obtained.set()

            session = PortMapSession(mapper, on_event=on_event)
            with trio.fail_after(5):
                async with trio.open_nursery() as inner:
                    await inner.start(session.run)
                    await obtained.wait()
                    inner.cancel_scope.cancel()
                await deleted.wait()
            nursery.cancel_scope.cancel()
    assert got == [MappingObtained(("127.0.0.1", 40000), 7200, "pcp")]
    assert seen[0][8:24] == _ip16("127.0.0.1")
    assert struct.unpack_from("!I", seen[-1], 4) == (0,)  # the delete, sent while cancelled


# -- the connector publishes the mapping --------------------------------------------------------


async def test_a_connector_publishes_its_mapping_and_deletes_it_when_it_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """In netsim: alice's connector asks a PCP gateway on her LAN, registers the mapped endpoint
    as a server-reflexive candidate beside STUN's, still connects to bob, and deletes the
    mapping when it stops."""
    from punchtrio.connect import MemoryInterface, PeerConnected
    from punchtrio.netsim import NatBehavior
    from punchtrio.punch import Candidate, CandidateType
    from tests.unit.test_connect_basic import build_world, connector_for, serve_stun

    cone = NatBehavior.port_restricted_cone()
    world = build_world(cone, cone)
    nat_a = world.nats[0]
    gateway = nat_a.lan.add_host(name="gateway")
    requests: list[bytes] = []
    deleted = trio.Event()
    mapped = Candidate(CandidateType.SRFLX, "198.51.100.1", 40000)

    async def serve_gateway(*, task_status: trio.TaskStatus[None]) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind((str(gateway.address), 5351))
        task_status.started()
        with sock:
            while True:
                data, source = await sock.recvfrom(1100)
                requests.append(data)
                if not struct.unpack_from("!I", data, 4)[0]:
                    deleted.set()
                else:
                    await sock.sendto(pcp_reply(data, external=mapped.address), source)

    ifaces = {name: MemoryInterface(name) for name in ("alice", "bob")}
    connectors = {
        "alice": connector_for(world, "alice", ifaces["alice"], port_mapping=str(gateway.address)),
        "bob": connector_for(world, "bob", ifaces["bob"]),
    }
    async with world.net, trio.open_nursery() as nursery:
        await nursery.start(serve_stun, world.stun)
        with gateway.activate():
            await nursery.start(serve_gateway)
        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                for name, connector in connectors.items():
                    with world.hosts[name].activate():
                        await inner.start(connector.run)
                async for event in connectors["bob"].events:
                    if isinstance(event, PeerConnected):
                        break
                alice = connectors["alice"]
                port = alice.listen_port
                assert mapped in alice.candidates
                assert alice.record is not None
                assert mapped.to_endpoint() in alice.record.endpoints
                # STUN's own answer is still there, after the mapping.
                srflx = [c for c in alice.candidates if c.type is CandidateType.SRFLX]
                assert srflx[0] == mapped
                assert len(srflx) > 1
                inner.cancel_scope.cancel()
            await deleted.wait()
        nursery.cancel_scope.cancel()
    for iface in ifaces.values():
        iface.close()
    assert requests[0][8:24] == _ip16(str(world.hosts["alice"].address))
    assert struct.unpack_from("!H", requests[0], 40) == (port,)
    assert struct.unpack_from("!I", requests[-1], 4) == (0,)
