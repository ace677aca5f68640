"""``punchtrio hub``: options, defaults and the one-line errors (serving is tested in interop)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from punchtrio import PrivateKey
from punchtrio.cli import _hub
from punchtrio.cli._main import build_parser, main


def _args(*argv: str) -> object:
    return build_parser().parse_args(["hub", *argv])


def test_defaults() -> None:
    args = _args()
    assert args.listen is None  # type: ignore[attr-defined]
    assert _hub._addresses(None, "--listen", _hub.DEFAULT_LISTEN) == [("0.0.0.0", 7777)]
    config, limits = _hub.build_config(args)  # type: ignore[arg-type]
    assert (config.ttl, config.max_wait, config.rate, config.burst) == (300.0, 60.0, 50.0, 100.0)
    assert config.networks == ()
    assert limits.max_peers == 200_000


def test_options_reach_the_config(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    key.write(tmp_path / "hub.key")
    (tmp_path / "red").write_text("red network secret\n")
    (tmp_path / "blue").write_text("blue network secret\n")
    args = _args(
        "--key-file", str(tmp_path / "hub.key"),
        "--network-secret-file", str(tmp_path / "red"),
        "--network-secret-file", str(tmp_path / "blue"),
        "--ttl", "60", "--max-wait", "25", "--rate", "0", "--max-peers", "10",
        "--max-queued", "4", "--max-messages", "40", "--max-waiters", "7",
    )  # fmt: skip
    config, limits = _hub.build_config(args)  # type: ignore[arg-type]
    assert config.key.public_key() == key.public_key()
    assert len(config.networks) == 2
    assert (config.ttl, config.max_wait, config.rate) == (60.0, 25.0, 0.0)
    assert (limits.max_peers, limits.max_queued_per_peer, limits.max_queued) == (10, 4, 40)
    assert limits.max_waiters == 7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ttl", "0"], "--ttl must be a positive number"),
        (["--ttl", "nan"], "--ttl must be a positive number"),
        (["--rate", "-1"], "--rate must be 0 or a positive number"),
        (["--max-peers", "0"], "--max-peers must be at least 1"),
        (["--listen", "example.com:7777"], "--listen must be a literal IP address"),
        (["--listen", "0.0.0.0"], "--listen must be IPv4:port or [IPv6]:port"),
        (["--listen", "0.0.0.0:99999"], "--listen must have a port from 1 to 65535"),
        (["--stun-alternate", "192.0.2.1:3479"], "--stun-alternate needs --stun"),
        (["--key-file", "/nonexistent/hub.key"], "cannot read key file"),
        (["--tls-cert", "cert.pem"], "give both --tls-cert and --tls-key"),
        (["--redis", "http://localhost:6379"], "--redis must be a redis://"),
    ],
)
def test_bad_options_exit_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["hub", *argv])
    err = capsys.readouterr().err
    assert status in (1, 2, 3)
    assert err.startswith("punchtrio: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_short_network_secret_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "weak").write_text("short\n")
    assert main(["hub", "--network-secret-file", str(tmp_path / "weak")]) == 1
    assert "16 to 1024 bytes" in capsys.readouterr().err


def _run_hub(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "punchtrio.cli",
            "hub",
            "--store",
            "memory",
            "--listen",
            "127.0.0.1:0",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _assert_one_error_line(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("punchtrio: error: ")
    assert message in lines[0]


def test_bad_stun_alternate_is_one_line() -> None:
    proc = _run_hub("--stun", "127.0.0.1:0", "--stun-alternate", "127.0.0.1:0")
    _assert_one_error_line(proc, "the alternate address must differ from the primary")


def test_stun_port_in_use_is_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = _run_hub("--stun", f"127.0.0.1:{port}")
    _assert_one_error_line(proc, "cannot serve STUN on")
