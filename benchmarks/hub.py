"""The rendezvous hub under load: signed register + lookup requests per second against one
``punchtrio hub`` process on loopback, beside ``GET /healthz`` (the floor cost of the HTTP stack) in
the same run, and the hub's resident memory with 100,000 registered peers.

The load comes from ``wrk`` (a C load generator, Debian package ``wrk``) so that the measure is the
hub's and not a Python client's. Signed requests cannot be made up inside wrk: this module signs
them in Python just before each wrk run (every one with its own nonce and a fresh timestamp, well
inside the hub's 60 s window) and a small Lua script hands them to wrk's connections in order. The
hub is pinned to one core and wrk to the other (``taskset``) so "one hub process" is measured alike
on every run; the hub's CPU time per request (``/proc/PID/stat``) is reported too, because other
load on a shared machine inflates wall time but hardly CPU time. Every answer's status is checked
from the hub's own metrics (``--metrics``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from punchtrio import PrivateKey, PublicKey
from punchtrio.cli._hub import _server_gc
from punchtrio.rendezvous import HubConfig, RequestSigner, create_app

NAME = "hub"

CONNECTIONS = 128
"""wrk connections (keep-alive, one request in flight each): the concurrent clients."""
ROUNDS = 4
"""The timed phases (baseline, register + lookup) alternate in this many rounds."""
ROUND_SECONDS = 8
"""Length of one timed phase."""
POOL_RATE = 8000
"""Signed requests prepared per second of a timed phase: more than one hub process can serve."""
LOOKUP_TARGETS = 2000
"""Peers registered (untimed) before the timed phases, for the lookups to find."""
PEERS = 100_000
"""Registered peers for the memory measurement."""
FILL_SECONDS = 20.0
"""Planned length of one wrk run of the memory fill (its requests must stay inside the window)."""
APP_CALLS = 3000
"""Calls of each kind in the in-process measurement of the ASGI app alone."""
TARGET_RPS = 3000.0
TARGET_RSS_MB = 300.0

# Hands out the requests of the pool file in order (one wrk thread). Once they are used up it
# stops its thread (answering the call that found the pool empty with a harmless /healthz) and
# says so, for wrk's main thread sleeps out the whole -d unless interrupted (SIGINT). wrk calls
# request() once before the run to check the script and never sends that one: the pool's first
# entry is a /healthz for it. done() prints the summary as one JSON line.
_LUA = r"""
local pool, count, index = {}, 0, 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(os.getenv("PUNCHTRIO_WRK_POOL"), "rb"))
  local data = file:read("*a")
  file:close()
  local start = 1
  while true do
    local stop = string.find(data, "\0", start, true)
    if not stop then break end
    count = count + 1
    pool[count] = string.sub(data, start, stop - 1)
    start = stop + 1
  end
  exhausted = 0
end

function request()
  index = index + 1
  if index > count then
    if exhausted == 0 then
      exhausted = 1
      io.write("PTBENCH-EXHAUSTED\n")
      io.flush()
    end
    wrk.thread:stop()
    return pool[1]
  end
  return pool[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'PTBENCH {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"exhausted":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    threads[1]:get("exhausted") or 0))
end
"""

_COUNTER = re.compile(r'^punchtrio_hub_requests_total\{((?:[^}"]|"[^"]*")*)\} ([0-9.e+]+)$', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Run:
    """What one wrk run measured (sums over several runs with :meth:`add`)."""

    requests: int = 0
    seconds: float = 0.0
    hub_cpu: float = 0.0
    hub_requests: int = 0
    wrk_errors: int = 0
    non2xx: int = 0
    exhausted: bool = False
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    p50: list[float] = field(default_factory=list)
    p90: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request(self) -> float:
        """Hub CPU time (user + system) per request the hub answered, in microseconds."""
        return self.hub_cpu / self.hub_requests * 1e6 if self.hub_requests else 0.0

    def add(self, other: Run) -> None:
        self.requests += other.requests
        self.seconds += other.seconds
        self.hub_cpu += other.hub_cpu
        self.hub_requests += other.hub_requests
        self.wrk_errors += other.wrk_errors
        self.non2xx += other.non2xx
        self.exhausted |= other.exhausted
        self.statuses.update(other.statuses)
        self.p50 += other.p50
        self.p90 += other.p90
        self.p99 += other.p99
        self.rates += other.rates

    def latency(self) -> str:
        """Median over runs of each run's p50 / p90 / p99, in milliseconds."""
        p50, p90, p99 = (statistics.median(p) / 1000 for p in (self.p50, self.p90, self.p99))
        return f"p50 {p50:.0f} ms, p90 {p90:.0f} ms, p99 {p99:.0f} ms"

    def spread(self) -> str:
        return f"{min(self.rates):,.0f}-{max(self.rates):,.0f}"


class Peer:
    """One simulated client: a fresh key, its signer and its record's content."""

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


class Bench:
    """A running hub, pinned to one core (``hub_cpus``: these cores), and wrk on another.

    ``redis``: a Redis URL for ``--redis`` (else the memory store); ``workers`` > 1 runs
    ``--workers``, which serves no metrics: statuses then come from wrk (non-2xx answers).
    ``key_file``: the hub's key (replicas of one hub share it; default: a fresh key).
    """

    def _prepare(self, workdir: Path) -> None:
        """Choose the hub's and the load's cores, write wrk's script and pick the hub's port."""
        cpus = sorted(os.sched_getaffinity(0))
        self.pinned = len(cpus) >= 2
        self.hub_cpu, self.load_cpu = (cpus[0], cpus[1]) if self.pinned else (cpus[0], cpus[0])
        self.workdir = workdir
        self.script = workdir / "pool.lua"
        self.script.write_text(_LUA)
        self.pool = workdir / "pool.bin"
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"

    def __init__(
        self,
        workdir: Path,
        *,
        redis: str | None = None,
        workers: int = 1,
        hub_cpus: set[int] | None = None,
        key_file: Path | None = None,
    ) -> None:
        for tool in ("wrk", "taskset"):
            if shutil.which(tool) is None:
                raise SystemExit(
                    f"benchmarks hub: `{tool}` is not installed; the hub benchmark drives load "
                    "with wrk (Debian: apt-get install wrk taskset, or run scripts/bootstrap)"
                )
        self._prepare(workdir)
        metrics_at = f"127.0.0.1:{_free_port()}"
        self.metrics_url: str | None = f"http://{metrics_at}/metrics" if workers == 1 else None
        self.next_peer = 0
        argv = [
            sys.executable, "-m", "punchtrio.cli", "hub", "--listen", self.host,
            "--rate", "0", "--max-peers", str(2 * PEERS), "--ttl", "3600",
        ]  # fmt: skip
        argv += ["--store", "memory"] if redis is None else ["--redis", redis]
        argv += [] if key_file is None else ["--key-file", str(key_file)]
        argv += ["--metrics", metrics_at] if workers == 1 else ["--workers", str(workers)]
        self.workers = workers
        cores = hub_cpus if hub_cpus is not None else {self.hub_cpu}
        self.hub_cores = ",".join(map(str, sorted(cores)))
        if self.pinned:
            argv = ["taskset", "-c", self.hub_cores, *argv]
        self.hub = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://{self.host}", timeout=10)
        self._wait_ready()
        info = self.http.get("/v1/hub").json()
        self.hub_key = PublicKey.from_base64(info["public_key"])

    def close(self) -> None:
        self.http.close()
        self.hub.terminate()
        try:
            self.hub.wait(10)
        except subprocess.TimeoutExpired:
            self.hub.kill()
            self.hub.wait()

    def _wait_ready(self) -> None:
        for _ in range(200):
            if self.hub.poll() is not None:
                raise RuntimeError(f"punchtrio hub exited with {self.hub.returncode}")
            try:
                if self.http.get("/healthz").status_code == 200 and (
                    len(self.pids()) == self.workers + (self.workers > 1)
                ):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("punchtrio hub did not start")

    def pids(self) -> list[int]:
        """The hub's processes: itself (the supervisor) and its workers."""
        pid = self.hub.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            children = []
        return [pid, *map(int, children)]

    def cpu(self) -> float:
        """CPU seconds (user + system) of every hub process so far."""
        return sum(_cpu_seconds(pid) for pid in self.pids())

    # requests

    def _wire(self, method: str, target: str, body: bytes = b"", peer: Peer | None = None) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        if body:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        if peer is not None:
            headers = peer.signer.sign(method, target, body, now=time.time())
            lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def healthz(self, count: int) -> Iterator[bytes]:
        wire = self._wire("GET", "/healthz")
        for _ in range(count):
            yield wire

    def registrations(self, count: int) -> Iterator[bytes]:
        """First registrations of ``count`` new peers (new names, each its own key)."""
        for _ in range(count):
            peer = Peer(self.next_peer, self.hub_key)
            self.next_peer += 1
            yield self._wire("PUT", f"/v1/peers/{peer.name}", peer.body, peer)

    def register_and_lookup(self, pairs: int, known: int) -> Iterator[bytes]:
        """``pairs`` times: a new peer registers, then looks up one of the first ``known`` peers."""
        for _ in range(pairs):
            peer = Peer(self.next_peer, self.hub_key)
            self.next_peer += 1
            other = f"peer-{(self.next_peer * 7919) % known}"
            yield self._wire("PUT", f"/v1/peers/{peer.name}", peer.body, peer)
            yield self._wire("GET", f"/v1/peers/{other}", b"", peer)

    # measuring

    def run(self, requests: Iterator[bytes], seconds: float) -> Run:
        """Serve ``requests`` with wrk for at most ``seconds`` (less if they run out)."""
        with self.pool.open("wb") as pool:
            pool.write(self._wire("GET", "/healthz") + b"\0")
            for wire in requests:
                pool.write(wire + b"\0")
        argv = [
            "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:.0f}s", "--timeout", "10s",
            "-s", str(self.script), f"http://{self.host}/",
        ]  # fmt: skip
        if self.pinned:
            argv = ["taskset", "-c", str(self.load_cpu), *argv]
        before, cpu = self.counters(), self.cpu()
        # taskset execs wrk, so the pid is wrk's.
        wrk = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PUNCHTRIO_WRK_POOL": str(self.pool)},
        )
        summary = None
        assert wrk.stdout is not None
        assert wrk.stderr is not None
        for line in wrk.stdout:
            if line.startswith("PTBENCH-EXHAUSTED"):
                wrk.send_signal(signal.SIGINT)
            elif line.startswith("PTBENCH "):
                summary = line
        stderr = wrk.stderr.read()
        wrk.wait()
        cpu = self.cpu() - cpu
        after = self.counters()
        if wrk.returncode != 0 or summary is None:
            raise RuntimeError(f"wrk failed ({wrk.returncode}): {stderr.strip()[-500:]}")
        report = json.loads(summary.split(" ", 1)[1])
        statuses = after - before
        seconds_run = report["duration_us"] / 1e6
        counted = sum(statuses.values()) if self.metrics_url else report["requests"]
        return Run(
            requests=report["requests"],
            seconds=seconds_run,
            hub_cpu=cpu,
            hub_requests=counted,
            wrk_errors=report["socket_errors"] + report["timeouts"],
            non2xx=report["non2xx"],
            exhausted=bool(report["exhausted"]),
            statuses=statuses,
            p50=[report["p50_us"]],
            p90=[report["p90_us"]],
            p99=[report["p99_us"]],
            rates=[report["requests"] / seconds_run if seconds_run else 0.0],
        )

    def counters(self) -> Counter[tuple[str, str, int]]:
        counts: Counter[tuple[str, str, int]] = Counter()
        if self.metrics_url is None:
            return counts
        for labels, value in _COUNTER.findall(self.http.get(self.metrics_url).text):
            label = dict(_LABEL.findall(labels))
            counts[label["route"], label["method"], int(label["status"])] = int(float(value))
        return counts

    def peers(self) -> int:
        assert self.metrics_url is not None
        for line in self.http.get(self.metrics_url).text.splitlines():
            if line.startswith("punchtrio_hub_peers "):
                return int(float(line.split()[1]))
        raise RuntimeError("no punchtrio_hub_peers in the hub's metrics")


_EXPECTED = {
    ("/healthz", "GET"): 200,
    ("/v1/peers/{name}", "PUT"): 201,
    ("/v1/peers/{name}", "GET"): 200,
}


def _unexpected(*runs: Run) -> dict[str, int]:
    wrong: Counter[str] = Counter()
    for run in runs:
        for (route, method, status), n in run.statuses.items():
            if _EXPECTED.get((route, method)) != status:
                wrong[f"{method} {route} {status}"] += n
        if run.wrk_errors:
            wrong["socket errors and timeouts"] += run.wrk_errors
        if run.non2xx and not run.statuses:  # no metrics (--workers): wrk's count
            wrong["non-2xx answers"] += run.non2xx
    return dict(wrong)


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


def _app_alone() -> tuple[float, float]:
    """CPU µs per call of the hub's ASGI app called directly (no HTTP server, no sockets):
    ``GET /healthz``, and a new peer's register + lookup as in the timed phase (averaged)."""
    hub_key = PrivateKey.generate()
    app = create_app(HubConfig(hub_key, rate=0.0, ttl=3600.0))

    def scope(method: str, target: str, body: bytes, peer: Peer | None) -> dict[str, object]:
        headers = [(b"host", b"hub")]
        if body:
            headers += [(b"content-type", b"application/json")]
            headers += [(b"content-length", str(len(body)).encode())]
        if peer is not None:
            signed = peer.signer.sign(method, target, body, now=time.time())
            headers += [(k.lower().encode(), v.encode()) for k, v in signed.items()]
        return {
            "type": "http", "http_version": "1.1", "asgi": {"version": "3.0"}, "method": method,
            "scheme": "http", "path": target, "raw_path": target.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 7777), "state": {}, "extensions": {},
        }  # fmt: skip

    async def call(request: dict[str, object], body: bytes) -> int:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status = 0

        async def receive() -> dict[str, object]:
            if messages:
                return messages.pop()
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])

        await app(request, receive, send)
        return status

    async def timed(requests: list[tuple[dict[str, object], bytes, int]]) -> float:
        started = time.process_time()
        for request, body, expected in requests:
            if await call(request, body) != expected:
                raise RuntimeError(
                    f"the app answered {request['method']} {request['path']} wrongly"
                )
        return (time.process_time() - started) / len(requests) * 1e6

    async def measure() -> tuple[float, float]:
        hub_public = hub_key.public_key()
        known = [Peer(i, hub_public) for i in range(APP_CALLS)]
        fresh = [Peer(APP_CALLS + i, hub_public) for i in range(APP_CALLS // 2)]
        setup = [(scope("PUT", f"/v1/peers/{p.name}", p.body, p), p.body, 201) for p in known]
        await timed(setup)
        health = [(scope("GET", "/healthz", b"", None), b"", 200)] * APP_CALLS
        mixed = []
        for i, peer in enumerate(fresh):
            mixed.append((scope("PUT", f"/v1/peers/{peer.name}", peer.body, peer), peer.body, 201))
            other = known[(i * 7919) % len(known)].name
            mixed.append((scope("GET", f"/v1/peers/{other}", b"", peer), b"", 200))
        return await timed(health), await timed(mixed)

    with _server_gc():  # as in a `punchtrio hub` process
        return trio.run(measure)


def _measure(bench: Bench) -> str:
    rss_idle = _rss_mb(bench.hub.pid)
    # Untimed: the peers the lookups will find (this also warms the hub up).
    warmup = bench.run(bench.registrations(LOOKUP_TARGETS), 60)
    if bench.peers() < LOOKUP_TARGETS - 1:
        raise RuntimeError(f"warm-up registered only {bench.peers()} peers")
    known = bench.next_peer

    # Baseline and subject alternate in rounds, so that other load on this shared machine falls
    # on both alike.
    pool = POOL_RATE * ROUND_SECONDS
    baseline, mixed = Run(), Run()
    for _ in range(ROUNDS):
        baseline.add(bench.run(bench.healthz(pool), ROUND_SECONDS))
        mixed.add(bench.run(bench.register_and_lookup(pool // 2, known), ROUND_SECONDS))

    # Memory: fill the hub to PEERS records through the API, each with its own key, in wrk runs
    # short enough for every request's timestamp to stay inside the hub's window.
    fill = Run()
    rate = max(mixed.rate, 200.0)
    while (missing := PEERS - bench.peers()) > 0:
        chunk = min(missing, int(rate * FILL_SECONDS))
        part = bench.run(bench.registrations(chunk), 3 * FILL_SECONDS)
        if PEERS - bench.peers() >= missing:
            raise RuntimeError(f"the hub registered none of {chunk} peers: {_unexpected(part)}")
        fill.add(part)
        rate = max(part.rate, 200.0)
    peers = bench.peers()
    rss_full = _rss_mb(bench.hub.pid)
    app_healthz, app_mixed = _app_alone()

    errors = _unexpected(warmup, baseline, mixed, fill)
    ratio = mixed.rate / baseline.rate if baseline.rate else 0.0
    cpu_ratio = mixed.cpu_per_request / baseline.cpu_per_request if baseline.hub_cpu else 0.0
    floor_rps = 1e6 / max(baseline.cpu_per_request, 1)
    added = mixed.cpu_per_request - baseline.cpu_per_request
    per_peer = (rss_full - rss_idle) * 1024 * 1024 / max(1, peers)
    verdict_rps = "meets" if mixed.rate >= TARGET_RPS else "misses"
    verdict_rss = "meets" if rss_full <= TARGET_RSS_MB else "misses"
    pinning = (
        f"the hub pinned to CPU {bench.hub_cpu} and wrk to CPU {bench.load_cpu} (`taskset`)"
        if bench.pinned
        else "hub and wrk unpinned (this machine has one usable CPU)"
    )
    exhausted = (
        " A timed phase used up its prepared requests and ended early."
        if mixed.exhausted or baseline.exhausted
        else ""
    )
    return "\n".join(
        [
            "## Rendezvous hub (`benchmarks/hub.py`)",
            "",
            f"One `punchtrio hub` process on loopback (`--rate 0`) loaded by `wrk -t1 "
            f"-c{CONNECTIONS}` ({CONNECTIONS} keep-alive connections, one request in flight "
            f"each), {pinning}; {ROUNDS} alternating rounds of {ROUND_SECONDS} s per kind. "
            "Register + lookup alternates a new peer's first signed `PUT /v1/peers/{self}` "
            "(a new name and a new key: an X25519 on the hub) and its signed "
            f"`GET /v1/peers/{{other}}` of one of {LOOKUP_TARGETS:,} peers registered before. "
            "Every request is signed in Python just before its wrk run (own nonce, fresh "
            "timestamp) and replayed in order by a Lua script. The baseline is unsigned "
            "`GET /healthz` served the same way: Hypercorn + Starlette and nothing else. "
            "Statuses are checked from the hub's metrics listener (`--metrics`); hub CPU is its user + system time "
            "from `/proc`, which other load on the machine inflates less than wall time."
            + exhausted,
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| `/healthz` baseline | {baseline.rate:,.0f} req/s (rounds {baseline.spread()}; "
            f"{baseline.latency()}) | |",
            f"| register + lookup | {mixed.rate:,.0f} req/s (rounds {mixed.spread()}; "
            f"{mixed.latency()}) | ≥ {TARGET_RPS:,.0f} req/s: {verdict_rps} |",
            f"| register + lookup / baseline, requests/s | {ratio:.2f} | |",
            f"| hub CPU per request: baseline / register + lookup "
            f"| {baseline.cpu_per_request:,.0f} µs / {mixed.cpu_per_request:,.0f} µs "
            f"(x {cpu_ratio:.2f}; a whole core would serve "
            f"{1e6 / max(baseline.cpu_per_request, 1):,.0f} / "
            f"{1e6 / max(mixed.cpu_per_request, 1):,.0f} req/s) | |",
            f"| the ASGI app alone, no HTTP server: `/healthz` / register + lookup "
            f"| {app_healthz:,.0f} µs / {app_mixed:,.0f} µs CPU per call | |",
            f"| registering {fill.requests:,} more new peers (each a new key) "
            f"| {fill.rate:,.0f} req/s ({fill.seconds:.0f} s, "
            f"{fill.cpu_per_request:,.0f} µs hub CPU each) | |",
            f"| hub RSS, idle | {rss_idle:.0f} MB | |",
            f"| hub RSS with {peers:,} peers | {rss_full:.0f} MB "
            f"({per_peer:,.0f} bytes per peer over idle) | ≤ {TARGET_RSS_MB:.0f} MB: {verdict_rss} |",
            f"| unexpected statuses | {errors or 'none'} | none |",
            "",
            f"What bounds it: `/healthz` (HTTP/1.1 parsing and answering by Hypercorn's h11 "
            f"protocol on Trio, Starlette's routing, no hub work) costs the hub "
            f"{baseline.cpu_per_request:,.0f} µs of CPU per request, so one hub process on one "
            f"core serves at most about {floor_rps:,.0f} requests/s of any kind. Register + "
            f"lookup adds {added:,.0f} µs per request on average, of which the hub's own work "
            f"(signature check with one X25519 per new key, validation, JSON, the store) is "
            f"about {app_mixed - app_healthz:,.0f} µs (the app alone) and the rest Hypercorn's "
            "handling of bigger requests and answers.",
            "",
            "Run: `.venv/bin/python -m benchmarks hub` (or `nox -s bench -- hub`); needs `wrk` "
            "(`scripts/bootstrap` installs it).",
        ]
    )


SCALE_ROUNDS = 3
"""Rounds of the scale-out comparison (each runs every configuration once, in turn)."""
SCALE_POOL_RATE = 3000
"""Signed requests prepared per second of a scale-out phase (more than two workers serve)."""
WAKES = 40
"""Long polls woken by a registration, per kind (same hub, other replica)."""
WAKE_TARGET_MS = 50.0
REDIS_CPU_TARGET = 1.25
"""Goal: hub CPU per request on Redis at most this many times the memory store's."""
WORKERS_TARGET = 1.6
"""Goal: requests/s of 2 workers over 1, when the load generator has a core of its own."""
REFRESH_SECONDS = 300.0 / 3
"""A client refreshes its record every third of its lifetime (the hub's --ttl, 300 s)."""
POLL_SECONDS = 60.0
"""A client's message long poll is answered (empty) after the hub's --max-wait, 60 s."""


def _redis_server(workdir: Path, cpu: int) -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("redis-server") is None:
        raise SystemExit(
            "benchmarks hub: `redis-server` is not installed; the scale-out comparison runs "
            "hubs on Redis (Debian: apt-get install redis-server, or run scripts/bootstrap)"
        )
    port = _free_port()
    argv = [
        "taskset", "-c", str(cpu), "redis-server", "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir), "--databases", "8",
    ]  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("redis-server did not start")


async def _wake_latency(
    registering: str, same: str, other: str, hub_key: PublicKey
) -> tuple[list[float], list[float]]:
    """Milliseconds from sending a registration at ``registering`` to the answer of a long poll
    for it waiting at ``same`` (that very process) and at ``other`` (another replica)."""
    from punchtrio.rendezvous import HubAuth

    watcher = HubAuth(RequestSigner(PrivateKey.generate(), hub_key))
    results: tuple[list[float], list[float]] = ([], [])
    async with httpx.AsyncClient(timeout=20) as http:
        for index in range(WAKES):
            for kind, where in enumerate((same, other)):
                out = results[kind]
                peer = Peer(5_000_000 + 2 * index + kind, hub_key)
                woke: list[float] = []

                async def poll(
                    url: str = where, name: str = peer.name, woke: list[float] = woke
                ) -> None:
                    reply = await http.get(
                        f"{url}/v1/peers/{name}", params={"wait": 10}, auth=watcher
                    )
                    if reply.status_code != 200:
                        raise RuntimeError(f"a long poll answered {reply.status_code}")
                    woke.append(time.perf_counter())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(poll)
                    await trio.sleep(0.05)
                    sent = time.perf_counter()
                    put = await http.put(
                        f"{registering}/v1/peers/{peer.name}",
                        content=peer.body,
                        headers={"content-type": "application/json"},
                        auth=HubAuth(peer.signer),
                    )
                    if put.status_code != 201:
                        raise RuntimeError(f"a registration answered {put.status_code}")
                out.append((woke[0] - sent) * 1000)
    return results


def _scale_out(workdir: Path) -> str:
    """One process on memory, one on Redis, two workers on Redis: req/s and CPU per request."""
    cpus = sorted(os.sched_getaffinity(0))
    hub_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (cpus[0], cpus[0])
    redis, port = _redis_server(workdir, load_cpu)
    url = f"redis://127.0.0.1:{port}"
    configs = [
        ("1 process, memory store", None, 1, {hub_cpu}),
        ("1 process, Redis", f"{url}/1", 1, {hub_cpu}),
        ("2 workers, Redis, on one core", f"{url}/2", 2, {hub_cpu}),
        ("2 workers, Redis, on both cores", f"{url}/3", 2, {hub_cpu, load_cpu}),
    ]
    benches: list[Bench] = []
    other = None
    key_file = workdir / "hub.key"
    PrivateKey.generate().write(key_file)
    try:
        for index, (_, redis_url, workers, cores) in enumerate(configs):
            bench_dir = workdir / f"config-{index}"
            bench_dir.mkdir()
            benches.append(
                Bench(
                    bench_dir, redis=redis_url, workers=workers, hub_cpus=cores, key_file=key_file
                )
            )
        (workdir / "other").mkdir()
        other = Bench(workdir / "other", redis=f"{url}/1", hub_cpus={hub_cpu}, key_file=key_file)
        # The hubs are pinned (children inherit this process's cores); the clients stay off theirs.
        os.sched_setaffinity(0, {load_cpu})
        same, cross = trio.run(
            _wake_latency,
            f"http://{benches[1].host}",
            f"http://{benches[1].host}",
            f"http://{other.host}",
            benches[1].hub_key,
        )
        runs = [Run() for _ in configs]
        redis_cpu = [0.0 for _ in configs]
        pool = SCALE_POOL_RATE * ROUND_SECONDS
        for bench in benches:
            bench.run(bench.registrations(LOOKUP_TARGETS), 60)
        for _ in range(SCALE_ROUNDS):
            for index, bench in enumerate(benches):
                before = _cpu_seconds(redis.pid)
                runs[index].add(
                    bench.run(bench.register_and_lookup(pool // 2, LOOKUP_TARGETS), ROUND_SECONDS)
                )
                redis_cpu[index] += _cpu_seconds(redis.pid) - before
    finally:
        for bench in [*benches, *([other] if other else [])]:
            bench.close()
        redis.terminate()
        redis.wait(10)

    memory, one, _, spread = runs
    rows = []
    for (label, redis_url, _, cores), run, rcpu in zip(configs, runs, redis_cpu, strict=True):
        redis_per = f"{rcpu / run.hub_requests * 1e6:,.0f} µs" if redis_url else "-"
        rows.append(
            f"| {label} (hub on CPU {','.join(map(str, sorted(cores)))}) | {run.rate:,.0f} "
            f"(rounds {run.spread()}) | {run.cpu_per_request:,.0f} µs | {redis_per} "
            f"| {run.latency()} |"
        )
    cpu_ratio = one.cpu_per_request / memory.cpu_per_request if memory.cpu_per_request else 0.0
    workers_ratio = spread.rate / one.rate if one.rate else 0.0
    projected = 2 * 1e6 / max(runs[2].cpu_per_request, 1)
    per_peer = 1 / REFRESH_SECONDS + 1 / POLL_SECONDS
    peers_per_core = 1e6 / max(one.cpu_per_request, 1) / per_peer

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    wake_p90 = pct(cross, 0.9)
    errors = _unexpected(*runs)
    verdict = {True: "meets", False: "misses"}
    return "\n".join(
        [
            "### More than one process (`--redis`, `--workers`)",
            "",
            f"The same register + lookup load (wrk as above, pinned to CPU {load_cpu} together "
            f"with `redis-server`, {SCALE_ROUNDS} rounds of {ROUND_SECONDS} s; each round runs "
            "every configuration in turn, so other load on this shared 2-core machine falls on "
            "all alike; the numbers are noisy). Hub CPU sums every hub process "
            "(`/proc/PID/stat` of the supervisor and its workers); Redis CPU is `redis-server`'s.",
            "",
            "| configuration | req/s | hub CPU per request | Redis CPU per request | latency |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "| measure | value | goal |",
            "|---|---|---|",
            f"| hub CPU per request, Redis / memory | {cpu_ratio:.3f} "
            f"| ≤ {REDIS_CPU_TARGET}: {verdict[cpu_ratio <= REDIS_CPU_TARGET]} |",
            f"| req/s, 2 workers on both cores / 1 process (wrk and Redis share CPU {load_cpu} "
            f"with a worker) | {workers_ratio:.2f} | ≥ {WORKERS_TARGET} with a core for the load "
            "generator: not measurable on 2 cores |",
            f"| 2 workers at the CPU per request measured on one core, with a core each "
            f"| {projected:,.0f} req/s projected ({projected / max(one.rate, 1):.2f}x one "
            "process's measured req/s) | |",
            f"| peers per hub core at the default refresh (a signed refresh every "
            f"{REFRESH_SECONDS:.0f} s and a message long poll every {POLL_SECONDS:.0f} s each) "
            f"| {peers_per_core:,.0f} | |",
            f"| long poll woken by a registration, same process (median / p90) "
            f"| {pct(same, 0.5):.1f} / {pct(same, 0.9):.1f} ms | |",
            f"| long poll woken by a registration at another replica (median / p90) "
            f"| {pct(cross, 0.5):.1f} / {wake_p90:.1f} ms "
            f"(x {pct(cross, 0.5) / max(pct(same, 0.5), 1e-3):.2f} of same-process) "
            f"| p90 ≤ {WAKE_TARGET_MS:.0f} ms: {verdict[wake_p90 <= WAKE_TARGET_MS]} |",
            f"| unexpected statuses | {errors or 'none'} | none |",
        ]
    )


def run() -> str:
    """Start a hub, measure it with wrk, stop it; then the scale-out comparison on Redis; return
    the Markdown section."""
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="punchtrio-bench-hub-") as workdir:
        bench = Bench(Path(workdir))
        try:
            # Preparing requests stays off the hub's core too.
            os.sched_setaffinity(0, {bench.load_cpu})
            section = _measure(bench)
        finally:
            os.sched_setaffinity(0, affinity)
            bench.close()
    return section + "\n\n" + scale_out()


def scale_out() -> str:
    """The scale-out comparison alone (``python -m benchmarks.hub scale-out``)."""
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="punchtrio-bench-hub-") as workdir:
        try:
            return _scale_out(Path(workdir))
        finally:
            os.sched_setaffinity(0, affinity)


if __name__ == "__main__":
    print(scale_out() if sys.argv[1:] == ["scale-out"] else run())
