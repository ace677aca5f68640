"""``punchtrio status [--json] [IFACE]`` and ``punchtrio ping PEER``: ask a running ``up``.

Both talk to ``up``'s control socket (:mod:`punchtrio.cli._control`, ``/run/punchtrio/IFACE.ctl``),
never to the network. Without ``IFACE`` every running ``up`` on this machine is asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .. import PunchtrioError
from ._control import CONTROL_DIRECTORY, PING_TIMEOUT, ControlError, control_path, request
from ._main import UsageError


class StatusError(PunchtrioError):
    """``status`` or ``ping`` could not get an answer: no running ``up``, root needed, a peer
    that is not there or did not answer. Exits with status 1."""

    exit_code = 1


def register(subparsers: Any) -> None:
    """Add ``status`` and ``ping`` to the ``punchtrio`` parser."""
    status = subparsers.add_parser(
        "status",
        help="show every peer of a running `punchtrio up`: path, endpoint, RTT, handshake, bytes",
        description=(
            "Show the peers of a running `punchtrio up` (all of them, or the one on IFACE): name, "
            "path (lan/direct/relay), endpoint, round trip, last handshake, bytes each way, and "
            "the stage of a peer not connected yet. Reads up's root-only control socket in "
            f"{CONTROL_DIRECTORY}. See docs/cli.md."
        ),
    )
    status.add_argument("interface", nargs="?", metavar="IFACE", help="the tunnel interface")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")
    status.set_defaults(run=_status)
    ping = subparsers.add_parser(
        "ping",
        help="ping a peer through the tunnel; say which path answered and the round trip",
        description=(
            "Send ICMP echo requests to PEER's tunnel address through a running `punchtrio up` "
            "and report, for each reply, the round trip and the path it came back on "
            "(lan/direct/relay and endpoint). See docs/cli.md."
        ),
    )
    ping.add_argument("peer", metavar="PEER", help="the peer's name (or a static peer's key)")
    ping.add_argument(
        "--interface", metavar="IFACE", help="the tunnel (default: the one with PEER)"
    )
    ping.add_argument("-c", "--count", type=int, default=3, metavar="N", help="probes (default 3)")
    ping.add_argument(
        "--timeout",
        type=float,
        default=PING_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for each reply (default {PING_TIMEOUT:g})",
    )
    ping.add_argument("--json", action="store_true", help="print each result as a JSON line")
    ping.set_defaults(run=_ping)


def _interfaces(given: str | None) -> list[str]:
    if given is not None:
        return [given]
    try:
        names = sorted(n[:-4] for n in os.listdir(CONTROL_DIRECTORY) if n.endswith(".ctl"))
    except FileNotFoundError:
        names = []
    except PermissionError:
        raise StatusError(f"permission denied on {CONTROL_DIRECTORY}: run as root") from None
    if not names:
        raise StatusError(
            f"no running `punchtrio up` here: no control socket in {CONTROL_DIRECTORY}; "
            "start `punchtrio up` first"
        )
    return names


def _ask(interface: str, message: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    try:
        reply = request(control_path(interface), message, timeout=timeout)
    except ControlError as exc:
        raise StatusError(str(exc)) from None
    if not reply.get("ok"):
        raise StatusError(str(reply.get("error", "the request failed")))
    return reply


def _status(args: argparse.Namespace) -> int:
    statuses = [_ask(name, {"op": "status"})["status"] for name in _interfaces(args.interface)]
    if args.json:
        out: Any = statuses[0] if args.interface is not None else statuses
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write("\n".join(render_status(s) for s in statuses))
    return 0


def _ping(args: argparse.Namespace) -> int:
    if args.count < 1 or not 0 < args.timeout <= 30:
        raise UsageError("--count must be at least 1 and --timeout between 0 and 30 seconds")
    interface = args.interface
    if interface is None:
        for name in _interfaces(None):
            peers = _ask(name, {"op": "status"})["status"]["peers"]
            if any(args.peer in (p["name"], p["public_key"]) for p in peers):
                interface = name
                break
        else:
            raise StatusError(f"no running `punchtrio up` has a peer named {args.peer[:40]!r}")
    answered = 0
    for _ in range(args.count):
        message = {"op": "ping", "peer": args.peer, "timeout": args.timeout}
        try:
            result = _ask(interface, message, timeout=args.timeout + 10)["ping"]
        except StatusError as exc:
            if "no reply" not in str(exc):
                raise
            line = str(exc)
            sys.stdout.write((json.dumps({"error": line}) if args.json else line) + "\n")
            continue
        answered += 1
        sys.stdout.write((json.dumps(result) if args.json else render_ping(result)) + "\n")
        sys.stdout.flush()
    if not answered:
        raise StatusError(f"{args.peer} did not answer any of {args.count} pings")
    return 0


def render_ping(result: dict[str, Any]) -> str:
    """One line for a ping reply: who answered, over which path, and the round trip."""
    via = _path_text(result)
    return (
        f"pong from {result['peer']} ({result['address']}) via {via} in {result['rtt_ms']:.2f} ms"
    )


def _path_text(entry: dict[str, Any]) -> str:
    path = entry.get("path") or "path"
    relay = f" {entry['relay']}" if entry.get("relay") else ""
    endpoint = f" {entry['endpoint']}" if entry.get("endpoint") else ""
    return f"{path}{relay}{endpoint}"


def render_status(status: dict[str, Any]) -> str:
    """The text ``punchtrio status`` prints for one interface: a header line, then one line
    per peer (a connected peer's path, endpoint, round trip, last handshake and bytes, and on a
    relayed path why no direct path answered, once known; otherwise the stage it is in, or why
    it failed)."""
    head = [status["interface"]]
    for field in ("name", "address"):
        if status.get(field):
            head.append(str(status[field]))
    head.append(f"port {status['listen_port']}")
    head.append(f"key {status['public_key']}")
    lines = ["  ".join(head)]
    peers = status["peers"]
    width = max((len(_label(p)) for p in peers), default=0)
    for peer in peers:
        label = _label(peer).ljust(width)
        if peer.get("error"):
            lines.append(f"  {label}  failed at {peer['stage']}: {peer['error']}")
            continue
        if peer["name"] is not None and not peer["connected"]:
            lines.append(f"  {label}  {peer['stage'] or 'starting'}")
            continue
        parts = [_path_text(peer) if peer.get("path") else (peer.get("endpoint") or "-")]
        if peer.get("rtt_ms") is not None:
            parts.append(f"rtt {peer['rtt_ms']:.1f} ms")
        age = peer.get("handshake_age_s")
        parts.append(f"handshake {_ago(age)}" if age is not None else "no handshake")
        parts.append(f"rx {_size(peer['rx_bytes'])} tx {_size(peer['tx_bytes'])}")
        if peer.get("direct_error"):
            parts.append(f"no direct path: {peer['direct_error']}")
        lines.append(f"  {label}  " + "  ".join(parts))
    if not peers:
        lines.append("  (no peers)")
    return "\n".join(lines) + "\n"


def _label(peer: dict[str, Any]) -> str:
    return str(peer["name"]) if peer["name"] is not None else f"{peer['public_key'][:10]}..."


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
