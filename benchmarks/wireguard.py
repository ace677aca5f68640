"""punchtrio's userspace WireGuard against wireguard-go: single-stream TCP and ping RTT (root).

One run builds the same path three times (two namespaces joined by a veth, a tunnel across it) and
measures each with iperf3 (one TCP stream, ``SECONDS`` long) and ping:

- baseline: wireguard-go <-> wireguard-go;
- punchtrio <-> punchtrio (``punchtrio up`` on both ends);
- punchtrio <-> wireguard-go (interop, for information).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labs.netns import Lab, require_binaries
from labs.scenarios.tunnel_ping import (
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


@contextmanager
def _tunnel(a_kind: str, b_kind: str) -> Iterator[Pair]:
    """A tunnel 10.9.0.1 (namespace a) <-> 10.9.0.2 (namespace b); each end 'wg-go' or 'punchtrio'."""
    keys = [genkey(), genkey()]
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        pair = make_pair(lab)
        peers = []
        for i, (ns, kind) in enumerate(((pair.a, a_kind), (pair.b, b_kind))):
            other = 1 - i
            common = {
                "private_key": keys[i][0],
                "peer_public": keys[other][1],
                "allowed_ips": f"{OVERLAY[other]}/32",
            }
            endpoint = f"{UNDERLAY[other]}:{UDP_PORT}"
            if kind == "wg-go":
                start_wireguard_go(
                    lab,
                    ns,
                    f"{lab.prefix}w{i}",
                    address=f"{OVERLAY[i]}/24",
                    endpoint=endpoint,
                    **common,
                )
            else:
                config = write_config(
                    Path(tmp) / f"pt{i}.conf",
                    addresses=[f"{OVERLAY[i]}/24"],
                    endpoint=endpoint,
                    **common,
                )
                peers.append(start_punchtrio(lab, ns, config, f"pt{i}"))
        try:
            if ping(pair.a, OVERLAY[1], count=3)[0] == 0:
                raise RuntimeError(f"{a_kind} <-> {b_kind}: the tunnel carries no ping")
            yield pair
        finally:
            for peer in peers:
                peer.stop()


def _iperf(pair: Pair, *, reverse: bool = False) -> float:
    """Return single-stream TCP throughput a -> b (b -> a if ``reverse``) in Mbit/s."""
    server = subprocess.Popen(
        pair.b.exec("iperf3", "-s", "-1", "-B", OVERLAY[1]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while ":5201" not in pair.b.run("ss", "-H", "-tln"):
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        argv = ["iperf3", "-c", OVERLAY[1], "-t", str(SECONDS), "-J", "--connect-timeout", "5000"]
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


def _measure(a_kind: str, b_kind: str) -> tuple[float, float, float]:
    """Return (Mbit/s a->b, Mbit/s b->a, average ping RTT in ms)."""
    with _tunnel(a_kind, b_kind) as pair:
        forward = _iperf(pair)
        backward = _iperf(pair, reverse=True)
        _, rtt = ping(pair.a, OVERLAY[1], count=20)
    return forward, backward, rtt


def run() -> str:
    """Measure the three tunnels and return the Markdown section with the ratios."""
    require_binaries("wireguard-go", "wg", "iperf3", "ping", "ip")
    rows = {
        "wireguard-go <-> wireguard-go (baseline)": _measure("wg-go", "wg-go"),
        "punchtrio <-> punchtrio": _measure("punchtrio", "punchtrio"),
        "punchtrio -> wireguard-go": _measure("punchtrio", "wg-go"),
    }
    base_fwd, base_back, base_rtt = rows["wireguard-go <-> wireguard-go (baseline)"]
    lines = [
        "## WireGuard data path: punchtrio vs wireguard-go",
        "",
        f"Two namespaces joined by a veth; single-stream TCP (`iperf3 -t {SECONDS}`, each way) "
        "and 20 pings through the tunnel; ratios against wireguard-go on both ends, same run. "
        "Command: `nox -s bench -- wireguard` (or `.venv/bin/python -m benchmarks wireguard`).",
        "",
        "| tunnel | TCP a->b Mbit/s | TCP b->a Mbit/s | ping RTT ms | throughput ratio | RTT ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (fwd, back, rtt) in rows.items():
        ratio = (fwd + back) / (base_fwd + base_back)
        lines.append(
            f"| {name} | {fwd:.0f} | {back:.0f} | {rtt:.3f} | {ratio:.2f}x | {rtt / base_rtt:.2f}x |"
        )
    lines += [
        "",
        "Targets: throughput >= 1.0x wireguard-go (first milestone 0.5x), RTT <= 1.5x. "
        "See docs/tunnel.md for the profile and what bounds the data path.",
    ]
    return "\n".join(lines)
