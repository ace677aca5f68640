"""Test helper: ``punchtrio up`` plus test settings, run in a namespace by the interop tests.

``python -m tests.interop.tunnel_peer --config F --interface IF --json [--rekey-after S]`` brings the
tunnel up like ``punchtrio up --json`` and reads commands on stdin, one per line:
``stats`` prints the peers, the device's drop counters and the shell's counters as one JSON line;
``under_load on|off`` forces the device's under-load state. SIGTERM or SIGINT tears it down.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

import trio

from punchtrio.cli._up import _fields, _json_line, _stats
from punchtrio.tunnel import UserspaceTunnel, load_wgquick, open_userspace_tunnel
from punchtrio.wireguard import Timers


def _emit_event(event: object) -> None:
    _json_line(type(event).__name__, _fields(event))


async def _commands(tunnel: UserspaceTunnel) -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                await trio.sleep_forever()
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                words = line.decode().split()
                if words == ["stats"]:
                    _json_line(
                        "stats",
                        {
                            "peers": _stats(tunnel),
                            "drops": dict(tunnel.device.counters),
                            "shell": dataclasses.asdict(tunnel.counters),
                            "data_path": tunnel.data_path,
                            "data_thread_turns": tunnel.data_thread_turns,
                        },
                    )
                elif words[:1] == ["under_load"]:
                    tunnel.device.under_load = words[1:] == ["on"]
                    _json_line("under_load", {"on": tunnel.device.under_load})


async def _main(args: argparse.Namespace) -> None:
    config = load_wgquick(args.config)
    timers = Timers.fast(args.rekey_after) if args.rekey_after else None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_userspace_tunnel(
            config, name=args.interface, timers=timers, on_event=_emit_event
        ) as tunnel:
            _json_line("up", {"interface": tunnel.name, "listen_port": tunnel.listen_port})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_commands, tunnel)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
            stats = _stats(tunnel)
    _json_line("down", {"interface": args.interface, "peers": stats})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rekey-after", type=float, default=None)
    trio.run(_main, parser.parse_args())
