"""`punchtrio up --hub`'s JSON events in netsim: on IPv6, every endpoint two IPv6-only `up` runs
write, the `down` event's per-peer counters included, is ``"[addr]:port"``; a first registration
the hub refuses ends `up` (exit 8) after `peer_failed` with ``retry_in`` null and `down`."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
import trio
import trio.testing

from punchtrio import PrivateKey, netsim
from punchtrio.cli import _up
from punchtrio.cli._progress import JsonLines
from punchtrio.connect import ConnectError, MemoryInterface
from punchtrio.netsim import NatBehavior
from punchtrio.rendezvous import MemoryHub

from .test_connect_basic import INNER, KEYS, PRIMARY, WAN, build_world, serve_stun, wall_clock

STUN6, STUN6_OTHER = ("2001:db8:5::10", 3478), ("2001:db8:5::11", 3479)
HOSTS = {"alice": "2001:db8:a::2", "bob": "2001:db8:b::2"}
BRACKETED = re.compile(r"\[[0-9a-f:]+\]:\d+")
"""An IPv6 endpoint as the events write it."""


async def _serve(plan: _up.UpPlan, out: io.StringIO, rendezvous: Any, iface: Any) -> None:
    await _up.serve_up(
        plan, JsonLines(out), rendezvous=rendezvous, interface=iface, wall_clock=wall_clock
    )


async def _run_pair() -> dict[str, list[dict[str, Any]]]:
    """Two IPv6-only public hosts run ``serve_up`` against each other for 5 s (virtual) and stop
    as Ctrl-C would; return each side's JSON events."""
    net = netsim.Internet(seed=3)
    stun = net.add_host(STUN6[0], STUN6_OTHER[0], name="stun")
    hosts = {name: net.add_host(ip, name=name, link=WAN) for name, ip in HOSTS.items()}
    hub = MemoryHub()
    out = {name: io.StringIO() for name in HOSTS}
    with MemoryInterface("alice") as ia, MemoryInterface("bob") as ib:
        ifaces = {"alice": ia, "bob": ib}
        async with net, trio.open_nursery() as nursery:
            await nursery.start(netsim.serve_stun, stun, STUN6, STUN6_OTHER)
            for name, other in (("alice", "bob"), ("bob", "alice")):
                plan = _up.UpPlan(
                    "http://unused",
                    name,
                    KEYS[name],
                    f"{INNER[name]}/24",  # type: ignore[arg-type]
                    (other,),
                    (STUN6,),
                )
                rendezvous = hub.peer(name, KEYS[name].public_key())
                with hosts[name].activate():
                    nursery.start_soon(_serve, plan, out[name], rendezvous, ifaces[name])
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    return {
        name: [json.loads(line) for line in s.getvalue().splitlines()] for name, s in out.items()
    }


async def test_the_down_event_writes_ipv6_endpoints_bracketed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events = await _run_pair()
    for name, other in (("alice", "bob"), ("bob", "alice")):
        connected = [e for e in events[name] if e["event"] == "peer_connected"]
        assert len(connected) == 1, events[name]
        assert connected[0]["endpoint"] == f"[{HOSTS[other]}]:51820"
        down = events[name][-1]
        assert down["event"] == "down", events[name][-3:]
        [peer] = down["peers"]
        assert peer["endpoint"] == f"[{HOSTS[other]}]:51820", down
        assert peer["public_key"] == str(KEYS[other].public_key())
        assert peer["rx_bytes"] > 0
        assert peer["tx_bytes"] > 0
        # No endpoint anywhere in the stream is an unbracketed IPv6 address with a port.
        for event in events[name]:
            if "endpoint" in event:
                assert BRACKETED.fullmatch(event["endpoint"]), event


async def test_a_first_registration_that_fails_ends_up_with_exit_8_after_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Our own failure, not a peer's: the hub refuses our first record (another key holds our
    name), so every peer fails at ``register`` with ``retry_in`` null and ``up`` ends."""
    world = build_world(NatBehavior.full_cone(), NatBehavior.full_cone(), seed=5)
    await world.hub.peer("alice", KEYS["alice"].public_key()).register()
    impostor = PrivateKey(bytes(range(60, 92)))
    plan = _up.UpPlan("http://unused", "alice", impostor, "10.99.0.9/24", ("bob",), (PRIMARY,))  # type: ignore[arg-type]
    out = io.StringIO()
    with MemoryInterface() as iface:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            with world.hosts["alice"].activate(), pytest.raises(ConnectError) as caught:
                await _serve(plan, out, world.hub.peer("alice", impostor.public_key()), iface)
            nursery.cancel_scope.cancel()
    assert caught.value.exit_code == 8
    assert str(caught.value) == (
        "register: the rendezvous refused or could not be reached: "
        "name is registered to another key"
    )
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [e for e in events if e["event"] == "peer_failed"]
    assert [(e["peer"], e["stage"], e["retry_in"]) for e in failed] == [("bob", "register", None)]
    assert events[-1]["event"] == "down"
