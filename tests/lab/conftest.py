"""One NAT lab for the whole lab suite, and the STUN servers in its hub (root only)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labs import discovery
from labs.topology import KINDS, Host, Nat, NatSpec, Network, build

from tests.conftest import require_root_and

LAB_BINARIES = ("ip", "nft", "conntrack", "sysctl", "ss")
COTURN_BINARIES = ("turnserver", "turnutils_natdiscovery")
OUR_PORTS = (5478, 5479)  # punchtrio stun-server; coturn keeps the default 3478/3479


@dataclass
class NatLab:
    """The suite's topology: one single-host NAT per kind, two-host NATs and a nested NAT.

    ``hairpin_nat`` and ``plain_nat`` are two-host ``port`` NATs with and without hairpinning,
    ``shared_full`` a two-host ``full`` NAT, ``nested`` the host of a ``port`` NAT behind a ``full``.
    """

    net: Network
    by_kind: dict[str, Host]
    hairpin_nat: Nat
    plain_nat: Nat
    shared_full: Nat
    nested: Host


@pytest.fixture(scope="session")
def _nat_lab() -> Iterator[NatLab]:
    require_root_and(*LAB_BINARIES)
    specs = [
        *(NatSpec(kind) for kind in KINDS),
        NatSpec("port", hosts=2, hairpin=True),
        NatSpec("port", hosts=2),
        NatSpec("full", hosts=2),
        NatSpec("port", behind=NatSpec("full", hosts=0)),
    ]
    with build(specs) as net:
        singles = net.requested[: len(KINDS)]
        yield NatLab(
            net=net,
            by_kind={nat.kind: nat.hosts[0] for nat in singles},
            hairpin_nat=net.requested[len(KINDS)],
            plain_nat=net.requested[len(KINDS) + 1],
            shared_full=net.requested[len(KINDS) + 2],
            nested=net.requested[len(KINDS) + 3].hosts[0],
        )


@pytest.fixture
def nat_lab(_nat_lab: NatLab) -> NatLab:
    """The shared lab with every NAT's mappings forgotten, so tests cannot see each other's state."""
    _nat_lab.net.flush_conntrack()
    return _nat_lab


@pytest.fixture(scope="session")
def reflector(_nat_lab: NatLab) -> discovery.Server:
    """The plain-UDP reflector (ground truth) in the hub."""
    return discovery.start_reflector(_nat_lab.net)


@pytest.fixture(scope="session")
def coturn(_nat_lab: NatLab, tmp_path_factory: pytest.TempPathFactory) -> discovery.Server:
    """coturn in STUN-only mode on the hub's two addresses (RFC 5780 on), ports 3478/3479."""
    require_root_and(*COTURN_BINARIES)
    return discovery.start_coturn(_nat_lab.net, tmp_path_factory.mktemp("coturn"))


@pytest.fixture(scope="session")
def our_stun(_nat_lab: NatLab, tmp_path_factory: pytest.TempPathFactory) -> discovery.Server:
    """``punchtrio stun-server`` on the hub's two addresses, ports 5478/5479."""
    log: Path = tmp_path_factory.mktemp("stun-server") / "stun-server.log"
    return discovery.start_punchtrio_stun(_nat_lab.net, *OUR_PORTS, log=log)
