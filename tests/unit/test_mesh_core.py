"""A mesh's decisions without I/O: removing a peer from the connector's core, and the policy
that turns listings into peers to add and remove."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.connect import (
    ConnectCore,
    MeshPlan,
    MeshPolicy,
    PeerForgotten,
    PeerRemoved,
    RecordFound,
    RemovePeer,
    SignalReceived,
)
from punchtrio.rendezvous import PeerListing
from punchtrio.wireguard import ConfigError, PeerConfig

from .test_connect_core import KEYS, drain, make_core, ready, record

CAROL = PrivateKey(bytes(range(201, 233)))


def punching() -> ConnectCore:
    core = make_core(retry_backoff=2.0)
    ready(core)
    core.handle(RecordFound("bob", record("bob", 5)), 0.2)
    core.handle(SignalReceived("bob", "punchtrio-punch/1 5 fixed bob-run1"), 0.3)
    assert core.peer("bob").stage == "punch"
    drain(core)
    return core


def test_removing_a_peer_forgets_its_wireguard_peer_routes_timers_and_probes() -> None:
    core = punching()
    bob = KEYS["bob"].public_key().raw
    assert core.device.peers() == [bob]
    assert core.get_timer() is not None  # the puncher's schedule
    core.handle(RemovePeer("bob", "its record left the network"), 1.0)
    actions, events = drain(core)
    assert events == [PeerRemoved("bob", "its record left the network")]
    assert actions == [PeerForgotten("bob", bob)]
    assert core.names == ()
    assert core.device.peers() == []
    assert core.peer_by_key(bob) is None
    # Its allowed IPs are free again: another key may take 10.99.0.2/32 now.
    route = ipaddress.ip_network("10.99.0.2/32")
    core.device.add_peer(PeerConfig(CAROL.public_key().raw, allowed_ips=(route,)))
    assert core.get_timer() is None  # no deadline, retry or probe of bob is left
    core.handle_timer(100.0)
    assert core.datagrams_to_send() == []
    assert drain(core) == ([], [])


def test_without_removal_the_route_stays_taken() -> None:
    # The check above can fail: with bob kept, his allowed IPs refuse another key.
    core = punching()
    route = ipaddress.ip_network("10.99.0.2/32")
    with pytest.raises(ConfigError):
        core.device.add_peer(PeerConfig(CAROL.public_key().raw, allowed_ips=(route,)))


def test_late_answers_for_a_removed_peer_are_ignored_and_it_can_come_back() -> None:
    core = punching()
    core.handle(RemovePeer("bob", "gone"), 1.0)
    drain(core)
    core.handle(RecordFound("bob", record("bob", 6)), 1.1)  # a lookup that was in flight
    core.handle(SignalReceived("bob", "punchtrio-punch/1 6 fixed bob-run2"), 1.2)
    assert core.names == ()
    assert core.device.peers() == []
    core.handle(RemovePeer("bob", "gone"), 1.3)  # twice: nothing more happens
    assert drain(core) == ([], [])
    core.add_peer("bob", 2.0)
    assert core.peer("bob").stage == "wait"
    core.handle(RecordFound("bob", record("bob", 7)), 2.1)
    assert core.device.peers() == [KEYS["bob"].public_key().raw]


def test_removing_a_failed_peer_cancels_its_retry_and_queued_actions() -> None:
    core = make_core(retry_backoff=2.0)
    ready(core)
    actions, _ = drain(core)
    core.handle_timer(31.0)  # the wait timed out: retry in 2 s
    drain(core)
    assert core.peer("bob").retry_at == pytest.approx(33.0)
    core.add_peer("carol", 31.5)  # queues a WaitForRecord for carol, kept
    core.handle(RemovePeer("bob", "gone"), 32.0)
    actions, _ = drain(core)
    assert PeerForgotten("bob") in actions
    assert all(
        getattr(a, "peer", None) != "bob" for a in actions if not isinstance(a, PeerForgotten)
    )
    assert core.names == ("carol",)
    core.handle_timer(40.0)
    assert all(getattr(a, "peer", "carol") == "carol" for a in drain(core)[0])


# -- the policy ---------------------------------------------------------------------------------


def listing(*names: str, truncated: bool = False) -> PeerListing:
    return PeerListing.of(((n, 1, 300.0) for n in names), truncated=truncated)


def test_policy_adds_everyone_but_us_and_removes_who_left() -> None:
    policy = MeshPolicy("alice")
    assert policy.update(listing("alice", "bob", "carol")) == MeshPlan(("bob", "carol"), ())
    assert policy.update(listing("alice", "bob", "carol")) == MeshPlan((), ())
    assert policy.update(listing("alice", "carol", "dave")) == MeshPlan(("dave",), ("bob",))
    assert policy.update(listing()) == MeshPlan((), ("carol", "dave"))
    assert policy.members == set()


def test_policy_keeps_pinned_peers_and_names_past_a_truncated_listing() -> None:
    policy = MeshPolicy("alice", pinned=["zed"])
    assert policy.update(listing("bob", "mia", "zed")) == MeshPlan(("bob", "mia"), ())
    assert policy.update(listing("carl", "dan", truncated=True)) == MeshPlan(
        ("carl", "dan"), ("bob",)
    )  # mia sorts after the last listed name: not known to have left
    assert policy.update(listing("carl", "dan")) == MeshPlan((), ("mia",))
    assert "zed" not in policy.members


_name = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@given(st.lists(st.sets(_name, max_size=8), min_size=1, max_size=6))
def test_policy_members_always_equal_the_last_listing_minus_us(
    listings: list[set[str]],
) -> None:
    policy = MeshPolicy("alice")
    members: set[str] = set()
    for names in listings:
        plan = policy.update(listing(*names))
        members = (members | set(plan.add)) - set(plan.remove)
        assert set(plan.add).isdisjoint(plan.remove)
        assert members == policy.members == names - {"alice"}
