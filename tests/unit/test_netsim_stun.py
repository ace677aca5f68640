"""RFC 5780 discovery (punchtrio.stun) classifies every netsim NAT correctly.

The client side is the unchanged ``discover_nat``, which uses ``trio.socket`` and so runs on the
simulated host. ``StunServer`` binds raw stdlib sockets, so the server side here is its sans-IO core
``StunResponder`` on simulated sockets: :func:`punchtrio.netsim.serve_stun`.
"""

from __future__ import annotations

import itertools

import pytest
import trio

from punchtrio import netsim
from punchtrio.netsim import Filtering, Mapping, NatBehavior
from punchtrio.stun import discover_nat

PRIMARY = ("203.0.113.10", 3478)
ALTERNATE = ("203.0.113.11", 3479)


@pytest.mark.parametrize(
    ("mapping", "filtering", "hairpinning"),
    [
        (m, f, h)
        for (m, f), h in zip(itertools.product(Mapping, Filtering), itertools.cycle([True, False]))
    ],
)
async def test_discovery_classifies_each_nat(
    autojump_clock: trio.testing.MockClock,
    mapping: Mapping,
    filtering: Filtering,
    hairpinning: bool,
) -> None:
    net = netsim.Internet(seed=1)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    behavior = NatBehavior(mapping=mapping, filtering=filtering, hairpinning=hairpinning)
    nat = net.add_nat("198.51.100.1", behavior=behavior, link=netsim.Link(latency=0.02))
    client = nat.lan.add_host(name="client")
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        with client.activate():
            report = await discover_nat(PRIMARY, probe_timeout=2.0)
        nursery.cancel_scope.cancel()
    assert report.mapping == mapping.value
    assert report.filtering == filtering.value
    assert report.public_endpoint[0] == "198.51.100.1"
    assert report.port_preservation
    assert report.other_address == ALTERNATE
    # A hairpinned probe gets back in only if it reuses the mapping, or filtering admits anyone.
    admitted = (
        mapping is Mapping.ENDPOINT_INDEPENDENT or filtering is Filtering.ENDPOINT_INDEPENDENT
    )
    assert report.hairpinning is (hairpinning and admitted)


async def test_discovery_without_nat(autojump_clock: trio.testing.MockClock) -> None:
    net = netsim.Internet()
    server = net.add_host(PRIMARY[0], ALTERNATE[0])
    client = net.add_host("192.0.2.50")
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        with client.activate():
            report = await discover_nat(PRIMARY, probe_timeout=2.0)
        nursery.cancel_scope.cancel()
    assert report.mapping == "none"
    assert report.filtering == "endpoint-independent"
    assert report.public_endpoint == report.local_endpoint == ("192.0.2.50", 49152)


@pytest.mark.parametrize("inbound_refresh", [False, True])
async def test_discovery_measures_the_mapping_lifetime(
    autojump_clock: trio.testing.MockClock, inbound_refresh: bool
) -> None:
    net = netsim.Internet()
    server = net.add_host(PRIMARY[0], ALTERNATE[0])
    # Whether or not inbound packets refresh the mapping, each idle period is measured on its own.
    behavior = NatBehavior(
        filtering=Filtering.ENDPOINT_INDEPENDENT,
        mapping_timeout=60,
        inbound_refresh=inbound_refresh,
    )
    client = net.add_nat("198.51.100.1", behavior=behavior).lan.add_host()
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        with client.activate():
            report = await discover_nat(PRIMARY, probe_timeout=2.0, lifetime=10)
        nursery.cancel_scope.cancel()
    assert report.mapping_lifetime == (40.0, 80.0)
