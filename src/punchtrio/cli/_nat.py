"""``punchtrio nat``: RFC 5780 NAT behaviour discovery against a STUN server."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from typing import Any

import trio

from ..stun import (
    Ipv6Report,
    NatReport,
    discover_ipv6,
    discover_nat,
    parse_endpoint,
    resolve_ipv6,
)
from ._main import UsageError


def register(subparsers: Any) -> None:
    """Add ``nat`` to the ``punchtrio`` parser."""
    parser = subparsers.add_parser(
        "nat",
        help="discover the NAT's mapping, filtering, hairpinning (RFC 5780)",
        description=(
            "Run RFC 5780 tests against a STUN server that has an alternate address and report "
            "the public endpoint, mapping and filtering behaviour, hairpinning and port "
            "preservation. Exit codes: 3 server unreachable, 4 no response (UDP blocked?), "
            "5 server has no alternate address, 6 alternate address silent, 1 other errors. "
            "When the server has an IPv6 address (an IPv6 --stun, or a name with an AAAA "
            "record), the IPv6 side is tested too: its server-reflexive endpoint, whether a "
            "translator (NPTv6, NAT66) changed the address or port, and, if the server has an "
            "IPv6 alternate address, whether unsolicited inbound gets in."
        ),
    )
    parser.add_argument(
        "--stun",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help=(
            "the STUN server (IPv6 as [addr]:port); repeat to give its IPv6 address beside "
            "the IPv4 one: the first is the RFC 5780 report, the first IPv6 one the IPv6 side"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--lifetime",
        nargs="?",
        type=float,
        const=5.0,
        default=None,
        metavar="MINUTES",
        help="also measure the mapping lifetime, idling up to MINUTES in total (default 5)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds to wait for each probe's answer (default 3)",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    servers = []
    for text in args.stun:
        try:
            servers.append(parse_endpoint(text))
        except ValueError as exc:
            raise UsageError(f"--stun: {exc}") from None
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    if args.lifetime is not None and args.lifetime <= 0:
        raise UsageError("--lifetime must be > 0 minutes")
    report, ipv6 = trio.run(partial(_discover, servers, args.timeout, args.lifetime))
    if args.json:
        sys.stdout.write(json.dumps({**report.to_json(), "ipv6": ipv6.to_json()}) + "\n")
    else:
        sys.stdout.write(_render(report) + _render_ipv6(ipv6))
    return 0


async def _discover(
    servers: list[tuple[str, int]], probe_timeout: float, lifetime: float | None
) -> tuple[NatReport, Ipv6Report]:
    """The RFC 5780 report against the first server, then the IPv6 side against the first
    server with an IPv6 address."""
    report = await discover_nat(servers[0], probe_timeout=probe_timeout, lifetime=lifetime)
    server6 = None
    for server in servers:
        server6 = await resolve_ipv6(server)
        if server6 is not None:
            break
    return report, await discover_ipv6(server6, probe_timeout=probe_timeout)


def _yes_no(value: bool | None) -> str:
    return "n/a (no NAT)" if value is None else ("yes" if value else "no")


def _render(report: NatReport) -> str:
    data = report.to_json()
    lines = [
        f"public endpoint:   {data['public_endpoint']}",
        f"local endpoint:    {data['local_endpoint']}",
        f"mapping:           {report.mapping}",
        f"filtering:         {report.filtering}",
        f"hairpinning:       {_yes_no(report.hairpinning)}",
        f"port preservation: {_yes_no(report.port_preservation)}",
    ]
    if report.mapping_lifetime is not None:
        low, high = report.mapping_lifetime
        bound = f"less than {high:g} s" if high is not None else "no expiry seen"
        lines.append(f"mapping lifetime:  at least {low:g} s, {bound}")
    return "\n".join(lines) + "\n"


def _render_ipv6(report: Ipv6Report) -> str:
    if not report.tested:
        return f"IPv6:              not tested ({report.reason})\n"
    data = report.to_json()
    changed = {
        "none": "no (no translator)",
        "nptv6": "address changed, port kept (NPTv6)",
        "nat66": "port changed (NAT66)",
    }
    if report.unsolicited_inbound is None:
        inbound = f"not tested ({(report.reason or '').removeprefix('inbound not tested: ')})"
    else:
        inbound = f"{'yes' if report.unsolicited_inbound else 'no'} (filtering: {report.filtering})"
    lines = [
        f"IPv6 public:       {data['public_endpoint']}",
        f"IPv6 local:        {data['local_endpoint']}",
        f"IPv6 translated:   {changed[report.translation or 'none']}",
        f"IPv6 inbound:      {inbound}",
    ]
    return "\n".join(lines) + "\n"
