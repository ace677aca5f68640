"""Where a ping's round trip goes, hop by hop: plain wireguard-go against ``punchtrio up --hub``.

The NAT lab's two port-restricted cones and a real hub carry each tunnel in turn (the tunnels of
``tunnels-lab``). Once a tunnel has run for :data:`SETTLE` seconds, ``tcpdump`` runs in both
hosts' namespaces while :data:`PINGS` pings at 20 per second cross it, and records when each
packet passed each interface, by the kernel's clock (one clock for all namespaces). Each ping
is followed through eight sightings:

1. a's TUN, the echo request leaving the kernel for the tunnel;
2. a's ``eth0``, the encrypted request leaving;
3. b's ``eth0``, it arriving (through both NATs);
4. b's TUN, the decrypted request;
5. b's TUN, the kernel's echo reply;
6. b's ``eth0``, the encrypted reply leaving;
7. a's ``eth0``, it arriving;
8. a's TUN, the decrypted reply.

The gaps between them are the stages: 1->2, 3->4, 5->6 and 7->8 are the tunnel's own work (with
its wake-up), 2->3 and 6->7 the lab's network, 4->5 the kernel answering. The table gives each
stage's median over every ping of every round, for both tunnels, and the difference. The
capture costs both tunnels the same (each packet is copied once per interface). Needs root, the
lab's programs, wireguard-go, wg, ping and tcpdump. ``python -m benchmarks latency-stages``;
``PUNCHTRIO_BENCH_ROUNDS`` sets the rounds (default 2).
"""

from __future__ import annotations

import itertools
import re
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from labs.netns import require_binaries
from labs.scenarios.punch_matrix import running_pair, start_hub
from labs.topology import Host, Network, build
from labs.wireguard import Pair

from benchmarks.tunnels_lab import ADDRESSES, TunnelFailed, plain_tunnel
from benchmarks.wireguard import ROUNDS, tunnel_rtt

NAME = "latency-stages"

PINGS = 100
"""Pings per tunnel and round, :data:`INTERVAL` apart."""
INTERVAL = 0.05
"""Seconds between pings (20 per second: each packet finds the tunnel asleep)."""
SETTLE = 10.0
"""Seconds each tunnel runs before its capture starts: ``up``'s probes to the candidates that
never answer (the other host's LAN address) end about 8.5 s after the punch began, and they
must not share the CPU with the pings."""
WIREGUARD_SIZE = 128
"""UDP payload of one ping through WireGuard: the 84-byte IP packet padded to 96, a 16-byte
header and a 16-byte tag."""
STAGES = (
    "a: request from the TUN to the wire (wake-up, read, encrypt, send)",
    "network a -> b (both NATs)",
    "b: request from the wire to the TUN (wake-up, read, decrypt, write)",
    "b: the kernel answers the ping",
    "b: reply from the TUN to the wire",
    "network b -> a",
    "a: reply from the wire to the TUN",
    "round trip, first sighting to last",
)
"""The table's rows: the seven gaps between the eight sightings, then their sum."""
KINDS = ("plain", "userspace")
LABELS = {"plain": "plain wireguard-go", "userspace": "`up --hub`"}

_LINE = re.compile(r"^(\d+\.\d+) (\S+)\s+(In|Out)\s+IP6? (\S+) > (\S+): (.*)$")
_SEQ = re.compile(r"\bseq (\d+),")


@dataclass(frozen=True)
class Sighting:
    """One line of ``tcpdump -i any -n -tt``: when (seconds, the kernel's clock), on which
    interface, whether the packet was leaving it (``Out``), and the rest of the line."""

    time: float
    interface: str
    outgoing: bool
    summary: str


def parse_capture(text: str) -> list[Sighting]:
    """Return the IP packets of ``tcpdump -i any -n -tt`` output, in order; other lines (a
    header, an ARP packet, a line cut off when the capture stopped) are skipped."""
    sightings = []
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match is not None:
            sightings.append(Sighting(float(match[1]), match[2], match[3] == "Out", match[6]))
    return sightings


def _wireguard(outgoing: bool) -> Callable[[Sighting], bool]:
    def matches(seen: Sighting) -> bool:
        return (
            seen.interface == "eth0"
            and seen.outgoing == outgoing
            and seen.summary == f"UDP, length {WIREGUARD_SIZE}"
        )

    return matches


def _echo(interface: str, kind: str, seq: str) -> Callable[[Sighting], bool]:
    def matches(seen: Sighting) -> bool:
        found = _SEQ.search(seen.summary)
        return (
            seen.interface == interface
            and seen.summary.startswith(f"ICMP echo {kind},")
            and found is not None
            and found[1] == seq
        )

    return matches


def _first(sightings: Sequence[Sighting], after: float, test: Callable[[Sighting], bool]) -> float:
    for seen in sightings:
        if seen.time >= after and test(seen):
            return seen.time
    raise LookupError


def round_trips(
    a: Sequence[Sighting], b: Sequence[Sighting], tun_a: str, tun_b: str
) -> list[tuple[float, ...]]:
    """Follow each echo request on ``tun_a`` through the eight sightings (module docs) in a's
    and b's captures; return, per ping, the seven stages and the round trip in microseconds.
    A ping missing a sighting (lost, or cut off by the capture's end) is left out."""
    trips = []
    for request in a:
        found = _SEQ.search(request.summary)
        if request.interface != tun_a or found is None or "echo request" not in request.summary:
            continue
        seq = found[1]
        try:
            times = [request.time]
            times.append(_first(a, times[-1], _wireguard(outgoing=True)))
            times.append(_first(b, times[-1], _wireguard(outgoing=False)))
            times.append(_first(b, times[-1], _echo(tun_b, "request", seq)))
            times.append(_first(b, times[-1], _echo(tun_b, "reply", seq)))
            times.append(_first(b, times[-1], _wireguard(outgoing=True)))
            times.append(_first(a, times[-1], _wireguard(outgoing=False)))
            times.append(_first(a, times[-1], _echo(tun_a, "reply", seq)))
        except LookupError:
            continue
        gaps = [(later - earlier) * 1e6 for earlier, later in itertools.pairwise(times)]
        trips.append((*gaps, (times[-1] - times[0]) * 1e6))
    return trips


def report(trips: Mapping[str, Sequence[tuple[float, ...]]], rounds: int) -> str:
    """The Markdown section: each stage's median per tunnel (microseconds) and the difference."""
    medians = {
        kind: [statistics.median(column) for column in zip(*rows, strict=True)] if rows else None
        for kind, rows in trips.items()
    }
    lines = [
        "## Where a round trip goes: packet captures, plain wireguard-go against `up --hub`",
        "",
        "Two hosts behind the NAT lab's two port-restricted cones and a real `punchtrio hub`; "
        f"{PINGS} pings at {1 / INTERVAL:.0f} per second through each tunnel per round, once "
        f"it has run {SETTLE:.0f} s, {rounds} interleaved rounds, `tcpdump` in both hosts' "
        "namespaces. Medians over every "
        "ping, in microseconds, of the time between two sightings of the same ping (see "
        "`benchmarks/latency_stages.py`). Command: `.venv/bin/python -m benchmarks "
        "latency-stages` (root, with tcpdump).",
        "",
        f"| stage | {LABELS['plain']} | {LABELS['userspace']} | difference |",
        "|---|---:|---:|---:|",
    ]
    plain, ours = medians["plain"], medians["userspace"]
    for index, stage in enumerate(STAGES):
        cells = [f"{m[index]:.0f}" if m is not None else "-" for m in (plain, ours)]
        diff = f"{ours[index] - plain[index]:+.0f}" if plain and ours else "-"
        lines.append(f"| {stage} | {cells[0]} | {cells[1]} | {diff} |")
    counts = ", ".join(f"{LABELS[kind]} {len(rows)}" for kind, rows in trips.items())
    lines += ["", f"Pings followed through all eight sightings: {counts}."]
    return "\n".join(lines)


def _capture(
    hosts: tuple[Host, Host], workdir: Path, pair: Pair, tuns: tuple[str, str]
) -> list[tuple[float, ...]]:
    files = [workdir / f"capture-{index}.txt" for index in range(2)]
    time.sleep(SETTLE)
    captures = []
    try:
        for host, path in zip(hosts, files, strict=True):
            with path.open("w") as out:
                argv = host.ns.exec("tcpdump", "-i", "any", "-n", "-tt", "-l", "icmp or udp")
                captures.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # tcpdump attaches to every interface
        tunnel_rtt(pair, interval=INTERVAL, count=PINGS, address=ADDRESSES[1])
        time.sleep(0.3)
    finally:
        for capture in captures:
            capture.send_signal(signal.SIGINT)
            capture.wait(timeout=10)
    a, b = (parse_capture(path.read_text()) for path in files)
    return round_trips(a, b, *tuns)


def _one(
    net: Network, hosts: tuple[Host, Host], workdir: Path, kind: str, tag: str
) -> list[tuple[float, ...]]:
    net.flush_conntrack()
    pair = Pair(net.lab, hosts[0].ns, hosts[1].ns)
    tuns = (f"{net.lab.prefix}{tag}0", f"{net.lab.prefix}{tag}1")
    if kind == "plain":
        with plain_tunnel(net, hosts, tag):
            return _capture(hosts, workdir, pair, tuns)
    with running_pair(net, tag, *hosts, workdir, interfaces=tuns) as live:
        if live.result.seconds is None:
            raise TunnelFailed(f"failed: no ping through `up --hub`: {live.result.stderr}")
        return _capture(hosts, workdir, pair, tuns)


def run() -> str:
    """Capture :data:`~benchmarks.wireguard.ROUNDS` interleaved rounds of both tunnels in the
    NAT lab and return the Markdown section. Raises :class:`TunnelFailed` or ``LabError`` when
    a tunnel or the lab does not come up."""
    require_binaries("wireguard-go", "wg", "ping", "ip", "tcpdump")
    trips: dict[str, list[tuple[float, ...]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="pt-stages-") as tmp, build(["port", "port"]) as net:
        workdir = Path(tmp)
        start_hub(net, workdir / "hub.log")
        hosts = (net.requested[0].hosts[0], net.requested[1].hosts[0])
        for number in range(ROUNDS):
            order = KINDS if number % 2 == 0 else KINDS[::-1]
            for kind in order:
                trips[kind] += _one(net, hosts, workdir, kind, f"s{kind[0]}{number}")
    return report(trips, ROUNDS)
