"""Real-kernel NAT labs: network namespaces, bridges and nftables NATs of each RFC 4787 kind (root).

``build(["port", "full"])`` makes an "internet" bridge with a hub namespace holding two public
addresses (``203.0.113.1`` and ``.2``), and behind each NAT one or more host namespaces; leaving
the ``with`` block stops every process started with ``net.lab.spawn(...)`` and deletes every
namespace (so every interface, nftables table and conntrack entry), also after an error. The NAT
kinds are those of :data:`KINDS` (:data:`EXPECTED` gives each one's mapping and filtering, spelled
as ``punchtrio nat --json``). ``punchtrio demo`` builds its lab with this, and so do the
repository's lab tests, scenarios and benchmarks (through ``labs.topology``). See the NAT lab
page of the documentation for how each kind is made and why. IPv6 sites (:data:`IPV6_KINDS`:
``firewall``, a global prefix behind a stateful firewall; ``nat66``) and dual-stack ones
(``NatSpec("sym", ipv6="firewall")``) come with a dual-stack or IPv6-only hub (``hub=``).

Standard library only; needs root and :data:`REQUIRED_BINARIES` at :func:`build` time.
"""

from __future__ import annotations

from .._netns import Lab, LabError, Namespace
from ._topology import (
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
    "udp_blocked_between",
]
