"""punchtrio's IPv6 NAT test (`discover_ipv6`) against a dual-stack STUN server in netsim."""

from __future__ import annotations

import pytest
import trio

from punchtrio import netsim
from punchtrio.netsim import Filtering, Ipv6Firewall, NatBehavior
from punchtrio.stun import Ipv6Report, discover_ipv6

PRIMARY6, ALTERNATE6 = ("2001:db8:ffff::10", 3478), ("2001:db8:ffff::11", 3479)
PRIMARY4, ALTERNATE4 = ("203.0.113.10", 3478), ("203.0.113.11", 3479)


async def report_from(
    ipv6: Ipv6Firewall | NatBehavior | None, lan6: str | None, *, ipv4: bool = True
) -> Ipv6Report:
    net = netsim.Internet(seed=2)
    stun = net.add_host(PRIMARY4[0], ALTERNATE4[0], PRIMARY6[0], ALTERNATE6[0], name="stun")
    site = net.add_nat(
        "198.51.100.1" if ipv4 else None,
        lan="10.0.0.0/24" if ipv4 else None,
        address6="2001:db8:1::1" if lan6 else None,
        lan6=lan6,
        ipv6=ipv6,
    )
    host = site.lan.add_host(name="client")
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, stun, PRIMARY4, ALTERNATE4)
        await nursery.start(netsim.serve_stun, stun, PRIMARY6, ALTERNATE6)
        with host.activate():
            report = await discover_ipv6(PRIMARY6, probe_timeout=2.0)
        nursery.cancel_scope.cancel()
    return report


@pytest.mark.parametrize(
    ("filtering", "expected"),
    [
        (Filtering.ADDRESS_AND_PORT_DEPENDENT, "address-and-port-dependent"),
        (Filtering.ADDRESS_DEPENDENT, "address-dependent"),
        (Filtering.ENDPOINT_INDEPENDENT, "endpoint-independent"),
    ],
)
async def test_behind_a_firewall_the_server_sees_our_own_address_and_the_filter_shows(
    autojump_clock: trio.testing.MockClock, filtering: Filtering, expected: str
) -> None:
    report = await report_from(Ipv6Firewall(filtering=filtering), "2001:db8:1:1::/64")
    assert report.tested, report.reason
    assert report.translation == "none"
    assert report.public_endpoint == report.local_endpoint
    assert report.local_endpoint is not None
    assert report.local_endpoint[0] == "2001:db8:1:1::2"
    assert report.filtering == expected
    assert report.unsolicited_inbound is (filtering is Filtering.ENDPOINT_INDEPENDENT)


async def test_behind_nat66_the_server_sees_the_translated_endpoint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await report_from(NatBehavior.symmetric(), "fd00:1::/64")
    assert report.tested, report.reason
    assert report.translation == "nat66"
    assert report.public_endpoint is not None
    assert report.public_endpoint[0] == "2001:db8:1::1"
    assert report.filtering == "address-and-port-dependent"
    assert report.unsolicited_inbound is False


async def test_an_ipv6_only_site_is_tested_like_a_dual_stack_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await report_from(None, "2001:db8:1:1::/64", ipv4=False)
    assert report.tested, report.reason
    assert report.translation == "none"
    assert report.filtering == "endpoint-independent"  # routed, nothing filters


async def test_an_ipv4_only_site_reports_no_ipv6_route_as_the_real_socket_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = await report_from(None, None)
    assert not report.tested
    assert report.reason == "no IPv6 route to [2001:db8:ffff::10]:3478: Network is unreachable"
