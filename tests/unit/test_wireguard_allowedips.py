"""The cryptokey routing table against a brute-force longest-prefix match."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.wireguard import ConfigError
from punchtrio.wireguard._allowedips import AllowedIPs

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def v4_networks() -> st.SearchStrategy[Net]:
    return st.builds(
        lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    )


def v6_networks() -> st.SearchStrategy[Net]:
    return st.builds(
        lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    )


def brute_force(routes: dict[Net, int], address: bytes) -> int | None:
    ip = ipaddress.ip_address(address)
    best: tuple[int, int] | None = None
    for net, value in routes.items():
        if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, value)
    return None if best is None else best[1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(v4_networks(), v6_networks()), st.integers(0, 5)), max_size=30),
    st.lists(
        st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)),
        max_size=30,
    ),
)
def test_longest_prefix_match(entries: list[tuple[Net, int]], probes: list[bytes]) -> None:
    table: AllowedIPs[int] = AllowedIPs()
    routes: dict[Net, int] = {}
    for net, value in entries:
        if net in routes and routes[net] != value:
            with pytest.raises(ConfigError):
                table.insert(net, value)
            continue
        table.insert(net, value)
        routes[net] = value
    # Probe the networks' own addresses too, so matches are common.
    probes += [n.network_address.packed for n in routes] + [
        n.broadcast_address.packed for n in routes
    ]
    for address in probes:
        assert table.lookup(address) == brute_force(routes, address)
        assert table.lookup(address) == brute_force(routes, address)  # cached answer
    assert sorted(map(str, (n for n, _ in table.networks()))) == sorted(map(str, routes))
    for net in list(routes)[::2]:
        table.remove(net)
        del routes[net]
    for address in probes:
        assert table.lookup(address) == brute_force(routes, address)


def test_other_lengths_never_match() -> None:
    table: AllowedIPs[int] = AllowedIPs()
    table.insert(ipaddress.IPv4Network("0.0.0.0/0"), 1)
    assert table.lookup(b"") is None
    assert table.lookup(b"\x01\x02\x03") is None
