"""punchtrio's userspace WireGuard <-> wireguard-go across two namespaces: pings and a TCP transfer.

The building blocks (a namespace pair, a wireguard-go peer set up with ``wg``, a punchtrio peer run
as ``punchtrio up --json``, ping, transfer) live in :mod:`labs.wireguard`; they are re-exported
here for code that imported them from this module.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from labs.netns import Lab, require_binaries
from labs.wireguard import (
    OVERLAY,
    OVERLAY6,
    PYTHON,
    ROOT,
    UDP_PORT,
    UNDERLAY,
    Pair,
    PunchtrioPeer,
    genkey,
    make_pair,
    ping,
    start_punchtrio,
    start_wireguard_go,
    transfer,
    wg_show,
    write_config,
)

__all__ = [
    "DESCRIPTION",
    "NAME",
    "OVERLAY",
    "OVERLAY6",
    "PYTHON",
    "ROOT",
    "UDP_PORT",
    "UNDERLAY",
    "Pair",
    "PunchtrioPeer",
    "genkey",
    "make_pair",
    "ping",
    "run",
    "start_punchtrio",
    "start_wireguard_go",
    "transfer",
    "wg_show",
    "write_config",
]

NAME = "tunnel-ping"
DESCRIPTION = "punchtrio WireGuard <-> wireguard-go over a veth: pings both ways and a TCP transfer"


def _traffic_checks(pair: Pair, wg_if: str, results: list[tuple[str, bool, str]]) -> None:
    got, rtt = ping(pair.a, OVERLAY[1], count=5)
    results.append(("ping punchtrio -> wireguard-go (IPv4)", got == 5, f"{got}/5, {rtt} ms"))
    got, rtt = ping(pair.b, OVERLAY[0], count=5)
    results.append(("ping wireguard-go -> punchtrio (IPv4)", got == 5, f"{got}/5, {rtt} ms"))
    got, rtt = ping(pair.a, OVERLAY6[1], count=3)
    results.append(("ping punchtrio -> wireguard-go (IPv6)", got == 3, f"{got}/3, {rtt} ms"))
    size = 20 << 20
    for sender, receiver, address, label in (
        (pair.b, pair.a, OVERLAY[0], "wireguard-go -> punchtrio"),
        (pair.a, pair.b, OVERLAY[1], "punchtrio -> wireguard-go"),
    ):
        sent_hash, received, seconds = transfer(sender, receiver, address, size)
        ok = received == f"{size} {sent_hash}"
        rate = size * 8 / seconds / 1e6
        detail = f"sha256 {'matches' if ok else 'DIFFERS'}, {rate:.0f} Mbit/s"
        results.append((f"TCP 20 MiB {label}", ok, detail))
    handshakes = wg_show(pair.b, wg_if, "latest-handshakes").split()
    results.append(
        ("wireguard-go saw a handshake", len(handshakes) == 2 and handshakes[1] != "0", "")
    )


def run() -> int:
    """Build the pair, run the checks, print a short report; 0 if everything passed."""
    require_binaries("wireguard-go", "wg", "ping", "ip")
    our_private, our_public = genkey()
    their_private, their_public = genkey()
    results: list[tuple[str, bool, str]] = []
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        pair = make_pair(lab)
        wg_if = f"{lab.prefix}wg"
        start_wireguard_go(
            lab,
            pair.b,
            wg_if,
            private_key=their_private,
            address=f"{OVERLAY[1]}/24",
            address6=f"{OVERLAY6[1]}/64",
            peer_public=our_public,
            allowed_ips=f"{OVERLAY[0]}/32,{OVERLAY6[0]}/128",
            endpoint=f"{UNDERLAY[0]}:{UDP_PORT}",
        )
        config = write_config(
            Path(tmp) / "pt0.conf",
            private_key=our_private,
            addresses=[f"{OVERLAY[0]}/24", f"{OVERLAY6[0]}/64"],
            peer_public=their_public,
            allowed_ips=f"{OVERLAY[1]}/32, {OVERLAY6[1]}/128",
            endpoint=f"{UNDERLAY[1]}:{UDP_PORT}",
        )
        peer = start_punchtrio(lab, pair.a, config, "pt0")
        print(f"lab: namespaces {pair.a.name} (punchtrio, pt0) and {pair.b.name} (wireguard-go)")
        try:
            _traffic_checks(pair, wg_if, results)
        finally:
            status = peer.stop()
        down = next((e for e in peer.seen if e["event"] == "down"), None)
        detail = ""
        if down is not None and down["peers"]:
            stats = down["peers"][0]
            detail = f"rx {stats['rx_bytes']} B, tx {stats['tx_bytes']} B"
        results.append(("punchtrio stopped cleanly on SIGTERM", status == 0 and bool(down), detail))
        gone = pair.a.run("ip", "link", "show", "pt0", check=False) == ""
        results.append(("TUN device pt0 removed", gone, ""))
    for name, ok, detail in results:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
    passed = all(ok for _, ok, _ in results)
    print("tunnel-ping: " + ("all checks passed" if passed else "FAILED"))
    return 0 if passed else 1
