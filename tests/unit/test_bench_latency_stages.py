"""The latency-stages benchmark follows each ping through both hosts' captures, and its parser
takes any text."""

from __future__ import annotations

import pytest
from benchmarks.latency_stages import STAGES, Sighting, parse_capture, report, round_trips
from hypothesis import given
from hypothesis import strategies as st

A = """\
tcpdump: data link type LINUX_SLL2
1000.000100 eth0  Out IP 10.1.0.11.51820 > 10.2.0.11.51820: UDP, length 72
1000.001000 tun0  Out IP 10.99.0.1 > 10.99.0.2: ICMP echo request, id 7, seq 1, length 64
1000.001150 eth0  Out IP 10.1.0.11.51820 > 203.0.113.12.51820: UDP, length 128
1000.001700 eth0  In  IP 203.0.113.12.51820 > 10.1.0.11.51820: UDP, length 128
1000.001900 tun0  In  IP 10.99.0.2 > 10.99.0.1: ICMP echo reply, id 7, seq 1, length 64
1000.051000 tun0  Out IP 10.99.0.1 > 10.99.0.2: ICMP echo request, id 7, seq 2, length 64
1000.051150 eth0  Out IP 10.1.0.11.51820 > 203.0.113.12.51820: UDP, length 128
1000.0512
"""
B = """\
1000.001220 eth0  In  IP 203.0.113.11.51820 > 10.2.0.11.51820: UDP, length 128
1000.001400 tun1  In  IP 10.99.0.1 > 10.99.0.2: ICMP echo request, id 7, seq 1, length 64
1000.001420 tun1  Out IP 10.99.0.2 > 10.99.0.1: ICMP echo reply, id 7, seq 1, length 64
1000.001480 eth0  Out IP 10.2.0.11.51820 > 203.0.113.11.51820: UDP, length 128
1000.051300 eth0  In  IP 203.0.113.11.51820 > 10.2.0.11.51820: UDP, length 128
"""


def test_a_ping_is_followed_through_its_eight_sightings() -> None:
    a, b = parse_capture(A), parse_capture(B)
    assert len(a) == 7  # the header and the line the capture's end cut off are skipped
    assert a[1] == Sighting(1000.001, "tun0", True, "ICMP echo request, id 7, seq 1, length 64")
    # The second ping's request crossed, but no answer was captured: it is left out.
    [trip] = round_trips(a, b, "tun0", "tun1")
    assert len(trip) == len(STAGES)
    assert [round(gap) for gap in trip] == [150, 70, 180, 20, 60, 220, 200, 900]


def test_the_table_gives_each_stage_for_both_tunnels_and_the_difference() -> None:
    plain = [(100.0, 50.0, 100.0, 10.0, 50.0, 30.0, 100.0, 440.0)] * 3
    ours = [(200.0, 50.0, 150.0, 10.0, 40.0, 30.0, 160.0, 640.0)]
    text = report({"plain": plain, "userspace": ours}, 2)
    assert f"| {STAGES[0]} | 100 | 200 | +100 |" in text
    assert f"| {STAGES[4]} | 50 | 40 | -10 |" in text
    assert f"| {STAGES[7]} | 440 | 640 | +200 |" in text
    assert "plain wireguard-go 3, `up --hub` 1." in text
    missing = report({"plain": plain, "userspace": []}, 2)
    assert f"| {STAGES[0]} | 100 | - | - |" in missing


@given(st.text())
def test_any_text_parses_to_the_packet_lines_it_holds(text: str) -> None:
    sightings = parse_capture(text)
    assert len(sightings) <= len(text.splitlines())
    for seen in sightings:
        assert seen.time >= 0
        assert seen.interface in text
        assert " " not in seen.interface
        assert seen.summary in text


_NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=15)


@given(
    st.integers(min_value=0, max_value=2**40),
    st.integers(min_value=0, max_value=999_999),
    _NAMES,
    st.booleans(),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789 ,.:", max_size=60).map(str.strip).filter(bool),
)
def test_a_printed_line_parses_back(
    seconds: int, micros: int, interface: str, outgoing: bool, rest: str
) -> None:
    direction = "Out" if outgoing else "In "
    line = f"{seconds}.{micros:06d} {interface} {direction} IP 10.0.0.1 > 10.0.0.2: {rest}"
    [seen] = parse_capture(line)
    assert seen == Sighting(float(f"{seconds}.{micros:06d}"), interface, outgoing, rest)


@pytest.mark.parametrize(
    "line",
    [
        "1000.5 eth0 Out ARP, Request who-has 10.0.0.2 tell 10.0.0.1, length 28",
        "1000.5 eth0 Sideways IP 10.0.0.1 > 10.0.0.2: UDP, length 128",
        "eth0 Out IP 10.0.0.1 > 10.0.0.2: UDP, length 128",
    ],
)
def test_lines_that_are_not_ip_packets_are_skipped(line: str) -> None:
    assert parse_capture(line) == []
