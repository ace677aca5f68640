"""The hub's relay in a real ``punchtrio hub --relay`` process: registered peers over UDP and TCP.

Two peers register at the hub over HTTP (signed requests), bind at its relay and move frames:
both over UDP, then one over TCP to one over UDP. An unregistered key is refused, and the hub's
``/metrics`` shows what the relay forwarded and dropped.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.relay import (
    HubRelayClient,
    HubStreamDecoder,
    RefusalCode,
    RelayRefused,
    RelayStream,
    encode_hub_stream_frame,
)
from punchtrio.rendezvous import Endpoint, HubAuth, HubInfo, RegisterRequest, RequestSigner
from tests.conftest import require_root_and

pytestmark = pytest.mark.interop


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


class RunningHub:
    def __init__(self, url: str, relay: tuple[str, int], metrics_url: str) -> None:
        self.url = url
        self.relay = relay
        self.metrics_url = metrics_url
        self.log: Path | None = None


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RunningHub]:
    yield from _run_hub(tmp_path, ["--relay", "127.0.0.1:0"])


@pytest.fixture
def dual_stack_hub(tmp_path: Path) -> Iterator[RunningHub]:
    yield from _run_hub(tmp_path, ["--relay", "127.0.0.1:0", "--relay", "[::1]:0"])


def _run_hub(tmp_path: Path, relay: list[str]) -> Iterator[RunningHub]:
    """A ``punchtrio hub`` process with these ``--relay`` options, until SIGTERM (exit 0)."""
    require_root_and()
    key = tmp_path / "hub.key"
    PrivateKey.generate().write(key)
    command = [
        sys.executable, "-m", "punchtrio.cli", "hub", "--store", "memory",
        "--listen", "127.0.0.1:0", *relay,
        "--key-file", str(key), "--rate", "0", "--metrics", "127.0.0.1:0",
    ]  # fmt: skip
    log = tmp_path / "hub.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stderr=sink, text=True)
    try:
        found = None
        for _ in range(300):
            text = log.read_text()
            url = re.search(r"serving (http://\S+)", text)
            relay = re.search(r"relay on (\S+) port (\d+)", text)
            metrics = re.search(r"metrics on (http://\S+)", text)
            if url and relay and metrics:
                found = RunningHub(url[1], (relay[1], int(relay[2])), metrics[1])
                break
            assert process.poll() is None, f"the hub exited early: {text}"
            time.sleep(0.05)
        assert found is not None, "the hub did not start within 15 s"
        found.log = log
        yield found
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()


async def _register(http: httpx.AsyncClient, info: HubInfo, name: str) -> HubRelayClient:
    key = PrivateKey.generate()
    body = RegisterRequest(key.public_key(), (Endpoint.parse("10.0.0.7:51820"),)).to_json()
    auth = HubAuth(RequestSigner(key, info.public_key))
    response = await http.put(f"/v1/peers/{name}", json=body, auth=auth)
    assert response.status_code == 201, response.text
    return HubRelayClient(key.raw, info.public_key.raw)


async def _udp(client: HubRelayClient, relay: tuple[str, int]) -> trio.socket.SocketType:
    v6 = ":" in relay[0]
    sock = trio.socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("::1" if v6 else "127.0.0.1", 0))
    client.connect(trio.current_time())
    with trio.fail_after(10):
        while not client.bound and not client.counters["refused"]:
            for frame in client.datagrams_to_send():
                await sock.sendto(frame, relay)
            data, _ = await sock.recvfrom(2048)
            client.receive_frame(data, trio.current_time())
    return sock


async def _data(client: HubRelayClient, sock: trio.socket.SocketType) -> tuple[bytes, bytes]:
    """The next data frame on ``sock``, unwrapped (control frames, such as CHANNEL, are handled
    on the way)."""
    while True:
        data, _ = await sock.recvfrom(2048)
        got = client.receive_frame(data, trio.current_time())
        if got is not None:
            return got


async def test_registered_peers_exchange_frames_over_udp_and_tcp(hub: RunningHub) -> None:
    async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
        info = HubInfo.from_json((await http.get("/v1/hub")).json())
        assert info.relay is not None
        assert (info.relay.port, info.relay.tls) == (hub.relay[1], False)
        alice = await _register(http, info, "alice")
        bob = await _register(http, info, "bob")
        carol = await _register(http, info, "carol")

        # UDP <-> UDP
        alice_sock, bob_sock = await _udp(alice, hub.relay), await _udp(bob, hub.relay)
        assert alice.bound
        assert bob.bound
        await alice_sock.sendto(alice.wrap(bob.public_key, b"hi bob"), hub.relay)
        await bob_sock.sendto(bob.wrap(alice.public_key, b"hi alice"), hub.relay)
        with trio.fail_after(10):
            assert await _data(bob, bob_sock) == (alice.public_key, b"hi bob")
            assert await _data(alice, alice_sock) == (bob.public_key, b"hi alice")
        # the relay named each peer by a channel: the short channel frames go through as well
        with trio.fail_after(10):
            for client, sock, peer in ((alice, alice_sock, bob), (bob, bob_sock, alice)):
                while client.channel_of(peer.public_key) is None:
                    data, _ = await sock.recvfrom(2048)
                    assert client.receive_frame(data, trio.current_time()) is None
        await alice_sock.sendto(alice.wrap(bob.public_key, b"short to bob"), hub.relay)
        await bob_sock.sendto(bob.wrap(alice.public_key, b"short to alice"), hub.relay)
        with trio.fail_after(10):
            assert await _data(bob, bob_sock) == (alice.public_key, b"short to bob")
            assert await _data(alice, alice_sock) == (bob.public_key, b"short to alice")

        # TCP (carol) <-> UDP (bob)
        await _tcp_to_udp(carol, hub.relay, bob, bob_sock, hub.relay)

        # An unregistered key is refused; data from an unbound source goes nowhere.
        stranger = HubRelayClient(PrivateKey.generate().raw, info.public_key.raw)
        stranger_sock = await _udp(stranger, hub.relay)
        event = stranger.next_event()
        assert isinstance(event, RelayRefused)
        assert event.code == RefusalCode.NOT_REGISTERED
        await stranger_sock.sendto(stranger.wrap(bob.public_key, b"spam"), hub.relay)

        metrics = ""
        with trio.fail_after(10):
            while 'dropped_frames_total{reason="unbound"} 1.0' not in metrics:
                metrics = (await http.get(hub.metrics_url)).text
                await trio.sleep(0.05)
        assert "punchtrio_hub_relay_forwarded_frames_total 6.0" in metrics
        assert "punchtrio_hub_relay_bound_peers 2.0" in metrics  # carol's stream closed
        assert 'punchtrio_hub_relay_binds_total{result="not_registered"} 1.0' in metrics
        for sock in (alice_sock, bob_sock, stranger_sock):
            sock.close()


async def test_a_relay_on_both_families_carries_ipv4_to_ipv6(dual_stack_hub: RunningHub) -> None:
    """``--relay 127.0.0.1:0 --relay [::1]:0``: one port on both, published per family; a peer
    bound over IPv4 and one bound over IPv6 (UDP and TCP) reach each other."""
    hub = dual_stack_hub
    assert hub.log is not None
    port = hub.relay[1]
    assert f"relay on ::1 port {port} (UDP, TCP)" in hub.log.read_text()
    v4, v6 = ("127.0.0.1", port), ("::1", port)
    async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
        body = (await http.get("/v1/hub")).json()
        assert body["relays"] == [
            {"ip": None, "port": port, "tls": False, "family": 4},
            {"ip": None, "port": port, "tls": False, "family": 6},
        ]
        info = HubInfo.from_json(body)
        alice = await _register(http, info, "alice")
        bob = await _register(http, info, "bob")
        carol = await _register(http, info, "carol")
        alice_sock, bob_sock = await _udp(alice, v4), await _udp(bob, v6)
        await alice_sock.sendto(alice.wrap(bob.public_key, b"4 to 6"), v4)
        await bob_sock.sendto(bob.wrap(alice.public_key, b"6 to 4"), v6)
        with trio.fail_after(10):
            assert await _data(bob, bob_sock) == (alice.public_key, b"4 to 6")
            assert await _data(alice, alice_sock) == (bob.public_key, b"6 to 4")

        # TCP over IPv6 (carol) <-> UDP over IPv4 (alice)
        await _tcp_to_udp(carol, v6, alice, alice_sock, v4)
        for sock in (alice_sock, bob_sock):
            sock.close()


async def _tcp_to_udp(
    tcp_peer: HubRelayClient,
    tcp_relay: tuple[str, int],
    udp_peer: HubRelayClient,
    udp_sock: trio.socket.SocketType,
    udp_relay: tuple[str, int],
) -> None:
    """Bind ``tcp_peer`` over TCP at ``tcp_relay``, then one frame each way between it and
    ``udp_peer`` (bound on ``udp_sock`` at ``udp_relay``)."""
    stream = RelayStream(tcp_relay, decoder_factory=HubStreamDecoder)
    received: list[tuple[bytes, bytes]] = []
    progress = Progress()

    def on_frame(frame: bytes, now: float) -> None:
        result = tcp_peer.receive_frame(frame, now)
        if result is not None:
            received.append(result)
        for out in tcp_peer.datagrams_to_send():
            stream.send_nowait(encode_hub_stream_frame(out))
        progress.poke()

    async with trio.open_nursery() as nursery:
        tcp_peer.connect(trio.current_time())
        for frame in tcp_peer.datagrams_to_send():
            stream.send_nowait(encode_hub_stream_frame(frame))
        await nursery.start(stream.run, on_frame)
        with trio.fail_after(10):
            await progress.until(lambda: tcp_peer.bound)
        stream.send_nowait(encode_hub_stream_frame(tcp_peer.wrap(udp_peer.public_key, b"by tcp")))
        await udp_sock.sendto(udp_peer.wrap(tcp_peer.public_key, b"by udp"), udp_relay)
        with trio.fail_after(10):
            assert await _data(udp_peer, udp_sock) == (tcp_peer.public_key, b"by tcp")
            await progress.until(lambda: received)
        assert received == [(udp_peer.public_key, b"by udp")]
        nursery.cancel_scope.cancel()
