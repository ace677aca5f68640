"""Handshake flood against punchtrio's userspace WireGuard and against wireguard-go (root).

The same lab twice, once with wireguard-go on both ends and once with ``punchtrio up`` on both:
namespaces ``a`` and ``b`` joined by a veth carry a tunnel (10.9.0.1 <-> 10.9.0.2); a third
namespace ``f``, on its own veth to ``b``, floods b's WireGuard port with handshake initiations
from ``KEYS`` fresh keys, each with a valid mac1 for b's public key (what anyone who knows the key
can build), while ``a`` pings b through the tunnel every 10 ms. Three phases per tunnel: no flood,
a flood from f's own address, and a flood from ``SPOOFED`` spoofed source addresses (raw
sockets; b routes them back to f, which drops them). An nftables set in b counts the cookie
replies b sends, per destination address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from labs.netns import Lab, Namespace, require_binaries
from labs.wireguard import (
    OVERLAY,
    PYTHON,
    ROOT,
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

from punchtrio.keys import PublicKey
from punchtrio.wireguard import Device, PeerConfig

NAME = "flood"
SECONDS = float(os.environ.get("PUNCHTRIO_FLOOD_SECONDS", "6"))
"""Length of each flood (override with ``PUNCHTRIO_FLOOD_SECONDS``); pings cover its middle."""
RATE = float(os.environ.get("PUNCHTRIO_FLOOD_RATE", "170000"))
"""Packets per second the flooder aims at (``PUNCHTRIO_FLOOD_RATE``); the achieved rate is printed."""
KEYS = 2000
"""Fresh initiator keys in the flood (each initiation has a valid mac1)."""
SPOOFED = 2000
"""Spoofed source addresses in the spoofed flood (10.200.0.0/16)."""
PING_INTERVAL = 0.01
"""Seconds between pings through the tunnel."""
FLOOD_SIDE = ("10.0.1.1", "10.0.1.2")  # f and b on their own veth
SPOOF_NET = "10.200.0.0/16"


@dataclass
class Phase:
    """What one phase measured."""

    rate: float  # flood packets per second achieved (0: no flood)
    pings: int
    replies: int
    rtts: list[float]
    cookie_replies: dict[str, int]

    @property
    def loss(self) -> float:
        """Ping loss in percent."""
        return 100.0 * (self.pings - self.replies) / self.pings

    @property
    def median_rtt(self) -> float:
        """Median RTT of the answered pings, ms (NaN if none)."""
        return statistics.median(self.rtts) if self.rtts else float("nan")

    @property
    def p90_rtt(self) -> float:
        """90th percentile RTT of the answered pings, ms (NaN if none)."""
        if not self.rtts:
            return float("nan")
        ordered = sorted(self.rtts)
        return ordered[int(0.9 * (len(ordered) - 1))]


def _initiations(target: bytes, count: int) -> bytes:
    """``count`` initiations to ``target`` from fresh keys: valid mac1, unknown to the target."""
    rng = random.Random(20240601)
    blob = []
    anywhere = (ipaddress.ip_network("0.0.0.0/0"),)
    packet = bytes([0x45]) + bytes(15) + bytes([10, 9, 0, 2]) + bytes(8)
    for _ in range(count):
        device = Device(rng.randbytes(32), random=rng.randbytes)
        device.add_peer(
            PeerConfig(target, allowed_ips=anywhere, endpoint=(FLOOD_SIDE[1], UDP_PORT))
        )
        device.send_packet(packet, 0.0)
        [(initiation, _)] = device.datagrams_to_send()
        blob.append(initiation)
    return b"".join(blob)


_NFT = """
table inet flood {
  set replies { type ipv4_addr; size 65536; flags dynamic; counter; }
  chain out {
    type filter hook output priority 0; policy accept;
    udp sport %d @th,64,32 0x03000000 update @replies { ip daddr };
  }
}
"""


def _cookie_replies(ns: Namespace) -> dict[str, int]:
    """Return cookie replies sent from ``ns`` per destination address, and reset the counts."""
    listing = json.loads(ns.run("nft", "-j", "list", "set", "inet", "flood", "replies"))
    counts: dict[str, int] = {}
    for item in listing["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            entry = elem["elem"]
            counts[entry["val"]] = int(entry["counter"]["packets"])
    ns.run("nft", "flush", "set", "inet", "flood", "replies")
    return counts


@contextlib.contextmanager
def _lab(kind: str) -> Iterator[tuple[Pair, Namespace, bytes]]:
    """The tunnel a <-> b (both ends ``kind``), the flooder's namespace and b's public key."""
    keys = [genkey(), genkey()]
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        pair = make_pair(lab)
        flooder = lab.namespace("f")
        lab.veth(flooder, "fl0", pair.b, "bf0")
        flooder.run("ip", "addr", "add", f"{FLOOD_SIDE[0]}/24", "dev", "fl0")
        pair.b.run("ip", "addr", "add", f"{FLOOD_SIDE[1]}/24", "dev", "bf0")
        pair.b.run("ip", "route", "add", SPOOF_NET, "via", FLOOD_SIDE[0])
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as rules:
            rules.write(_NFT % UDP_PORT)
        try:
            pair.b.run("nft", "-f", rules.name)
        finally:
            os.unlink(rules.name)
        peers = []
        for i, ns in enumerate((pair.a, pair.b)):
            other = 1 - i
            allowed_ips = f"{OVERLAY[other]}/32"
            endpoint = f"{UNDERLAY[other]}:{UDP_PORT}"
            if kind == "wg-go":
                start_wireguard_go(
                    lab,
                    ns,
                    f"{lab.prefix}w{i}",
                    private_key=keys[i][0],
                    address=f"{OVERLAY[i]}/24",
                    peer_public=keys[other][1],
                    allowed_ips=allowed_ips,
                    endpoint=endpoint,
                )
            else:
                config = write_config(
                    Path(tmp) / f"pt{i}.conf",
                    private_key=keys[i][0],
                    addresses=[f"{OVERLAY[i]}/24"],
                    peer_public=keys[other][1],
                    allowed_ips=allowed_ips,
                    endpoint=endpoint,
                )
                peers.append(start_punchtrio(lab, ns, config, f"pt{i}"))
        try:
            if ping(pair.a, OVERLAY[1], count=3)[0] == 0:
                raise RuntimeError(f"{kind}: the tunnel carries no ping")
            yield pair, flooder, PublicKey.from_base64(keys[1][1]).raw
        finally:
            for peer in peers:
                peer.stop()


def _phase(pair: Pair, flooder: Namespace, packets: Path | None, spoof: int) -> Phase:
    """Ping a -> b through the tunnel, during a flood from ``flooder`` unless ``packets`` is None."""
    proc = None
    if packets is not None:
        argv = [PYTHON, "-m", "benchmarks._flood_sender", "--packets", str(packets)]
        argv += ["--target", f"{FLOOD_SIDE[1]}:{UDP_PORT}", "--rate", str(RATE)]
        argv += ["--seconds", str(SECONDS), "--spoof", str(spoof), "--spoof-net", SPOOF_NET]
        proc = subprocess.Popen(
            flooder.exec(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT)
        )
        time.sleep(0.75)  # the flood is on and the peer under load before the first ping
    count = int((SECONDS - 1.5) / PING_INTERVAL)
    argv = ["ping", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "1", OVERLAY[1]]
    out = pair.a.run(*argv, check=False)
    rate = 0.0
    if proc is not None:
        stdout, stderr = proc.communicate(timeout=SECONDS + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"the flooder failed: {stderr.decode(errors='replace').strip()}")
        rate = float(json.loads(stdout)["rate"])
    received = re.search(r"(\d+) received", out)
    rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    replies = _cookie_replies(pair.b)
    time.sleep(2.0)  # both implementations leave "under load" 1 s after the flood
    return Phase(rate, count, int(received[1]) if received else 0, rtts, replies)


def _measure(kind: str) -> dict[str, Phase]:
    with _lab(kind) as (pair, flooder, public), tempfile.TemporaryDirectory() as tmp:
        packets = Path(tmp) / "initiations"
        packets.write_bytes(_initiations(public, KEYS))
        os.chmod(tmp, 0o755)
        return {
            "no flood": _phase(pair, flooder, None, 0),
            "flood, one source": _phase(pair, flooder, packets, 0),
            f"flood, {SPOOFED} spoofed sources": _phase(pair, flooder, packets, SPOOFED),
        }


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def run() -> str:
    """Flood both tunnels and return the Markdown section with the ratios."""
    require_binaries("wireguard-go", "wg", "ping", "ip", "nft")
    results = {"wireguard-go": _measure("wg-go"), "punchtrio": _measure("punchtrio")}
    lines = [
        "## Handshake flood: punchtrio vs wireguard-go",
        "",
        f"A third namespace floods the responder's WireGuard port for {SECONDS:.0f} s with "
        f"initiations from {KEYS} fresh keys, each with a valid mac1 (aiming at {RATE:.0f} "
        f"packets/s; the rate achieved is shown), from its own address or from {SPOOFED} spoofed "
        f"ones, while the other peer pings through the tunnel every {PING_INTERVAL * 1000:.0f} ms. "
        "Cookie replies are counted per destination in the responder's nftables output hook. "
        "Both ends run the same implementation; same run, same machine. Command: "
        "`nox -s bench -- flood` (or `.venv/bin/python -m benchmarks flood`).",
        "",
        "| tunnel | phase | flood pkt/s | ping loss % | median RTT ms | p90 RTT ms "
        "| cookie replies | sources answered | max replies per source |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tunnel, phases in results.items():
        for phase, m in phases.items():
            replies = m.cookie_replies
            lines.append(
                f"| {tunnel} | {phase} | {m.rate:.0f} | {m.loss:.1f} | {_fmt(m.median_rtt, 3)} "
                f"| {_fmt(m.p90_rtt, 3)} | {sum(replies.values())} | {len(replies)} "
                f"| {max(replies.values(), default=0)} |"
            )
    lines += [
        "",
        "| phase | ping loss, punchtrio - wireguard-go (points) | median RTT ratio | p90 RTT ratio "
        "| max cookie replies per source, ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    ours, theirs = results["punchtrio"], results["wireguard-go"]
    for phase in ours:
        o, t = ours[phase], theirs[phase]
        o_max = max(o.cookie_replies.values(), default=0)
        t_max = max(t.cookie_replies.values(), default=0)
        lines.append(
            f"| {phase} | {o.loss - t.loss:+.1f} | {_fmt(o.median_rtt / t.median_rtt)}x "
            f"| {_fmt(o.p90_rtt / t.p90_rtt)}x "
            f"| {_fmt(o_max / t_max) + 'x' if t_max else 'n/a'} |"
        )
    lines += [
        "",
        "Goal: ping loss and RTT through punchtrio's tunnel no worse than wireguard-go's under the "
        "same flood, and cookie replies bounded per source (punchtrio: at most the rate "
        "limiter's 5 + 20 per second per source once under load). See docs/wireguard.md, "
        '"Under load".',
    ]
    return "\n".join(lines)
