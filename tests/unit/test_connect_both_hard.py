"""Two connectors behind NATs that both map per destination, in netsim and without a relay: the
ordinary punch cannot meet and birthday probing is out of reach (both sides would have to guess),
so both fail at the punch stage with a reason that says why, and close their sockets."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from punchtrio.connect import PeerFailed
from punchtrio.netsim import Filtering, Mapping, NatBehavior, PortAllocation

from .test_connect_basic import build_world, run_pair
from .test_connect_matrix import TIMEOUT

WHY = "both NATs map per destination so not even birthday probing reaches a direct path"
NO_RELAY = "no relay is available (the hub runs none; start it with --relay)"


def per_destination(mapping: Mapping, allocation: PortAllocation) -> NatBehavior:
    """A NAT that maps per destination (``mapping``) and filters by address and port."""
    return NatBehavior(
        mapping=mapping,
        filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
        port_allocation=allocation,
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Mapping.ADDRESS_AND_PORT_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT),
        (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT),
        (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_DEPENDENT),
    ],
    ids=["APD-APD", "AD-APD", "AD-AD"],
)
@pytest.mark.parametrize("allocation", [PortAllocation.RANDOM, PortAllocation.PRESERVING])
async def test_both_nats_map_per_destination_and_no_relay_fails_with_the_reason(
    a: Mapping,
    b: Mapping,
    allocation: PortAllocation,
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = build_world(per_destination(a, allocation), per_destination(b, allocation), seed=5)
    times: dict[str, float] = {}
    events = await run_pair(world, times)
    for name, other in (("alice", "bob"), ("bob", "alice")):
        failed = events[name][-1]
        assert isinstance(failed, PeerFailed), (name, events[name][-3:])
        assert failed.peer == other
        assert failed.stage == "punch"
        head, _, elapsed_and_rest = failed.reason.partition(" after ")
        assert head == f"no path to {other}"
        elapsed, _, rest = elapsed_and_rest.partition(" s: ")
        assert 0.0 < float(elapsed) < TIMEOUT
        assert rest == f"{WHY}; {NO_RELAY}"
        assert times[name] < TIMEOUT
    # Every socket of either side is closed once the connectors have stopped.
    for host in world.hosts.values():
        assert host.sockets == []
