"""NAT topologies built from network namespaces, bridges and nftables, torn down reliably.

The builder lives in the installed package (:mod:`punchtrio.natlab`, which ``punchtrio demo``
builds its lab with too, so the demo's NATs are the lab's kinds); this module re-exports it under
the names the lab scenarios, tests and benchmarks use. ``build(["full", "sym"])`` yields a
:class:`Network`; the NAT kinds, their nftables and the address plan are documented there and in
``docs/lab.md``.
"""

from __future__ import annotations

from punchtrio.natlab import (
    EXPECTED,
    HUB_ALTERNATE,
    HUB_ALTERNATE6,
    HUB_PRIMARY,
    HUB_PRIMARY6,
    HUB_STACKS,
    IPV6_KINDS,
    KINDS,
    REQUIRED_BINARIES,
    WAN6_NET,
    WAN_NET,
    Host,
    Hub,
    Nat,
    NatSpec,
    Network,
    build,
    cleanup,
    nft6_ruleset,
    nft_ruleset,
    udp_blocked_between,
)

from .netns import Lab, LabError, Namespace, require_binaries, run

__all__ = [
    "EXPECTED",
    "HUB_ALTERNATE",
    "HUB_ALTERNATE6",
    "HUB_PRIMARY",
    "HUB_PRIMARY6",
    "HUB_STACKS",
    "IPV6_KINDS",
    "KINDS",
    "REQUIRED_BINARIES",
    "WAN6_NET",
    "WAN_NET",
    "Host",
    "Hub",
    "Lab",
    "LabError",
    "Namespace",
    "Nat",
    "NatSpec",
    "Network",
    "build",
    "cleanup",
    "nft6_ruleset",
    "nft_ruleset",
    "require_binaries",
    "run",
    "udp_blocked_between",
]
