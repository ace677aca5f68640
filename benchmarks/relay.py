"""The hub's relay in the real NAT lab: throughput, time to tunnel and relay -> direct upgrade (root).

One lab run (the punch matrix topology, ``punchtrio hub --relay``) measures:

- in :data:`ROUNDS` interleaved rounds, single-stream TCP (``iperf3``, :data:`SECONDS` long,
  a -> b through the tunnel addresses) for a direct pair (port/port), a pair relayed over UDP
  (sym/sym) and one relayed over TCP (udp-blocked/full: the blocked side reaches the relay over
  TCP, the other side over UDP), reported as ratios relay-UDP / direct and relay-TCP / relay-UDP,
  with the CPU time the hub and both peers spent meanwhile;
- for the same connections, the time from starting both ``punchtrio up`` to the first ping reply,
  beside the cost of starting two Python processes that import punchtrio (the baseline of
  ``benchmarks/punch_lab.py``);
- the upgrade: a port/port pair whose direct path is blocked (UDP between the two NATs dropped on
  the lab's internet) connects through the relay; a while after its first ping the block is lifted
  and the clock runs until both sides print ``path_changed`` relay -> direct, while a ping every
  50 ms through the tunnel counts what the switch loses. :data:`ROUNDS` runs lift it about
  :data:`BLOCKED_FOR_S` after the first ping (offsets spread over one probe interval, since the
  direct probes then go out once a second), one run after :data:`LONG_BLOCK_S`, when the first
  round of direct probes has failed and only the puncher's upgrade retry can find the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from labs.netns import LabError, require_binaries
from labs.scenarios.punch_matrix import (
    MATRIX_SPECS,
    LivePair,
    matrix_pairs,
    running_pair,
    start_coturn,
    start_hub,
)
from labs.topology import Host, Network, build, udp_blocked_between

from benchmarks.punch_lab import startup_seconds

NAME = "relay"
SECONDS = int(os.environ.get("PUNCHTRIO_BENCH_SECONDS", "5"))
"""Length of each iperf3 run in seconds (override with ``PUNCHTRIO_BENCH_SECONDS``)."""
ROUNDS = int(os.environ.get("PUNCHTRIO_BENCH_ROUNDS", "3"))
"""Interleaved rounds over the three pairs, and short-block upgrade runs
(``PUNCHTRIO_BENCH_ROUNDS``)."""
BLOCKED_FOR_S = 5.0
"""Seconds after its first ping the upgrade pair stays relayed (plus 0 to 1 s, spread over runs)."""
LONG_BLOCK_S = 15.0
"""The block of the last upgrade run: longer than the direct probes' first round (about 8.5 s)."""
UPGRADE_TIMEOUT_S = 30.0
PAIRS = {"direct": "port/port", "relay over UDP": "sym/sym", "relay over TCP": "udp-blocked/full"}
COTURN = ("coturn over UDP", "sym/sym")
"""The same symmetric pair, relayed by a real coturn instead (the hub then runs no relay)."""
COTURN_SECRET = "benchmark-turn-secret-0123"
TUNNEL_TARGET_S = 1.5
"""Goal for a relayed pair's first ping, in seconds after both sides are up (their ``up``
events: process started and tunnel device open; no relay change can shorten that part)."""
UPGRADE_TARGET_S = 5.0
RATIO_TARGET = 0.5


@dataclass
class _Pair:
    """What the rounds measured for one kind of pair."""

    mbits: list[float] = field(default_factory=list)
    first_ping: list[float] = field(default_factory=list)
    after_up: list[float] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"hub": [], "a": [], "b": []})
    lost: list[float] = field(default_factory=list)


@dataclass
class _Upgrade:
    """One upgrade run: seconds blocked after the first ping, seconds from lifting the block
    until both sides printed ``path_changed`` to direct, pings sent and lost meanwhile."""

    blocked: float
    seconds: float
    sent: int
    lost: int


def _after_up(pair: LivePair) -> float | None:
    """Seconds from the later of the two ``up`` events (both processes started, tunnel device
    open) to the first ping reply; ``None`` if either side printed none."""
    ups = []
    for name in pair.names:
        timed = zip(pair.arrived[name], pair.events[name], strict=False)  # arrived leads by one
        at = next((t for t, e in timed if e.get("event") == "up"), None)
        if at is None:
            return None
        ups.append(at - pair.started)
    if pair.result.seconds is None:
        return None
    return pair.result.seconds - max(ups)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (from ``/proc``)."""
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
    """Both sides' paths, e.g. ``relay (hub/tcp) / relay (hub/udp)``."""
    parts = []
    for name in pair.names:
        event = pair.result.connected(name)
        if event is None:
            parts.append("none")
        else:
            relay = f" ({event['relay']})" if "relay" in event else ""
            parts.append(f"{event['path']}{relay}")
    return " / ".join(parts)


def _transfer(pair: LivePair, hub_pid: int, into: _Pair) -> float | None:
    """Run :func:`_iperf` on ``pair`` and record its speed and the CPU shares (% of one core)."""
    pids = {"hub": hub_pid, "a": pair.procs[pair.names[0]].pid, "b": pair.procs[pair.names[1]].pid}
    before = {role: _cpu_seconds(pid) for role, pid in pids.items()}
    began = time.monotonic()
    speed = _iperf(pair)
    wall = time.monotonic() - began
    for role, pid in pids.items():
        into.cpu[role].append((_cpu_seconds(pid) - before[role]) / wall * 100)
    if speed is not None:
        into.mbits.append(speed)
    return speed


def _tunnel_loss(pair: LivePair) -> float | None:
    """The share of the bytes a's WireGuard sent to b that b's WireGuard did not receive, from
    both sides' ``down`` events (``None`` if either is missing). Counts the whole connection:
    the transfer, the pings and the handshake."""
    counts = []
    for name, key in zip(pair.names, ("tx_bytes", "rx_bytes"), strict=True):
        down = pair.events[name][-1] if pair.events[name] else {}
        peers = down.get("peers") if down.get("event") == "down" else None
        if not isinstance(peers, list) or len(peers) != 1:
            return None
        counts.append(int(peers[0][key]))
    sent, received = counts
    return None if sent == 0 else 1 - received / sent


def _ping_summary(text: str) -> tuple[int, int]:
    """(transmitted, received) from ping's summary line."""
    sent = received = 0
    for line in text.splitlines():
        if "packets transmitted" in line:
            parts = [part.split() for part in line.split(",")]
            sent, received = int(parts[0][0]), int(parts[1][0])
    return sent, received


def _upgrade(net: Network, a: Host, b: Host, blocked: float, slug: str, workdir: Path) -> _Upgrade:
    """One upgrade run with the direct path blocked until ``blocked`` seconds after the first
    ping. Raises LabError if the pair did not start on the relay or did not move to direct."""
    net.flush_conntrack()
    with contextlib.ExitStack() as block:
        block.enter_context(udp_blocked_between(net, a.nat, b.nat))
        with running_pair(net, slug, a, b, workdir) as pair:
            paths = _paths(pair)
            if pair.result.seconds is None or paths != "relay (hub/udp) / relay (hub/udp)":
                raise LabError(f"the upgrade pair did not start on the relay: {paths}")
            lift_at = pair.started + pair.result.seconds + blocked
            time.sleep(max(0.0, lift_at - time.monotonic()))
            pinger = subprocess.Popen(
                a.ns.exec("ping", "-n", "-q", "-i", "0.05", "-W", "1", "10.99.0.2"),
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                # Timed from just before the rule goes: a probe may cross while nft deletes it.
                lifted = time.monotonic()
                block.close()
                moved = []
                for name in pair.names:
                    found = pair.wait_for(
                        name, "path_changed", UPGRADE_TIMEOUT_S, lambda e: e["to"] == "direct"
                    )
                    if found is None:
                        raise LabError(f"{name}: no path_changed to direct: {pair.events[name]}")
                    moved.append(found[1] - lifted)
                time.sleep(1.0)  # a second of the direct path in the loss count
            finally:
                pinger.send_signal(2)  # SIGINT: ping prints its summary
                out, _ = pinger.communicate(timeout=10)
    sent, received = _ping_summary(out)
    return _Upgrade(blocked, max(moved), sent, sent - received)


def run() -> str:
    """Measure throughput, time to tunnel and the upgrade in one lab; return the Markdown section."""
    require_binaries("iperf3", "ping", "nft", "ip", "ss")
    measured = {kind: _Pair() for kind in PAIRS}
    failures: list[str] = []
    upgrades: list[_Upgrade] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pt-relay-") as tmp, build(MATRIX_SPECS) as net:
        hub = start_hub(net, Path(tmp) / "hub.log")
        pairs = matrix_pairs(net)
        base = statistics.median(startup_seconds(*pairs["sym/sym"]) for _ in range(ROUNDS))
        for round_number in range(ROUNDS):
            for kind, label in PAIRS.items():
                a, b = pairs[label]
                net.flush_conntrack()
                slug = f"{label.replace('/', '-')}-{round_number}"
                with running_pair(net, slug, a, b, Path(tmp)) as pair:
                    measured[kind].paths.add(_paths(pair))
                    if pair.result.seconds is None:
                        failures.append(f"{label} round {round_number}: no ping")
                        continue
                    measured[kind].first_ping.append(pair.result.seconds)
                    after = _after_up(pair)
                    if after is not None:
                        measured[kind].after_up.append(after)
                    speed = _transfer(pair, hub.pid, measured[kind])
                    if speed is None:
                        failures.append(f"{label} round {round_number}: iperf3 failed")
                lost = _tunnel_loss(pair)
                if lost is not None and speed is not None:
                    measured[kind].lost.append(lost * 100)
                print(f"    {label}: {_paths(pair)}, {pair.result.seconds}, {speed}", flush=True)
        a, b = pairs["port/port"]
        blocks = [BLOCKED_FOR_S + n / max(1, ROUNDS) for n in range(ROUNDS)] + [LONG_BLOCK_S]
        for number, blocked in enumerate(blocks):
            try:
                upgrades.append(_upgrade(net, a, b, blocked, f"upgrade-{number}", Path(tmp)))
                print(f"    upgrade: {upgrades[-1]}", flush=True)
            except LabError as error:
                failures.append(f"upgrade after {blocked:.1f} s: {error}")
        _through_coturn(net, hub, pairs[COTURN[1]], Path(tmp), measured, failures)
    return _section(measured, base, upgrades, failures, time.monotonic() - began)


def _through_coturn(
    net: Network,
    hub: subprocess.Popen[bytes],
    pair_hosts: tuple[Host, Host],
    workdir: Path,
    measured: dict[str, _Pair],
    failures: list[str],
) -> None:
    """The relayed pair again, through coturn: a hub without a relay that mints TURN credentials."""
    hub.terminate()
    hub.wait(timeout=15)
    uris, turnserver = start_coturn(net, workdir, COTURN_SECRET)
    secret = workdir / "turn.secret"
    secret.write_text(COTURN_SECRET + "\n")
    start_hub(net, workdir / "hub-turn.log", relay=False, turn=uris[:1], turn_secret_file=secret)
    kind, label = COTURN
    into = measured.setdefault(kind, _Pair())
    for round_number in range(ROUNDS):
        net.flush_conntrack()
        with running_pair(net, f"coturn-{round_number}", *pair_hosts, workdir) as pair:
            into.paths.add(_paths(pair))
            if pair.result.seconds is None:
                failures.append(f"{label} through coturn round {round_number}: no ping")
                continue
            into.first_ping.append(pair.result.seconds)
            after = _after_up(pair)
            if after is not None:
                into.after_up.append(after)
            speed = _transfer(pair, turnserver.pid, into)
            if speed is None:
                failures.append(f"{label} through coturn round {round_number}: iperf3 failed")
        lost = _tunnel_loss(pair)
        if lost is not None and speed is not None:
            into.lost.append(lost * 100)
        print(f"    coturn {label}: {_paths(pair)}, {pair.result.seconds}, {speed}", flush=True)


def _spread(values: list[float], unit: str, digits: int = 2) -> str:
    if not values:
        return "failed"
    median = statistics.median(values)
    return f"{median:.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


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
    measured: dict[str, _Pair],
    base: float,
    upgrades: list[_Upgrade],
    failures: list[str],
    took: float,
) -> str:
    rows = []
    for kind, label in [*PAIRS.items(), COTURN]:
        m = measured.get(kind, _Pair())
        median = statistics.median(m.first_ping) if m.first_ping else None
        beyond = "" if median is None else f"{median - base:.2f} s"
        after_up = statistics.median(m.after_up) if m.after_up else None
        target = "" if kind == "direct" else _verdict(after_up, TUNNEL_TARGET_S, at_least=False)
        cpu = " / ".join(
            f"{statistics.median(m.cpu[role]):.0f}" if m.cpu[role] else "-"
            for role in ("hub", "a", "b")
        )
        rows.append(
            f"| {label} ({kind}) | {', '.join(sorted(m.paths))} "
            f"| {_spread(m.mbits, ' Mbit/s', 0)} | {cpu} | {_spread(m.lost, ' %', 1)} "
            f"| {_spread(m.first_ping, ' s')} | {beyond} | {_spread(m.after_up, ' s')} "
            f"| {target} |"
        )
    udp_direct = _ratio(measured["relay over UDP"].mbits, measured["direct"].mbits)
    tcp_udp = _ratio(measured["relay over TCP"].mbits, measured["relay over UDP"].mbits)
    hub_coturn = _ratio(measured["relay over UDP"].mbits, measured.get(COTURN[0], _Pair()).mbits)
    short = [u for u in upgrades if u.blocked < LONG_BLOCK_S]
    long = [u for u in upgrades if u.blocked >= LONG_BLOCK_S]
    short_median = statistics.median(u.seconds for u in short) if short else None

    def ratio(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.2f}x"

    def runs(items: list[_Upgrade]) -> str:
        return "; ".join(
            f"blocked {u.blocked:.1f} s: {u.seconds:.2f} s, {u.lost} of {u.sent} pings lost"
            for u in items
        )

    lines = [
        "## The hub's relay: throughput, time to tunnel, upgrade to direct (`benchmarks/relay.py`)",
        "",
        "One NAT lab (the punch matrix topology, `punchtrio hub --relay 203.0.113.1:7778`), "
        f"{ROUNDS} interleaved rounds, a new pair of `punchtrio up --hub` each time; medians "
        f"(min-max). Throughput: one TCP stream (`iperf3 -t {SECONDS}`) a -> b through the tunnel "
        "(10.99.0.1 -> 10.99.0.2). sym/sym can only meet through the relay, both sides over UDP; "
        "in udp-blocked/full the blocked side reaches the relay over TCP and the other side over "
        "UDP; last, the same sym/sym pair through a real coturn (the hub restarted without its "
        "relay, minting coturn REST credentials), CPU of turnserver in the hub column. CPU: each process's CPU time during the transfer in % of one core (all threads). "
        "Tunnel bytes lost: 1 - (bytes b's WireGuard received) / (bytes a's WireGuard sent), "
        "from both sides' `down` events: datagrams lost on the way (the inner TCP slows down "
        "for each loss). "
        "First ping: from starting both `punchtrio up --hub` at once, as in "
        "`benchmarks/punch_lab.py`; the baseline, two Python processes importing punchtrio "
        f"started at once on the same hosts, took {base:.2f} s in this run; after both `up`: "
        "from the later of the two sides' `up` events (process started, tunnel device open) to "
        "the first ping, the time the pipeline and the relay set-up take, which the goal "
        f"(<= {TUNNEL_TARGET_S} s) is about (on a loaded machine the import baseline varies "
        "by seconds between runs, and `punchtrio up` does more than import before it starts "
        "its pipeline). Command: "
        "`.venv/bin/python -m benchmarks relay` (root). The machine has 2 cores shared with "
        "other work, and the peers, the hub and iperf3 all run on them: the numbers are noisy; "
        "the ratios, measured in the same run, are what to compare.",
        "",
        "| pair | paths (a / b) | TCP a -> b | CPU % hub / a / b | tunnel bytes lost a -> b "
        "| first ping | beyond the import baseline | after both `up` "
        f"| after both `up` <= {TUNNEL_TARGET_S} s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| ratio | measured | goal |",
        "|---|---|---|",
        f"| relay over UDP / direct | {ratio(udp_direct)} "
        f"| >= {RATIO_TARGET}x: {_verdict(udp_direct, RATIO_TARGET, at_least=True)} |",
        f"| relay over TCP / relay over UDP | {ratio(tcp_udp)} "
        f"| >= {RATIO_TARGET}x: {_verdict(tcp_udp, RATIO_TARGET, at_least=True)} |",
        f"| hub relay over UDP / coturn over UDP | {ratio(hub_coturn)} "
        f"| >= 1.0x: {_verdict(hub_coturn, 1.0, at_least=True)} |",
        "",
        "Upgrade to direct: a port/port pair with UDP between its two NATs dropped on the lab's "
        "internet connects through the relay; the block is lifted some seconds after the first "
        "ping, and the clock runs from lifting it until both sides printed `path_changed` relay "
        f"-> direct (goal <= {UPGRADE_TARGET_S:.0f} s), with a ping every 50 ms through the tunnel "
        "meanwhile. Lifted about 5 s after the first ping: "
        f"{_spread([u.seconds for u in short], ' s')}: "
        f"{_verdict(short_median, UPGRADE_TARGET_S, at_least=False)} ({runs(short) or 'failed'}). "
        f"Lifted {LONG_BLOCK_S:.0f} s after: {runs(long) or 'failed'}.",
        "",
        "The time depends on when the path opens. The direct pairs are probed for about 8.5 s "
        "after the punch starts (30 probes, 20 in the first second, then spaced out to one a "
        "second); a block lifted 5 s after connecting is found by the next of these probes, "
        "within a second. Once every direct pair has failed, the puncher probes them again "
        "2 s later, then 4, 8 ... up to 60 s after each failed round (each round again about "
        f"8.5 s of probes): the {LONG_BLOCK_S:.0f} s run is found by the first retry round, while "
        "a path that opens between two rounds waits for the next one (up to a minute after a "
        "long outage). The short blocks are spread over one second on purpose: the probes then "
        "go out once a second in step with the first ping (both follow the punch start), so a "
        "block always lifted exactly 5 s after the first ping would always end just before a "
        "probe. The block is a rule on the lab's internet bridge, not in a NAT, so both NATs "
        "keep their state and the hub stays reachable.",
    ]
    if failures:
        lines += ["", "Failures in this run: " + "; ".join(failures) + "."]
    lines += ["", f"Whole benchmark: {took:.0f} s."]
    return "\n".join(lines)
