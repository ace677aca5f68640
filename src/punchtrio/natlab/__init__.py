"""Real-kernel NAT labs: network namespaces, bridges and nftables NATs of each RFC 4787 kind (root).

``build(["port", "full"])`` makes an "internet" bridge with a hub namespace holding two public
addresses (``203.0.113.1`` and ``.2``), and behind each NAT one or more host namespaces; leaving
the ``with`` block stops every process started with ``net.lab.spawn(...)`` and deletes every
namespace (so every interface, nftables table and conntrack entry), also after an error. The NAT
kinds are those of :data:`KINDS` (:data:`EXPECTED` gives each one's mapping and filtering, spelled
as ``punchtrio nat --json``). ``punchtrio demo`` builds its lab with this, and so do the
repository's lab tests, scenarios and benchmarks (through ``labs.topology``). See the NAT lab
page of the documentation for how each kind is made and why.

Standard library only; needs root and :data:`REQUIRED_BINARIES` at :func:`build` time.
"""

from __future__ import annotations

from .._netns import Lab, LabError, Namespace
from ._topology import (
    EXPECTED,
    HUB_ALTERNATE,
    HUB_PRIMARY,
    KINDS,
    REQUIRED_BINARIES,
    WAN_NET,
    Host,
    Hub,
    Nat,
    NatSpec,
    Network,
    build,
    cleanup,
    nft_ruleset,
    udp_blocked_between,
)

__all__ = [
    "EXPECTED",
    "HUB_ALTERNATE",
    "HUB_PRIMARY",
    "KINDS",
    "REQUIRED_BINARIES",
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
    "nft_ruleset",
    "udp_blocked_between",
]
