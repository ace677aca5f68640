"""Candidates: validation, priorities, host addresses and server-reflexive gathering (sans-IO)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import netsim
from punchtrio.punch import (
    Candidate,
    CandidateError,
    CandidateType,
    ReflexiveGatherer,
    candidate_priority,
    host_candidates,
    local_addresses,
    sort_candidates,
)
from punchtrio.rendezvous import Endpoint, EndpointType
from punchtrio.stun import OtherAddress, StunMessage, XorMappedAddress, encode_message


@pytest.mark.parametrize(
    ("address", "port"),
    [
        ("127.0.0.1", 1),
        ("::1", 1),
        ("169.254.1.1", 1),
        ("fe80::1", 1),
        ("224.0.0.1", 1),
        ("0.0.0.0", 1),
        ("255.255.255.255", 1),
        ("240.0.0.1", 1),
        ("::ffff:192.0.2.1", 1),
        ("example.com", 1),
        ("192.0.2.1", 0),
        ("192.0.2.1", 65536),
        ("192.0.2.1", True),
    ],
)
def test_unusable_candidates_are_refused(address: str, port: int) -> None:
    with pytest.raises(CandidateError):
        Candidate(CandidateType.HOST, address, port)


def test_candidates_are_normalised_and_prioritised_by_type() -> None:
    host = Candidate(CandidateType.HOST, "2001:DB8:0::1", 5000)
    assert host.address == "2001:db8::1"
    assert host.endpoint == ("2001:db8::1", 5000)
    assert host.version == 6
    kinds = [CandidateType.RELAY, CandidateType.SRFLX, CandidateType.PRFLX, CandidateType.HOST]
    made = [Candidate(k, "192.0.2.1", 1000 + i) for i, k in enumerate(kinds)]
    assert [c.type for c in sort_candidates(made)] == kinds[::-1]
    assert (
        host.priority == candidate_priority(CandidateType.HOST) == (126 << 24) | (65535 << 8) | 255
    )
    with pytest.raises(CandidateError):
        candidate_priority(CandidateType.HOST, 70000)


def test_sort_keeps_the_best_of_duplicate_endpoints() -> None:
    low = Candidate(CandidateType.SRFLX, "192.0.2.1", 1)
    high = Candidate(CandidateType.HOST, "192.0.2.1", 1)
    assert sort_candidates([low, high]) == [high]


@given(
    st.sampled_from([CandidateType.HOST, CandidateType.SRFLX, CandidateType.RELAY]),
    st.one_of(st.just("198.51.100.7"), st.just("2001:db8::7"), st.just("10.1.2.3")),
    st.integers(1, 65535),
)
def test_rendezvous_endpoints_round_trip(kind: CandidateType, address: str, port: int) -> None:
    cand = Candidate(kind, address, port)
    endpoint = cand.to_endpoint()
    assert endpoint == Endpoint(EndpointType(kind.value), ipaddress.ip_address(address), port)
    assert Candidate.from_endpoint(endpoint) == cand


def test_a_peer_reflexive_candidate_is_advertised_as_server_reflexive() -> None:
    endpoint = Candidate(CandidateType.PRFLX, "192.0.2.1", 9).to_endpoint()
    assert endpoint.type is EndpointType.SRFLX


def test_host_candidates_skip_unusable_addresses_and_keep_the_order() -> None:
    got = host_candidates(51820, ["10.0.0.2", "127.0.0.1", "fe80::1", "2001:db8::2"])
    assert [c.endpoint for c in got] == [("10.0.0.2", 51820), ("2001:db8::2", 51820)]
    assert got[0].priority > got[1].priority
    assert all(c.type is CandidateType.HOST for c in got)


def test_local_addresses_of_this_machine_are_usable() -> None:
    found = local_addresses()
    assert not [ip for ip in found if ip.is_loopback or ip.is_link_local or ip.is_multicast]
    # Cross-check the IPv6 ones against the kernel's own table.
    try:
        with open("/proc/net/if_inet6") as table:
            rows = [line.split() for line in table]
    except OSError:
        rows = []
    expected = {
        ipaddress.IPv6Address(bytes.fromhex(row[0]))
        for row in rows
        if int(row[3], 16) == 0  # global scope
    }
    assert expected <= {ip for ip in found if ip.version == 6}


def test_local_addresses_inside_netsim_are_the_simulated_hosts() -> None:
    net = netsim.Internet()
    host = net.add_host("192.0.2.7", "2001:db8::7")
    with host.activate():
        assert [str(ip) for ip in local_addresses()] == ["192.0.2.7", "2001:db8::7"]


def success(request: bytes, mapped: tuple[str, int], other: tuple[str, int] | None = None) -> bytes:
    tid = int.from_bytes(request[8:20], "big")
    attrs = [XorMappedAddress(ip=mapped[0], port=mapped[1])]
    if other is not None:
        attrs.append(OtherAddress(ip=other[0], port=other[1]))
    return encode_message(StunMessage(msg_type=0x0101, transaction_id=tid, attributes=attrs))


S1, S2 = ("203.0.113.10", 3478), ("203.0.113.11", 3479)


@pytest.mark.parametrize(
    ("second", "varies"), [(("198.51.100.1", 5000), False), (("198.51.100.1", 6000), True)]
)
def test_two_servers_tell_whether_the_mapping_depends_on_the_destination(
    second: tuple[str, int], varies: bool
) -> None:
    g = ReflexiveGatherer([S1, S2], 0.0)
    requests = {dst: data for data, dst in g.datagrams_to_send(0.0)}
    assert set(requests) == {S1, S2}
    assert not g.receive_datagram(success(requests[S1], ("198.51.100.1", 5000)), S2, 0.1)
    assert g.receive_datagram(success(requests[S1], ("198.51.100.1", 5000)), S1, 0.1)
    assert g.receive_datagram(success(requests[S2], second), S2, 0.1)
    assert g.done
    result = g.result()
    assert result.mapping_varies is varies
    assert [c.endpoint for c in result.candidates] == list(
        dict.fromkeys([("198.51.100.1", 5000), second])
    )
    assert all(c.type is CandidateType.SRFLX for c in result.candidates)


def test_one_server_is_asked_again_at_its_other_address() -> None:
    g = ReflexiveGatherer([S1], 0.0)
    [(request, dst)] = g.datagrams_to_send(0.0)
    assert dst == S1
    g.receive_datagram(success(request, ("198.51.100.1", 5000), other=S2), S1, 0.05)
    assert not g.done
    [(second, dst)] = g.datagrams_to_send(0.05)
    assert dst == S2
    g.receive_datagram(success(second, ("198.51.100.1", 5000)), S2, 0.1)
    assert g.done
    assert g.result().mapping_varies is False


def test_servers_that_never_answer_fail_and_leave_no_verdict() -> None:
    g = ReflexiveGatherer([S1], 0.0, rto=0.1, rc=2)
    now = 0.0
    while not g.done:
        g.datagrams_to_send(now)
        timer = g.get_timer()
        assert timer is not None
        now = timer
        g.handle_timer(now)
    result = g.result()
    assert result.failed == (S1,)
    assert result.mapping_varies is None
    assert result.candidates == ()
    with pytest.raises(ValueError, match="at least one"):
        ReflexiveGatherer([], 0.0)
