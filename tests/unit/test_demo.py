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
    # Nothing may be lost: perfect links, and a window the tunnel writes to its interface inline.
    assert report.transfer_bytes == _demo.NETSIM_PACKETS * _demo.NETSIM_PACKET_SIZE
    assert not [note for note in report.notes if "did not arrive" in note]
    assert lines[-1] == "everything torn down"
    # The second act: relayed where no punch works, then direct once the way opens.
    act = report.relay_act
    assert act.paths == {"dave": "relay", "erin": "relay"}
    assert act.relay == {"dave": "hub/udp", "erin": "hub/udp"}
    assert act.time_to_tunnel_s is not None
    assert act.time_to_tunnel_s < 1.5
    assert act.upgraded_to == {"dave": "direct", "erin": "direct"}
    assert act.upgrade_s is not None
    assert act.upgrade_s < 5


class _LossyPair:
    """Both ends of a tunnel in memory, losing the 7th packet (counted as a netsim link loss)."""

    def __init__(self) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[bytes](64)
        self.sent = 0
        self.counts = {"lost": 3, "interface-write-errors": 0}

    async def send(self, packet: bytes) -> None:
        self.sent += 1
        if self.sent == 7:
            self.counts["lost"] += 1
            return
        await self.send_channel.send(packet)

    async def receive(self) -> bytes:
        return await self.receive_channel.receive()


async def test_a_lost_transfer_packet_is_reported_with_its_cause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pair = _LossyPair()
    report = _demo.DemoReport("netsim")
    await _demo._transfer(report, pair, pair, lambda: dict(pair.counts))  # type: ignore[arg-type]
    assert report.transfer_bytes == (_demo.NETSIM_PACKETS - 1) * _demo.NETSIM_PACKET_SIZE
    assert report.notes == [
        f"1 of {_demo.NETSIM_PACKETS} packets did not arrive within 2 virtual seconds "
        "(on the way: 1 lost, 0 interface-write-errors)"
    ]


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
