"""TurnClient against a real coturn (Debian ``turnserver``) on loopback.

coturn runs with a temporary configuration on 127.0.0.1 (relay addresses on 127.0.0.1 too, loopback
peers allowed), once with a static user (``--lt-cred-mech --user``) and once with the REST scheme
(``--use-auth-secret --static-auth-secret``) whose credentials our own hub mints. The peers are
plain UDP sockets or other TurnClients; TURN over TCP uses the project's RelayStream.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from punchtrio.keys import PrivateKey
from punchtrio.relay import (
    ChannelBound,
    PermissionCreated,
    RelayStream,
    TurnAllocated,
    TurnClient,
    TurnClosed,
    TurnCredentials,
    TurnEvent,
    TurnFailed,
    TurnServerURI,
    TurnStreamDecoder,
)
from punchtrio.rendezvous import HubClient
from punchtrio.rendezvous._hub import HubConfig, create_app
from tests.conftest import require_root_and

pytestmark = pytest.mark.interop

REALM = "punchtrio.test"
USER, PASSWORD = "alice", "correct-horse"
SECRET = "rest-secret-for-tests"


@dataclass
class Coturn:
    port: int
    min_port: int
    max_port: int
    log: Path
    process: subprocess.Popen[bytes]
    tls_port: int | None = None
    certificate: Path | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def _wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until coturn answers a STUN Binding request (its relay ports are set up by then)."""
    request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12)
    deadline = time.monotonic() + 15
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"turnserver exited with {process.returncode}:\n{log.read_text()}")
            probe.sendto(request, ("127.0.0.1", port))
            try:
                probe.recvfrom(2048)
            except TimeoutError:
                continue
            time.sleep(0.3)
            return
    pytest.fail(f"turnserver did not answer within 15 s:\n{log.read_text()}")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), made with the openssl command."""
    require_root_and("openssl")
    cert, key = tmp_path / "turn.crt", tmp_path / "turn.key"
    command = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
        "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


def start_coturn(tmp_path: Path, *auth: str, tls: bool = False) -> Iterator[Coturn]:
    require_root_and("turnserver")
    port = _free_port()
    min_port = random.randrange(40000, 60000, 100)
    log = tmp_path / "turnserver.log"
    tls_port, certificate = None, None
    tls_options = ["--no-tls"]
    if tls:
        certificate, key = _self_signed(tmp_path)
        tls_port = _free_port()
        tls_options = [
            "--tls-listening-port", str(tls_port), "--cert", str(certificate),
            "--pkey", str(key),
        ]  # fmt: skip
    command = [
        "turnserver", "-n", "--log-file", "stdout", "--simple-log", "--no-cli", *tls_options,
        "--no-dtls", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
        "--listening-port", str(port), "--min-port", str(min_port),
        "--max-port", str(min_port + 99), "--allow-loopback-peers",
        "--allowed-peer-ip", "127.0.0.1", "--realm", REALM, "--fingerprint",
        "--pidfile", str(tmp_path / "turnserver.pid"), "--userdb", str(tmp_path / "turndb"),
        *auth,
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, process, log)
        yield Coturn(port, min_port, min_port + 99, log, process, tls_port, certificate)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    yield from start_coturn(tmp_path, "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}")


@pytest.fixture
def coturn_tls(tmp_path: Path) -> Iterator[Coturn]:
    yield from start_coturn(tmp_path, "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", tls=True)


@pytest.fixture
def coturn_rest(tmp_path: Path) -> Iterator[Coturn]:
    yield from start_coturn(
        tmp_path, "--lt-cred-mech", "--use-auth-secret", "--static-auth-secret", SECRET
    )


@pytest.fixture
async def sockets() -> AsyncIterator[list[trio.socket.SocketType]]:
    """Every UDP socket a test opens (through ``udp_socket``), closed at its end."""
    opened: list[trio.socket.SocketType] = []
    yield opened
    for sock in opened:
        sock.close()


async def udp_socket(opened: list[trio.socket.SocketType]) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    opened.append(sock)
    await sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class UdpShell:
    """A minimal Trio shell for one TurnClient on its own UDP socket (what the connector does)."""

    client: TurnClient
    sock: trio.socket.SocketType
    events: list[TurnEvent] = field(default_factory=list)
    payloads: list[tuple[tuple[str, int], bytes]] = field(default_factory=list)

    @classmethod
    async def open(cls, client: TurnClient, opened: list[trio.socket.SocketType]) -> UdpShell:
        return cls(client, await udp_socket(opened))

    async def flush(self) -> None:
        for datagram in self.client.datagrams_to_send():
            await self.sock.sendto(datagram, self.client.server)

    async def pump(self, until: Callable[[], bool], seconds: float = 10.0) -> None:
        client = self.client
        with trio.fail_after(seconds):
            while True:
                await self.flush()
                while (event := client.next_event()) is not None:
                    self.events.append(event)
                if until():
                    return
                timer = client.get_timer()
                wake = trio.current_time() + 0.05
                if timer is not None:
                    wake = min(wake, timer)
                with trio.move_on_at(wake):
                    data, source = await self.sock.recvfrom(65536)
                    relayed = client.receive(data, trio.current_time(), source=source[:2])
                    if relayed is not None:
                        self.payloads.append(relayed)
                client.handle_timer(trio.current_time())

    def has(self, kind: type) -> bool:
        return any(isinstance(event, kind) for event in self.events)

    def first(self, kind: type) -> TurnEvent:
        return next(event for event in self.events if isinstance(event, kind))


def longer_than(items: list[tuple[tuple[str, int], bytes]], size: int) -> Callable[[], bool]:
    return lambda: len(items) > size


async def allocated(
    server: Coturn, credentials: TurnCredentials, opened: list[trio.socket.SocketType]
) -> UdpShell:
    shell = await UdpShell.open(TurnClient(server.address, credentials), opened)
    shell.client.allocate(trio.current_time())
    await shell.pump(lambda: shell.has(TurnAllocated) or shell.has(TurnFailed))
    assert not shell.has(TurnFailed), shell.events
    return shell


async def test_allocation_permission_channel_and_data_both_ways(
    coturn: Coturn, sockets: list[trio.socket.SocketType]
) -> None:
    shell = await allocated(coturn, TurnCredentials(USER, PASSWORD), sockets)
    client = shell.client
    event = shell.first(TurnAllocated)
    assert isinstance(event, TurnAllocated)
    relayed = client.relayed_address
    assert relayed is not None
    assert relayed[0] == "127.0.0.1"
    assert coturn.min_port <= relayed[1] <= coturn.max_port
    assert client.mapped_address == shell.sock.getsockname()[:2]
    assert event.lifetime == 600

    peer = await udp_socket(sockets)
    peer_address = peer.getsockname()[:2]
    client.add_peer(peer_address, trio.current_time())
    await shell.pump(lambda: shell.has(ChannelBound) and shell.has(PermissionCreated))
    assert shell.first(ChannelBound) == ChannelBound(peer_address, 0x4000)

    # Client -> peer, as ChannelData: the peer sees it come from the relayed address.
    frame = client.wrap(peer_address, b"hello peer")
    assert frame is not None
    assert frame[:2] == b"\x40\x00"
    await shell.sock.sendto(frame, coturn.address)
    with trio.fail_after(5):
        data, source = await peer.recvfrom(2048)
    assert (data, source[:2]) == (b"hello peer", relayed)

    # Peer -> client: ChannelData back.
    await peer.sendto(b"hello client", relayed)
    await shell.pump(lambda: bool(shell.payloads))
    assert shell.payloads == [(peer_address, b"hello client")]
    assert client.counters["channel_data_in"] == 1

    # A second peer socket on the same IP has the permission but no channel: Send and Data
    # indications carry its traffic.
    other = await udp_socket(sockets)
    other_address = other.getsockname()[:2]
    indication = client.wrap(other_address, b"via send indication")
    assert indication is not None
    assert indication[:2] == b"\x00\x16"
    await shell.sock.sendto(indication, coturn.address)
    with trio.fail_after(5):
        data, source = await other.recvfrom(2048)
    assert (data, source[:2]) == (b"via send indication", relayed)
    await other.sendto(b"via data indication", relayed)
    await shell.pump(lambda: len(shell.payloads) == 2)
    assert shell.payloads[1] == (other_address, b"via data indication")
    assert client.counters["data_indications_in"] == 1
    assert client.counters["dropped_integrity"] == 0
    assert client.counters["dropped_unmatched"] == 0

    client.close(trio.current_time())
    await shell.pump(lambda: shell.has(TurnClosed))
    # A new client on the same socket allocates too (once coturn has freed the old allocation).
    again = UdpShell(TurnClient(coturn.address, TurnCredentials(USER, PASSWORD)), shell.sock)
    again.client.allocate(trio.current_time())
    await again.pump(lambda: again.has(TurnAllocated) or again.has(TurnFailed))
    assert again.has(TurnAllocated), again.events
    again.client.close(trio.current_time())
    await again.pump(lambda: again.has(TurnClosed))


async def test_two_turn_clients_relay_to_each_other(
    coturn: Coturn, sockets: list[trio.socket.SocketType]
) -> None:
    alice = await allocated(coturn, TurnCredentials(USER, PASSWORD), sockets)
    bob = await allocated(coturn, TurnCredentials(USER, PASSWORD), sockets)
    a_relayed, b_relayed = alice.client.relayed_address, bob.client.relayed_address
    assert a_relayed is not None
    assert b_relayed is not None
    assert a_relayed != b_relayed
    now = trio.current_time()
    alice.client.add_peer(b_relayed, now)
    bob.client.add_peer(a_relayed, now)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alice.pump, lambda: alice.has(ChannelBound))
        nursery.start_soon(bob.pump, lambda: bob.has(ChannelBound))
    for round_trip in range(3):
        message = f"ping {round_trip}".encode()
        frame = alice.client.wrap(b_relayed, message)
        assert frame is not None
        await alice.sock.sendto(frame, coturn.address)
        await bob.pump(longer_than(bob.payloads, round_trip))
        assert bob.payloads[-1] == (a_relayed, message)
        reply = bob.client.wrap(a_relayed, b"pong" + message)
        assert reply is not None
        await bob.sock.sendto(reply, coturn.address)
        await alice.pump(longer_than(alice.payloads, round_trip))
        assert alice.payloads[-1] == (b_relayed, b"pong" + message)


async def test_wrong_password_is_refused_with_a_clear_error(
    coturn: Coturn, sockets: list[trio.socket.SocketType]
) -> None:
    credentials = TurnCredentials(USER, "wrong-pass")
    shell = await UdpShell.open(TurnClient(coturn.address, credentials), sockets)
    shell.client.allocate(trio.current_time())
    await shell.pump(lambda: shell.has(TurnFailed) or shell.has(TurnAllocated))
    failed = shell.first(TurnFailed)
    assert isinstance(failed, TurnFailed)
    assert failed.code == 401
    assert f"127.0.0.1:{coturn.port}" in failed.reason
    assert "'alice'" in failed.reason
    assert "wrong-pass" not in failed.reason


async def test_a_leftover_allocation_on_our_address_is_replaced(
    coturn: Coturn, sockets: list[trio.socket.SocketType]
) -> None:
    # A client that vanished without closing (a crash) left an allocation on this socket's
    # 5-tuple: coturn answers the next Allocate with 437; the client deletes it and allocates.
    first = await allocated(coturn, TurnCredentials(USER, PASSWORD), sockets)
    second = UdpShell(TurnClient(coturn.address, TurnCredentials(USER, PASSWORD)), first.sock)
    second.client.allocate(trio.current_time())
    await second.pump(lambda: second.has(TurnAllocated) or second.has(TurnFailed))
    assert second.has(TurnAllocated), second.events
    second.client.close(trio.current_time())
    await second.pump(lambda: second.has(TurnClosed))


async def test_rest_credentials_minted_by_our_hub_are_accepted(
    coturn_rest: Coturn, sockets: list[trio.socket.SocketType]
) -> None:
    uri = TurnServerURI.parse(f"turn:127.0.0.1:{coturn_rest.port}?transport=udp")
    config = HubConfig(PrivateKey.generate(), rate=0, turn=(uri,), turn_secret=SECRET.encode())
    app = create_app(config)
    async with HubClient(
        "http://hub.test", PrivateKey.generate(), "alice", transport=httpx.ASGITransport(app)
    ) as hub:
        await hub.register()
        assert hub.hub_info is not None
        assert hub.hub_info.turn == (uri,)
        (granted,) = await hub.turn_servers()
    assert granted.uri == uri
    assert granted.ttl == 3600
    assert granted.credentials.username.endswith(":alice")
    assert granted.uri.address is not None
    shell = await allocated(coturn_rest, granted.credentials, sockets)
    assert shell.client.relayed_address is not None
    # A forged REST password is refused.
    forged = TurnCredentials(granted.credentials.username, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    bad = await UdpShell.open(TurnClient(coturn_rest.address, forged), sockets)
    bad.client.allocate(trio.current_time())
    await bad.pump(lambda: bad.has(TurnFailed) or bad.has(TurnAllocated))
    assert isinstance(bad.first(TurnFailed), TurnFailed)


async def test_turn_over_tcp_with_relay_stream(
    coturn: Coturn, sockets: list[trio.socket.SocketType]
) -> None:
    client = TurnClient(coturn.address, TurnCredentials(USER, PASSWORD), transport="tcp")
    stream = RelayStream(coturn.address, decoder_factory=TurnStreamDecoder)
    await relay_over_stream(client, stream, sockets)


async def test_turn_over_tls_with_relay_stream(
    coturn_tls: Coturn, sockets: list[trio.socket.SocketType]
) -> None:
    assert coturn_tls.tls_port is not None
    assert coturn_tls.certificate is not None
    address = ("127.0.0.1", coturn_tls.tls_port)
    context = ssl.create_default_context(cafile=str(coturn_tls.certificate))
    client = TurnClient(address, TurnCredentials(USER, PASSWORD), transport="tls")
    stream = RelayStream(address, decoder_factory=TurnStreamDecoder, tls=context)
    await relay_over_stream(client, stream, sockets)


async def relay_over_stream(
    client: TurnClient, stream: RelayStream, sockets: list[trio.socket.SocketType]
) -> None:
    events: list[TurnEvent] = []
    payloads: list[tuple[tuple[str, int], bytes]] = []

    def on_frame(frame: bytes, now: float) -> None:
        relayed = client.receive(frame, now)
        if relayed is not None:
            payloads.append(relayed)

    async def pump(until: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while True:
                for chunk in client.datagrams_to_send():
                    assert stream.send_nowait(chunk)
                while (event := client.next_event()) is not None:
                    events.append(event)
                if until():
                    return
                await trio.sleep(0.01)
                client.handle_timer(trio.current_time())

    peer = await udp_socket(sockets)
    peer_address = peer.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run, on_frame)
        client.allocate(trio.current_time())
        await pump(lambda: any(isinstance(e, (TurnAllocated, TurnFailed)) for e in events))
        assert isinstance(events[0], TurnAllocated), events
        relayed = client.relayed_address
        assert relayed is not None
        client.add_peer(peer_address, trio.current_time())
        await pump(lambda: any(isinstance(e, ChannelBound) for e in events))
        # Odd sizes: ChannelData is padded to 4 bytes on the stream, and coturn must accept that.
        for size in (1, 2, 3, 5, 1200):
            payload = bytes([size % 256]) * size
            frame = client.wrap(peer_address, payload)
            assert frame is not None
            assert len(frame) % 4 == 0
            assert stream.send_nowait(frame)
            with trio.fail_after(5):
                data, source = await peer.recvfrom(4096)
            assert (data, source[:2]) == (payload, relayed)
            count = len(payloads)  # the stream's reader task appends, maybe before pump() runs
            await peer.sendto(payload[::-1] + b"!", relayed)
            await pump(longer_than(payloads, count))
            assert payloads[-1] == (peer_address, payload[::-1] + b"!")
        client.close(trio.current_time())
        await pump(lambda: any(isinstance(e, TurnClosed) for e in events))
        nursery.cancel_scope.cancel()
    assert client.counters["dropped_malformed"] == 0
