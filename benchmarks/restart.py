"""Back through the tunnel after a restart, in the real NAT lab, beside a cold start.

Needs root (network namespaces, nftables). Two ``punchtrio up --hub`` behind two port-restricted
cone NATs; a real hub keeps its state on disk. A cold start is both ``up`` started at once, to
the first ping reply (pings every 50 ms). A restart stops one side (SIGTERM: it unregisters and
removes its TUN; SIGKILL: nothing is cleaned up, its record stays at the hub), starts it again
with the same key, name and port, and times the first ping reply from then; the other side keeps
running. Side ``a`` has the lower key and initiates the handshake, so restarting ``a`` and ``b``
covers both roles. Each restart is also timed from the restarted process's ``up`` event (its TUN
is up), which leaves out the Python start-up; the baseline, measured in the same run, is a bare
``punchtrio up --help`` on one host. Target: 2 s from the restart.

Then the NAT of one side forgets every mapping while pings run every 0.1 s through the tunnel,
once with ``conntrack -F`` alone and once as a NAT reboot (conntrack and the NAT's mapping sets
flushed, so the next mapping may take another public port); the outage is the gap between the
last reply before and the first after. Target: 5 s.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from labs import discovery
from labs.scenarios.restart import (
    Side,
    first_ping,
    forget_mappings,
    outage_around,
    pair,
    start_state_hub,
)
from labs.topology import Host, Network, build

NAME = "restart"
RUNS = 3
TARGET_S = 2.0
OUTAGE_TARGET_S = 5.0
FORGETTING = (("a", False), ("b", False), ("a", True), ("b", True))
PING_WITHIN_S = 30.0
SCENARIOS = (
    ("a", signal.SIGTERM),
    ("a", signal.SIGKILL),
    ("b", signal.SIGTERM),
    ("b", signal.SIGKILL),
)


def _startup(host: Host) -> float:
    start = time.monotonic()
    subprocess.run(
        host.ns.exec(*discovery.PUNCHTRIO, "up", "--help"), capture_output=True, check=False
    )
    return time.monotonic() - start


def _cold(net: Network, label: str, workdir: Path) -> tuple[tuple[Side, Side], float | None]:
    net.flush_conntrack()
    first, second = (nat.hosts[0] for nat in net.requested)
    alice, bob = pair(net, label, first, second, workdir)
    alice.start()
    bob.start()
    took = first_ping(alice.host, bob.tunnel_ip, PING_WITHIN_S)
    if took is not None:
        bob.wait_for("peer_connected", 5.0)
    return (alice, bob), took


def _restart(sides: tuple[Side, Side], who: str, how: int) -> tuple[float | None, float | None]:
    """Stop and start one side; return (seconds from the start, seconds from its ``up`` event)."""
    alice, bob = sides
    gone = alice if who == "a" else bob
    gone.stop(how)
    mark = len(gone.events)
    gone.start()
    took = first_ping(alice.host, bob.tunnel_ip, PING_WITHIN_S)
    if took is None:
        return None, None
    answered = gone.started + took
    up = gone.wait_for("up", 0.0, since=mark)
    return took, None if up is None else answered - up[1]


def _median(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "no reply"
    failed = len(values) - len(got)
    text = f"{statistics.median(got):.2f} s"
    return text if not failed else f"{text} ({failed} of {len(values)} got no reply)"


def run() -> str:
    """Measure :data:`RUNS` rounds and return the Markdown section."""
    cold: list[float | None] = []
    restarts: dict[tuple[str, int], list[tuple[float | None, float | None]]] = {
        s: [] for s in SCENARIOS
    }
    outages: dict[tuple[str, bool], list[float | None]] = {f: [] for f in FORGETTING}
    with (
        tempfile.TemporaryDirectory(prefix="pt-bench-restart-") as tmp,
        build(["port", "port"]) as net,
    ):
        workdir = Path(tmp)
        start_state_hub(net, workdir / "hub-state", workdir / "hub.log")
        host = net.requested[0].hosts[0]
        base = statistics.median(_startup(host) for _ in range(RUNS))
        for run_number in range(RUNS):
            sides, took = _cold(net, f"r{run_number}", workdir)
            cold.append(took)
            if took is None:
                for side in sides:
                    side.stop()
                continue
            for scenario in SCENARIOS:
                time.sleep(1.0)  # the tunnel runs a moment before the restart
                restarts[scenario].append(_restart(sides, *scenario))
            for who, reboot in FORGETTING:
                time.sleep(1.0)
                outages[(who, reboot)].append(_forget(sides, who, reboot))
            for side in sides:
                side.stop()
    cold_s = [c for c in cold if c is not None]
    cold_median = statistics.median(cold_s) if cold_s else None
    lines = [
        f"Two `punchtrio up` behind two port-restricted cone NATs, a real hub (SQLite state); "
        f"median of {RUNS} runs, pings every 50 ms. Python start-up (`punchtrio up --help` on "
        f"one host) in the same run: {base:.2f} s. Target: {TARGET_S:g} s from the restart.",
        "",
        "| what | to first ping | from its `up` event | ratio to a cold start |",
        "|---|---|---|---|",
        f"| cold start (both at once) | {_median(list(cold))} | | 1.00 |",
    ]
    for (who, how), results in restarts.items():
        role = "initiator" if who == "a" else "responder"
        total = [r[0] for r in results]
        since_up = [r[1] for r in results]
        got = [t for t in total if t is not None]
        ratio = f"{statistics.median(got) / cold_median:.2f}" if got and cold_median else "n/a"
        name = signal.Signals(how).name
        lines.append(
            f"| {name} of the {role}, started again | {_median(total)} | {_median(since_up)} "
            f"| {ratio} |"
        )
    lines += [
        "",
        f"| the NAT forgets, under traffic | outage | target {OUTAGE_TARGET_S:g} s |",
        "|---|---|---|",
    ]
    for (who, reboot), gaps in outages.items():
        role = "initiator" if who == "a" else "responder"
        what = "reboot (mapping sets too)" if reboot else "`conntrack -F`"
        lines.append(f"| {what}, the {role}'s NAT | {_median(gaps)} | |")
    return "\n".join(lines)


def _forget(sides: tuple[Side, Side], who: str, reboot: bool) -> float | None:
    """The outage of pings a -> b while ``who``'s NAT forgets its mappings."""
    a, b = sides
    nat = (a if who == "a" else b).host.nat
    return outage_around(a.host, b.tunnel_ip, lambda: forget_mappings(nat, reboot=reboot)).outage
