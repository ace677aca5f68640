"""The rendezvous hub under load: signed register + lookup requests per second against one
``punchtrio hub`` process on loopback, beside ``GET /healthz`` (the floor cost of the HTTP stack) in
the same run, and the hub's resident memory with 100,000 registered peers.

The load generator speaks HTTP/1.1 itself over Trio sockets (keep-alive, one request in flight per
connection, many connections) so that it costs far less per request than the hub, and signs every
request just in time exactly as ``HubClient`` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from punchtrio import PrivateKey, PublicKey
from punchtrio.rendezvous import RequestSigner

NAME = "hub"

CONCURRENCY = 128
"""Connections, each with one request in flight."""
REQUESTS = 24_000
"""Requests of each kind (register + lookup, and baseline) in the timed phases."""
ROUNDS = 4
"""The timed phases alternate in this many rounds."""
PEERS = 100_000
"""Registered peers for the memory measurement."""
TARGET_RPS = 3000.0
TARGET_RSS_MB = 300.0

Request = tuple[bytes, int]  # wire bytes, expected status


@dataclass
class Phase:
    """What one load phase measured."""

    requests: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    hub_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request(self) -> float:
        """Hub CPU time (user + system) per request, in microseconds."""
        return self.hub_cpu / self.requests * 1e6 if self.requests else 0.0

    def add(self, other: Phase) -> None:
        self.requests += other.requests
        for status, count in other.errors.items():
            self.errors[status] = self.errors.get(status, 0) + count
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.hub_cpu += other.hub_cpu

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


class Peer:
    """One simulated client: its key, its signer and its record's content."""

    def __init__(self, index: int, hub_key: PublicKey) -> None:
        self.name = f"peer-{index}"
        self.key = PrivateKey.generate()
        self.signer = RequestSigner(self.key, hub_key)
        a, b, c = (index >> 16) & 255, (index >> 8) & 255, index & 255
        self.body = json.dumps(
            {
                "public_key": self.key.public_key().to_base64(),
                "endpoints": [
                    {"type": "srflx", "address": f"198.51.100.{c}:{20000 + index % 40000}"},
                    {"type": "host", "address": f"192.168.{b}.{c}:51820"},
                ],
                "allowed_ips": [f"10.{a}.{b}.{c}/32"],
            },
            separators=(",", ":"),
        ).encode()


def _request(
    host: str, method: str, target: str, body: bytes, signer: RequestSigner | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if signer is not None:
        headers = signer.sign(method, target, body, now=time.time())
        lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(stream: trio.SocketStream, buffer: bytearray) -> int:
    """Read one response (Content-Length framed) and return its status."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the hub closed the connection")
        buffer += chunk
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length = 0
    for line in head[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    total = end + 4 + length
    while len(buffer) < total:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the hub closed the connection")
        buffer += chunk
    del buffer[:total]
    return status


async def _load(port: int, pid: int, count: int, make: Callable[[int], Request]) -> Phase:
    """Send ``count`` requests made by ``make(i)`` over :data:`CONCURRENCY` connections; also
    account the CPU time the hub process ``pid`` spent meanwhile."""
    phase = Phase()
    next_index = 0

    async def connection() -> None:
        nonlocal next_index
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        async with stream:
            while next_index < count:
                index = next_index
                next_index += 1
                wire, expected = make(index)
                started = time.perf_counter()
                await stream.send_all(wire)
                status = await _read_response(stream, buffer)
                phase.latencies.append(time.perf_counter() - started)
                phase.requests += 1
                if status != expected:
                    phase.errors[status] = phase.errors.get(status, 0) + 1

    cpu, started = _cpu_seconds(pid), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(min(CONCURRENCY, count)):
            nursery.start_soon(connection)
    phase.seconds = time.perf_counter() - started
    phase.hub_cpu = _cpu_seconds(pid) - cpu
    return phase


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_hub(port: int) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "punchtrio.cli", "hub", "--listen", f"127.0.0.1:{port}",
        "--rate", "0", "--max-peers", str(2 * PEERS), "--ttl", "3600",
    ]  # fmt: skip
    hub = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if hub.poll() is not None:
            raise RuntimeError(f"punchtrio hub exited with {hub.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return hub
        except httpx.TransportError:
            time.sleep(0.05)
    hub.kill()
    raise RuntimeError("punchtrio hub did not start")


async def _measure(port: int, pid: int) -> str:
    host = f"127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=f"http://{host}", timeout=5) as http:
        hub_key = PublicKey.from_base64((await http.get("/v1/hub")).json()["public_key"])
    rss_idle = _rss_mb(pid)

    def healthz(index: int) -> Request:
        return _request(host, "GET", "/healthz", b"", None), 200

    # A population of CONCURRENCY * 2 clients; each registers once (untimed), then the timed phase
    # alternates refreshes of their own record (PUT) and lookups of another one (GET).
    clients = [Peer(i, hub_key) for i in range(CONCURRENCY * 2)]

    def first_register(index: int) -> Request:
        peer = clients[index]
        return _request(host, "PUT", f"/v1/peers/{peer.name}", peer.body, peer.signer), 201

    await _load(port, pid, len(clients), first_register)

    def register_or_lookup(index: int) -> Request:
        peer = clients[index % len(clients)]
        if index % 2:
            other = clients[(index * 7 + 3) % len(clients)].name
            return _request(host, "GET", f"/v1/peers/{other}", b"", peer.signer), 200
        return _request(host, "PUT", f"/v1/peers/{peer.name}", peer.body, peer.signer), 200

    # Subject and baseline alternate in rounds, so that load from other processes on this shared
    # machine falls on both alike.
    baseline, mixed = Phase(), Phase()
    for _ in range(ROUNDS):
        baseline.add(await _load(port, pid, REQUESTS // ROUNDS, healthz))
        mixed.add(await _load(port, pid, REQUESTS // ROUNDS, register_or_lookup))

    # Memory: fill the hub to PEERS records through the API, each with its own key.
    start = len(clients)

    def register(index: int) -> Request:
        peer = Peer(start + index, hub_key)
        return _request(host, "PUT", f"/v1/peers/{peer.name}", peer.body, peer.signer), 201

    fill = await _load(port, pid, PEERS - start, register)
    async with httpx.AsyncClient(base_url=f"http://{host}", timeout=5) as http:
        metrics = (await http.get("/metrics")).text
    peers = next(
        int(float(line.split()[1]))
        for line in metrics.splitlines()
        if line.startswith("punchtrio_hub_peers ")
    )
    rss_full = _rss_mb(pid)

    errors = {**baseline.errors}
    for phase in (mixed, fill):
        for status, n in phase.errors.items():
            errors[status] = errors.get(status, 0) + n
    ratio = mixed.rate / baseline.rate if baseline.rate else 0.0
    cpu_ratio = mixed.cpu_per_request / baseline.cpu_per_request if baseline.hub_cpu else 0.0
    per_peer = (rss_full - rss_idle) * 1024 * 1024 / max(1, peers)
    verdict_rps = "meets" if mixed.rate >= TARGET_RPS else "misses"
    verdict_rss = "meets" if rss_full <= TARGET_RSS_MB else "misses"
    return "\n".join(
        [
            "## Rendezvous hub (`benchmarks/hub.py`)",
            "",
            f"One `punchtrio hub` process on loopback (`--rate 0`), {CONCURRENCY} keep-alive "
            f"connections with one request in flight each, {REQUESTS:,} requests of each kind "
            f"in {ROUNDS} alternating rounds. Register + lookup alternates signed "
            "`PUT /v1/peers/{self}` (refresh) and signed `GET /v1/peers/{other}` (lookup) from "
            "256 peers; the baseline is unsigned `GET /healthz` under the same load (Hypercorn + "
            "Starlette and nothing else). Hub CPU is the hub process's user + system time from "
            "`/proc`, which other load on the machine does not inflate the way it does wall time.",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| `/healthz` baseline | {baseline.rate:,.0f} req/s "
            f"(p50 {baseline.percentile(0.5):.1f} ms, p99 {baseline.percentile(0.99):.1f} ms) | |",
            f"| register + lookup | {mixed.rate:,.0f} req/s "
            f"(p50 {mixed.percentile(0.5):.1f} ms, p99 {mixed.percentile(0.99):.1f} ms) "
            f"| ≥ {TARGET_RPS:,.0f} req/s: {verdict_rps} |",
            f"| register + lookup / baseline, requests/s | {ratio:.2f} | |",
            f"| hub CPU per request: baseline / register + lookup "
            f"| {baseline.cpu_per_request:,.0f} µs / {mixed.cpu_per_request:,.0f} µs "
            f"(x {cpu_ratio:.2f}; one full core would serve "
            f"{1e6 / max(mixed.cpu_per_request, 1):,.0f} register + lookup req/s) | |",
            f"| registering {fill.requests:,} new peers (each a new key: an X25519 on the hub) "
            f"| {fill.rate:,.0f} req/s ({fill.seconds:.0f} s) | |",
            f"| hub RSS, idle | {rss_idle:.0f} MB | |",
            f"| hub RSS with {peers:,} peers | {rss_full:.0f} MB "
            f"({per_peer:,.0f} bytes per peer over idle) | ≤ {TARGET_RSS_MB:.0f} MB: {verdict_rss} |",
            f"| unexpected statuses | {errors or 'none'} | none |",
            "",
            "Run: `.venv/bin/python -m benchmarks hub` (or `nox -s bench -- hub`). The load "
            "generator shares the machine's cores with the hub, so the absolute rates are a floor.",
        ]
    )


def run() -> str:
    """Start a hub, measure it, stop it; return the Markdown section."""
    port = _free_port()
    hub = _start_hub(port)
    try:
        return trio.run(_measure, port, hub.pid)
    finally:
        hub.terminate()
        try:
            hub.wait(10)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(run())
