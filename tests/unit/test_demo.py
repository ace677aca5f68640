"""`punchtrio demo` without root: the netsim story connects, pings and transfers, and reports it."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from punchtrio.cli import _demo
from punchtrio.cli._main import main


async def test_the_netsim_story_reports_a_direct_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lines: list[str] = []
    report = await _demo.netsim_story(lines.append)
    assert report.mode == "netsim"
    by_name = {peer.name: peer for peer in report.peers}
    assert by_name["alice"].kind == "port-restricted cone"
    assert by_name["bob"].kind == "full cone"
    assert by_name["alice"].path == by_name["bob"].path == "direct"
    assert by_name["alice"].endpoint == "198.51.100.2:51820"
    assert by_name["bob"].endpoint == "198.51.100.1:51820"
    assert report.time_to_tunnel_s is not None
    assert 0 < report.time_to_tunnel_s < 2
    assert report.ping_rtt_ms is not None
    assert report.ping_rtt_ms >= 80  # two 20 ms links each way
    sent = _demo.NETSIM_PACKETS * _demo.NETSIM_PACKET_SIZE
    assert sent * 0.9 <= report.transfer_bytes <= sent
    assert lines[-1] == "everything torn down"


def test_demo_netsim_prints_a_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--netsim", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "netsim"
    assert [p["path"] for p in report["peers"]] == ["direct", "direct"]
    assert report["throughput_mbit_s"] > 0


def test_demo_report_renders_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--netsim"]) == 0
    out = capsys.readouterr().out
    assert "punchtrio demo (netsim)" in out
    assert "port-restricted cone" in out
    assert "time to tunnel:" in out


def test_nat_kind_names_the_classic_kinds() -> None:
    assert _demo.nat_kind("endpoint-independent", "endpoint-independent") == "full cone"
    assert _demo.nat_kind("address-and-port-dependent", "address-and-port-dependent") == "symmetric"
    assert _demo.nat_kind("address-dependent", "address-dependent") == "other"
