"""The NAT matrix in netsim: every pair of RFC 4787 behaviours, and two peers behind one NAT.

Expectations come from rules, never from observed results:

- ``issue_rule`` is the guarantee the issue states: a direct path exists without relaying when at
  least one side maps endpoint-independently and filters endpoint-independently or by address, or
  both map endpoint-independently. Wherever it holds, the test demands a direct path.
- ``punch_model`` is the complete prediction for punchtrio's puncher, derived from the RFC 4787
  definitions (one external IP per NAT) and the puncher's peer-reflexive triggered checks. It adds
  the pairs where neither maps endpoint-independently but one NAT filters endpoint-independently
  (so the first ping gets in through its STUN mapping), the other filters at most by address, and
  at least one of them maps by address only (its port towards the peer is then one port, so the
  chase of new ports ends). Birthday punching adds every pair where exactly one side maps
  endpoint-independently: the other side's mapping varies between the two STUN servers, so it opens
  256 mappings towards the easy side, which probes that NAT's ports until one answers (the netsim
  NATs here preserve ports, so the predicted ports find it at once). Every pair outside it must
  fail cleanly at the punch stage (this
  module runs without a relay; ``test_connect_relay`` runs the same matrix with the hub's relay,
  where every pair connects).
"""

from __future__ import annotations

import itertools
import re

import pytest
import trio

from punchtrio.connect import PeerConnected, PeerFailed
from punchtrio.netsim import Filtering, Mapping, NatBehavior

from .test_connect_basic import build_world, run_pair

EI, AD, APD = "EI", "AD", "APD"
MAPPING = {
    EI: Mapping.ENDPOINT_INDEPENDENT,
    AD: Mapping.ADDRESS_DEPENDENT,
    APD: Mapping.ADDRESS_AND_PORT_DEPENDENT,
}
FILTERING = {
    EI: Filtering.ENDPOINT_INDEPENDENT,
    AD: Filtering.ADDRESS_DEPENDENT,
    APD: Filtering.ADDRESS_AND_PORT_DEPENDENT,
}
KINDS = [(m, f) for m in (EI, AD, APD) for f in (EI, AD, APD)]
FAILURE = re.compile(
    r"no path to (alice|bob) after \d+\.\d s: [A-Za-z' ]+; "
    r"no relay is available \(the hub runs none; start it with --relay\)"
)
TIMEOUT = 15.0
"""Virtual seconds by which a pair must have failed (STUN plus the puncher's 8.5 s budget)."""


def issue_rule(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """The issue's rule for "a direct path is possible without relaying"."""
    return any(m == EI and f in (EI, AD) for m, f in (a, b)) or (a[0] == EI and b[0] == EI)


def punch_model(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether punchtrio's puncher finds a direct path between NATs ``a`` and ``b`` (see above)."""
    if issue_rule(a, b):
        return True
    if (a[0] == EI) != (b[0] == EI):
        # One side maps endpoint-independently but filters by port, the other maps per
        # destination: the filtering side never sent to the port the other one uses for it,
        # until birthday probing finds one of the many the other side opens.
        return True
    for (mx, fx), (my, fy) in ((a, b), (b, a)):
        if fx == EI and fy in (EI, AD) and AD in (mx, my):
            return True
    return False


def label(kind: tuple[str, str]) -> str:
    return f"{kind[0]}M/{kind[1]}F"


def behavior(kind: tuple[str, str], *, hairpinning: bool = False) -> NatBehavior:
    return NatBehavior(
        mapping=MAPPING[kind[0]], filtering=FILTERING[kind[1]], hairpinning=hairpinning
    )


def test_the_model_contains_the_issue_rule_and_is_symmetric() -> None:
    for a, b in itertools.product(KINDS, repeat=2):
        assert punch_model(a, b) == punch_model(b, a)
        assert punch_model(a, b) >= issue_rule(a, b)
    assert sum(issue_rule(a, b) for a, b in itertools.product(KINDS, repeat=2)) == 33
    assert sum(punch_model(a, b) for a, b in itertools.product(KINDS, repeat=2)) == 54


@pytest.mark.parametrize(
    ("a", "b"),
    list(itertools.product(KINDS, repeat=2)),
    ids=[f"{label(a)}-{label(b)}" for a, b in itertools.product(KINDS, repeat=2)],
)
async def test_pair_of_nats(
    a: tuple[str, str], b: tuple[str, str], autojump_clock: trio.testing.MockClock
) -> None:
    world = build_world(behavior(a), behavior(b), seed=KINDS.index(a) * 9 + KINDS.index(b))
    times: dict[str, float] = {}
    events = await run_pair(world, times)
    alice, bob = events["alice"], events["bob"]
    if punch_model(a, b):
        assert bob[-1] == "ping"  # the IP packet alice wrote crossed the tunnel
        for name, got in (("alice", alice[-1]), ("bob", bob[-2])):
            assert isinstance(got, PeerConnected)
            assert got.path == "direct"
            nat = "192.0.2.1" if name == "alice" else "198.51.100.1"
            assert got.endpoint.startswith(nat + ":")
    else:
        for name, got in (("alice", alice[-1]), ("bob", bob[-1])):
            assert isinstance(got, PeerFailed)
            assert got.stage == "punch"
            assert FAILURE.fullmatch(got.reason), got.reason
            assert times[name] < TIMEOUT


@pytest.mark.parametrize("hairpinning", [False, True], ids=["no-hairpin", "hairpin"])
@pytest.mark.parametrize("kind", KINDS, ids=[label(k) for k in KINDS])
async def test_two_peers_behind_the_same_nat_use_the_lan(
    kind: tuple[str, str], hairpinning: bool, autojump_clock: trio.testing.MockClock
) -> None:
    world = build_world(behavior(kind, hairpinning=hairpinning), None, seed=7)
    events = await run_pair(world)
    alice, bob = events["alice"], events["bob"]
    assert bob[-1] == "ping"
    assert alice[-1] == PeerConnected("bob", "lan", "10.0.0.3:51820", alice[-1].elapsed_ms)  # type: ignore[attr-defined]
    assert isinstance(bob[-2], PeerConnected)
    assert (bob[-2].path, bob[-2].endpoint) == ("lan", "10.0.0.2:51820")
