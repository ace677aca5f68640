"""The hub relay's Trio shell over real loopback sockets (UDP, TCP, TLS), and its hub wiring."""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.metrics import TextCollector
from punchtrio.relay import (
    HubRelayClient,
    HubRelayServeError,
    HubRelayServer,
    HubRelayService,
    HubStreamDecoder,
    RelayStream,
    RelayStreamError,
    encode_hub_stream_frame,
    server_tls_context,
)
from punchtrio.rendezvous import HubInfo, HubRelayAddress
from punchtrio.rendezvous._hub import KeyDirectory
from tests.unit.hub_harness import Hub

LOOPBACK = "127.0.0.1"


class Progress:
    """Wakes a waiter whenever a frame arrives on a stream."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def poke(self) -> None:
        self.event.set()
        self.event = trio.Event()

    async def until(self, condition: Callable[[], object]) -> None:
        while not condition():
            await self.event.wait()


class Setup:
    def __init__(self) -> None:
        self.hub_key = PrivateKey.generate()
        self.registered: set[bytes] = set()
        self.server = HubRelayServer(
            self.hub_key, registered=lambda key, net, now: key in self.registered
        )

    def client(self) -> HubRelayClient:
        key = PrivateKey.generate()
        self.registered.add(key.public_key().raw)
        return HubRelayClient(key.raw, self.hub_key.public_key().raw)


async def _udp_bind(
    client: HubRelayClient, sock: trio.socket.SocketType, relay: tuple[str, int]
) -> None:
    client.connect(trio.current_time())
    with trio.fail_after(5):
        while not client.bound:
            for frame in client.datagrams_to_send():
                await sock.sendto(frame, relay)
            data, _ = await sock.recvfrom(2048)
            client.receive_frame(data, trio.current_time())


async def _udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((LOOPBACK, 0))
    return sock


def _stream_binder(
    client: HubRelayClient,
    stream: RelayStream,
    got: list[tuple[bytes, bytes]],
    progress: Progress,
) -> Callable[[bytes, float], None]:
    def on_frame(frame: bytes, now: float) -> None:
        result = client.receive_frame(frame, now)
        if result is not None:
            got.append(result)
        for out in client.datagrams_to_send():
            stream.send_nowait(encode_hub_stream_frame(out))
        progress.poke()

    return on_frame


async def _exchange_over(tls: ssl.SSLContext | None, client_tls: ssl.SSLContext | None) -> None:
    setup = Setup()
    service = HubRelayService(setup.server, (LOOPBACK, 0), tls=tls)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(service.serve)
        udp_peer, tcp_peer = setup.client(), setup.client()
        sock = await _udp_socket()
        await _udp_bind(udp_peer, sock, relay)
        stream = RelayStream(
            relay, decoder_factory=HubStreamDecoder, tls=client_tls, server_hostname="localhost"
        )
        got: list[tuple[bytes, bytes]] = []
        progress = Progress()
        await nursery.start(stream.run, _stream_binder(tcp_peer, stream, got, progress))
        tcp_peer.connect(trio.current_time())
        for frame in tcp_peer.datagrams_to_send():
            stream.send_nowait(encode_hub_stream_frame(frame))
        with trio.fail_after(5):
            await progress.until(lambda: tcp_peer.bound)
        # UDP -> TCP and TCP -> UDP
        await sock.sendto(udp_peer.wrap(tcp_peer.public_key, b"udp to tcp"), relay)
        assert stream.send_nowait(
            encode_hub_stream_frame(tcp_peer.wrap(udp_peer.public_key, b"tcp to udp"))
        )
        with trio.fail_after(5):
            unwrapped = None
            while unwrapped is None:  # the relay's CHANNEL frame may come first
                data, _ = await sock.recvfrom(2048)
                unwrapped = udp_peer.receive_frame(data, trio.current_time())
            await progress.until(lambda: got)
        assert unwrapped == (tcp_peer.public_key, b"tcp to udp")
        assert got == [(udp_peer.public_key, b"udp to tcp")]
        assert setup.server.bound_peers == 2
        assert "punchtrio_hub_relay_streams 1" in service.metrics_lines()
        sock.close()
        nursery.cancel_scope.cancel()


async def test_udp_and_tcp_peers_exchange_frames_through_the_shell() -> None:
    await _exchange_over(None, None)


def _self_signed(tmp: Path) -> tuple[str, str, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "relay.crt", tmp / "relay.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    client = ssl.create_default_context(cafile=str(cert_path))
    return str(cert_path), str(key_path), client


async def test_tls_peers_exchange_frames(tmp_path: Path) -> None:
    cert, key, client = _self_signed(tmp_path)
    await _exchange_over(server_tls_context(cert, key), client)


async def test_tls_with_an_untrusted_certificate_is_one_line_error(tmp_path: Path) -> None:
    cert, key, _ = _self_signed(tmp_path)
    setup = Setup()
    service = HubRelayService(setup.server, (LOOPBACK, 0), tls=server_tls_context(cert, key))
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(service.serve)
        stream = RelayStream(
            relay, decoder_factory=HubStreamDecoder, tls=ssl.create_default_context()
        )
        with pytest.raises(RelayStreamError, match="TLS handshake") as caught:
            await stream.run(lambda frame, now: None)
        assert "\n" not in str(caught.value)
        nursery.cancel_scope.cancel()


def test_bad_tls_files_are_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(HubRelayServeError, match="cannot load"):
        server_tls_context(str(tmp_path / "missing.crt"), str(tmp_path / "missing.pem"))


async def test_a_taken_port_is_one_line_error() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind((LOOPBACK, 0))
    service = HubRelayService(Setup().server, (LOOPBACK, taken.getsockname()[1]))
    with pytest.raises(HubRelayServeError, match=r"cannot serve the relay on 127\.0\.0\.1"):
        await service.serve()
    taken.close()


async def test_connection_refused_is_one_line_error() -> None:
    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    port = probe.getsockname()[1]
    probe.close()
    stream = RelayStream((LOOPBACK, port), decoder_factory=HubStreamDecoder)
    with pytest.raises(RelayStreamError, match="cannot connect to relay"):
        await stream.run(lambda frame, now: None)


async def test_a_slow_tcp_reader_is_bounded_and_does_not_block_the_relay() -> None:
    setup = Setup()
    service = HubRelayService(setup.server, (LOOPBACK, 0), max_buffer=64 * 1024)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(service.serve)
        slow, sender, other = setup.client(), setup.client(), setup.client()
        # The slow peer binds over TCP, then never reads again.
        tcp = await trio.open_tcp_stream(*relay)
        slow.connect(trio.current_time())
        decoder = HubStreamDecoder()
        with trio.fail_after(5):
            while not slow.bound:
                for frame in slow.datagrams_to_send():
                    await tcp.send_all(encode_hub_stream_frame(frame))
                for frame in decoder.feed(await tcp.receive_some(4096)):
                    slow.receive_frame(frame, trio.current_time())
        sock, other_sock = await _udp_socket(), await _udp_socket()
        await _udp_bind(sender, sock, relay)
        await _udp_bind(other, other_sock, relay)
        payload = b"p" * 1400
        frame_to_slow = sender.wrap(slow.public_key, payload)
        with trio.fail_after(20):
            while service.counters["stream_dropped"] == 0:
                for _ in range(64):
                    await sock.sendto(frame_to_slow, relay)
                await trio.sleep(0.001)
            # The relay still forwards to everyone else at once.
            await sock.sendto(sender.wrap(other.public_key, b"still here"), relay)
            data, _ = await other_sock.recvfrom(2048)
        assert other.receive_frame(data, trio.current_time()) == (sender.public_key, b"still here")
        assert service._writers  # the slow connection is still open, its queue bounded
        assert all(w.buffered <= 64 * 1024 for w in service._writers.values())
        text = "\n".join(service.metrics_lines())
        assert 'punchtrio_hub_relay_send_dropped_total{transport="tcp"} 0' not in text
        for s in (sock, other_sock):
            s.close()
        await tcp.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stream_that_breaks_the_framing_is_closed() -> None:
    setup = Setup()
    service = HubRelayService(setup.server, (LOOPBACK, 0))
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(service.serve)
        tcp = await trio.open_tcp_stream(*relay)
        await tcp.send_all(b"\xff\xff" + b"x" * 100)
        with trio.fail_after(5):
            assert await tcp.receive_some(100) == b""
        assert service.counters["stream_framing_errors"] == 1
        await tcp.aclose()
        nursery.cancel_scope.cancel()


async def test_the_hub_publishes_the_relay_counts_it_and_keeps_the_directory() -> None:
    directory = KeyDirectory(clock=lambda: 1_800_000_000.0 + trio.current_time())
    setup = Setup()
    relay = HubRelayAddress(None, 7778, True)
    async with Hub(relays=(relay,), directory=directory) as hub:
        published = (await hub.http.get("/v1/hub")).json()
        assert published["relay"] == {"ip": None, "port": 7778, "tls": True}
        assert "relays" not in published  # one address: what every client has always read
        info = HubInfo.from_json(published)
        assert info.relays == (relay,)
        assert info.relay == relay
        metrics = hub.scrape(TextCollector(setup.server.metrics_lines))
        assert metrics["punchtrio_hub_relay_bound_peers"] == 0
        peer = hub.peer()
        key = peer.key.public_key().raw
        assert not directory.is_registered(key, "", hub_now())
        assert (await peer.put("alice")).status_code == 201
        assert directory.is_registered(key, "", hub_now())
        assert not directory.is_registered(key, "0" * 32, hub_now())
        assert (await peer.delete("alice")).status_code == 204
        assert not directory.is_registered(key, "", hub_now())
    async with Hub() as plain:
        assert "relay" not in (await plain.http.get("/v1/hub")).json()


def hub_now() -> float:
    return 1_800_000_000.0 + trio.current_time()


def test_directory_entries_expire() -> None:
    directory = KeyDirectory(clock=lambda: 100.0, sweep_every=2)
    directory.note("", "a", b"k" * 32, 50.0)
    assert not directory.is_registered(b"k" * 32, "", 60.0)
    directory.note("", "b", b"j" * 32, 500.0)  # second note: a sweep at clock 100
    assert len(directory) == 1
    assert directory.is_registered(b"j" * 32, "", 100.0)


def _hub_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "punchtrio.cli",
        "hub",
        "--store",
        "memory",
        "--listen",
        "127.0.0.1:0",
        *argv,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(
    ("value", "message"),
    [("nonsense", "--relay must be IPv4:port"), ("127.0.0.1:70000", "--relay must have a port")],
)
def test_cli_bad_relay_value_is_one_line(value: str, message: str) -> None:
    proc = _hub_cli("--relay", value)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"punchtrio: error: {message}")


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_cli_relay_port_in_use_is_one_line_and_starts_nothing(kind: int) -> None:
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind((LOOPBACK, 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        port = taken.getsockname()[1]
        proc = _hub_cli("--relay", f"127.0.0.1:{port}")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"punchtrio: error: cannot serve the relay on 127.0.0.1:{port}: Address already in use"
    ]


async def test_a_gso_burst_is_read_with_gro_split_and_forwarded_in_order() -> None:
    setup = Setup()
    service = HubRelayService(setup.server, (LOOPBACK, 0))
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(service.serve)
        assert service.gro
        assert service.gso
        sender, receiver = setup.client(), setup.client()
        sock_a, sock_b = await _udp_socket(), await _udp_socket()
        await _udp_bind(sender, sock_a, relay)
        await _udp_bind(receiver, sock_b, relay)
        # 40 equal frames and a shorter last one: one GSO send, as a tunnel sends a burst.
        payloads = [bytes([n]) * 1200 for n in range(40)] + [b"tail"]
        frames = [sender.wrap(receiver.public_key, payload) for payload in payloads]
        segment = [(socket.SOL_UDP, 103, len(frames[0]).to_bytes(2, sys.byteorder))]
        await sock_a.sendmsg(frames, segment, 0, relay)
        got = []
        with trio.fail_after(5):
            while len(got) < len(payloads):
                data, _ = await sock_b.recvfrom(65536)
                unwrapped = receiver.receive_frame(data, trio.current_time())
                assert unwrapped is not None
                got.append(unwrapped)
        sock_a.close()
        sock_b.close()
        nursery.cancel_scope.cancel()
    assert got == [(sender.public_key, payload) for payload in payloads]
    # The burst was read in fewer reads than frames and forwarded in fewer sends than frames.
    assert service.counters["udp_reads"] < 10
    assert service.counters["udp_sends"] < 10
    assert setup.server.counters["forwarded"] == len(payloads)


async def test_a_dual_stack_relay_carries_frames_between_ipv4_and_ipv6_peers() -> None:
    """One relay core on an IPv4 and an IPv6 address (one port, IPv6 socket IPv6-only): a peer
    bound over IPv4 UDP and one over IPv6 UDP reach each other, each answered on its family."""
    setup = Setup()
    service = HubRelayService(setup.server, (LOOPBACK, 0), ("::1", 0))
    async with trio.open_nursery() as nursery:
        first = await nursery.start(service.serve)
        assert [ip for ip, _ in service.bound] == [LOOPBACK, "::1"]
        assert {port for _, port in service.bound} == {first[1]}
        assert service._socks[6].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        v4_peer, v6_peer = setup.client(), setup.client()
        v4 = await _udp_socket()
        v6 = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        await v6.bind(("::1", 0))
        await _udp_bind(v4_peer, v4, service.bound[0])
        await _udp_bind(v6_peer, v6, service.bound[1])
        await v4.sendto(v4_peer.wrap(v6_peer.public_key, b"4 to 6"), service.bound[0])
        await v6.sendto(v6_peer.wrap(v4_peer.public_key, b"6 to 4"), service.bound[1])
        for sock, peer, sender, text in ((v6, v6_peer, v4_peer, b"4 to 6"),
                                         (v4, v4_peer, v6_peer, b"6 to 4")):  # fmt: skip
            with trio.fail_after(5):
                unwrapped = None
                while unwrapped is None:  # the relay's CHANNEL frame may come first
                    data, _ = await sock.recvfrom(2048)
                    unwrapped = peer.receive_frame(data, trio.current_time())
            assert unwrapped == (sender.public_key, text)
        # TCP is served on both addresses too.
        for address in service.bound:
            stream = await trio.open_tcp_stream(*address)
            await stream.aclose()
        v4.close()
        v6.close()
        nursery.cancel_scope.cancel()


async def test_a_dual_stack_relay_binds_both_or_neither() -> None:
    """The IPv6 side's port is taken: one line naming it, and the IPv4 side is not left bound."""
    taken = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    taken.bind(("::1", 0))
    port = taken.getsockname()[1]
    service = HubRelayService(Setup().server, (LOOPBACK, port), ("::1", port))
    with pytest.raises(HubRelayServeError, match=rf"cannot serve the relay on \[::1\]:{port}"):
        await service.serve()
    again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    again.bind((LOOPBACK, port))  # free: the failed start released its IPv4 socket
    again.close()
    taken.close()


@pytest.mark.parametrize(
    "addresses",
    [(), ((LOOPBACK, 0), ("127.0.0.2", 0)), ((LOOPBACK, 7000), ("::1", 7001))],
)
def test_relay_addresses_are_one_per_family_on_one_port(
    addresses: tuple[tuple[str, int], ...],
) -> None:
    with pytest.raises(ValueError, match="relay serves"):
        HubRelayService(Setup().server, *addresses)
