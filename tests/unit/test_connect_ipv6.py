"""Dual-stack path choice in the sans-IO puncher: same-family pairs, and IPv6 winning near-ties."""

from __future__ import annotations

import pytest

from punchtrio.punch import (
    Candidate,
    CandidateError,
    CandidateType,
    PunchError,
    PunchSettings,
    check_candidate_address,
)

from .test_punch_puncher import PUB, PUBLIC, World

PUBLIC6 = {"a": ("2a01:4f8::a", 5000), "b": ("2a01:4f8::b", 5000)}


def start_dual(w: World) -> None:
    for name, other in (("a", "b"), ("b", "a")):
        cands = [
            Candidate(CandidateType.SRFLX, *PUBLIC[other]),
            Candidate(CandidateType.SRFLX, *PUBLIC6[other]),
        ]
        w.punchers[name].start(PUB[other], cands, 0.0)


def connect6(w: World) -> None:
    w.links[("a", PUBLIC6["b"])] = ("b", PUBLIC6["a"])
    w.links[("b", PUBLIC6["a"])] = ("a", PUBLIC6["b"])


def test_ipv6_replaces_ipv4_at_an_equal_round_trip() -> None:
    """IPv4 works first; IPv6 starts working later at the same RTT and wins the tie."""
    w = World()
    w.connect_direct()
    start_dual(w)
    w.run(3.0)
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC["b"]]
    connect6(w)
    w.run(20.0)
    assert w.chosen("a")[-1].endpoint == PUBLIC6["b"]
    path = w.punchers["a"].path(PUB["b"])
    assert path is not None
    assert path.endpoint == PUBLIC6["b"]


def test_ipv4_does_not_replace_ipv6_at_an_equal_round_trip() -> None:
    w = World()
    connect6(w)
    start_dual(w)
    w.run(3.0)
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC6["b"]]
    w.connect_direct()
    w.run(20.0)
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC6["b"]]


def test_pairs_are_same_family_only() -> None:
    """A puncher whose socket reaches IPv6 alone never probes the IPv4 candidate."""
    w = World()
    w.punchers["a"].families = frozenset({6})
    connect6(w)  # no IPv4 links: an IPv6-only host receives nothing over IPv4
    start_dual(w)
    w.run(3.0)
    assert w.pings_to("a", PUBLIC["b"]) == 0
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC6["b"]]


def test_a_negative_family_margin_is_refused() -> None:
    with pytest.raises(PunchError, match="family_margin"):
        PunchSettings(family_margin=-0.001)


@pytest.mark.parametrize(
    ("address", "reason"),
    [("fe80::1", "link-local"), ("::1", "loopback"), ("::ffff:192.0.2.1", "IPv4-mapped")],
)
def test_bad_ipv6_candidates_are_refused_with_a_reason(address: str, reason: str) -> None:
    import ipaddress

    with pytest.raises(CandidateError, match=reason):
        check_candidate_address(ipaddress.ip_address(address))
