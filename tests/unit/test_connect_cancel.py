"""Every stage of the pipeline can be cancelled cleanly: no task, socket or registration is left."""

from __future__ import annotations

import pytest
import trio

from punchtrio import netsim
from punchtrio.connect import (
    ConnectError,
    Connector,
    MemoryInterface,
    PeerConnected,
    StageStarted,
    open_connector,
)
from punchtrio.netsim import NatBehavior
from punchtrio.rendezvous import MemoryHub

from .test_connect_basic import INNER, KEYS, PRIMARY, build_world, serve_stun, wall_clock

SLOW = 0.5
"""Virtual seconds every rendezvous call takes, so that each stage is really in flight."""


def tasks_of(objects: set[int]) -> list[str]:
    """Names of the live tasks whose coroutine is a method of one of ``objects`` (by id)."""
    found: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        frame = getattr(task.coro, "cr_frame", None)
        if frame is not None and id(frame.f_locals.get("self")) in objects:
            found.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return found


@pytest.mark.parametrize("stage", ["stun", "register", "wait", "punch", "handshake", "established"])
async def test_cancelling_at_each_stage_leaves_nothing(
    stage: str, autojump_clock: trio.testing.MockClock
) -> None:
    cone = NatBehavior.port_restricted_cone()
    world = build_world(cone, cone, link=netsim.Link(latency=0.05), seed=11)
    hub = world.hub
    alice_host = world.hosts["alice"]
    seen: list[object] = []
    with MemoryInterface() as ia, MemoryInterface() as ib:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            bob = Connector(
                "bob",
                KEYS["bob"],
                netsim.DistantRendezvous(hub.peer("bob", KEYS["bob"].public_key()), SLOW),
                f"{INNER['bob']}/24",
                peers=["alice"],
                interface=ib,
                stun_servers=[PRIMARY],
                wall_clock=wall_clock,
            )

            async def start_bob_later() -> None:
                await trio.sleep(5)  # alice is waiting for bob by then
                with world.hosts["bob"].activate():
                    await bob.run()

            nursery.start_soon(start_bob_later)
            with trio.CancelScope() as scope, alice_host.activate():
                async with open_connector(
                    "alice",
                    KEYS["alice"],
                    netsim.DistantRendezvous(hub.peer("alice", KEYS["alice"].public_key()), SLOW),
                    f"{INNER['alice']}/24",
                    peers=["bob"],
                    interface=ia,
                    stun_servers=[PRIMARY],
                    wall_clock=wall_clock,
                ) as alice:
                    assert alice_host.sockets  # the sockets (one per family) are bound
                    async for event in alice.events:
                        seen.append(event)
                        if (isinstance(event, StageStarted) and event.stage == stage) or isinstance(
                            event, PeerConnected
                        ):
                            at = alice.peers["bob"].stage
                            scope.cancel()
            # Everything of alice's is gone: tasks, socket, record.
            assert tasks_of({id(alice), id(alice.tunnel)}) == []
            assert alice_host.sockets == []
            assert "alice" not in [r.name for r in hub.records()]
            assert not ia.closed  # the caller's interface is the caller's to close
            nursery.cancel_scope.cancel()
    assert scope.cancelled_caught
    assert isinstance(seen[-1], PeerConnected if stage == "established" else StageStarted)
    if stage == "stun":
        assert at is None
    elif stage == "register":
        assert at == "wait"  # the peer's record is awaited while we register
    else:
        assert at == stage  # cancelled while that stage was in flight


async def test_connect_after_the_scope_ended_is_an_error() -> None:
    connector = Connector(
        "alice",
        KEYS["alice"],
        MemoryHub().peer("alice", KEYS["alice"].public_key()),
        "10.99.0.1/24",
    )
    with pytest.raises(RuntimeError, match="not running") as raised:
        await connector.connect("bob")
    # A misuse, not a connection failure: `except ConnectError` must not swallow it, and
    # nothing was started for the peer.
    assert not isinstance(raised.value, ConnectError)
    assert connector.peers == {}
