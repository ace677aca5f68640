"""``punchtrio stun-server``: an RFC 5780 STUN server on one or two IP addresses."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from typing import Any

import trio

from ..stun import StunServer, format_endpoint, parse_endpoint
from ._main import UsageError


def register(subparsers: Any) -> None:
    """Add ``stun-server`` to the ``punchtrio`` parser."""
    parser = subparsers.add_parser(
        "stun-server",
        help="run a STUN server (RFC 5780 with --alternate)",
        description=(
            "Answer STUN Binding requests on IP:PORT. With --alternate, also listen on the other "
            "three IP x port combinations and honour CHANGE-REQUEST (RFC 5780 NAT tests); "
            "without it, CHANGE-REQUEST is answered with error 420. Runs until interrupted."
        ),
    )
    parser.add_argument("--primary", required=True, metavar="IP:PORT", help="primary address")
    parser.add_argument(
        "--alternate",
        metavar="IP2:PORT2",
        help="alternate address; must differ from the primary in both IP and port",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=50.0,
        metavar="N",
        help="requests per second allowed per source IP, bursts of 2N (0: no limit; default 50)",
    )
    parser.set_defaults(run=_run)


def _literal(text: str, option: str) -> tuple[str, int]:
    try:
        ip, port = parse_endpoint(text)
        ipaddress.ip_address(ip)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    return ip, port


def _run(args: argparse.Namespace) -> int:
    primary = _literal(args.primary, "--primary")
    alternate = None if args.alternate is None else _literal(args.alternate, "--alternate")
    if args.rate < 0:
        raise UsageError("--rate must be >= 0")
    rate = args.rate or None
    server = StunServer(primary, alternate, rate=rate, burst=2 * (rate or 1))
    try:
        trio.run(_serve, server)
    finally:
        stats = server.stats
        print(
            f"stun-server: {stats.received} received, {stats.answered} answered, "
            f"{stats.errors} errors, {stats.malformed} malformed, "
            f"{stats.rate_limited} rate-limited",
            file=sys.stderr,
        )
    return 0


async def _serve(server: StunServer) -> None:
    # SIGTERM (how the lab and service managers stop us) ends the run cleanly, like Ctrl-C.
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            endpoints = await nursery.start(server.serve)
            listening = ", ".join(format_endpoint(endpoint) for endpoint in endpoints)
            print(f"stun-server: listening on {listening}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
