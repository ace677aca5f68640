"""`punchtrio up --hub`: argument checks, the JSON event stream, failures and static peers, in netsim."""

from __future__ import annotations

import io
import json
import pathlib
import re
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from punchtrio import PrivateKey
from punchtrio.cli import _up
from punchtrio.cli._main import UsageError, build_parser, main
from punchtrio.cli._progress import JsonLines, ProgressView
from punchtrio.connect import ConnectError, MemoryInterface, PeerConnected, PeerFailed
from punchtrio.netsim import NatBehavior
from punchtrio.tunnel import ConfigError

from .test_connect_basic import INNER, KEYS, PRIMARY, build_world, serve_stun, wall_clock


def _args(tmp_path: pathlib.Path, *extra: str) -> list[str]:
    key = tmp_path / "alice.key"
    if not key.exists():
        KEYS["alice"].write(key)
    return [
        "up",
        "--hub",
        "http://192.0.2.9:7777",
        "--name",
        "alice",
        "--key-file",
        str(key),
        "--address",
        "10.99.0.1/24",
        "--peer",
        "bob",
        *extra,
    ]


def _plan(argv: list[str]) -> _up.UpPlan:
    return _up.build_plan(build_parser().parse_args(argv))


def test_plan_from_arguments(tmp_path: pathlib.Path) -> None:
    plan = _plan(
        _args(tmp_path, "--peer", "carol", "--stun", "203.0.113.1:3478", "--listen-port", "0")
    )
    assert plan.name == "alice"
    assert plan.peers == ("bob", "carol")
    assert plan.key.public_key() == KEYS["alice"].public_key()
    assert str(plan.address) == "10.99.0.1/24"
    assert plan.stun == (("203.0.113.1", 3478),)
    assert plan.listen_port == 0
    assert plan.interface == ""
    assert plan.static is None
    assert _plan(_args(tmp_path)).stun is None  # the hub's advertised STUN server


@pytest.mark.parametrize(
    "extra",
    [
        ["--peer", "Bad Name"],
        ["--peer", "alice"],
        ["--peer", "bob"],
        ["--stun", "stun.example:3478"],
        ["--stun", "2001:db8::1:3478"],
        ["--listen-port", "70000"],
        ["--interface", "x" * 16],
        ["--address", "10.99.0.1"],
        ["--address", "fd00::1/64"],
        ["--network-secret-file", "/nonexistent/secret"],
    ],
)
def test_bad_arguments_exit_2_before_anything_starts(
    tmp_path: pathlib.Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _args(tmp_path, *extra)
    if extra[0] == "--address":
        argv[argv.index("10.99.0.1/24")] = extra[1]
        argv = argv[:-2]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("punchtrio: error: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--name", "alice"],
        ["up", "--peer", "bob", "--config", "x.conf"],
        ["up", "--hub", "ftp://hub", "--name", "a", "--peer", "b"],
        ["up", "--hub", "http://hub:7777", "--peer", "b"],
        ["up", "--hub", "http://hub:7777", "--name", "a"],
    ],
)
def test_incomplete_command_lines_are_usage_errors(argv: list[str]) -> None:
    assert main(argv) == 2


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_parse_stun_accepts_every_ipv4_endpoint(ip: Any, port: int) -> None:
    assert _up.parse_stun(f"{ip}:{port}") == (str(ip), port)


@given(st.ip_addresses(v=6), st.integers(1, 65535))
def test_parse_stun_accepts_every_bracketed_ipv6_endpoint(ip: Any, port: int) -> None:
    assert _up.parse_stun(f"[{ip}]:{port}") == (str(ip), port)


@given(st.text(max_size=80))
def test_parse_stun_rejects_with_a_usage_error_only(text: str) -> None:
    try:
        ip, port = _up.parse_stun(text)
    except UsageError:
        return
    assert text in (f"{ip}:{port}", f"[{ip}]:{port}") or text.endswith(f":{port}")


def test_a_peer_failure_is_one_line_naming_the_stage(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def failing(plan: _up.UpPlan, report: Any) -> None:
        raise ConnectError(
            "bob", "punch", "no path to bob after 8.5 s: both NATs map per destination"
        )

    monkeypatch.setattr(_up, "serve_up", failing)
    assert main(_args(tmp_path, "--json")) == 8
    assert capsys.readouterr().err == (
        "punchtrio: error: punch: no path to bob after 8.5 s: both NATs map per destination\n"
    )


def _json_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_two_up_runs_connect_and_report_json_lines(
    autojump_clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    world = build_world(NatBehavior.port_restricted_cone(), NatBehavior.restricted_cone())
    out = {"alice": io.StringIO(), "bob": io.StringIO()}
    plans = {
        name: _up.UpPlan(
            "http://unused",
            name,
            KEYS[name],
            f"{INNER[name]}/24",  # type: ignore[arg-type]
            (other,),
            (PRIMARY,),
        )
        for name, other in (("alice", "bob"), ("bob", "alice"))
    }
    with MemoryInterface() as ia, MemoryInterface() as ib:
        ifaces = {"alice": ia, "bob": ib}
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            for name, plan in plans.items():
                rendezvous = world.hub.peer(name, KEYS[name].public_key())
                with world.hosts[name].activate():
                    nursery.start_soon(
                        lambda p=plan, r=rendezvous, n=name: _up.serve_up(
                            p,
                            JsonLines(out[n]),
                            rendezvous=r,
                            interface=ifaces[n],
                            wall_clock=wall_clock,
                        )
                    )
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    for name, other in (("alice", "bob"), ("bob", "alice")):
        events = _json_events(out[name])
        assert all(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e.pop("time")) for e in events
        )
        assert events[0] == {
            "event": "up",
            "name": name,
            "interface": ifaces[name].name,
            "listen_port": 51820,
        }
        assert [e["stage"] for e in events if e["event"] == "stage_started"][:2] == [
            "stun",
            "register",
        ]
        connected = [e for e in events if e["event"] == "peer_connected"]
        assert len(connected) == 1
        assert set(connected[0]) == {"event", "peer", "path", "endpoint", "elapsed_ms"}
        assert connected[0]["peer"] == other
        assert connected[0]["path"] == "direct"
        assert isinstance(connected[0]["elapsed_ms"], float)
        gathered = next(e for e in events if e["event"] == "candidates_gathered")
        assert any(c.startswith("srflx ") for c in gathered["candidates"])
        assert events[-1]["event"] == "down"
        [peer_stats] = events[-1]["peers"]
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", peer_stats["endpoint"])  # "ip:port"


async def test_a_missing_peer_fails_at_wait_and_tears_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = build_world(NatBehavior.port_restricted_cone(), NatBehavior.restricted_cone())
    out = io.StringIO()
    plan = _up.UpPlan("http://unused", "alice", KEYS["alice"], "10.99.0.1/24", ("bob",), (PRIMARY,))  # type: ignore[arg-type]
    with MemoryInterface() as iface:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            with world.hosts["alice"].activate(), pytest.raises(ConnectError) as caught:
                await _up.serve_up(
                    plan,
                    JsonLines(out),
                    rendezvous=world.hub.peer("alice", KEYS["alice"].public_key()),
                    interface=iface,
                    wall_clock=wall_clock,
                    wait_timeout=3.0,
                    retry_backoff=None,
                )
            nursery.cancel_scope.cancel()
    assert caught.value.stage == "wait"
    events = _json_events(out)
    assert events[-2]["event"] == "peer_failed"
    assert events[-2]["stage"] == "wait"
    assert events[-2]["retry_in"] is None
    assert events[-1]["event"] == "down"
    assert world.hub.records() == ()  # our record was removed at the hub


async def test_a_missing_peer_is_retried_and_up_keeps_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = build_world(NatBehavior.port_restricted_cone(), NatBehavior.restricted_cone())
    out = io.StringIO()
    plan = _up.UpPlan("http://unused", "alice", KEYS["alice"], "10.99.0.1/24", ("bob",), (PRIMARY,))  # type: ignore[arg-type]
    with MemoryInterface() as iface:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            with world.hosts["alice"].activate(), trio.move_on_after(20.0) as scope:
                await _up.serve_up(
                    plan,
                    JsonLines(out),
                    rendezvous=world.hub.peer("alice", KEYS["alice"].public_key()),
                    interface=iface,
                    wall_clock=wall_clock,
                    wait_timeout=3.0,
                )
            nursery.cancel_scope.cancel()
    assert scope.cancelled_caught  # still running when stopped: no failure ended it
    events = _json_events(out)
    failures = [e for e in events if e["event"] == "peer_failed"]
    # Waits of 3 s end at 3, 8 and 15 s; the retries after 2 and 4 s start waits at 0, 5 and
    # 12 s; the one after 8 s would come at 23 s, after the stop.
    assert [f["retry_in"] for f in failures] == [2.0, 4.0, 8.0]  # doubling backoff
    waits = [e for e in events if e["event"] == "stage_started" and e["stage"] == "wait"]
    assert len(waits) == 3
    assert events[-1]["event"] == "down"


def test_config_and_hub_combine(tmp_path: pathlib.Path) -> None:
    static_key = PrivateKey(bytes(range(50, 82))).public_key()
    conf = tmp_path / "wg0.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {KEYS['alice'].to_base64()}\nAddress = 10.99.0.1/24\nListenPort = 51999\n\n"
        f"[Peer]\nPublicKey = {static_key}\nAllowedIPs = 10.50.0.0/24\nEndpoint = 192.0.2.50:51820\n"
    )
    plan = _plan(
        [
            "up",
            "--config",
            str(conf),
            "--hub",
            "http://192.0.2.9:7777",
            "--name",
            "alice",
            "--peer",
            "bob",
        ]
    )
    assert plan.key.public_key() == KEYS["alice"].public_key()
    assert str(plan.address) == "10.99.0.1/24"
    assert plan.listen_port == 51999
    assert plan.static is not None
    assert len(plan.static.peers) == 1


async def test_static_peers_join_the_rendezvous_tunnel(
    autojump_clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    static_key = PrivateKey(bytes(range(50, 82))).public_key()
    conf = tmp_path / "wg0.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {KEYS['alice'].to_base64()}\nAddress = 10.99.0.1/24\n\n"
        f"[Peer]\nPublicKey = {static_key}\nAllowedIPs = 10.50.0.0/24\n"
    )
    plan = _plan(
        [
            "up",
            "--config",
            str(conf),
            "--hub",
            "http://192.0.2.9:7777",
            "--name",
            "alice",
            "--stun",
            f"{PRIMARY[0]}:{PRIMARY[1]}",
        ]
    )
    world = build_world(NatBehavior.port_restricted_cone(), None)
    out = io.StringIO()
    with MemoryInterface() as iface:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            with world.hosts["alice"].activate():
                nursery.start_soon(
                    lambda: _up.serve_up(
                        plan,
                        JsonLines(out),
                        rendezvous=world.hub.peer("alice", KEYS["alice"].public_key()),
                        interface=iface,
                        wall_clock=wall_clock,
                    )
                )
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
    down = _json_events(out)[-1]
    assert down["event"] == "down"
    assert [p["public_key"] for p in down["peers"]] == [str(static_key)]


async def test_a_static_peer_the_device_refuses_names_file_and_line(
    autojump_clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {KEYS['alice'].to_base64()}\nAddress = 10.99.0.1/24\n\n"
        f"[Peer]\nPublicKey = {KEYS['alice'].public_key()}\nAllowedIPs = 10.50.0.0/24\n"
    )
    plan = _plan(["up", "--config", str(conf), "--hub", "http://192.0.2.9:7777", "--name", "alice"])
    world = build_world(NatBehavior.port_restricted_cone(), None)
    out = io.StringIO()
    with MemoryInterface() as iface:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            with world.hosts["alice"].activate(), pytest.raises(ConfigError) as caught:
                await _up.serve_up(
                    plan,
                    JsonLines(out),
                    rendezvous=world.hub.peer("alice", KEYS["alice"].public_key()),
                    interface=iface,
                    wall_clock=wall_clock,
                )
            nursery.cancel_scope.cancel()
    assert str(caught.value) == f"{conf}:5: a device cannot be its own peer"
    assert caught.value.exit_code == 2
    assert _json_events(out)[-1]["event"] == "down"


def test_describe_gives_json_for_every_event() -> None:
    name, fields = _up.describe(PeerConnected("bob", "direct", "198.51.100.2:40000", 123.44))
    assert name == "peer_connected"
    assert fields == {
        "peer": "bob",
        "path": "direct",
        "endpoint": "198.51.100.2:40000",
        "elapsed_ms": 123.4,
    }
    assert _up.describe(PeerFailed("bob", "punch", "no path"))[0] == "peer_failed"


def test_progress_view_prints_plain_steps_off_a_terminal() -> None:
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    view = ProgressView(console)
    view("stage_started", {"stage": "wait", "peer": "bob"})
    view(
        "peer_connected",
        {"peer": "bob", "path": "direct", "endpoint": "192.0.2.1:51820", "elapsed_ms": 812.0},
    )
    view("peer_failed", {"peer": "carol", "stage": "punch", "reason": "no path"})
    view.close()
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "waiting for bob at the hub" in text
    assert "connected to bob (direct, 192.0.2.1:51820) after 812 ms" in text
    assert "carol failed at the punch stage" in text
    assert "no path" not in text  # the reason is the CLI's one error line, printed once


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--turn", "turn:203.0.113.5:3478"], "--turn needs --turn-user NAME"),
        (["--turn-user", "u"], "--turn-user and --turn-password-file need --turn URI"),
        (
            [
                "--turn",
                "turns:203.0.113.5:5349?transport=udp",
                "--turn-user",
                "u",
                "--turn-password-file",
                "PW",
            ],
            "turns: over UDP (DTLS) is not supported",
        ),
        (["--turn", "http://x", "--turn-user", "u", "--turn-password-file", "PW"], "--turn: "),
        (
            ["--turn", "turn:203.0.113.5:3478", "--turn-user", "u", "--turn-password-file", "NONE"],
            "--turn-password-file",
        ),
    ],
)
def test_bad_turn_options_are_usage_errors_before_anything_starts(
    tmp_path: pathlib.Path, extra: list[str], message: str
) -> None:
    key = tmp_path / "k"
    PrivateKey.generate().write(key)
    password = tmp_path / "pw"
    password.write_text("secret\n")
    argv = [
        "--hub", "http://203.0.113.1:7777", "--name", "alice", "--key-file", str(key),
        "--address", "10.99.0.1/24", "--peer", "bob",
    ]  # fmt: skip
    extra = [
        str(password) if a == "PW" else str(tmp_path / "none") if a == "NONE" else a for a in extra
    ]
    args = build_parser().parse_args(["up", *argv, *extra])
    with pytest.raises(UsageError) as caught:
        _up.build_plan(args)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_turn_options_become_the_connector_s_turn_servers(tmp_path: pathlib.Path) -> None:
    key = tmp_path / "k"
    PrivateKey.generate().write(key)
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    args = build_parser().parse_args(
        [
            "up", "--hub", "http://203.0.113.1:7777", "--name", "alice", "--key-file", str(key),
            "--address", "10.99.0.1/24", "--peer", "bob", "--turn", "turn:203.0.113.5:3478",
            "--turn-user", "u", "--turn-password-file", str(password), "--no-relay",
        ]
    )  # fmt: skip
    plan = _up.build_plan(args)
    [server] = plan.turn
    assert server.uri.address is not None
    assert (server.credentials.username, server.credentials.password) == ("u", "s3cret")
    assert plan.relay is False
    assert "s3cret" not in repr(plan)


def test_the_down_event_shows_a_relayed_peer_at_its_relay_not_its_internal_name() -> None:
    class Described:
        def describe_path(self, address: tuple[str, int]) -> tuple[str, str | None]:
            if address == ("240.0.0.1", 1):
                return "203.0.113.1:7778", "hub/udp"
            return f"{address[0]}:{address[1]}", None

    stats = [{"endpoint": "240.0.0.1:1"}, {"endpoint": "192.0.2.1:51820"}, {"endpoint": None}]
    shown = _up._relayed_stats(Described(), stats)  # type: ignore[arg-type]
    assert shown == [
        {"endpoint": "203.0.113.1:7778", "relay": "hub/udp"},
        {"endpoint": "192.0.2.1:51820"},
        {"endpoint": None},
    ]


def test_hub_trust_options(tmp_path: pathlib.Path) -> None:
    hub_key = PrivateKey.generate().public_key()
    plan = _plan([*_args(tmp_path, "--hub-key", hub_key.to_base64(), "--port-mapping")])
    assert plan.hub_key == hub_key
    assert plan.port_mapping is True
    assert plan.hub_ca is None
    https = [
        a.replace("http://192.0.2.9:7777", "https://hub.example:7777") for a in _args(tmp_path)
    ]
    with pytest.raises(UsageError, match=r"--hub-ca .*missing\.pem: no such file"):
        _plan([*https, "--hub-ca", str(tmp_path / "missing.pem")])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="not a PEM CA bundle"):
        _plan([*https, "--hub-ca", str(garbage)])
    # An http:// hub takes --hub-ca too: it verifies the relays over TLS the hub advertises.
    with pytest.raises(UsageError, match="not a PEM CA bundle"):
        _plan(_args(tmp_path, "--hub-ca", str(garbage)))
    with pytest.raises(UsageError, match="--hub-key: "):
        _plan(_args(tmp_path, "--hub-key", "not-a-key"))


def test_candidates_are_written_as_endpoints_with_ipv6_in_brackets() -> None:
    from punchtrio.connect import CandidatesGathered
    from punchtrio.punch import Candidate, CandidateType

    event = CandidatesGathered(
        (
            Candidate(CandidateType.HOST, "fd00::2", 51820),
            Candidate(CandidateType.SRFLX, "198.51.100.7", 40000),
        ),
        mapping_varies=False,
    )
    name, fields = _up.describe(event)
    assert name == "candidates_gathered"
    assert fields["candidates"] == ["host [fd00::2]:51820", "srflx 198.51.100.7:40000"]
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    view = ProgressView(console)
    view(name, fields)
    view.close()
    line = console.file.getvalue()  # type: ignore[attr-defined]
    assert "candidates: host [fd00::2]:51820, srflx 198.51.100.7:40000 (NAT mapping" in line
    assert "fd00::2:51820" not in line
