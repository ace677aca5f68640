"""``punchtrio nat`` and ``punchtrio stun-server`` classify the lab's real NATs correctly."""

from __future__ import annotations

import pytest
from labs import discovery
from labs.topology import EXPECTED, KINDS

from tests.conftest import require_root_and
from tests.lab.conftest import COTURN_BINARIES, LAB_BINARIES, NatLab

pytestmark = pytest.mark.lab

REPORT_KEYS = {"public_endpoint", "mapping", "filtering", "hairpinning", "port_preservation"}


def _check_reports(nat_lab: NatLab, reports: list[dict[str, object]]) -> None:
    for kind, report in zip(KINDS, reports, strict=True):
        assert report.keys() >= REPORT_KEYS, report
        assert (report["mapping"], report["filtering"]) == EXPECTED[kind], (kind, report)
        public_ip, _, port = str(report["public_endpoint"]).rpartition(":")
        assert public_ip == nat_lab.by_kind[kind].nat.public_ip, (kind, report)
        assert 0 < int(port) < 65536
        assert report["port_preservation"] is (kind != "sym"), (kind, report)
        # None of the single-host NATs hairpins.
        assert report["hairpinning"] is False, (kind, report)


def test_punchtrio_nat_against_our_server(nat_lab: NatLab, our_stun: discovery.Server) -> None:
    require_root_and(*LAB_BINARIES)
    reports = discovery.run_parallel(
        [discovery.start_punchtrio_nat(nat_lab.by_kind[kind], our_stun) for kind in KINDS]
    )
    _check_reports(nat_lab, reports)


def test_punchtrio_nat_against_coturn(nat_lab: NatLab, coturn: discovery.Server) -> None:
    require_root_and(*LAB_BINARIES, *COTURN_BINARIES)
    reports = discovery.run_parallel(
        [discovery.start_punchtrio_nat(nat_lab.by_kind[kind], coturn) for kind in KINDS]
    )
    _check_reports(nat_lab, reports)


def test_punchtrio_nat_sees_hairpinning(nat_lab: NatLab, our_stun: discovery.Server) -> None:
    require_root_and(*LAB_BINARIES)
    with_hairpin, without = discovery.run_parallel(
        [
            discovery.start_punchtrio_nat(nat_lab.hairpin_nat.hosts[0], our_stun),
            discovery.start_punchtrio_nat(nat_lab.plain_nat.hosts[0], our_stun),
        ]
    )
    assert with_hairpin["hairpinning"] is True, with_hairpin
    assert without["hairpinning"] is False, without
    for report in (with_hairpin, without):
        assert (report["mapping"], report["filtering"]) == EXPECTED["port"], report


def test_punchtrio_nat_behind_two_nats(nat_lab: NatLab, our_stun: discovery.Server) -> None:
    require_root_and(*LAB_BINARIES)
    host = nat_lab.nested
    report = discovery.punchtrio_nat(host, our_stun)
    assert (report["mapping"], report["filtering"]) == EXPECTED["port"], report
    assert str(report["public_endpoint"]).startswith(host.nat.internet_ip + ":"), report


def test_stun_client_sees_the_same_nat_through_our_server_and_coturn(
    nat_lab: NatLab, our_stun: discovery.Server, coturn: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES, "turnserver", "stun")
    hosts = [nat_lab.by_kind[kind] for kind in KINDS]
    ours = discovery.run_parallel([discovery.start_stun_client(h, our_stun) for h in hosts])
    nat_lab.net.flush_conntrack()
    theirs = discovery.run_parallel([discovery.start_stun_client(h, coturn) for h in hosts])
    for kind, mine, reference in zip(KINDS, ours, theirs, strict=True):
        assert mine["mapping"] == reference["mapping"], (kind, mine, reference)
        assert mine.get("filtering") == reference.get("filtering"), (kind, mine, reference)
        assert mine["port_preservation"] == reference["port_preservation"], kind
    assert [r["mapping"] for r in theirs] == ["endpoint-independent"] * 3 + ["dependent"] * 2


def test_stun_client_sees_hairpinning_through_our_server_and_coturn(
    nat_lab: NatLab, our_stun: discovery.Server, coturn: discovery.Server
) -> None:
    require_root_and(*LAB_BINARIES, "turnserver", "stun")
    hosts = [nat_lab.hairpin_nat.hosts[0], nat_lab.plain_nat.hosts[0]]
    for server in (our_stun, coturn):
        # One server at a time: the stun client picks its ports from a small range.
        reports = discovery.run_parallel([discovery.start_stun_client(h, server) for h in hosts])
        assert [report["hairpinning"] for report in reports] == [True, False], (server, reports)
