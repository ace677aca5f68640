"""One rule set for endpoint addresses (``punchtrio.check_endpoint_address``), shared by the hub
and the connector, and the one endpoint text form (``format_endpoint`` / ``parse_endpoint``)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio import EndpointError, check_endpoint_address, format_endpoint, parse_endpoint
from punchtrio.punch import CandidateError, check_candidate_address
from punchtrio.rendezvous import Endpoint, ValidationError
from punchtrio.rendezvous._models import check_unicast

from .hub_harness import Hub

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ipv4s = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6s = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
ports = st.integers(1, 65535)


def _in(prefix: str) -> st.SearchStrategy[ipaddress.IPv6Address]:
    network = ipaddress.IPv6Network(prefix)
    size = network.num_addresses
    return st.integers(0, size - 1).map(lambda i: network.network_address + i)


MAPPED = ipaddress.IPv6Address("::ffff:192.0.2.1")

REFUSED_IPV6 = [
    ("::1", "::1 is loopback"),
    ("::", ":: is unspecified"),
    ("ff02::1", "ff02::1 is multicast"),
    ("ff0e::1234", "ff0e::1234 is multicast"),
    ("fe80::1", "fe80::1 is link-local without a scope id"),
    ("febf::1", "febf::1 is link-local without a scope id"),
    # Python 3.13 writes IPv4-mapped addresses as ::ffff:192.0.2.1, older ones as ::ffff:c000:201.
    ("::ffff:192.0.2.1", f"{MAPPED} is an IPv4-mapped IPv6 address"),
    ("100::1", "100::1 is discard-only (100::/64)"),
    ("64:ff9b:1::1", "64:ff9b:1::1 is a local-use NAT64 address"),
    ("64:ff9b::7f00:1", "127.0.0.1 is loopback (embedded in 64:ff9b::7f00:1)"),
]


@pytest.mark.parametrize(("text", "reason"), REFUSED_IPV6)
def test_ipv6_refusals_name_the_address_and_the_reason(text: str, reason: str) -> None:
    ip = ipaddress.ip_address(text)
    with pytest.raises(EndpointError) as shared:
        check_endpoint_address(ip)
    assert str(shared.value) == reason
    with pytest.raises(CandidateError) as connector:
        check_candidate_address(ip)
    assert str(connector.value) == reason
    with pytest.raises(ValidationError) as hub:
        check_unicast(ip, what="endpoint address")
    assert str(hub.value) == f"endpoint address: {reason}"


def test_link_local_with_a_scope_id_is_refused_too() -> None:
    with pytest.raises(EndpointError, match=r"^fe80::1%eth0 is link-local$"):
        check_endpoint_address(ipaddress.IPv6Address("fe80::1%eth0"))


@pytest.mark.parametrize(
    "text",
    ["2001:db8::1", "2a00:1450:4001:80b::200e", "fd00::7", "192.0.2.1", "10.0.0.1", "8.8.8.8"],
)
def test_documentation_private_and_global_addresses_are_accepted(text: str) -> None:
    # Documentation ranges are accepted in IPv6 because they are in IPv4 (192.0.2.0/24).
    ip = ipaddress.ip_address(text)
    assert check_endpoint_address(ip) == ip
    assert check_candidate_address(ip) == ip
    assert check_unicast(ip) == ip


@given(st.one_of(ipv4s, ipv6s))
@settings(max_examples=2000)
def test_the_hub_and_the_connector_judge_every_address_alike(ip: IPAddress) -> None:
    outcomes: list[str | None] = []
    for check, error in (
        (check_endpoint_address, EndpointError),
        (check_candidate_address, CandidateError),
        (check_unicast, ValidationError),
    ):
        try:
            check(ip)
            outcomes.append(None)
        except error as exc:
            outcomes.append(str(exc).removeprefix("address: "))
    assert outcomes[0] == outcomes[1] == outcomes[2], (ip, outcomes)


@given(
    st.one_of(
        _in("ff00::/8"),
        _in("fe80::/10"),
        _in("::ffff:0:0/96"),
        _in("100::/64"),
        st.just(ipaddress.IPv6Address("::1")),
        st.just(ipaddress.IPv6Address("::")),
    )
)
@settings(max_examples=500)
def test_every_address_of_the_refused_ipv6_ranges_is_refused(ip: ipaddress.IPv6Address) -> None:
    with pytest.raises(EndpointError, match=rf"^{ip} is "):
        check_endpoint_address(ip)


@given(st.one_of(ipv4s, ipv6s), ports)
def test_format_and_parse_round_trip(ip: IPAddress, port: int) -> None:
    text = format_endpoint((ip, port))
    assert text == (f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    assert parse_endpoint(text) == (ip, port)
    assert format_endpoint((str(ip), port)) == text


@given(st.text(max_size=80))
@settings(max_examples=1000)
def test_parse_endpoint_refuses_garbage_with_one_error(text: str) -> None:
    message = None
    try:
        ip, port = parse_endpoint(text, what="--listen")
    except EndpointError as exc:
        message = str(exc)
    if message is not None:
        assert message.startswith("--listen ")
        assert "\n" not in message
    else:
        assert 0 < port < 65536
        assert format_endpoint((ip, port)) in (text, f"{ip}:{port}", f"[{ip}]:{port}")


@pytest.mark.parametrize(
    "text",
    ["::1:5", "[::1]5", "[127.0.0.1]:5", "1.2.3.4:0", "[::1]:65536", "host:5", "[fe80::1%lo]:5"],
)
def test_malformed_endpoints_are_refused(text: str) -> None:
    with pytest.raises(EndpointError):
        parse_endpoint(text)


async def test_the_hub_answers_400_with_the_reason_for_each_refused_ipv6_endpoint() -> None:
    async with Hub() as hub:
        peer = hub.peer()
        body = peer.body()
        for text, reason in REFUSED_IPV6:
            body["endpoints"] = [{"type": "host", "address": format_endpoint((text, 51820))}]
            reply = await peer.put("alice", body)
            assert reply.status_code == 400, text
            error = reply.json()["error"]
            assert error.endswith(reason), (text, error)
        assert hub.store.stats().peers == 0
        body["endpoints"] = [{"type": "host", "address": "[2001:db8::5]:51820"}]
        assert (await peer.put("alice", body)).status_code == 201
        assert Endpoint.parse("[2001:db8::5]:51820").address == "[2001:db8::5]:51820"
