"""The real hub: ``punchtrio hub`` in a subprocess (Hypercorn's Trio worker) on loopback.

What only a real server shows: signed requests over TCP, a long poll that wakes, headers sent a byte
at a time and oversized headers being cut off, a 10 MiB body refused after 64 KiB, the embedded
STUN server answering, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    Endpoint,
    HubAuth,
    HubClient,
    HubInfo,
    PeerRecord,
    RegisterRequest,
    RendezvousUnavailableError,
    RequestSigner,
)
from tests.conftest import require_root_and

pytestmark = pytest.mark.interop


class RunningHub:
    def __init__(
        self, process: subprocess.Popen[str], url: str, stun_port: int, log: Path, metrics: str
    ) -> None:
        self.process = process
        self.log = log
        self.url = url
        self.metrics_url = metrics
        self.stun_port = stun_port
        self.port = int(url.rsplit(":", 1)[1])


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RunningHub]:
    key = tmp_path / "hub.key"
    PrivateKey.generate().write(key)
    command = [
        sys.executable, "-m", "punchtrio.cli", "hub", "--store", "memory",
        "--listen", "127.0.0.1:0", "--stun", "127.0.0.1:0",
        "--key-file", str(key), "--rate", "0", "--max-wait", "20",
        "--metrics", "127.0.0.1:0",
    ]  # fmt: skip
    log = tmp_path / "hub.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stderr=sink, text=True)
    try:
        url, stun_port, metrics = None, None, ""
        for _ in range(300):
            text = log.read_text()
            url_match = re.search(r"serving (http://\S+)", text)
            stun_match = re.search(r"STUN on \S+ port (\d+)", text)
            metrics_match = re.search(r"metrics on (http://\S+)", text)
            if url_match and stun_match and metrics_match:
                url, stun_port, metrics = url_match[1], int(stun_match[1]), metrics_match[1]
                break
            assert process.poll() is None, f"the hub exited early: {text}"
            time.sleep(0.05)
        assert url is not None, "the hub did not start within 15 s"
        assert stun_port is not None
        yield RunningHub(process, url, stun_port, log, metrics)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _registration(key: PrivateKey) -> dict[str, object]:
    return RegisterRequest(key.public_key(), (Endpoint.parse("10.0.0.7:51820"),)).to_json()


async def test_signed_register_lookup_and_long_poll(hub: RunningHub) -> None:
    async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
        info = HubInfo.from_json((await http.get("/v1/hub")).json())
        assert [s.port for s in info.stun] == [hub.stun_port]
        alice_key, bob_key = PrivateKey.generate(), PrivateKey.generate()
        alice = HubAuth(RequestSigner(alice_key, info.public_key))
        bob = HubAuth(RequestSigner(bob_key, info.public_key))

        replies: list[httpx.Response] = []

        async def wait_for_bob() -> None:
            replies.append(await http.get("/v1/peers/bob", params={"wait": 15}, auth=alice))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_bob)
            for _ in range(200):  # until the hub reports the open wait
                if "punchtrio_hub_open_waits 1.0" in (await http.get(hub.metrics_url)).text:
                    break
                await trio.sleep(0.05)
            created = await http.put("/v1/peers/bob", json=_registration(bob_key), auth=bob)
            assert created.status_code == 201
        assert replies[0].status_code == 200
        assert PeerRecord.from_json(replies[0].json()).public_key == bob_key.public_key()

        hijack = await http.put("/v1/peers/bob", json=_registration(alice_key), auth=alice)
        assert (hijack.status_code, hijack.json()) == (
            409,
            {"error": "name is registered to another key"},
        )
        anonymous = await http.get("/v1/peers/bob")
        assert anonymous.status_code == 401


def _connect(hub: RunningHub) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=20)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_headers_sent_a_byte_at_a_time_are_cut_off(hub: RunningHub) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: hub\r\nUser-Agent: slowloris\r\nX-Pad: " + b"a" * 40
    with _connect(hub) as sock:
        sock.settimeout(0.25)
        sent = 0
        closed = False
        for byte in request:
            try:
                sock.send(bytes([byte]))
                sent += 1
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed, "the server kept waiting for slow headers"
        assert sent < len(request)


def test_oversized_headers_are_refused(hub: RunningHub) -> None:
    with _connect(hub) as sock:
        huge = b"X-Big: " + b"b" * (64 * 1024) + b"\r\n"
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n" + huge + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_all(sock)
    assert not answer.startswith(b"HTTP/1.1 200")
    assert answer == b"" or re.match(rb"HTTP/1.1 4(00|31)", answer)


def test_ten_mib_body_is_refused_after_64_kib(hub: RunningHub) -> None:
    with _connect(hub) as sock:
        head = (
            b"PUT /v1/peers/alice HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head)
        chunk = b"8000\r\n" + b" " * 0x8000 + b"\r\n"
        for _ in range(4):  # 128 KiB of the announced 10 MiB, then stop and listen
            sock.sendall(chunk)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'{"error": "body is larger than 65536 bytes"}' in answer

    with _connect(hub) as sock:
        sock.sendall(
            b"PUT /v1/peers/alice HTTP/1.1\r\nHost: hub\r\nContent-Length: 10485760\r\n\r\n"
        )
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413")


def test_embedded_stun_server_answers(hub: RunningHub) -> None:
    transaction = secrets.token_bytes(12)
    request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(request, ("127.0.0.1", hub.stun_port))
        reply, _ = sock.recvfrom(2048)
    assert struct.unpack("!H", reply[:2])[0] == 0x0101
    assert reply[8:20] == transaction


def test_sigterm_stops_the_hub_cleanly(hub: RunningHub) -> None:
    hub.process.send_signal(signal.SIGTERM)
    assert hub.process.wait(10) == 0
    assert "Traceback" not in hub.log.read_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", hub.port), timeout=2).close()


def test_hub_refuses_an_address_in_use(hub: RunningHub) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "punchtrio.cli",
            "hub",
            "--store",
            "memory",
            "--listen",
            f"127.0.0.1:{hub.port}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=os.environ,
    )
    assert result.returncode == 3
    assert result.stderr.strip().startswith("punchtrio: error: cannot listen on 127.0.0.1:")


async def test_an_abandoned_long_poll_releases_its_wait(hub: RunningHub) -> None:
    async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
        info = HubInfo.from_json((await http.get("/v1/hub")).json())
        signer = RequestSigner(PrivateKey.generate(), info.public_key)
        target = "/v1/peers/ghost?wait=20"
        headers = "".join(f"{k}: {v}\r\n" for k, v in signer.sign("GET", target).items())
        stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: hub\r\n{headers}\r\n".encode())
        gauges = []
        for _ in range(100):
            gauges.append((await http.get(hub.metrics_url)).text)
            if "punchtrio_hub_open_waits 1.0\n" in gauges[-1]:
                break
            await trio.sleep(0.05)
        assert "punchtrio_hub_open_waits 1.0\n" in gauges[-1]
        await stream.aclose()
        for _ in range(100):
            gauges.append((await http.get(hub.metrics_url)).text)
            if "punchtrio_hub_open_waits 0.0\n" in gauges[-1]:
                break
            await trio.sleep(0.05)
        assert "punchtrio_hub_open_waits 0.0\n" in gauges[-1]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    require_root_and("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
        "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(openssl, check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def _tls_hub(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real ``punchtrio hub`` over TLS with a self-signed certificate: its URL and the cert."""
    cert, key = _self_signed(tmp_path)
    log = tmp_path / "hub.log"
    command = [
        sys.executable, "-m", "punchtrio.cli", "hub", "--store", "memory", "--listen", "127.0.0.1:0",
        "--tls-cert", str(cert), "--tls-key", str(key),
    ]  # fmt: skip
    with log.open("w") as sink:
        process = subprocess.Popen(command, stderr=sink, text=True)
    try:
        url = None
        for _ in range(300):
            if match := re.search(r"serving (https://\S+)", log.read_text()):
                url = match[1]
                break
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        assert url is not None
        yield url, cert
    finally:
        process.terminate()
        process.wait(10)


def test_tls_hub_serves_https(tmp_path: Path) -> None:
    with _tls_hub(tmp_path) as (url, cert):
        trusted = ssl.create_default_context(cafile=str(cert))
        reply = httpx.get(f"{url}/v1/hub", verify=trusted)
        assert HubInfo.from_json(reply.json()).api == 1
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https://", "http://") + "/healthz")


def test_an_untrusted_hub_certificate_says_how_to_trust_it(tmp_path: Path) -> None:
    """A hub whose certificate is not in the system's store: the error says that verification
    failed and names --hub-ca; with the bundle (``verify=``), registration works."""
    with _tls_hub(tmp_path) as (hub_url, cert):

        async def attempt(verify: ssl.SSLContext | bool) -> None:
            client = HubClient(hub_url, PrivateKey.generate(), "alice", verify=verify, attempts=1)
            try:
                await client.register([Endpoint.parse("10.0.0.7:51820")])
            finally:
                await client.aclose()

        with pytest.raises(RendezvousUnavailableError) as refused:
            trio.run(attempt, True)
        assert "TLS certificate verification failed" in str(refused.value)
        assert "--hub-ca FILE" in str(refused.value)
        trio.run(attempt, ssl.create_default_context(cafile=str(cert)))
