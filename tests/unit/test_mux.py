"""The shared-socket demultiplexer: the classifier, the dispatcher and the two ways to run it."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import netsim
from punchtrio.mux import (
    PROBE_MAGIC,
    RELAY_MAGIC,
    Datagram,
    Kind,
    Mux,
    MuxedDevice,
    MuxError,
    classify,
    serve_mux,
)
from punchtrio.punch import PING, PONG, build_probe
from punchtrio.stun import (
    Fingerprint,
    MessageIntegrity,
    Software,
    StunMessage,
    StunResponder,
    StunTransaction,
    XorMappedAddress,
    encode_message,
)
from punchtrio.tunnel import UserspaceTunnel
from punchtrio.wireguard import (
    CookieReply,
    Device,
    Initiation,
    PeerConfig,
    Response,
    Transport,
)
from tests.packets import ipv4

KEY_A = bytes(range(1, 33))
KEY_B = bytes(range(101, 133))
ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)


def wireguard_datagrams() -> list[bytes]:
    """One real message of each WireGuard type, from two devices' handshake and a cookie reply."""
    a, b = Device(KEY_A), Device(KEY_B)
    a.add_peer(
        PeerConfig(
            b.public_key, allowed_ips=(ipaddress.ip_network("10.0.0.2/32"),), endpoint=ADDR_B
        )
    )
    b.add_peer(PeerConfig(a.public_key, allowed_ips=(ipaddress.ip_network("10.0.0.1/32"),)))
    assert a.send_packet(ipv4("10.0.0.1", "10.0.0.2"), 0.0) is None
    [(initiation, _)] = a.datagrams_to_send()
    b.receive_datagram(initiation, ADDR_A, 0.0)
    [(response, _)] = b.datagrams_to_send()
    a.receive_datagram(response, ADDR_B, 0.0)
    transports = [d for d, _ in a.datagrams_to_send()]
    busy = Device(KEY_B)
    busy.under_load = True
    busy.add_peer(PeerConfig(a.public_key))
    busy.receive_datagram(initiation, ADDR_A, 0.0)
    [(cookie, _)] = busy.datagrams_to_send()
    return [initiation, response, cookie, *transports]


WG_REAL = wireguard_datagrams()


def test_real_wireguard_messages_of_every_type_are_wireguard() -> None:
    assert sorted({d[0] for d in WG_REAL}) == [1, 2, 3, 4]
    assert all(classify(d) is Kind.WIREGUARD for d in WG_REAL)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", Kind.UNKNOWN),
        (b"\x00", Kind.UNKNOWN),
        pytest.param(StunTransaction(("203.0.113.1", 3478), 0.0).request, Kind.STUN, id="stun"),
        # STUN header with a length that does not match the datagram: not STUN.
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12), Kind.UNKNOWN),
        # First two bits 01: not STUN even with the cookie (it is TURN ChannelData).
        (b"\x40\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), Kind.CHANNEL_DATA),
        # A WireGuard-shaped 20-byte datagram with the cookie: STUN wins, as the order says.
        (b"\x01\x00\x00\x00\x21\x12\xa4\x42" + bytes(12), Kind.STUN),
        (b"\x04\x00\x00\x00" + bytes(28), Kind.WIREGUARD),
        (b"\x04\x00\x00\x00" + bytes(27), Kind.UNKNOWN),  # below the smallest WireGuard message
        (b"\x05\x00\x00\x00" + bytes(60), Kind.UNKNOWN),
        (b"\x01\x00\x00\x01" + bytes(144), Kind.UNKNOWN),
        (PROBE_MAGIC, Kind.PROBE),
        (b"\x4f\xff\x00\x00", Kind.CHANNEL_DATA),
        (b"\x4f\xff\x00", Kind.UNKNOWN),
        # RFC 5766 allowed channels up to 0x7FFE; RFC 8656 narrowed them to 0x4000-0x4FFF.
        (b"\x50\x00\x00\x00", Kind.UNKNOWN),
        (b"\x7f\xff\x00\x00", Kind.UNKNOWN),
        (RELAY_MAGIC + bytes(8), Kind.RELAY),
        (RELAY_MAGIC[:3], Kind.UNKNOWN),
        (b"\x80" + bytes(40), Kind.UNKNOWN),
        (b"\xff" * 100, Kind.UNKNOWN),
    ],
)
def test_classify_examples(data: bytes, kind: Kind) -> None:
    assert classify(data) is kind


class Recorder:
    """A mux with a recording handler for every kind; WireGuard's returns a marker packet."""

    def __init__(self) -> None:
        self.mux = Mux()
        self.got: list[tuple[Kind, bytes]] = []
        for kind in (Kind.STUN, Kind.PROBE, Kind.CHANNEL_DATA, Kind.RELAY):
            self.mux.route(kind, self._recorder(kind))
        self.mux.route(Kind.WIREGUARD, self._wireguard)

    def _recorder(self, kind: Kind):  # type: ignore[no-untyped-def]
        def handler(data: bytes, addr: tuple[str, int], now: float) -> None:
            self.got.append((kind, data))

        return handler

    def _wireguard(self, data: bytes, addr: tuple[str, int], now: float) -> bytes:
        self.got.append((Kind.WIREGUARD, data))
        return b"inner"


@given(st.binary(max_size=200))
def test_classifier_is_total_and_the_dispatcher_agrees_with_it(data: bytes) -> None:
    kind = classify(data)
    assert isinstance(kind, Kind)
    rec = Recorder()
    result = rec.mux.receive_datagram(data, ADDR_A, 1.0)
    if kind is Kind.UNKNOWN:
        assert rec.got == []
        assert rec.mux.counters.unknown == 1
    else:
        assert rec.got == [(kind, data)]
    assert result == (b"inner" if kind is Kind.WIREGUARD else None)
    assert rec.mux.counters.received(kind) == 1


@given(st.sampled_from([b"\x00", b"\x01", b"\x02", b"\x03", b"\x04"]), st.binary(max_size=200))
def test_classifier_on_cookie_prefixed_noise(first: bytes, rest: bytes) -> None:
    """Datagrams that carry the STUN cookie but are not STUN never reach the STUN handler."""
    data = first + rest[:3] + b"\x21\x12\xa4\x42" + rest[3:]
    kind = classify(data)
    length = int.from_bytes(data[2:4], "big")
    assert (kind is Kind.STUN) == (len(data) >= 20 and length == len(data) - 20 and not length % 4)


_ip4 = st.ip_addresses(v=4).map(str)
_ip6 = st.ip_addresses(v=6).map(str)


@given(
    st.sampled_from([0x0001, 0x0011, 0x0101, 0x0111, 0x0003, 0x0103]),
    st.one_of(_ip4, _ip6),
    st.integers(1, 65535),
    st.text(max_size=40),
    st.booleans(),
    st.booleans(),
)
def test_every_stun_message_is_stun(
    msg_type: int, ip: str, port: int, software: str, integrity: bool, fingerprint: bool
) -> None:
    family = 2 if ":" in ip else 1
    attrs = [XorMappedAddress(family=family, ip=ip, port=port), Software(value=software.encode())]
    if integrity:
        attrs.append(MessageIntegrity())
    if fingerprint:
        attrs.append(Fingerprint())
    data = encode_message(StunMessage(msg_type=msg_type, attributes=attrs), key=b"secret")
    assert classify(data) is Kind.STUN


@given(
    st.sampled_from(["v4", "v6"]),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.integers(1, 65535)),
)
def test_every_stun_request_is_stun(
    family: str, change_ip: bool, change_port: bool, rp: int | None
) -> None:
    dest = ("203.0.113.1", 3478) if family == "v4" else ("2001:db8::1", 3478)
    alternate = ("203.0.113.2", 3479) if family == "v4" else ("2001:db8::2", 3479)
    t = StunTransaction(dest, 0.0, change_ip=change_ip, change_port=change_port, response_port=rp)
    assert classify(t.request) is Kind.STUN
    # And the answer punchtrio's own server gives it (success, or a 420 error for a bad port).
    client = ("198.51.100.7", 40000) if family == "v4" else ("2001:db8::7", 40000)
    reply = StunResponder(dest, alternate, rate=None).handle(t.request, dest, client, 0.0)
    assert reply is not None
    assert classify(reply.data) is Kind.STUN


_u32 = st.integers(0, 2**32 - 1)


@given(
    st.one_of(
        st.builds(
            Initiation,
            _u32,
            st.binary(min_size=32, max_size=32),
            st.binary(min_size=48, max_size=48),
            st.binary(min_size=28, max_size=28),
            st.binary(min_size=16, max_size=16),
            st.binary(min_size=16, max_size=16),
        ),
        st.builds(
            Response,
            _u32,
            _u32,
            st.binary(min_size=32, max_size=32),
            st.binary(min_size=16, max_size=16),
            st.binary(min_size=16, max_size=16),
            st.binary(min_size=16, max_size=16),
        ),
        st.builds(
            CookieReply,
            _u32,
            st.binary(min_size=24, max_size=24),
            st.binary(min_size=32, max_size=32),
        ),
        st.builds(
            Transport, _u32, st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=1500)
        ),
    )
)
def test_every_wireguard_message_is_wireguard(
    message: Initiation | Response | CookieReply | Transport,
) -> None:
    assert classify(message.encode()) is Kind.WIREGUARD


@given(
    st.sampled_from([PING, PONG]),
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=8, max_size=8),
    st.floats(0, 4e9),
    st.one_of(st.none(), st.tuples(st.one_of(_ip4, _ip6), st.integers(1, 65535))),
)
def test_every_probe_is_a_probe(
    kind: int, txid: bytes, sender: bytes, wall: float, observed: tuple[str, int] | None
) -> None:
    data = build_probe(kind, txid, sender, wall, bytes(32), observed if kind == PONG else None)
    assert classify(data) is Kind.PROBE


@given(st.integers(0x4000, 0x4FFF), st.binary(max_size=100))
def test_every_channel_data_message_is_channel_data(channel: int, payload: bytes) -> None:
    data = struct.pack("!HH", channel, len(payload)) + payload
    assert classify(data) is Kind.CHANNEL_DATA


def test_routes_are_exclusive_and_unknown_cannot_be_routed() -> None:
    mux = Mux()
    with pytest.raises(MuxError):
        mux.route(Kind.UNKNOWN, lambda d, a, n: None)
    mux.route(Kind.STUN, lambda d, a, n: None)
    with pytest.raises(MuxError):
        mux.route(Kind.STUN, lambda d, a, n: None)
    mux.unroute(Kind.STUN)
    mux.route(Kind.STUN, lambda d, a, n: None)
    mux.route(Kind.WIREGUARD, lambda d, a, n: None)
    with pytest.raises(MuxError):
        mux.route(Kind.WIREGUARD, lambda d, a, n: None)


def test_unrouted_and_unknown_datagrams_are_dropped_and_counted() -> None:
    mux = Mux()
    assert mux.receive_datagram(WG_REAL[-1], ADDR_A, 0.0) is None
    assert mux.receive_datagram(PROBE_MAGIC, ADDR_A, 0.0) is None
    assert mux.receive_datagram(b"\x99 junk", ADDR_A, 0.0) is None
    assert mux.counters.unrouted == 2
    assert mux.counters.unknown == 1
    assert mux.counters.received(Kind.WIREGUARD) == 1


async def test_a_full_or_closed_queue_drops_and_counts() -> None:
    mux = Mux()
    queue = mux.open_queue(Kind.PROBE, max_size=2)
    for i in range(5):
        mux.receive_datagram(PROBE_MAGIC + bytes([i]), ADDR_A, float(i))
    assert mux.counters.queue_full == 3
    first = queue.receive_nowait()
    assert first == Datagram(PROBE_MAGIC + b"\x00", ADDR_A, 0.0)
    await queue.aclose()
    mux.receive_datagram(PROBE_MAGIC, ADDR_A, 9.0)
    assert mux.counters.queue_full == 4


@pytest.mark.parametrize("raw", [False, True])
async def test_serve_mux_on_netsim_sockets(
    autojump_clock: trio.testing.MockClock, raw: bool
) -> None:
    net = netsim.Internet()
    alice, bob = net.add_host(ADDR_A[0]), net.add_host(ADDR_B[0])
    mux = Mux()
    stun = mux.open_queue(Kind.STUN)
    probes = mux.open_queue(Kind.PROBE)
    wireguard: list[bytes] = []
    mux.route(Kind.WIREGUARD, lambda d, a, n: wireguard.append(d))
    request = StunTransaction(ADDR_B, 0.0).request
    sock: Any
    async with net, trio.open_nursery() as nursery:
        if raw:
            sock = bob.nonblocking_socket()
            sock.bind(("", ADDR_B[1]))
        else:
            sock = bob.udp_socket()
            await sock.bind(("", ADDR_B[1]))
        await nursery.start(serve_mux, sock, mux)
        sender = alice.udp_socket()
        await sender.bind(("", ADDR_A[1]))
        for data in (request, PROBE_MAGIC + b"x", b"\xee junk", *WG_REAL):
            await sender.sendto(data, ADDR_B)
        got = await stun.receive()
        assert (got.data, got.source) == (request, ADDR_A)
        assert (await probes.receive()).data == PROBE_MAGIC + b"x"
        await trio.sleep(1)
        assert wireguard == WG_REAL
        assert mux.counters.unknown == 1
        nursery.cancel_scope.cancel()
        if raw:
            sock.close()


async def test_the_tunnel_drains_the_shared_socket_through_the_mux(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two real WireGuard devices in userspace tunnels; STUN on the same port reaches its queue."""
    net = netsim.Internet()
    hosts = {"a": net.add_host(ADDR_A[0]), "b": net.add_host(ADDR_B[0])}
    dev_a, dev_b = Device(KEY_A), Device(KEY_B)
    dev_a.add_peer(
        PeerConfig(
            dev_b.public_key, allowed_ips=(ipaddress.ip_network("10.0.0.2/32"),), endpoint=ADDR_B
        )
    )
    dev_b.add_peer(PeerConfig(dev_a.public_key, allowed_ips=(ipaddress.ip_network("10.0.0.1/32"),)))
    mux_b = Mux()
    stun_b = mux_b.open_queue(Kind.STUN)
    tuns = {name: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for name in hosts}
    for inside, _ in tuns.values():
        inside.setblocking(False)
    apps = {name: trio.socket.from_stdlib_socket(outside) for name, (_, outside) in tuns.items()}
    try:
        async with net, trio.open_nursery() as nursery:
            socks = {}
            for name, host in hosts.items():
                socks[name] = host.nonblocking_socket()
                socks[name].bind(("", 51820))
            tunnel_a = UserspaceTunnel(dev_a, tuns["a"][0], [socks["a"]])  # type: ignore[list-item]
            tunnel_b = UserspaceTunnel(MuxedDevice(dev_b, mux_b), tuns["b"][0], [socks["b"]])  # type: ignore[list-item]
            await nursery.start(tunnel_a.serve)
            await nursery.start(tunnel_b.serve)
            packet = ipv4("10.0.0.1", "10.0.0.2", b"through the mux")
            await apps["a"].send(packet)
            assert await apps["b"].recv(2048) == packet
            stun_client = hosts["a"].udp_socket()
            request = StunTransaction(ADDR_B, 0.0).request
            await stun_client.sendto(request, ADDR_B)
            got = await stun_b.receive()
            assert got.data == request
            assert mux_b.counters.wireguard >= 2  # initiation and the data
            assert dev_b.peer_stats()[dev_a.public_key].has_session
            nursery.cancel_scope.cancel()
    finally:
        for name, (inside, _) in tuns.items():
            apps[name].close()
            inside.close()


def test_a_relay_handler_s_decrypted_packet_is_returned_and_other_results_are_not() -> None:
    mux = Mux()
    mux.route(Kind.RELAY, lambda data, addr, now: b"inner packet")
    mux.route(Kind.CHANNEL_DATA, lambda data, addr, now: 42)
    assert (
        mux.receive_datagram(RELAY_MAGIC + b"frame", ("203.0.113.1", 7778), 0.0) == b"inner packet"
    )
    assert mux.receive_datagram(b"\x40\x00\x00\x00", ("203.0.113.1", 3478), 0.0) is None
    assert mux.counters.relay == 1
    assert mux.counters.channel_data == 1


class _QueuedDevice:
    """A stand-in device: every packet becomes a datagram to the address it names."""

    under_load = False

    def __init__(self) -> None:
        self.queued: list[tuple[bytes, tuple[str, int]]] = []

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> bytes | None:
        return None

    def process_handshakes(self, now: float, limit: int) -> bool:
        return False

    def send_packet(self, packet: bytes, now: float) -> tuple[bytes, tuple[str, int]] | None:
        host, port = packet.decode().split(":")
        return b"sealed " + packet, (host, int(port))

    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
        out, self.queued = self.queued, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> object:
        return None

    def peer_stats(self) -> dict[bytes, object]:
        return {}


def test_a_route_hands_what_wireguard_sends_to_a_relay_and_costs_nothing_without_one() -> None:
    device = _QueuedDevice()
    muxed = MuxedDevice(device, Mux())
    assert muxed.send_packet == device.send_packet  # no routes: the device's own method
    relayed: list[bytes] = []
    virtual = ("240.0.0.1", 1)
    muxed.set_route(virtual, relayed.append)
    assert muxed.routed(virtual) is not None
    assert muxed.send_packet(b"240.0.0.1:1", 0.0) is None  # sent by the route
    assert muxed.send_packet(b"192.0.2.1:5000", 0.0) == (
        b"sealed 192.0.2.1:5000",
        ("192.0.2.1", 5000),
    )
    device.queued = [(b"handshake", virtual), (b"keepalive", ("192.0.2.1", 5000))]
    assert muxed.datagrams_to_send() == [(b"keepalive", ("192.0.2.1", 5000))]
    assert relayed == [b"sealed 240.0.0.1:1", b"handshake"]
    muxed.set_route(virtual, None)
    assert muxed.routed(virtual) is None
    assert muxed.send_packet == device.send_packet


def test_a_route_with_wrap_returns_the_relay_frame_for_the_tunnel_to_send() -> None:
    device = _QueuedDevice()
    muxed = MuxedDevice(device, Mux())
    virtual, relay = ("240.0.0.1", 1), ("203.0.113.1", 7778)
    sent_by_route: list[bytes] = []
    muxed.set_route(virtual, sent_by_route.append, wrap=lambda data: (b"frame " + data, relay))
    # The tunnel's send paths get the wrapped frame addressed to the relay...
    assert muxed.send_packet(b"240.0.0.1:1", 0.0) == (b"frame sealed 240.0.0.1:1", relay)
    device.queued = [(b"handshake", virtual), (b"keepalive", ("192.0.2.1", 5000))]
    assert muxed.datagrams_to_send() == [
        (b"frame handshake", relay),
        (b"keepalive", ("192.0.2.1", 5000)),
    ]
    assert sent_by_route == []
    # ...while other callers (the puncher's probes) still send through the route itself.
    route = muxed.routed(virtual)
    assert route is not None
    route(b"probe")
    assert sent_by_route == [b"probe"]
    muxed.set_route(virtual, sent_by_route.append)  # the same path without wrap: route only
    assert muxed.send_packet(b"240.0.0.1:1", 0.0) is None
    assert sent_by_route[-1] == b"sealed 240.0.0.1:1"


def test_a_handoff_takes_every_handler_call_but_wireguard_s() -> None:
    got: list[tuple[str, bytes]] = []
    wireguard = b"\x04\x00\x00\x00" + bytes(40)
    mux = Mux(lambda data, addr, now: b"decrypted")
    mux.route(Kind.PROBE, lambda data, addr, now: got.append(("probe", data)))
    mux.route(Kind.RELAY, lambda data, addr, now: b"inner packet")
    handed: list[Any] = []
    mux.set_handoff(handed.append)
    probe = PROBE_MAGIC + b"ping"
    frame = RELAY_MAGIC + b"frame"
    source = ("203.0.113.1", 7778)
    # WireGuard still goes to its receiver at once; the others only become calls.
    assert mux.receive_datagram(wireguard, source, 1.0) == b"decrypted"
    assert mux.receive_datagram(probe, source, 2.0) is None
    assert mux.receive_datagram(frame, source, 3.0) is None
    assert mux.receive_datagram(b"\xffnoise", source, 4.0) is None  # unknown: dropped here
    assert got == []
    assert len(handed) == 2
    assert (mux.counters.wireguard, mux.counters.probe, mux.counters.relay) == (1, 1, 1)
    assert mux.counters.unknown == 1
    # Making the calls later runs the handlers with what arrived, and returns their results.
    assert [call() for call in handed] == [None, b"inner packet"]
    assert got == [("probe", probe)]
    mux.set_handoff(None)
    assert mux.receive_datagram(frame, source, 5.0) == b"inner packet"
    assert len(handed) == 2


def test_a_muxed_device_hands_off_its_routes_but_not_its_wraps() -> None:
    device = _QueuedDevice()
    mux = Mux()
    muxed = MuxedDevice(device, mux)
    relay = ("203.0.113.1", 7778)
    streamed, wrapped = ("240.0.0.1", 1), ("240.0.0.2", 1)
    sent: list[bytes] = []
    muxed.set_route(streamed, sent.append)
    muxed.set_route(wrapped, sent.append, wrap=lambda data: (b"frame " + data, relay))
    handed: list[Any] = []
    muxed.set_handoff(handed.append)
    assert mux.receive_datagram(PROBE_MAGIC + b"x", relay, 0.0) is None
    assert mux.counters.unrouted == 1  # no probe handler: nothing to hand off
    assert muxed.send_packet(b"240.0.0.1:1", 0.0) is None
    assert muxed.send_packet(b"240.0.0.2:1", 0.0) == (b"frame sealed 240.0.0.2:1", relay)
    device.queued = [(b"handshake", streamed), (b"keepalive", wrapped)]
    assert muxed.datagrams_to_send() == [(b"frame keepalive", relay)]
    assert sent == []  # the stream's sends wait for the Trio thread
    for call in handed:
        call()
    assert sent == [b"sealed 240.0.0.1:1", b"handshake"]
    muxed.set_handoff(None)
    assert muxed.send_packet(b"240.0.0.1:1", 0.0) is None
    assert sent[-1] == b"sealed 240.0.0.1:1"
    assert len(handed) == 2
