"""`punchtrio up` pairs on the lab's IPv6: IPv6-only sites, NAT66 and dual-stack symmetric NATs.

One lab with a dual-stack hub: two IPv6-only sites behind stateful firewalls, one IPv6-only site
behind NAT66, and two dual-stack sites whose IPv4 NATs are symmetric. Each pair runs
:func:`labs.scenarios.punch_matrix.run_pair` (both ``up`` at once, ping through the tunnel) and
the table shows each side's path, the endpoint ``a`` reached ``b`` at, and the time to first ping.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from labs.scenarios.punch_matrix import run_pair, start_hub
from labs.topology import Host, NatSpec, Network, build

NAME = "ipv6"
DESCRIPTION = "punchtrio up pairs on IPv6: firewalled IPv6-only, NAT66, dual-stack behind sym NATs"

SPECS = (
    NatSpec("firewall"),
    NatSpec("firewall"),
    NatSpec("nat66"),
    NatSpec("sym", ipv6="firewall"),
    NatSpec("sym", ipv6="firewall"),
)
"""Two firewalled IPv6-only sites, a NAT66 IPv6-only site, two dual-stack symmetric-NAT sites."""


def pairs(net: Network) -> dict[str, tuple[Host, Host]]:
    """The scenario's pairs over a network built from :data:`SPECS`."""
    hosts = [nat.hosts[0] for nat in net.requested]
    return {
        "firewall/firewall": (hosts[0], hosts[1]),
        "nat66/firewall": (hosts[2], hosts[0]),
        "sym+v6/sym+v6": (hosts[3], hosts[4]),
    }


def run() -> int:
    """Run every pair and print its paths, endpoint and time to first ping; 0 if all pinged."""
    failed = 0
    with tempfile.TemporaryDirectory(prefix="pt-ipv6-") as tmp, build(SPECS) as net:
        start_hub(net, Path(tmp) / "hub.log")
        print("| pair | path (a, b) | a reached b at | time to first ping |")
        print("|---|---|---|---|")
        for label, (a, b) in pairs(net).items():
            net.flush_conntrack()
            slug = label.replace("/", "-").replace("+", "")
            result = run_pair(net, slug, a, b, Path(tmp))
            event = result.connected(f"{slug}-a")
            endpoint = "-" if event is None else str(event["endpoint"])
            took = "no reply" if result.seconds is None else f"{result.seconds:.2f} s"
            failed += result.seconds is None
            paths = f"{result.path(slug + '-a')}, {result.path(slug + '-b')}"
            print(f"| {label} | {paths} | {endpoint} | {took} |", flush=True)
    return 1 if failed else 0
