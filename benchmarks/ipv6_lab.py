"""Time to tunnel on IPv6 in the real NAT lab: an IPv6-only pair against the IPv4 pair, same run.

Needs root (network namespaces, nftables). One lab holds both pairs and one dual-stack hub: two
IPv6-only hosts behind stateful firewalls (``NatSpec("firewall")``: global addresses, no
translation) and two IPv4 hosts behind port-restricted cone NATs (``port``). The pairs take turns,
:data:`RUNS` times each; every run starts both ``punchtrio up --hub`` at the same moment and stops
the clock at the first ping reply through the tunnel (pings every 50 ms), as
``benchmarks/punch_lab.py`` does. Python's start-up is most of that time on a loaded machine, so
the connector's own time is shown too: ``elapsed_ms`` of ``peer_connected`` (from the connector's
start) on the side that connected first, i.e. the one that started last and did not wait for its
peer to register: STUN, registration, the punch and the handshake. The ratios are IPv6 over IPv4
of the medians.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from labs.scenarios.punch_matrix import run_pair, start_hub
from labs.topology import Host, NatSpec, Network, build

NAME = "ipv6-lab"
RUNS = 5
SPECS = (NatSpec("port"), NatSpec("port"), NatSpec("firewall"), NatSpec("firewall"))


def _measure(
    net: Network, label: str, a: Host, b: Host, workdir: Path
) -> tuple[float | None, float | None, str]:
    """One run: seconds to first ping, the connector's seconds (see the module), the paths."""
    net.flush_conntrack()
    result = run_pair(net, label, a, b, workdir)
    names = (f"{label}-a", f"{label}-b")
    elapsed = [str(event["elapsed_ms"]) for event in map(result.connected, names) if event]
    connector = min(float(ms) for ms in elapsed) / 1000 if len(elapsed) == 2 else None
    return result.seconds, connector, "/".join(str(result.path(name)) for name in names)


def run() -> str:
    """Measure both pairs :data:`RUNS` times, interleaved, and return the Markdown section."""
    times: dict[str, list[float]] = {"IPv4 port/port": [], "IPv6-only firewall/firewall": []}
    beyond: dict[str, list[float]] = {label: [] for label in times}
    seen: dict[str, set[str]] = {label: set() for label in times}
    failed: dict[str, int] = dict.fromkeys(times, 0)
    with tempfile.TemporaryDirectory(prefix="pt-bench6-") as tmp, build(SPECS) as net:
        start_hub(net)
        hosts = [nat.hosts[0] for nat in net.requested]
        pairs = dict(zip(times, ((hosts[0], hosts[1]), (hosts[2], hosts[3])), strict=True))
        for number in range(RUNS):
            for label, (a, b) in pairs.items():
                slug = f"{'v4' if label.startswith('IPv4') else 'v6'}-{number}"
                seconds, connector, path = _measure(net, slug, a, b, Path(tmp))
                seen[label].add(path)
                if seconds is None or connector is None:
                    failed[label] += 1
                else:
                    times[label].append(seconds)
                    beyond[label].append(connector)
    rows = []
    medians: dict[str, tuple[float, float]] = {}
    for label, values in times.items():
        if not values:
            rows.append(f"| {label} | {', '.join(sorted(seen[label]))} | no reply | | {RUNS} |")
            continue
        medians[label] = statistics.median(values), statistics.median(beyond[label])
        rows.append(
            f"| {label} | {', '.join(sorted(seen[label]))} | {medians[label][0]:.2f} s "
            f"({min(values):.2f}-{max(values):.2f}) | {medians[label][1]:.2f} s "
            f"({min(beyond[label]):.2f}-{max(beyond[label]):.2f}) | {failed[label]} |"
        )
    if len(medians) == 2:
        (v4, v4_beyond), (v6, v6_beyond) = medians.values()
        ratio = (
            f"IPv6-only / IPv4: **{v6 / v4:.2f}x** to first ping,"
            f" {v6_beyond / v4_beyond:.2f}x in the connector."
        )
    else:
        ratio = "IPv6-only / IPv4: not measured (a pair never pinged)."
    return "\n".join(
        [
            "## Time to tunnel on IPv6 in the NAT lab (`benchmarks/ipv6_lab.py`)",
            "",
            "Both `punchtrio up --hub` started at once, until the first ping reply through the"
            " tunnel; an IPv6-only pair behind stateful firewalls against an IPv4 pair behind"
            f" port-restricted NATs, one dual-stack hub, taking turns; median of {RUNS} runs"
            " (min-max). Connector: `peer_connected`'s `elapsed_ms` on the side that connected"
            " first (start-up excluded).",
            "",
            "| pair | paths (a/b) | first ping | connector | no reply |",
            "|---|---|---|---|---|",
            *rows,
            "",
            ratio,
            "",
            "Run: `.venv/bin/python -m benchmarks ipv6-lab` (as root).",
        ]
    )
