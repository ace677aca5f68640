"""`punchtrio up --tunnel wireguard-go` against plain wireguard-go: what the backend costs (root).

The same path (two namespaces joined by a veth) is built twice per round: wireguard-go on both
ends set up with ``wg`` and ``ip`` (the baseline), and ``punchtrio up --config FILE --tunnel
wireguard-go`` on both ends (wireguard-go started and configured by punchtrio over UAPI). Each is
measured with single-stream TCP both ways (iperf3) and ping RTT at 500 pings/s; rounds are
interleaved and the ratio is backend / baseline from the same run. The target is >= 0.95x: the
backend puts nothing of punchtrio's on the data path.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labs.netns import Lab, require_binaries
from labs.wireguard import (
    OVERLAY,
    PYTHON,
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

from benchmarks.wireguard import ROUNDS, SECONDS, tunnel_rtt, tunnel_throughput

NAME = "wireguard-go-backend"


@contextmanager
def _tunnel(kind: str) -> Iterator[Pair]:
    """10.9.0.1 (a) <-> 10.9.0.2 (b), both ends ``"plain"`` wireguard-go or ``"backend"``."""
    keys = [genkey(), genkey()]
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        pair = make_pair(lab)
        peers = []
        for i, ns in enumerate((pair.a, pair.b)):
            other = 1 - i
            private_key, peer_public = keys[i][0], keys[other][1]
            if kind == "plain":
                start_wireguard_go(
                    lab,
                    ns,
                    f"{lab.prefix}w{i}",
                    private_key=private_key,
                    address=f"{OVERLAY[i]}/24",
                    peer_public=peer_public,
                    allowed_ips=f"{OVERLAY[other]}/32",
                    endpoint=f"{UNDERLAY[other]}:{UDP_PORT}",
                )
                continue
            config = write_config(
                Path(tmp) / f"g{i}.conf",
                private_key=private_key,
                addresses=[f"{OVERLAY[i]}/24"],
                peer_public=peer_public,
                allowed_ips=f"{OVERLAY[other]}/32",
                endpoint=f"{UNDERLAY[other]}:{UDP_PORT}",
                extra="MTU = 1420",
            )
            argv = [PYTHON, "-m", "punchtrio.cli", "up", "--tunnel", "wireguard-go"]
            peers.append(start_punchtrio(lab, ns, config, f"{lab.prefix}g{i}", argv=argv))
        try:
            if ping(pair.a, OVERLAY[1], count=3)[0] == 0:
                raise RuntimeError(f"{kind}: the tunnel carries no ping")
            yield pair
        finally:
            for peer in peers:
                peer.stop()


def _measure(kind: str) -> tuple[float, float, float]:
    """Return (Mbit/s a->b, Mbit/s b->a, median RTT ms at 500 pings/s)."""
    with _tunnel(kind) as pair:
        return (
            tunnel_throughput(pair),
            tunnel_throughput(pair, reverse=True),
            tunnel_rtt(pair, interval=0.002, count=1000),
        )


def run() -> str:
    """Measure both tunnels in interleaved rounds and return the Markdown section."""
    require_binaries("wireguard-go", "wg", "iperf3", "ping", "ip")
    names = {
        "plain": "wireguard-go <-> wireguard-go (baseline)",
        "backend": "up --tunnel wireguard-go, both ends",
    }
    samples: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in names}
    for _ in range(ROUNDS):
        for kind in names:
            samples[kind].append(_measure(kind))
    best = {
        kind: (max(s[0] for s in runs), max(s[1] for s in runs), min(s[2] for s in runs))
        for kind, runs in samples.items()
    }
    base = best["plain"]
    lines = [
        "## The wireguard-go backend vs plain wireguard-go",
        "",
        f"Two namespaces joined by a veth; single-stream TCP (`iperf3 -t {SECONDS}`, each way) "
        f"and median ping RTT at 500 pings/s, best of {ROUNDS} interleaved rounds; ratios against "
        "wireguard-go set up with `wg`, same run. Command: `nox -s bench -- wireguard-go-backend`.",
        "",
        "| tunnel | TCP a->b Mbit/s | TCP b->a Mbit/s | throughput ratio | RTT ms | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, (fwd, back, rtt) in best.items():
        ratio = (fwd + back) / (base[0] + base[1])
        lines.append(
            f"| {names[kind]} | {fwd:.0f} | {back:.0f} | {ratio:.2f}x | {rtt:.3f} "
            f"| {rtt / base[2]:.2f}x |"
        )
    lines += [
        "",
        "Target: throughput >= 0.95x plain wireguard-go (nothing of punchtrio's on the path).",
    ]
    return "\n".join(lines)
