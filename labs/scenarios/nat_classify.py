"""Build one NAT of every kind and print how each tool classifies it, beside the intended kind."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from labs import discovery
from labs.netns import LabError, require_binaries
from labs.topology import EXPECTED, KINDS, Network, build

NAME = "nat-classify"
DESCRIPTION = (
    "every NAT kind, classified by punchtrio nat (our server, coturn), coturn, stun, udpprobe"
)

_SHORT = {
    "endpoint-independent": "EI",
    "address-dependent": "AD",
    "address-and-port-dependent": "APD",
    "dependent": "D",
}


def _cell(report: dict[str, object]) -> str:
    mapping = _SHORT.get(str(report.get("mapping")), str(report.get("mapping")))
    filtering = _SHORT.get(str(report.get("filtering")), "-")
    return f"{mapping}/{filtering}"


def _column(
    net: Network, start: Callable[..., discovery.Probe], server: discovery.Server
) -> list[str]:
    hosts = [net.requested[index].hosts[0] for index in range(len(KINDS))]
    cells = []
    for host, probe in zip(hosts, [start(host, server) for host in hosts], strict=True):
        try:
            cells.append(_cell(probe.result()))
        except LabError as exc:
            print(f"{NAME}: {host.nat.kind}: {exc}", file=sys.stderr)
            cells.append("error")
    return cells


def run() -> int:
    """Build the four NAT kinds, classify each with every tool, print a Markdown table."""
    require_binaries("turnserver", "turnutils_natdiscovery", "stun")
    with tempfile.TemporaryDirectory(prefix="pt-nat-classify-") as tmp, build(KINDS) as net:
        ours = discovery.start_punchtrio_stun(net, 5478, 5479, log=Path(tmp) / "stun-server.log")
        coturn = discovery.start_coturn(net, Path(tmp) / "coturn")
        reflector = discovery.start_reflector(net)
        columns: dict[str, tuple[Callable[..., discovery.Probe], discovery.Server]] = {
            "punchtrio nat → punchtrio stun-server": (discovery.start_punchtrio_nat, ours),
            "punchtrio nat → coturn": (discovery.start_punchtrio_nat, coturn),
            "turnutils_natdiscovery → coturn": (discovery.start_coturn_natdiscovery, coturn),
            "stun → punchtrio stun-server": (discovery.start_stun_client, ours),
            "stun → coturn": (discovery.start_stun_client, coturn),
            "udpprobe (ground truth)": (discovery.start_udpprobe_classify, reflector),
        }
        table: dict[str, list[str]] = {}
        for title, (start, server) in columns.items():
            net.flush_conntrack()
            table[title] = _column(net, start, server)
    expected = [_cell({"mapping": m, "filtering": f}) for m, f in (EXPECTED[k] for k in KINDS)]
    print("mapping/filtering: EI endpoint-independent, AD address-dependent,")
    print("APD address-and-port-dependent, D dependent (RFC 3489 cannot say which)\n")
    print("| kind | intended | " + " | ".join(table) + " |")
    print("|---" * (len(table) + 2) + "|")
    agree = True
    for row, kind in enumerate(KINDS):
        cells = [table[title][row] for title in table]
        print(f"| {kind} | {expected[row]} | " + " | ".join(cells) + " |")
        # The RFC 3489 stun client can only say "dependent" for a mapping that is not independent.
        dependent = "D/-" if EXPECTED[kind][0] != "endpoint-independent" else ""
        agree &= all(cell in (expected[row], dependent) for cell in cells)
    return 0 if agree else 1
