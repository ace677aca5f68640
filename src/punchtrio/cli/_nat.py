"""``punchtrio nat``: RFC 5780 NAT behaviour discovery against a STUN server."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from typing import Any

import trio

from ..stun import NatReport, discover_nat, parse_endpoint
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
            "5 server has no alternate address, 6 alternate address silent, 1 other errors."
        ),
    )
    parser.add_argument("--stun", required=True, metavar="HOST:PORT", help="the STUN server")
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
    try:
        server = parse_endpoint(args.stun)
    except ValueError as exc:
        raise UsageError(f"--stun: {exc}") from None
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    if args.lifetime is not None and args.lifetime <= 0:
        raise UsageError("--lifetime must be > 0 minutes")
    report = trio.run(
        partial(discover_nat, server, probe_timeout=args.timeout, lifetime=args.lifetime)
    )
    if args.json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        sys.stdout.write(_render(report))
    return 0


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
