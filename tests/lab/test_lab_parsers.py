"""The lab's parsers of tool output and probe requests (no root needed)."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from labs import discovery
from labs.netns import LabError, Namespace
from labs.topology import KINDS, Nat, NatSpec, nft_ruleset
from labs.udpprobe import parse_request

# Trimmed real output of `turnutils_natdiscovery -m -f` (coturn 4.6.1) behind the lab's "addr" NAT.
NATDISCOVERY_ADDR = """\
-= Mapping Behavior Discovery =-
0: : IPv4. UDP reflexive addr: 203.0.113.12:34106
========================================
NAT with Endpoint Independent Mapping!
========================================
-= Filtering Behavior Discovery =-
STUN receive timeout..
========================================
NAT with Address Dependent Filtering!
========================================
"""

# Real first lines of Debian's `stun SERVER -v` (0.97) behind the lab's "port" and "sym" NATs.
STUN_PORT = """\
STUN client version 0.97
Primary: Independent Mapping, Port Dependent Filter, preserves ports, no hairpin\t
Return value is 0x000017
"""
STUN_SYM = """\
STUN client version 0.97
Primary: Dependent Mapping, random port, no hairpin\t
Return value is 0x000018
"""


def test_natdiscovery_output_parses_to_rfc4787_names() -> None:
    report = discovery.parse_natdiscovery(NATDISCOVERY_ADDR, 0)
    assert report == {"mapping": "endpoint-independent", "filtering": "address-dependent"}


def test_natdiscovery_without_verdict_is_an_error() -> None:
    with pytest.raises(LabError, match="no mapping/filtering verdict"):
        discovery.parse_natdiscovery("STUN receive timeout..\n", 1)


def test_stun_client_output_parses() -> None:
    port = discovery.parse_stun_client(STUN_PORT, 23)
    assert port["mapping"] == "endpoint-independent"
    assert port["filtering"] == "address-and-port-dependent"
    assert port["port_preservation"] is True
    assert port["hairpinning"] is False
    sym = discovery.parse_stun_client(STUN_SYM, 24)
    assert sym["mapping"] == "dependent"
    assert "filtering" not in sym
    assert sym["port_preservation"] is False


def test_stun_client_without_verdict_is_an_error() -> None:
    with pytest.raises(LabError, match="Primary"):
        discovery.parse_stun_client("STUN client version 0.97\n", 250)


@given(st.binary(max_size=300))
def test_reflector_request_parser_never_raises(data: bytes) -> None:
    result = parse_request(data)
    assert result is None or isinstance(result[0], str)


@given(
    st.text(max_size=20),
    st.none() | st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
)
def test_reflector_request_round_trips(token: str, reply_from: tuple[str, int] | None) -> None:
    data = json.dumps({"token": token, "reply_from": list(reply_from) if reply_from else None})
    assert parse_request(data.encode()) == (token, reply_from)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(LabError, match="unknown NAT kind"):
        NatSpec("cone")


@pytest.mark.parametrize("kind", KINDS)
def test_rulesets_differ_only_as_the_kind_says(kind: str) -> None:
    nat = Nat(
        "nat1",
        kind,
        Namespace("x"),
        "203.0.113.11",
        "10.1.0.1",
        ipaddress.IPv4Network("10.1.0.0/24"),
        hairpin=False,
    )
    rules = nft_ruleset(nat)
    assert ("fully-random" in rules) is (kind == "sym")
    assert ('iifname "wan0" udp dport @mapping dnat' in rules) is (kind == "full")
    assert ("ip saddr . udp dport @contacted" in rules) is (kind in ("addr", "addr-map"))
    assert ("udp sport . ip daddr @owned" in rules) is (kind == "addr-map")
    assert "@owned snat" in rules or kind == "sym"
    assert 'iifname "lan0"' not in rules  # no hairpinning unless asked
