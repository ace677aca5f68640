"""The hub's relay in the real NAT lab: throughput, time to tunnel and relay -> direct upgrade (root).

One lab run (the punch matrix topology, ``punchtrio hub --relay``) measures, in interleaved
rounds:

- single-stream TCP (``iperf3``, ``SECONDS`` long, a -> b through the tunnel addresses) for a
  direct pair (port/port), a pair relayed over UDP (sym/sym) and one relayed over TCP
  (udp-blocked/full: the blocked side reaches the relay over TCP, the other side over UDP);
  reported as ratios relay-UDP / direct and relay-TCP / relay-UDP;
- the time from starting both ``punchtrio up`` to the first ping reply for each pair, beside the
  cost of starting two Python processes that import punchtrio (the baseline of
  ``benchmarks/punch_lab.py``);
- the upgrade: a port/port pair whose direct path is blocked (UDP between the two NATs dropped on
  the lab's internet) connects through the relay; ``BLOCKED_FOR_S`` after its first ping the block
  is lifted, and the clock runs until both sides print ``path_changed`` relay -> direct, while a
  ping every 50 ms counts what the switch loses.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from labs import discovery
from labs.netns import LabError, require_binaries
from labs.scenarios.punch_matrix import (
    MATRIX_SPECS,
    LivePair,
    matrix_pairs,
    running_pair,
    start_hub,
)
from labs.topology import Host, Network, build, udp_blocked_between

NAME = "relay"
SECONDS = int(os.environ.get("PUNCHTRIO_BENCH_SECONDS", "5"))
"""Length of each iperf3 run in seconds (override with ``PUNCHTRIO_BENCH_SECONDS``)."""
ROUNDS = int(os.environ.get("PUNCHTRIO_BENCH_ROUNDS", "3"))
"""Interleaved rounds over the three pairs, and upgrade runs (``PUNCHTRIO_BENCH_ROUNDS``)."""
BLOCKED_FOR_S = 5.0
"""How long after its first ping the upgrade pair stays relayed before the block is lifted."""
UPGRADE_TIMEOUT_S = 30.0
PAIRS = {"direct": "port/port", "relay over UDP": "sym/sym", "relay over TCP": "udp-blocked/full"}
TUNNEL_TARGET_S = 1.5
UPGRADE_TARGET_S = 5.0
RATIO_TARGET = 0.5


def _startup(a: Host, b: Host) -> float:
    """Seconds until two ``punchtrio up --help`` started at once (one per host) have both exited."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            host.ns.exec(*discovery.PUNCHTRIO, "up", "--help"), stdout=subprocess.DEVNULL
        )
        for host in (a, b)
    ]
    for proc in procs:
        proc.wait()
    return time.monotonic() - start


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (from ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _iperf(pair: LivePair) -> float | None:
    """Single-stream TCP a -> b (10.99.0.2) for :data:`SECONDS`, in Mbit/s; ``None`` on failure."""
    b, a = pair.b.ns, pair.a.ns
    server = subprocess.Popen(
        b.exec("iperf3", "-s", "-1", "-B", "10.99.0.2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while "10.99.0.2:5201" not in b.run("ss", "-H", "-tln"):
            if time.monotonic() > deadline:
                raise LabError("iperf3 server did not start")
            time.sleep(0.05)
        argv = ["iperf3", "-c", "10.99.0.2", "-t", str(SECONDS), "-J", "--connect-timeout", "5000"]
        out = subprocess.run(
            a.exec(*argv), capture_output=True, text=True, check=False, timeout=SECONDS + 30
        )
        try:
            result = json.loads(out.stdout)
        except ValueError:
            return None
        if "error" in result:
            print(f"    iperf3 {pair.label}: {result['error']}", flush=True)
            return None
        return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=10)


def _paths(pair: LivePair) -> str:
    """``path(relay)`` of both sides, e.g. ``relay (hub/tcp) / relay (hub/udp)``."""
    parts = []
    for name in pair.names:
        event = pair.result.connected(name)
        if event is None:
            parts.append("none")
        else:
            relay = f" ({event['relay']})" if "relay" in event else ""
            parts.append(f"{event['path']}{relay}")
    return " / ".join(parts)


def _upgrade(net: Network, a: Host, b: Host, slug: str, workdir: Path) -> tuple[float, int, int]:
    """One upgrade run: (seconds from lifting the block until both sides printed
    ``path_changed`` relay -> direct, pings sent and lost meanwhile). Raises LabError if the pair
    did not start on the relay or did not move."""
    net.flush_conntrack()
    with contextlib.ExitStack() as block:
        block.enter_context(udp_blocked_between(net, a.nat, b.nat))
        with running_pair(net, slug, a, b, workdir) as pair:
            paths = _paths(pair)
            if pair.result.seconds is None or not paths.startswith("relay"):
                raise LabError(f"upgrade pair did not start on the relay: {paths}")
            time.sleep(
                max(0.0, pair.started + pair.result.seconds + BLOCKED_FOR_S - time.monotonic())
            )
            pinger = subprocess.Popen(
                a.ns.exec("ping", "-n", "-q", "-i", "0.05", "-W", "1", "10.99.0.2"),
                stdout=subprocess.PIPE,
                text=True,
            )
            block.close()
            lifted = time.monotonic()
            moved = []
            for name in pair.names:
                found = pair.wait_for(
                    name, "path_changed", UPGRADE_TIMEOUT_S, lambda e: e["to"] == "direct"
                )
                if found is None:
                    pinger.terminate()
                    pinger.communicate()
                    raise LabError(f"{name}: no path_changed to direct: {pair.events[name][-3:]}")
                moved.append(found[1] - lifted)
            time.sleep(1.0)  # a second of the direct path in the loss count
            pinger.send_signal(2)  # SIGINT: ping prints its summary
            out, _ = pinger.communicate(timeout=10)
    sent = received = 0
    for part in out.replace("\n", ",").split(","):
        words = part.split()
        if len(words) >= 2 and words[1] == "packets" and words[-1] == "transmitted":
            sent = int(words[0])
        if len(words) == 2 and words[1] == "received":
            received = int(words[0])
    return max(moved), sent, sent - received


def _median(values: list[float]) -> str:
    if not values:
        return "failed"
    return f"{statistics.median(values):.2f}"


def _spread(values: list[float], unit: str, digits: int = 2) -> str:
    if not values:
        return "failed"
    median = statistics.median(values)
    return f"{median:.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def run() -> str:
    """Measure throughput, time to tunnel and the upgrade in one lab; return the Markdown section."""
    require_binaries("iperf3", "ping", "nft", "ip", "ss")
    mbits: dict[str, list[float]] = {kind: [] for kind in PAIRS}
    tunnel: dict[str, list[float]] = {kind: [] for kind in PAIRS}
    paths: dict[str, set[str]] = {kind: set() for kind in PAIRS}
    hub_cpu: dict[str, list[float]] = {kind: [] for kind in PAIRS}
    failures: list[str] = []
    upgrades: list[tuple[float, int, int]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pt-relay-") as tmp, build(MATRIX_SPECS) as net:
        hub = start_hub(net, Path(tmp) / "hub.log")
        pairs = matrix_pairs(net)
        base = statistics.median(_startup(*pairs["sym/sym"]) for _ in range(ROUNDS))
        for round_number in range(ROUNDS):
            for kind, label in PAIRS.items():
                a, b = pairs[label]
                net.flush_conntrack()
                slug = f"{label.replace('/', '-')}-{round_number}"
                with running_pair(net, slug, a, b, Path(tmp)) as pair:
                    paths[kind].add(_paths(pair))
                    if pair.result.seconds is None:
                        failures.append(f"{label} round {round_number}: no ping")
                        continue
                    tunnel[kind].append(pair.result.seconds)
                    cpu, wall = _cpu_seconds(hub.pid), time.monotonic()
                    speed = _iperf(pair)
                    hub_cpu[kind].append(
                        (_cpu_seconds(hub.pid) - cpu) / (time.monotonic() - wall) * 100
                    )
                    if speed is None:
                        failures.append(f"{label} round {round_number}: iperf3 failed")
                    else:
                        mbits[kind].append(speed)
                print(f"    {label}: {_paths(pair)}, {pair.result.seconds}, {speed}", flush=True)
        a, b = pairs["port/port"]
        for round_number in range(ROUNDS):
            try:
                upgrades.append(_upgrade(net, a, b, f"upgrade-{round_number}", Path(tmp)))
            except LabError as error:
                failures.append(f"upgrade round {round_number}: {error}")
            print(f"    upgrade: {upgrades[-1:]}", flush=True)
    took = time.monotonic() - began
    return _section(mbits, tunnel, paths, hub_cpu, base, upgrades, failures, took)


def _ratio(top: list[float], bottom: list[float]) -> float | None:
    if not top or not bottom:
        return None
    return statistics.median(top) / statistics.median(bottom)


def _verdict(value: float | None, target: float, *, at_least: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if at_least else value <= target
    return "meets" if met else "misses"


def _section(
    mbits: dict[str, list[float]],
    tunnel: dict[str, list[float]],
    paths: dict[str, set[str]],
    hub_cpu: dict[str, list[float]],
    base: float,
    upgrades: list[tuple[float, int, int]],
    failures: list[str],
    took: float,
) -> str:
    relay_direct = _ratio(mbits["relay over UDP"], mbits["direct"])
    tcp_udp = _ratio(mbits["relay over TCP"], mbits["relay over UDP"])
    rows = []
    for kind, label in PAIRS.items():
        first = tunnel[kind]
        median = statistics.median(first) if first else None
        target = "" if kind == "direct" else _verdict(median, TUNNEL_TARGET_S, at_least=False)
        beyond = "" if median is None else f"{median - base:.2f} s"
        rows.append(
            f"| {label} ({kind}) | {', '.join(sorted(paths[kind]))} "
            f"| {_spread(mbits[kind], 'Mbit/s', 0)} | {_median(hub_cpu[kind])} % "
            f"| {_spread(first, 's')} | {beyond} | {target} |"
        )
    switch = [u[0] for u in upgrades]
    upgrade_median = statistics.median(switch) if switch else None
    lost = ", ".join(f"{u[2]} of {u[1]}" for u in upgrades) or "not measured"
    fmt = "not measured"
    lines = [
        "## The hub's relay: throughput, time to tunnel, upgrade to direct (`benchmarks/relay.py`)",
        "",
        "One NAT lab (the punch matrix topology, `punchtrio hub --relay 203.0.113.1:7778`), "
        f"{ROUNDS} interleaved rounds; medians (min-max). Throughput: one TCP stream "
        f"(`iperf3 -t {SECONDS}`) a -> b through the tunnel (10.99.0.1 -> 10.99.0.2). "
        "sym/sym can only meet through the relay, both sides over UDP; in udp-blocked/full the "
        "blocked side reaches the relay over TCP and the other over UDP. First ping: from "
        "starting both `punchtrio up --hub` at once, as in `benchmarks/punch_lab.py`; baseline: "
        f"two Python processes importing punchtrio started at once, {base:.2f} s (same run). "
        "Hub CPU: the hub process's CPU time during the transfer, in % of one core. "
        "Command: `.venv/bin/python -m benchmarks relay` (root). The machine has 2 cores shared "
        "with other work, and the two peers, the hub and iperf3 all run on them: the numbers are "
        "noisy, read the ratios.",
        "",
        "| pair | paths (a / b) | TCP a -> b | hub CPU | first ping | beyond startup "
        f"| first ping <= {TUNNEL_TARGET_S} s |",
        "|---|---|---|---:|---|---|---|",
        *rows,
        "",
        "| ratio | measured | goal |",
        "|---|---|---|",
        f"| relay over UDP / direct | {fmt if relay_direct is None else f'{relay_direct:.2f}x'} "
        f"| >= {RATIO_TARGET}x: {_verdict(relay_direct, RATIO_TARGET, at_least=True)} |",
        f"| relay over TCP / relay over UDP | {fmt if tcp_udp is None else f'{tcp_udp:.2f}x'} "
        f"| >= {RATIO_TARGET}x: {_verdict(tcp_udp, RATIO_TARGET, at_least=True)} |",
        "",
        f"Upgrade (port/port with UDP between the two NATs dropped on the lab's internet, lifted "
        f"{BLOCKED_FOR_S:.0f} s after the first ping over the relay): from lifting the block until "
        f"both sides printed `path_changed` relay -> direct, {_spread(switch, 's')}; goal <= "
        f"{UPGRADE_TARGET_S:.0f} s: "
        f"{_verdict(upgrade_median, UPGRADE_TARGET_S, at_least=False)}. Pings every 50 ms "
        f"across the switch, lost per run: {lost}. The time depends on how long the path was "
        "blocked: direct pairs are probed for about 8.5 s after the punch starts (30 probes, "
        "spaced up to 1 s apart), so a block lifted 5 s after connecting is found by a probe "
        "that is still running; once every direct pair has failed, the puncher retries after "
        "2 s, then 4, 8 ... up to 60 s, so a path that opens later waits for the next retry.",
    ]
    if failures:
        lines += ["", "Failures in this run: " + "; ".join(failures) + "."]
    lines += ["", f"Whole benchmark: {took:.0f} s."]
    return "\n".join(lines)
