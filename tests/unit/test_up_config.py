"""``punchtrio up --config FILE.toml``: keys mapping 1:1 to the long options, bad input refused
with the key named, the wg-quick form told apart; and no key material in any log line."""

from __future__ import annotations

import argparse
import io
import logging
import pathlib
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.cli import _up
from punchtrio.cli._logs import LogReport, configure_logging, secret_texts
from punchtrio.cli._main import UsageError, build_parser, main
from punchtrio.cli._progress import JsonLines
from punchtrio.cli._up_config import (
    apply_config_file,
    config_options,
    is_wgquick,
    parse_up_config,
)
from punchtrio.connect import MemoryInterface
from punchtrio.netsim import NatBehavior
from punchtrio.tunnel import load_wgquick

from .test_connect_basic import INNER, KEYS, PRIMARY, build_world, serve_stun, wall_clock


def _up_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    args = parser.parse_args(["up"])
    found: argparse.ArgumentParser = args.up_parser
    return found


UP = _up_parser()
OPTIONS = config_options(UP)


def _args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(["up", *argv])
    apply_config_file(args, args.up_parser)
    return args


def test_every_long_option_of_up_is_a_key() -> None:
    assert {"hub", "name", "key-file", "address", "peer", "stun", "listen-port"} <= set(OPTIONS)
    assert {"no-relay", "metrics", "json", "verbose", "quiet", "log-format", "config"} <= set(
        OPTIONS
    )
    assert "help" not in OPTIONS
    assert OPTIONS["peer"].kind == "list"
    assert OPTIONS["listen-port"].kind == "int"
    assert OPTIONS["no-relay"].kind == "flag"
    assert OPTIONS["key-file"].path


def test_a_toml_file_fills_the_options_and_the_command_line_wins(tmp_path: pathlib.Path) -> None:
    (tmp_path / "alice.key").write_text(PrivateKey.generate().to_base64() + "\n")
    conf = tmp_path / "office.conf"
    conf.write_text(
        "# punchtrio up, as a service\n"
        'hub = "http://192.0.2.9:7777"\n'
        'name = "alice"\n'
        'key-file = "alice.key"\n'
        'address = "10.99.0.1/24"\n'
        'peer = ["bob", "carol"]\n'
        "listen-port = 51999\n"
        "no-relay = true\n"
        'metrics = "127.0.0.1:9586"\n'
        'log-format = "json"\n'
    )
    args = _args(["--config", str(conf), "--listen-port", "40000"])
    assert args.config is None
    assert args.hub == "http://192.0.2.9:7777"
    assert args.key_file == str(tmp_path / "alice.key")  # relative to the file
    assert args.peer == ["bob", "carol"]
    assert args.listen_port == 40000  # the command line wins
    assert args.no_relay is True
    assert args.log_format == "json"
    plan = _up.build_plan(args)
    assert plan.peers == ("bob", "carol")
    assert plan.metrics == ("127.0.0.1", 9586)
    assert plan.relay is False


def test_a_wgquick_config_is_still_a_wgquick_config(tmp_path: pathlib.Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(f"# comment\n\n[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\n")
    args = _args(["--config", str(conf)])
    assert args.config == str(conf)
    assert is_wgquick(" [ peer ]\n")
    assert not is_wgquick('hub = "http://x"\n[Interface]\n')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('hubb = "http://x"', "unknown key 'hubb'"),
        ('peer = "bob"', 'peer must be an array of strings, e.g. peer = ["..."]'),
        ("listen-port = true", "listen-port must be an integer"),
        ('listen-port = "51820"', "listen-port must be an integer"),
        ('no-relay = "yes"', "no-relay must be true or false"),
        ("name = 7", "name must be a string"),
        ('log-format = "xml"', "log-format must be one of text, json"),
        ("[hub]\nurl = 1", "hub must be a string"),
        ('hub = "http://x', "not valid TOML"),
        ('name = "a\\u0000b"', "name must not contain NUL"),
    ],
)
def test_bad_config_files_are_one_line_errors_naming_the_key(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text + "\n")
    assert main(["up", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"punchtrio: error: {conf}: ")
    assert message in err
    assert len(err.splitlines()) == 1


def test_unreadable_and_nested_config_files_are_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--config", str(tmp_path / "missing.conf")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    binary = tmp_path / "binary.conf"
    binary.write_bytes(b"\xff\xfe")
    assert main(["up", "--config", str(binary)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "inner.conf").write_text('name = "x"\n')
    outer = tmp_path / "outer.conf"
    outer.write_text('config = "inner.conf"\n')
    assert main(["up", "--config", str(outer)]) == 2
    assert "config must name a wg-quick file" in capsys.readouterr().err


_VALUES: dict[str, Any] = {
    "flag": st.booleans(),
    "list": st.lists(st.text(st.characters(blacklist_characters="\0"), max_size=8), max_size=3),
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=False),
    "str": st.text(st.characters(blacklist_characters="\0"), max_size=12),
}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        escaped = (f"\\u{ord(c):04x}" if ord(c) < 0x20 or c in '"\\\x7f' else c for c in value)
        return '"' + "".join(escaped) + '"'
    return repr(value)


@st.composite
def _configs(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(OPTIONS)), unique=True, max_size=6))
    chosen = {}
    for key in keys:
        option = OPTIONS[key]
        if option.choices is not None:
            chosen[key] = draw(st.sampled_from(option.choices))
        else:
            chosen[key] = draw(_VALUES[option.kind])
    return chosen


@given(_configs())
@settings(max_examples=200)
def test_valid_files_parse_back_to_their_values(config: dict[str, Any]) -> None:
    text = "".join(f"{key} = {_toml(value)}\n" for key, value in config.items())
    base = pathlib.Path("/etc/punchtrio")
    parsed = parse_up_config(text, OPTIONS, source="t.conf", base=base)
    for key, value in config.items():
        option = OPTIONS[key]
        if value is False:
            assert option.dest not in parsed
            continue
        if option.path and value and not value.startswith("/"):
            value = str(base / value)
        assert parsed[option.dest] == value


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_any_text_parses_or_is_a_usage_error(text: str) -> None:
    try:
        parse_up_config(text, OPTIONS, source="t.conf", base=pathlib.Path("/"))
    except UsageError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith("t.conf: ")


PSK = bytes(range(200, 232))


@pytest.mark.parametrize("form", ["text", "json"])
async def test_no_key_material_in_any_line_at_debug_level(
    autojump_clock: trio.testing.MockClock,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    form: str,
) -> None:
    """Two ``up`` runs log at debug level (bob's progress as log lines, alice's as JSON events),
    with a static peer that has a preshared key; no line shows a private key or the PSK."""
    static_key = PrivateKey.generate()
    wgquick = tmp_path / "static.conf"
    wgquick.write_text(
        f"[Interface]\nPrivateKey = {static_key.to_base64()}\n\n[Peer]\n"
        f"PublicKey = {PrivateKey.generate().public_key()}\n"
        f"PresharedKey = {secret_texts(keys=[PSK])[0]}\nAllowedIPs = 10.98.0.0/24\n"
    )
    static = load_wgquick(wgquick)
    world = build_world(NatBehavior.port_restricted_cone(), NatBehavior.restricted_cone())
    out = io.StringIO()
    with MemoryInterface() as ia, MemoryInterface() as ib:
        ifaces = {"alice": ia, "bob": ib}
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            args = argparse.Namespace(verbose=True, quiet=False, log_format=form)
            secrets = secret_texts(keys=[KEYS["alice"].raw, KEYS["bob"].raw])
            log = configure_logging(args, "up", secrets=secrets)
            for name, other in (("alice", "bob"), ("bob", "alice")):
                plan = _up.UpPlan(
                    "http://unused",
                    name,
                    KEYS[name],
                    f"{INNER[name]}/24",  # type: ignore[arg-type]
                    (other,),
                    (PRIMARY,),
                    static=static,
                )
                assert set(_up._secrets(plan.key, static, plan)) >= set(secret_texts(keys=[PSK]))
                log.debug("debug logging is on for %s", name)
                report = LogReport(log) if name == "bob" else JsonLines(out)
                rendezvous = world.hub.peer(name, KEYS[name].public_key())
                with world.hosts[name].activate():
                    nursery.start_soon(
                        lambda p=plan, r=rendezvous, n=name, rep=report: _up.serve_up(
                            p, rep, rendezvous=r, interface=ifaces[n], wall_clock=wall_clock
                        )
                    )
            await trio.sleep(5)
            logging.getLogger("punchtrio.rendezvous").debug("a library debug line")
            nursery.cancel_scope.cancel()
    captured = capsys.readouterr()
    text = out.getvalue() + captured.out + captured.err
    assert "debug logging is on for bob" in text
    assert "a library debug line" in text
    assert "peer_connected" in text
    assert '"event": "down"' in text  # the down event, with the peers' counters
    for secret in secret_texts(keys=[KEYS["alice"].raw, KEYS["bob"].raw, static_key.raw, PSK]):
        assert secret not in text


def test_both_v_and_q_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hub", "-v", "-q", "--store", "memory"]) == 2
    assert capsys.readouterr().err == "punchtrio: error: give -v or -q, not both\n"
