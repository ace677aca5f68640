"""``punchtrio up --all-peers``: its argument checks, and three ``up`` runs in netsim that find
each other through the listing, then drop the one that leaves."""

from __future__ import annotations

import io
import json
import pathlib
from typing import Any

import pytest
import trio

from punchtrio import PrivateKey, netsim
from punchtrio.cli import _up
from punchtrio.cli._main import UsageError, build_parser, main
from punchtrio.cli._progress import JsonLines
from punchtrio.connect import LEFT_REASON, Connector, MemoryInterface
from punchtrio.netsim import NatBehavior
from punchtrio.rendezvous import MemoryHub, NetworkSecret

from .test_connect_basic import PRIMARY, WAN, serve_stun, wall_clock

NAMES = ("ann", "ben", "cat")
KEYS = {name: PrivateKey(bytes([50 + i]) * 32) for i, name in enumerate(NAMES)}


def _argv(tmp_path: pathlib.Path, *extra: str) -> list[str]:
    key = tmp_path / "ann.key"
    KEYS["ann"].write(key)
    return [
        "up",
        "--hub",
        "http://192.0.2.9:7777",
        "--name",
        "ann",
        "--key-file",
        str(key),
        "--address",
        "10.99.0.1/24",
        *extra,
    ]


def test_all_peers_without_the_network_secret_is_one_line_and_exit_2(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(tmp_path, "--all-peers")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--all-peers needs --network-secret-file FILE" in err
    assert "Traceback" not in err


def test_all_peers_needs_no_peer_names(tmp_path: pathlib.Path) -> None:
    secret = tmp_path / "net.secret"
    secret.write_text("a network secret of ours\n")
    args = build_parser().parse_args(
        _argv(tmp_path, "--all-peers", "--network-secret-file", str(secret))
    )
    plan = _up.build_plan(args)
    assert plan.all_peers is True
    assert plan.peers == ()
    assert plan.network_secret == NetworkSecret(b"a network secret of ours")
    # Without --all-peers, no peer at all is still refused.
    bare = build_parser().parse_args(_argv(tmp_path, "--network-secret-file", str(secret)))
    with pytest.raises(UsageError, match="at least one --peer NAME"):
        _up.build_plan(bare)


def test_the_library_refuses_all_peers_where_no_listing_can_come() -> None:
    key = PrivateKey.generate()
    with pytest.raises(ValueError, match="all_peers needs the network secret"):
        Connector("ann", key, "http://192.0.2.9:7777", "10.99.0.1/24", all_peers=True)


def _events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_three_up_runs_mesh_and_drop_the_one_that_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet(seed=5)
    stun = net.add_host(PRIMARY[0], "203.0.113.11", name="stun")
    hub = MemoryHub()
    hosts = {}
    for i, name in enumerate(NAMES):
        nat = net.add_nat(
            f"198.51.100.{i + 1}",
            behavior=NatBehavior.port_restricted_cone(),
            link=WAN,
            name=f"nat-{name}",
        )
        hosts[name] = nat.lan.add_host(name=name)
    out = {name: io.StringIO() for name in NAMES}
    ifaces = {name: MemoryInterface(name) for name in NAMES}
    scopes = {name: trio.CancelScope() for name in NAMES}
    try:
        async with net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, stun)

            async def up(name: str, index: int) -> None:
                plan = _up.UpPlan(
                    "http://unused",
                    name,
                    KEYS[name],
                    f"10.99.0.{index + 1}/24",  # type: ignore[arg-type]
                    (),
                    (PRIMARY,),
                    all_peers=True,
                )
                with scopes[name], hosts[name].activate():
                    await _up.serve_up(
                        plan,
                        JsonLines(out[name]),
                        rendezvous=hub.peer(name, KEYS[name].public_key()),
                        interface=ifaces[name],
                        wall_clock=wall_clock,
                    )

            for index, name in enumerate(NAMES):
                nursery.start_soon(up, name, index)
            await trio.sleep(10)
            for name in NAMES:
                connected = {
                    e["peer"] for e in _events(out[name]) if e["event"] == "peer_connected"
                }
                assert connected == set(NAMES) - {name}, name
            scopes["cat"].cancel()  # as SIGTERM does: teardown deletes its record
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()
    for name in ("ann", "ben"):
        removed = [e for e in _events(out[name]) if e["event"] == "peer_removed"]
        assert [(e["peer"], e["reason"]) for e in removed] == [("cat", LEFT_REASON)]
        down = _events(out[name])[-1]
        assert down["event"] == "down"
        assert len(down["peers"]) == 1  # only the one that stayed is still a WireGuard peer
