"""The hub's ASGI app under other ASGI servers: Hypercorn's Trio worker (what ``punchtrio hub``
runs), Hypercorn's asyncio worker, Uvicorn (uvloop + httptools) and Granian (a Rust HTTP server),
each serving the same app (``benchmarks._asgi_target``, memory store) as one process pinned to
one core and loaded by ``wrk`` from the other, as in ``benchmarks/hub.py``: requests/s and the
server's CPU time per request for ``GET /healthz`` and for signed register + lookup.

The app is Trio-first: its handlers call ``trio.move_on_after`` (the body timeout of every
request with a body), ``trio.open_nursery`` (long polls) and ``trio.current_time`` (the rate
limit), so on an asyncio server every ``PUT`` fails (500, "must be called from async context").
The asyncio servers therefore serve the app with those three calls mapped to AnyIO
(``PUNCHTRIO_BENCH_ANYIO=1``): that measures what the abstraction would buy. The servers are not
punchtrio dependencies: install them into a benchmark-only place, e.g.
``pip install --target /tmp/asgi-servers uvicorn==0.54.0 granian==2.8.7 httptools uvloop`` and
``PUNCHTRIO_ASGI_SERVERS=/tmp/asgi-servers``, or ``nox -s bench -- asgi_servers``, whose
session installs them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from punchtrio import PrivateKey

from .hub import Bench, Peer, Run, _cpu_seconds

NAME = "asgi_servers"

ROUNDS = 3
"""Rounds; each runs every server's two phases in turn, so other load falls on all alike."""
ROUND_SECONDS = 5
"""Length of one timed phase."""
POOL_RATE = 5000
"""Signed requests prepared per second of a register + lookup phase."""
HEALTHZ_RATE = 30000
"""``/healthz`` requests prepared per second of a baseline phase."""
LOOKUP_TARGETS = 2000
"""Peers registered (untimed) before the timed phases, for the lookups to find."""
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Server:
    """One ASGI server: its label, its arguments to Python (``{host}``, ``{port}``, ``{key}``
    filled in; split at spaces) and whether it needs the AnyIO mapping (an asyncio server)."""

    label: str
    command: str
    anyio: bool


SERVERS = (
    Server(
        "`punchtrio hub` (Hypercorn, Trio worker, the hub's own settings)",
        "-m punchtrio.cli hub --listen {host} --rate 0 --ttl 3600 --store memory --key-file {key}",
        False,
    ),
    Server(
        "Hypercorn, Trio worker (its defaults)",
        "-m hypercorn -k trio -b {host} benchmarks._asgi_target:app",
        False,
    ),
    Server(
        "Hypercorn, asyncio worker",
        "-m hypercorn -k asyncio -b {host} benchmarks._asgi_target:app",
        True,
    ),
    Server(
        "Uvicorn (uvloop, httptools)",
        "-m uvicorn --host 127.0.0.1 --port {port} --loop uvloop --http httptools "
        "--no-access-log --log-level warning benchmarks._asgi_target:app",
        True,
    ),
    Server(
        "Granian (Rust HTTP/1, 1 worker, 1 runtime thread)",
        "-m granian --interface asgi --host 127.0.0.1 --port {port} --workers 1 "
        "--runtime-threads 1 --http 1 --no-ws --log-level warning benchmarks._asgi_target:app",
        True,
    ),
)


class Served(Bench):
    """A :class:`Bench` whose hub is ``server`` serving ``benchmarks._asgi_target:app``
    (statuses come from wrk's non-2xx count: these servers have no metrics listener)."""

    def __init__(self, workdir: Path, server: Server, key_file: Path, extra_path: str) -> None:
        self._prepare(workdir)
        self.metrics_url = None
        self.next_peer = 0
        self.workers = 1
        argv = [sys.executable]
        argv += [
            a.format(host=self.host, port=self.port, key=key_file) for a in server.command.split()
        ]
        if self.pinned:
            argv = ["taskset", "-c", str(self.hub_cpu), *argv]
        path = [str(ROOT), *([extra_path] if extra_path else [])]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "PUNCHTRIO_BENCH_HUB_KEY": str(key_file),
            "PUNCHTRIO_BENCH_ANYIO": "1" if server.anyio else "0",
        }
        with (workdir / "stderr").open("wb") as stderr:
            self.hub = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        self.http = httpx.Client(base_url=f"http://{self.host}", timeout=10)
        self.hub_key = PrivateKey.from_file(key_file).public_key()
        for _ in range(300):
            if self.hub.poll() is not None:
                error = (workdir / "stderr").read_text()[-800:]
                raise RuntimeError(f"{server.label} exited with {self.hub.returncode}: {error}")
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{server.label} did not start")
        time.sleep(0.5)  # worker processes settle

    def pids(self) -> list[int]:
        """The server process and all its descendants (Granian runs its worker in a child)."""
        found, todo = [], [self.hub.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                    todo += map(int, children)
            except FileNotFoundError:
                pass
        return found

    def cpu(self) -> float:
        """CPU seconds (user + system) of the server's processes so far."""
        total = 0.0
        for pid in self.pids():
            try:
                total += _cpu_seconds(pid)
            except FileNotFoundError:
                pass
        return total


@dataclass
class Measure:
    """Per-round requests/s and CPU µs per request of one phase of one server."""

    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    bad: int = 0
    exhausted: bool = False

    def add(self, run: Run) -> None:
        self.rates.append(run.rate)
        self.cpu.append(run.cpu_per_request)
        self.bad += run.non2xx + run.wrk_errors
        self.exhausted |= run.exhausted

    def rate(self) -> float:
        return statistics.median(self.rates)

    def cpu_us(self) -> float:
        return statistics.median(self.cpu)

    def text(self) -> str:
        return (
            f"{self.rate():,.0f} ({min(self.rates):,.0f}-{max(self.rates):,.0f}) "
            f"| {self.cpu_us():,.0f} µs ({min(self.cpu):,.0f}-{max(self.cpu):,.0f})"
        )


def _check_servers(extra_path: str) -> None:
    env = {**os.environ, "PYTHONPATH": extra_path}
    probe = subprocess.run(
        [sys.executable, "-c", "import uvicorn, granian, uvloop, httptools"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise SystemExit(
            "benchmarks asgi_servers: uvicorn, granian, uvloop and httptools are not importable "
            f"(PUNCHTRIO_ASGI_SERVERS={extra_path!r}); install them benchmark-only: pip install "
            "--target /tmp/asgi-servers uvicorn granian uvloop httptools, then "
            "PUNCHTRIO_ASGI_SERVERS=/tmp/asgi-servers"
        )


def _broken_on_asyncio(workdir: Path, key_file: Path, extra_path: str) -> str:
    """What the unmodified app answers on an asyncio server (Uvicorn): ``/healthz``, a signed
    ``PUT`` (a body: ``read_body``'s ``trio.move_on_after``) and a signed ``GET`` lookup."""
    uvicorn = next(s for s in SERVERS if s.label.startswith("Uvicorn"))
    served = Served(workdir, Server(uvicorn.label, uvicorn.command, False), key_file, extra_path)
    try:
        base = f"http://{served.host}"
        # A fresh connection each: Uvicorn closes one after an exception in the app.
        healthz = httpx.get(f"{base}/healthz").status_code
        peer = Peer(0, served.hub_key)
        target = f"/v1/peers/{peer.name}"
        signed = peer.signer.sign("PUT", target, peer.body, now=time.time())
        headers = {**signed, "content-type": "application/json"}
        put = httpx.put(f"{base}{target}", content=peer.body, headers=headers).status_code
        signed = peer.signer.sign("GET", target, b"", now=time.time())
        get = httpx.get(f"{base}{target}", headers=signed).status_code
    finally:
        served.close()
    stderr = (workdir / "stderr").read_text()
    error = "must be called from async context" in stderr
    return (
        f"unmodified on Uvicorn, `GET /healthz` answers {healthz}, a signed `PUT` {put}"
        + (" (`RuntimeError: must be called from async context` in `read_body`)" if error else "")
        + f" and a signed `GET` of that name {get}"
    )


def run() -> str:
    """Run every server in turn, ``ROUNDS`` times; return the Markdown section."""
    extra_path = os.environ.get("PUNCHTRIO_ASGI_SERVERS", "")
    _check_servers(extra_path)
    affinity = os.sched_getaffinity(0)
    healthz = [Measure() for _ in SERVERS]
    mixed = [Measure() for _ in SERVERS]
    load: list[float] = []
    with tempfile.TemporaryDirectory(prefix="punchtrio-bench-asgi-") as tmp:
        workdir = Path(tmp)
        key_file = workdir / "hub.key"
        PrivateKey.generate().write(key_file)
        (workdir / "broken").mkdir()
        broken = _broken_on_asyncio(workdir / "broken", key_file, extra_path)
        benches: list[Served] = []
        try:
            for index, server in enumerate(SERVERS):
                (workdir / str(index)).mkdir()
                benches.append(Served(workdir / str(index), server, key_file, extra_path))
            os.sched_setaffinity(0, {benches[0].load_cpu})
            for bench in benches:
                warm = bench.run(bench.registrations(LOOKUP_TARGETS), 60)
                if warm.non2xx or warm.wrk_errors:
                    raise RuntimeError(f"registrations failed at {bench.host}")
            for _ in range(ROUNDS):
                load.append(os.getloadavg()[0])
                for index, bench in enumerate(benches):
                    pool = bench.healthz(HEALTHZ_RATE * ROUND_SECONDS)
                    healthz[index].add(bench.run(pool, ROUND_SECONDS))
                    pairs = bench.register_and_lookup(
                        POOL_RATE * ROUND_SECONDS // 2, LOOKUP_TARGETS
                    )
                    mixed[index].add(bench.run(pairs, ROUND_SECONDS))
        finally:
            os.sched_setaffinity(0, affinity)
            for bench in benches:
                bench.close()

    base_h, base_m = healthz[0], mixed[0]
    rows = []
    for server, h, m in zip(SERVERS, healthz, mixed, strict=True):
        rows.append(
            f"| {server.label}{' (AnyIO mapping)' if server.anyio else ''} | {h.text()} "
            f"| {m.text()} | {h.rate() / base_h.rate():.2f} / {m.rate() / base_m.rate():.2f} "
            f"| {h.cpu_us() / base_h.cpu_us():.2f} / {m.cpu_us() / base_m.cpu_us():.2f} |"
        )
    bad = sum(x.bad for x in [*healthz, *mixed])
    exhausted = any(x.exhausted for x in [*healthz, *mixed])
    return "\n".join(
        [
            "## The hub's app on other ASGI servers (`benchmarks/asgi_servers.py`)",
            "",
            "The same app (memory store, `--rate 0`) served by each server as one process pinned "
            f"to one core, wrk on the other (as in the hub section); {ROUNDS} rounds of "
            f"{ROUND_SECONDS} s per server and kind, the servers in turn within each round; "
            "medians over rounds (range). CPU is the server's user + system time (every process "
            "of it) per request answered. The asyncio servers run the app with its three Trio "
            "calls mapped to AnyIO; "
            + broken
            + f". Load average (1 min) at the rounds: {', '.join(f'{x:.1f}' for x in load)}."
            + (" A phase used up its prepared requests and ended early." if exhausted else ""),
            "",
            "| server | `/healthz` req/s | `/healthz` CPU per request "
            "| register + lookup req/s | register + lookup CPU per request "
            "| req/s / Hypercorn-Trio (healthz / mixed) | CPU / Hypercorn-Trio (healthz / mixed) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Non-2xx answers and socket errors in the timed phases: {bad or 'none'}.",
            "",
            "Run: `PUNCHTRIO_ASGI_SERVERS=/tmp/asgi-servers .venv/bin/python -m benchmarks "
            "asgi_servers` (the servers installed there, never into the project's venv) or "
            "`nox -s bench -- asgi_servers`.",
        ]
    )


if __name__ == "__main__":
    print(run())
