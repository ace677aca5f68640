"""``punchtrio up --config FILE``: bring up a WireGuard tunnel from a wg-quick file until interrupted."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import json
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..tunnel import UserspaceTunnel, load_wgquick, open_userspace_tunnel
from ._main import UsageError

_IFNAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}")


def register(subparsers: Any) -> None:
    """Add ``up`` to the ``punchtrio`` parser."""
    up = subparsers.add_parser(
        "up",
        help="bring up a WireGuard tunnel from a wg-quick file",
        description=(
            "Bring up a WireGuard tunnel (punchtrio's userspace WireGuard over a TUN device) from a "
            "wg-quick file, and keep it up until Ctrl-C or SIGTERM, which remove it again."
        ),
    )
    up.add_argument("--config", metavar="FILE", help="wg-quick style configuration file")
    up.add_argument(
        "--interface",
        metavar="NAME",
        help="interface name (default: the file's name without .conf, as wg-quick does)",
    )
    up.add_argument("--json", action="store_true", help="print events as JSON, one per line")
    up.set_defaults(run=_up)


def _up(args: argparse.Namespace) -> int:
    if not args.config:
        raise UsageError("up needs --config FILE")
    config = load_wgquick(args.config)
    name = args.interface
    if name is None:
        stem = Path(args.config).name.removesuffix(".conf")
        name = stem if _IFNAME.fullmatch(stem) else ""
    elif not _IFNAME.fullmatch(name):
        raise UsageError(f"--interface {name[:40]!r} is not a valid interface name")
    emit = _json_line if args.json else _text_line
    trio.run(_run, config, name, emit)
    return 0


async def _run(config: Any, name: str, emit: Callable[[str, dict[str, Any]], None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_userspace_tunnel(
            config, name=name, on_event=lambda event: emit(type(event).__name__, _fields(event))
        ) as tunnel:
            emit("up", {"interface": tunnel.name, "listen_port": tunnel.listen_port})
            async for _ in signals:
                break
            stats = _stats(tunnel)
    emit("down", {"interface": tunnel.name, "peers": stats, "shell": _fields(tunnel.counters)})


def _stats(tunnel: UserspaceTunnel) -> list[dict[str, Any]]:
    return [
        {"public_key": base64.b64encode(key).decode(), **_fields(stats)}
        for key, stats in tunnel.peer_stats().items()
    ]


def _fields(obj: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return {}


def _plain(value: object) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    return str(value)


def _json_line(event: str, fields: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _text_line(event: str, fields: dict[str, Any]) -> None:
    if event == "up":
        text = f"tunnel {fields['interface']} up, UDP port {fields['listen_port']}; Ctrl-C to stop"
    elif event == "down":
        text = f"tunnel {fields['interface']} down"
    else:
        details = ", ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{event}: {details}" if details else event
    sys.stdout.write(f"punchtrio: {text}\n")
    sys.stdout.flush()
