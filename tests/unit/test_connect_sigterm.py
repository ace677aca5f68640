"""``open_connector(stop_signals=...)``: SIGTERM to a process in the block runs the teardown
(its hub record is deleted at once) and the process exits 0, as systemd's stop expects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from functools import partial

import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import HubConfig, MemoryStore, serve_hub

CHILD = textwrap.dedent(
    """
    import signal, sys, trio
    from punchtrio import PrivateKey
    from punchtrio.connect import MemoryInterface, Registered, TunnelConfig, open_connector

    async def main(url, stop):
        signals = (signal.SIGTERM,) if stop == "stop" else ()
        iface = MemoryInterface("alice")
        async with open_connector(
            "alice", PrivateKey.generate(), url, TunnelConfig("10.99.0.1/24", listen_port=0),
            interface=iface, stun_servers=[], stop_signals=signals,
        ) as conn:
            async for event in conn.events:
                if isinstance(event, Registered):
                    print("registered", flush=True)
        print("stopped", flush=True)

    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


async def _run_child(stop: str) -> tuple[int, str, bool]:
    """Start the child against a hub of our own, SIGTERM it once registered; return its exit
    status, its output and whether alice's record was still at the hub right after it ended."""
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        serve = partial(serve_hub, listen=("127.0.0.1", 0), store=store)
        listeners = await nursery.start(serve, HubConfig(PrivateKey.generate(), rate=0))
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILD, listeners.http[0], stop],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert process.stdout is not None
        output = b""
        with trio.fail_after(30):
            while b"registered" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        assert await store.get("", "alice") is not None
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while chunk := await process.stdout.receive_some(4096):
                output += chunk
            status = await process.wait()
        left = await store.get("", "alice") is not None
        nursery.cancel_scope.cancel()
    return status, output.decode(), left


async def test_sigterm_with_stop_signals_unregisters_and_exits_0() -> None:
    status, output, left = await _run_child("stop")
    assert status == 0, output
    assert output.split() == ["registered", "stopped"]
    assert not left  # deleted by the teardown, not left for its TTL


async def test_without_stop_signals_sigterm_kills_and_the_record_lingers() -> None:
    """The default leaves signals to the application: Python's SIGTERM ends it at once."""
    status, output, left = await _run_child("keep")
    assert status == -signal.SIGTERM, output
    assert "stopped" not in output
    assert left
