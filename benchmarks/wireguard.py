"""punchtrio's userspace WireGuard against wireguard-go: single-stream TCP and ping RTT (root).

One run builds the same path three times (two namespaces joined by a veth, a tunnel across it) and
measures each with iperf3 (one TCP stream, ``SECONDS`` long) and ping:

- baseline: wireguard-go <-> wireguard-go;
- punchtrio <-> punchtrio (``punchtrio up`` on both ends);
- punchtrio <-> wireguard-go (interop, for information).

``PUNCHTRIO_BENCH_COMPARE=DIR[,DIR...]`` adds one tunnel per ``DIR``, punchtrio <-> punchtrio with
the package imported from that ``src`` directory (another checkout's, e.g. ``git archive HEAD src``
unpacked), so a change to the data path is measured against the code before it in one run.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labs.netns import Lab, require_binaries
from labs.wireguard import (
    OVERLAY,
    UDP_PORT,
    UNDERLAY,
    Pair,
    genkey,
    make_pair,
    ping,
    start_punchtrio,
    start_wireguard_go,
    write_config,
)

NAME = "wireguard"
SECONDS = int(os.environ.get("PUNCHTRIO_BENCH_SECONDS", "10"))
"""Length of each iperf3 run (override with ``PUNCHTRIO_BENCH_SECONDS``)."""
ROUNDS = int(os.environ.get("PUNCHTRIO_BENCH_ROUNDS", "2"))
"""Interleaved rounds over the three tunnels (override with ``PUNCHTRIO_BENCH_ROUNDS``)."""
COMPARE = [d for d in os.environ.get("PUNCHTRIO_BENCH_COMPARE", "").split(",") if d]
"""``src`` directories whose punchtrio runs one more, comparison tunnel each (default: none)."""


@contextmanager
def _imported_from(src: str) -> Iterator[None]:
    """While inside, processes started from here import punchtrio from ``src`` (none: unchanged)."""
    if not src:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = src
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@contextmanager
def _tunnel(a_kind: str, b_kind: str) -> Iterator[Pair]:
    """A tunnel 10.9.0.1 (namespace a) <-> 10.9.0.2 (namespace b); each end 'wg-go' or 'punchtrio'.

    'punchtrio@DIR' is punchtrio imported from the ``src`` directory DIR.
    """
    keys = [genkey(), genkey()]
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        pair = make_pair(lab)
        peers = []
        for i, (ns, kind) in enumerate(((pair.a, a_kind), (pair.b, b_kind))):
            other = 1 - i
            private_key, peer_public = keys[i][0], keys[other][1]
            allowed_ips = f"{OVERLAY[other]}/32"
            endpoint = f"{UNDERLAY[other]}:{UDP_PORT}"
            if kind == "wg-go":
                start_wireguard_go(
                    lab,
                    ns,
                    f"{lab.prefix}w{i}",
                    private_key=private_key,
                    address=f"{OVERLAY[i]}/24",
                    peer_public=peer_public,
                    allowed_ips=allowed_ips,
                    endpoint=endpoint,
                )
            else:
                config = write_config(
                    Path(tmp) / f"pt{i}.conf",
                    private_key=private_key,
                    addresses=[f"{OVERLAY[i]}/24"],
                    peer_public=peer_public,
                    allowed_ips=allowed_ips,
                    endpoint=endpoint,
                )
                with _imported_from(kind.partition("@")[2]):
                    peers.append(start_punchtrio(lab, ns, config, f"pt{i}"))
        try:
            if ping(pair.a, OVERLAY[1], count=3)[0] == 0:
                raise RuntimeError(f"{a_kind} <-> {b_kind}: the tunnel carries no ping")
            yield pair
        finally:
            for peer in peers:
                peer.stop()


def tunnel_throughput(pair: Pair, *, reverse: bool = False, address: str = OVERLAY[1]) -> float:
    """Return single-stream TCP throughput a -> b (b -> a if ``reverse``) in Mbit/s.

    ``address`` is b's tunnel address (default 10.9.0.2), where b's iperf3 server listens.
    """
    server = subprocess.Popen(
        pair.b.exec("iperf3", "-s", "-1", "-B", address),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while ":5201" not in pair.b.run("ss", "-H", "-tln"):
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        argv = ["iperf3", "-c", address, "-t", str(SECONDS), "-J", "--connect-timeout", "5000"]
        out = subprocess.run(
            pair.a.exec(*argv, *(["-R"] if reverse else [])),
            capture_output=True,
            text=True,
            check=False,
        )
        result = json.loads(out.stdout)
        if "error" in result:
            raise RuntimeError(f"iperf3: {result['error']}")
        return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _measure(a_kind: str, b_kind: str) -> tuple[float, float, float, float]:
    """Return (Mbit/s a->b, Mbit/s b->a, RTT ms at 20 pings/s, RTT ms at 500 pings/s)."""
    with _tunnel(a_kind, b_kind) as pair:
        forward = tunnel_throughput(pair)
        backward = tunnel_throughput(pair, reverse=True)
        sparse = tunnel_rtt(pair, interval=0.05, count=100)
        dense = tunnel_rtt(pair, interval=0.002, count=1000)
    return forward, backward, sparse, dense


def tunnel_rtt(pair: Pair, *, interval: float, count: int, address: str = OVERLAY[1]) -> float:
    """Return the median ping RTT a -> b in ms (the median: the machine may be shared).

    ``count`` pings ``interval`` seconds apart go to ``address``, b's tunnel address (default
    10.9.0.2). Raises RuntimeError when fewer than half are answered.
    """
    argv = ["ping", "-c", str(count), "-i", str(interval), "-W", "2", address]
    out = pair.a.run(*argv, check=False)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if len(times) < count // 2:
        raise RuntimeError(f"only {len(times)} of {count} pings answered")
    return statistics.median(times)


def run() -> str:
    """Measure the three tunnels and return the Markdown section with the ratios."""
    require_binaries("wireguard-go", "wg", "iperf3", "ping", "ip")
    tunnels = {
        "wireguard-go <-> wireguard-go (baseline)": ("wg-go", "wg-go"),
        "punchtrio <-> punchtrio": ("punchtrio", "punchtrio"),
        "punchtrio (a) <-> wireguard-go (b)": ("punchtrio", "wg-go"),
    }
    for src in COMPARE:
        tunnels[f"punchtrio <-> punchtrio, from {src}"] = (f"punchtrio@{src}", f"punchtrio@{src}")
    # Rounds are interleaved, and each tunnel keeps its best throughput and lowest RTT, so a
    # burst of load from elsewhere on a shared machine hits one sample, not one tunnel.
    samples: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in tunnels}
    for _ in range(ROUNDS):
        for name, kinds in tunnels.items():
            samples[name].append(_measure(*kinds))
    rows = {
        name: (
            max(s[0] for s in runs),
            max(s[1] for s in runs),
            min(s[2] for s in runs),
            min(s[3] for s in runs),
        )
        for name, runs in samples.items()
    }
    base_fwd, base_back, base_sparse, base_dense = rows["wireguard-go <-> wireguard-go (baseline)"]
    lines = [
        "## WireGuard data path: punchtrio vs wireguard-go",
        "",
        f"Two namespaces joined by a veth; single-stream TCP (`iperf3 -t {SECONDS}`, each way) "
        "and median ping RTTs at 20 and 500 pings per second through the tunnel, best of "
        f"{ROUNDS} interleaved rounds; ratios against wireguard-go on both ends, same run. "
        "Command: `nox -s bench -- wireguard` (or `.venv/bin/python -m benchmarks wireguard`).",
        "",
        "| tunnel | TCP a->b Mbit/s | TCP b->a Mbit/s | throughput ratio "
        "| RTT ms, 20 pings/s | ratio | RTT ms, 500 pings/s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (fwd, back, sparse, dense) in rows.items():
        ratio = (fwd + back) / (base_fwd + base_back)
        lines.append(
            f"| {name} | {fwd:.0f} | {back:.0f} | {ratio:.2f}x "
            f"| {sparse:.3f} | {sparse / base_sparse:.2f}x | {dense:.3f} | {dense / base_dense:.2f}x |"
        )
    lines += [
        "",
        "Targets: throughput >= 1.4x wireguard-go, RTT <= 1.2x. "
        "See docs/tunnel.md for the profile and what bounds the data path.",
    ]
    return "\n".join(lines)
