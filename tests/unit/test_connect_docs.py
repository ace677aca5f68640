"""docs/connect.md's ten-line example runs as written, in netsim."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pytest
import trio

from punchtrio.connect import Connector, MemoryInterface

from .test_connect_basic import INNER, KEYS, PRIMARY, build_world, serve_stun, wall_clock

DOC = pathlib.Path(__file__).parents[2] / "docs" / "connect.md"


def example() -> str:
    """The first Python block of docs/connect.md."""
    match = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert match is not None
    return match.group(1)


def test_the_example_is_about_ten_lines() -> None:
    code = [line for line in example().splitlines() if line.strip() and "import" not in line]
    assert len(code) <= 12


async def test_the_example_connects_alice_to_bob(
    autojump_clock: trio.testing.MockClock,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace: dict[str, Any] = {"__name__": "example"}
    exec(compile(example(), str(DOC), "exec"), namespace)
    monkeypatch.chdir(tmp_path)
    KEYS["alice"].write(tmp_path / "alice.key")
    from punchtrio.netsim import NatBehavior

    world = build_world(NatBehavior.restricted_cone(), NatBehavior.port_restricted_cone())
    with MemoryInterface() as ia, MemoryInterface() as ib:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            bob = Connector(
                "bob",
                KEYS["bob"],
                world.hub.peer("bob", KEYS["bob"].public_key()),
                f"{INNER['bob']}/24",
                interface=ib,
                stun_servers=[PRIMARY],
                wall_clock=wall_clock,
            )
            with world.hosts["alice"].activate():
                nursery.start_soon(
                    lambda: namespace["main"](
                        world.hub.peer("alice", KEYS["alice"].public_key()),
                        interface=ia,
                        stun_servers=[PRIMARY],
                        wall_clock=wall_clock,
                    )
                )
            with world.hosts["bob"].activate():
                await nursery.start(bob.run)
            got = await bob.connect("alice")
            await trio.sleep(1)  # alice prints her PeerConnected too
            nursery.cancel_scope.cancel()
    assert got.path == "direct"
    printed = capsys.readouterr().out
    assert "PeerConnected(peer='bob', path='direct', endpoint='192.0.2.1:51820'" in printed
    assert printed.splitlines()[0] == "StageStarted(stage='stun', peer=None)"
