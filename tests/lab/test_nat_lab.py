"""The lab's NATs really behave as their kind: plain-UDP ground truth, coturn and the stun client."""

from __future__ import annotations

import time

import pytest
from labs import discovery
from labs.topology import EXPECTED, KINDS

from tests.conftest import require_root_and
from tests.lab.conftest import COTURN_BINARIES, LAB_BINARIES, NatLab

SAME_PORT_STAGGER = 0.5
"""Seconds between starting the two hosts of one NAT that probe from the same local port."""

pytestmark = pytest.mark.lab


def test_every_kind_behaves_as_its_table_row(nat_lab: NatLab, reflector: discovery.Server) -> None:
    require_root_and(*LAB_BINARIES)
    hosts = [nat_lab.by_kind[kind] for kind in KINDS]
    reports = discovery.run_parallel(
        [discovery.start_udpprobe_classify(host, reflector) for host in hosts]
    )
    for kind, host, report in zip(KINDS, hosts, reports, strict=True):
        assert (report["mapping"], report["filtering"]) == EXPECTED[kind], kind
        public_ip, _, port = str(report["public_endpoint"]).partition(":")
        assert public_ip == host.nat.public_ip
        assert int(port) > 0
        # Masquerade keeps the host's port unless it clashes; fully-random never keeps it.
        assert report["port_preservation"] is (kind != "sym"), kind


def test_coturn_natdiscovery_agrees_with_the_table(
    nat_lab: NatLab, coturn: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES, *COTURN_BINARIES)
    reports = discovery.run_parallel(
        [discovery.start_coturn_natdiscovery(nat_lab.by_kind[kind], coturn) for kind in KINDS]
    )
    table = {kind: (r["mapping"], r["filtering"]) for kind, r in zip(KINDS, reports, strict=True)}
    assert table == EXPECTED


def test_stun_client_against_coturn_agrees_with_the_table(
    nat_lab: NatLab, coturn: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES, "turnserver", "stun")
    reports = discovery.run_parallel(
        [discovery.start_stun_client(nat_lab.by_kind[kind], coturn) for kind in KINDS]
    )
    by_kind = dict(zip(KINDS, reports, strict=True))
    for kind in ("full", "addr", "port"):
        assert by_kind[kind]["mapping"] == "endpoint-independent", by_kind[kind]
        assert by_kind[kind]["filtering"] == EXPECTED[kind][1], by_kind[kind]
        assert by_kind[kind]["port_preservation"] is True
    # RFC 3489 only says "dependent" mapping, and reports no filtering for it.
    assert by_kind["sym"]["mapping"] == "dependent", by_kind["sym"]
    assert by_kind["sym"]["port_preservation"] is False
    assert by_kind["addr-map"]["mapping"] == "dependent", by_kind["addr-map"]


def test_hairpinning_nat_forwards_to_the_peer_from_the_senders_mapping(
    nat_lab: NatLab, reflector: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES)
    sender, receiver = nat_lab.hairpin_nat.hosts
    result = discovery.hairpin(sender, receiver, reflector)
    assert result.receiver_mapping.startswith(nat_lab.hairpin_nat.public_ip + ":")
    assert result.received_from == result.sender_mapping


def test_nat_without_hairpinning_drops_datagrams_to_its_own_address(
    nat_lab: NatLab, reflector: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES)
    sender, receiver = nat_lab.plain_nat.hosts
    result = discovery.hairpin(sender, receiver, reflector, timeout=1.0)
    assert result.receiver_mapping.startswith(nat_lab.plain_nat.public_ip + ":")
    assert result.received_from is None


def test_two_hosts_on_one_local_port_keep_endpoint_independent_mappings(
    nat_lab: NatLab, reflector: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES)
    nats = [nat_lab.hairpin_nat, nat_lab.shared_full]
    hosts = [host for nat in nats for host in nat.hosts]
    # Same local port on both hosts: plain masquerade would give the second host a mapping that
    # changes with the destination; the lab's binding table keeps it endpoint-independent.
    # The second host of each NAT starts a little later: first datagrams from one port crossing
    # the NAT at the same instant race in the binding table (docs/lab.md, "Known race").
    firsts = [
        discovery.start_udpprobe_classify(nat.hosts[0], reflector, port=40000) for nat in nats
    ]
    time.sleep(SAME_PORT_STAGGER)
    seconds = [
        discovery.start_udpprobe_classify(nat.hosts[1], reflector, port=40000) for nat in nats
    ]
    # In the order of ``hosts``: each NAT's first host, then its second.
    pairs = zip(firsts, seconds, strict=True)
    reports = discovery.run_parallel([probe for pair in pairs for probe in pair])
    for host, report in zip(hosts, reports, strict=True):
        assert (report["mapping"], report["filtering"]) == EXPECTED[host.nat.kind], report
    for nat, pair in zip(nats, (reports[:2], reports[2:]), strict=True):
        endpoints = {str(report["public_endpoint"]) for report in pair}
        assert len(endpoints) == 2
        assert f"{nat.public_ip}:40000" in endpoints
        assert [report["port_preservation"] for report in pair].count(True) == 1
    # Forgetting the mappings empties the binding table and conntrack.
    for nat in nats:
        assert "elements" in nat.ns.run("nft", "list", "map", "ip", "ptnat", "owned")
        nat.flush_conntrack()
        for name in ("map ip ptnat owned", "map ip ptnat mapping", "set ip ptnat contacted"):
            assert "elements" not in nat.ns.run("nft", "list", *name.split())
        assert nat.conntrack().strip() == ""


def test_nat_behind_nat_shows_the_outer_address_and_the_stricter_behaviour(
    nat_lab: NatLab, reflector: discovery.Server, coturn: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES, *COTURN_BINARIES)
    host = nat_lab.nested
    assert host.nat.outer is not None
    truth, theirs = discovery.run_parallel(
        [
            discovery.start_udpprobe_classify(host, reflector),
            discovery.start_coturn_natdiscovery(host, coturn),
        ]
    )
    # A "port" NAT behind a "full" NAT: the inner NAT's filter is the stricter one.
    assert (truth["mapping"], truth["filtering"]) == EXPECTED["port"]
    assert (theirs["mapping"], theirs["filtering"]) == EXPECTED["port"]
    assert str(truth["public_endpoint"]).startswith(host.nat.outer.public_ip + ":")
    assert host.nat.internet_ip == host.nat.outer.public_ip


def test_plain_udp_hole_punching_works_where_the_kinds_allow_it(
    nat_lab: NatLab, reflector: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES)
    port_a, port_b = nat_lab.by_kind["port"], nat_lab.plain_nat.hosts[0]
    full, sym = nat_lab.by_kind["full"], nat_lab.by_kind["sym"]
    # Two port-restricted cones: each side's first datagram opens its own filter for the other.
    a_got, b_got = discovery.punch(port_a, port_b, reflector)
    assert str(a_got).startswith(port_b.nat.public_ip + ":"), a_got
    assert str(b_got).startswith(port_a.nat.public_ip + ":"), b_got
    # A symmetric NAT uses a new port towards the peer, which a port-restricted filter rejects,
    # and the peer aims at the port it used towards the reflector.
    assert discovery.punch(port_a, sym, reflector) == (None, None)
    # A full cone lets the symmetric side in; nothing reaches the symmetric side.
    full_got, sym_got = discovery.punch(full, sym, reflector)
    assert str(full_got).startswith(sym.nat.public_ip + ":"), full_got
    assert sym_got is None
