"""Birthday punching with real kernel NATs: port-restricted cone against ``masquerade fully-random``.

Needs root (network namespaces, nftables, conntrack). Each trial forgets both NATs' state, starts
two ``punchtrio up --hub`` at once (one behind the lab's ``port`` NAT, one behind its ``sym`` NAT;
both orders), and stops the clock when both sides report the direct path (``peer_connected`` with
``path`` ``direct``, or ``path_changed`` to ``direct``). The probes the easy side sent are counted
by the kernel, not by punchtrio: the port-restricted NAT's conntrack table holds one entry per
port of the symmetric NAT's address that the easy side sent to (its ordinary pings to the
server-reflexive candidates included), read right after both sides went direct. Beside it, the
birthday arithmetic's prediction for the same settings, measured in the same run:
:func:`punchtrio.punch.birthday_success` and the median probes of
:func:`punchtrio.punch.simulate_birthday`. Goals: at least 95% direct, a median of at most 5 s.

Most of the time from the start is two interpreters importing punchtrio, so two more columns are
measured in the same run: the time from the later ``punch_started`` to both sides direct (the
punch's own share), and the baseline of ``benchmarks/punch_lab.py`` (two ``punchtrio up --help``
started at once on the same hosts).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from labs.scenarios.punch_matrix import LivePair, running_pair, start_hub
from labs.topology import Host, Nat, build

from benchmarks.punch_lab import startup_seconds
from punchtrio.punch import BirthdaySettings, birthday_success, simulate_birthday

NAME = "birthday-lab"
TRIALS = 10
"""Trials per order (port behind a, sym behind b, and the other way round)."""
DIRECT_WITHIN_S = 30.0
"""A trial that has not reached the direct path on both sides this long after the start fails."""
GOAL_RATE = 0.95
GOAL_MEDIAN_S = 5.0


@dataclass
class LabTrial:
    """One trial: seconds from starting both ``up`` to both sides direct (``None``: not within
    :data:`DIRECT_WITHIN_S`), seconds from the later ``punch_started`` to the same moment, and
    the distinct ports of the hard NAT's address that the easy NAT saw the easy side send to."""

    order: str
    seconds: float | None
    punch_seconds: float | None
    ports_probed: int


def punch_started_at(pair: LivePair) -> float | None:
    """Seconds from ``pair.started`` to the later side's first ``punch_started``, or ``None``."""
    instants = []
    for name in pair.names:
        found = pair.wait_for(name, "punch_started", 0.0)
        if found is None:
            return None
        instants.append(found[1])
    return max(instants) - pair.started


def direct_since_start(pair: LivePair, timeout: float) -> float | None:
    """Seconds from ``pair.started`` until both sides reported the direct path, or ``None``."""

    def is_direct(event: dict[str, object]) -> bool:
        kind = event["event"]
        return (kind == "peer_connected" and event.get("path") == "direct") or (
            kind == "path_changed" and event.get("to") == "direct"
        )

    instants = []
    for name in pair.names:
        left = max(0.0, pair.started + timeout - time.monotonic())
        found = None
        for event in ("peer_connected", "path_changed"):
            found = pair.wait_for(name, event, left if event == "path_changed" else 0.0, is_direct)
            if found is not None:
                break
        if found is None:
            return None
        instants.append(found[1])
    return max(instants) - pair.started


_ORIGINAL = re.compile(r"src=(\S+) dst=(\S+) sport=\d+ dport=(\d+)")


def ports_probed(easy_nat: Nat, easy: Host, hard_ip: str) -> int:
    """Distinct ports of ``hard_ip`` that ``easy`` sent UDP to, from ``easy_nat``'s conntrack."""
    ports = set()
    for line in easy_nat.conntrack().splitlines():
        found = _ORIGINAL.search(line)
        if found is not None and found.group(1) == easy.ip and found.group(2) == hard_ip:
            ports.add(int(found.group(3)))
    return len(ports)


def run_trials(trials: int = TRIALS) -> tuple[list[LabTrial], float]:
    """Run ``trials`` trials per order in one lab; return them (port/sym first) and the median
    startup baseline (seconds) measured beside them."""
    out = []
    baselines = []
    with tempfile.TemporaryDirectory(prefix="pt-bday-") as tmp, build(["port", "sym"]) as net:
        start_hub(net, Path(tmp) / "hub.log")
        port_nat, sym_nat = net.requested
        port_host, sym_host = port_nat.hosts[0], sym_nat.hosts[0]
        for order, (a, b) in (
            ("port/sym", (port_host, sym_host)),
            ("sym/port", (sym_host, port_host)),
        ):
            for number in range(trials):
                baselines.append(startup_seconds(a, b))
                net.flush_conntrack()
                label = f"bd{order.replace('/', '')}{number}"
                with running_pair(net, label, a, b, Path(tmp)) as pair:
                    seconds = direct_since_start(pair, DIRECT_WITHIN_S)
                    probed = ports_probed(port_nat, port_host, sym_nat.public_ip)
                    punched = punch_started_at(pair)
                punch = None if seconds is None or punched is None else seconds - punched
                out.append(LabTrial(order, seconds, punch, probed))
                took = "not direct" if seconds is None else f"{seconds:.2f} s"
                print(f"  {order} #{number + 1}: {took}, {probed} ports probed", flush=True)
                if seconds is None:
                    for name in pair.names:
                        print(f"    {name}: {pair.events[name]}", flush=True)
    return out, statistics.median(baselines)


def run() -> str:
    """Run :data:`TRIALS` trials per order and return the Markdown section."""
    trials, baseline = run_trials()
    settings = BirthdaySettings()
    low, high = settings.port_range
    predicted = birthday_success(settings.sockets, settings.max_probes, high - low + 1)
    simulated = simulate_birthday(2000, seed=1, settings=settings)
    rows = []
    for order in ("port/sym", "sym/port"):
        mine = [t for t in trials if t.order == order]
        won = [t for t in mine if t.seconds is not None]
        rate = len(won) / len(mine)
        if won:
            times = sorted(t.seconds for t in won if t.seconds is not None)
            punches = sorted(t.punch_seconds for t in won if t.punch_seconds is not None)
            median = statistics.median(times)
            probes = statistics.median(t.ports_probed for t in won)
            timing = f"{median:.2f} s ({times[0]:.2f}-{times[-1]:.2f})"
            vs_goal = f"{median / GOAL_MEDIAN_S:.2f}x"
            punch = f"{statistics.median(punches):.2f} s" if punches else ""
        else:
            timing, vs_goal, probes, punch = "none direct", "", 0, ""
        rows.append(
            f"| {order} | {len(won)}/{len(mine)} ({rate:.0%}) | {timing} | {vs_goal} | "
            f"{punch} | {baseline:.2f} s | {probes:g} | {simulated.median_probes:g} |"
        )
    return "\n".join(
        [
            "## Birthday punching in the NAT lab (`benchmarks/birthday_lab.py`)",
            "",
            "Real `punchtrio up --hub` pairs behind the lab's port-restricted cone (`port`) and"
            " `masquerade fully-random` (`sym`) NATs, both orders, "
            f"{TRIALS} trials each: time from starting both processes until both report the"
            " direct path, and the ports of the symmetric NAT's address that the easy side sent"
            " to (the easy NAT's conntrack table, ordinary pings included). Goals:"
            f" ≥ {GOAL_RATE:.0%} direct, median ≤ {GOAL_MEDIAN_S:g} s. The arithmetic's"
            f" prediction for {settings.sockets} mappings and {settings.max_probes} probes:"
            f" {predicted:.2%} success; `simulate_birthday` (2000 trials) measured"
            f" {simulated.rate:.2%} and a median of {simulated.median_probes:g} probes per"
            " success.",
            "",
            "| order (a/b) | direct | median time to direct (min-max) | vs 5 s goal"
            " | from punch start | baseline: startup | median ports probed"
            " | predicted median probes |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
