"""``punchtrio nat`` on IPv6: the server-reflexive IPv6 endpoint, NPTv6 / NAT66 detection, and an
honest "not tested" when the server has no IPv6 address or no IPv6 alternate address."""

from __future__ import annotations

import json
import sys

import pytest
import trio

from punchtrio.stun import (
    IPV6_TRANSLATIONS,
    Ipv6Report,
    StunServer,
    classify_ipv6_translation,
    discover_ipv6,
    format_endpoint,
    resolve_ipv6,
)

CLI = [sys.executable, "-m", "punchtrio.cli"]


@pytest.mark.parametrize(
    ("local", "public", "expected"),
    [
        (("2001:db8::5", 4000), ("2001:db8::5", 4000), "none"),
        (("2001:db8::5", 4000), ("2001:db8:0::5", 4000), "none"),  # same address, other text
        (("fd00::5", 4000), ("2001:db8:1::5", 4000), "nptv6"),
        (("fd00::5", 4000), ("2001:db8:1::9", 61000), "nat66"),
        (("2001:db8::5", 4000), ("2001:db8::5", 4001), "nat66"),
    ],
)
def test_classify_ipv6_translation(
    local: tuple[str, int], public: tuple[str, int], expected: str
) -> None:
    assert classify_ipv6_translation(local, public) == expected
    assert expected in IPV6_TRANSLATIONS


def test_report_fields_follow_the_endpoints() -> None:
    report = Ipv6Report(True, None, ("2001:db8::1", 3478), ("fd00::5", 4000), ("2001:db8::9", 4000))
    assert (report.address_changed, report.port_changed) == (True, False)
    assert report.to_json()["public_endpoint"] == "[2001:db8::9]:4000"
    untested = Ipv6Report(False, "the STUN server has no IPv6 address")
    assert (untested.address_changed, untested.port_changed) == (None, None)
    assert untested.to_json()["server"] is None


async def test_resolve_ipv6_takes_literals_and_names() -> None:
    assert await resolve_ipv6("[2001:db8::1]:3478") == ("2001:db8::1", 3478)
    assert await resolve_ipv6(("2001:db8::1", 3478)) == ("2001:db8::1", 3478)
    assert await resolve_ipv6("192.0.2.1:3478") is None
    assert await resolve_ipv6("not a server") is None
    assert await resolve_ipv6("localhost:3478") in (("::1", 3478), None)
    assert await resolve_ipv6("no-such-name.invalid:3478") is None


async def test_no_ipv6_server_is_not_tested() -> None:
    report = await discover_ipv6(None)
    assert not report.tested
    assert report.reason == "the STUN server has no IPv6 address"


async def test_against_our_server_on_ipv6_loopback() -> None:
    server = StunServer(("::1", 0), rate=None)
    async with trio.open_nursery() as nursery:
        (endpoint,) = await nursery.start(server.serve)
        report = await discover_ipv6(endpoint, probe_timeout=2)
        nursery.cancel_scope.cancel()
    assert report.tested
    assert report.public_endpoint == report.local_endpoint
    assert report.translation == "none"
    assert (report.address_changed, report.port_changed) == (False, False)
    # Without an IPv6 alternate address, inbound cannot be tested: said so, not guessed.
    assert report.unsolicited_inbound is None
    assert report.filtering is None
    assert report.reason is not None
    assert "no IPv6 alternate address" in report.reason


async def test_a_silent_ipv6_server_is_reported_not_tested() -> None:
    with trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind(("::1", 0))
        report = await discover_ipv6(silent.getsockname()[:2], probe_timeout=0.5, rto=0.1)
    assert not report.tested
    assert report.reason is not None
    assert "no response over IPv6" in report.reason


async def test_cli_reports_both_families() -> None:
    v4 = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0), rate=None)
    v6 = StunServer(("::1", 0), rate=None)
    async with trio.open_nursery() as nursery:
        endpoints4 = await nursery.start(v4.serve)
        (endpoint6,) = await nursery.start(v6.serve)
        argv = [*CLI, "nat", "--stun", format_endpoint(endpoints4[0]), "--timeout", "2"]
        argv += ["--stun", format_endpoint(endpoint6)]
        done = await trio.run_process([*argv, "--json"], capture_stdout=True)
        report = json.loads(done.stdout)
        assert report["mapping"] == "none"  # the IPv4 report, as before
        ipv6 = report["ipv6"]
        assert ipv6["tested"] is True
        assert ipv6["public_endpoint"].startswith("[::1]:")
        assert ipv6["translation"] == "none"
        assert ipv6["unsolicited_inbound"] is None
        text = await trio.run_process(argv, capture_stdout=True)
        lines = text.stdout.decode().splitlines()
        assert "IPv6 translated:   no (no translator)" in lines
        assert any(line.startswith("IPv6 inbound:      not tested (") for line in lines)

        alone = await trio.run_process(
            [*CLI, "nat", "--stun", format_endpoint(endpoints4[0]), "--json"],
            capture_stdout=True,
        )
        assert json.loads(alone.stdout)["ipv6"]["reason"] == "the STUN server has no IPv6 address"
        nursery.cancel_scope.cancel()
