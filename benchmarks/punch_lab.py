"""Time to tunnel in the real NAT lab: two ``punchtrio up --hub`` started at once, to the first ping.

Needs root (network namespaces, nftables). For each NAT pair, both ``up`` processes start at the
same moment; the clock stops at the first ping reply through the tunnel (pings every 50 ms). The
baseline, measured in the same run on the same hosts, is the cost of starting two Python
processes that import punchtrio (``punchtrio up --help`` on both hosts at once): what remains is
STUN, registration, the punch and the WireGuard handshake. The issue's target is 1.5 s.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from labs import discovery
from labs.scenarios.punch_matrix import MATRIX_SPECS, matrix_pairs, run_pair, start_hub
from labs.topology import Host, build

NAME = "punch-lab"
RUNS = 3
PAIRS = ("port/port", "full/sym", "same-nat")
TARGET_S = 1.5


def startup_seconds(a: Host, b: Host) -> float:
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


def run() -> str:
    """Measure each pair :data:`RUNS` times and return the Markdown section."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="pt-bench-") as tmp, build(MATRIX_SPECS) as net:
        start_hub(net)
        pairs = matrix_pairs(net)
        for label in PAIRS:
            a, b = pairs[label]
            times, paths = [], set()
            base = statistics.median(startup_seconds(a, b) for _ in range(RUNS))
            for run_number in range(RUNS):
                net.flush_conntrack()
                slug = f"{label.replace('/', '-')}-{run_number}"
                result = run_pair(net, slug, a, b, Path(tmp))
                if result.seconds is not None:
                    times.append(result.seconds)
                paths.add(f"{result.path(slug + '-a')}/{result.path(slug + '-b')}")
            if not times:
                rows.append(
                    f"| {label} | {', '.join(sorted(paths))} | no reply | | {base:.2f} s | |"
                )
                continue
            median = statistics.median(times)
            rows.append(
                f"| {label} | {', '.join(sorted(paths))} | {median:.2f} s "
                f"({min(times):.2f}-{max(times):.2f}) | {median / TARGET_S:.2f}x | {base:.2f} s "
                f"| {median - base:.2f} s |"
            )
    return "\n".join(
        [
            "## Time to tunnel in the NAT lab (`benchmarks/punch_lab.py`)",
            "",
            "Both `punchtrio up --hub` started at once behind real kernel NATs (see `docs/lab.md`),"
            " until the first ping reply through the tunnel; median of "
            f"{RUNS} runs (min-max). Baseline: two Python processes importing punchtrio started at"
            " once on the same hosts (`punchtrio up --help`), in the same run.",
            "",
            "| pair | paths (a/b) | first ping | vs 1.5 s target | baseline: startup | beyond startup |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
