"""``punchtrio register`` / ``lookup``: bad input is one line and exit 2, before any request.
(The commands against a real hub are in ``tests/interop/test_rendezvous_real_hub.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.cli import main
from punchtrio.cli._main import UsageError
from punchtrio.cli._register import _endpoint
from punchtrio.rendezvous import EndpointType


@pytest.fixture
def key(tmp_path: Path) -> str:
    path = tmp_path / "peer.key"
    PrivateKey.generate().write(path)
    return str(path)


# Port 9 on a documentation address: never contacted, every case fails before any request.
HUB = "http://192.0.2.1:9"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "Alice"], "--name must match"),
        (["--name", "alice", "--endpoint", "127.0.0.1:51820"], "is loopback"),
        (["--name", "alice", "--endpoint", "host.example:51820"], "literal IP"),
        (["--name", "alice", "--endpoint", "bogus:192.0.2.7:5"], "IPv4:port or [IPv6]:port"),
        (["--name", "alice", "--allowed-ip", "10.0.0.1/24"], "not a canonical CIDR"),
        (["--name", "alice", "--allowed-ip", "0.0.0.0/0"], "default route"),
        (["--name", "alice", "--hub-key", "AAAA"], "32 bytes of base64"),
        (["--name", "alice", "--timeout", "0"], "--timeout"),
    ],
)
def test_register_refuses_bad_input_with_one_line(
    key: str, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["register", "--hub", HUB, "--key-file", key, *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("punchtrio: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_bad_hub_url_key_file_and_secret(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lookup", "--hub", "ftp://hub", "--name", "bob", "--key-file", key]) == 2
    assert "http" in capsys.readouterr().err
    assert main(["lookup", "--hub", "http://[::1", "--name", "bob", "--key-file", key]) == 2
    assert "invalid hub URL" in capsys.readouterr().err
    missing = str(tmp_path / "missing.key")
    assert main(["lookup", "--hub", HUB, "--name", "bob", "--key-file", missing]) == 2
    assert "cannot read key file" in capsys.readouterr().err
    short = tmp_path / "short.secret"
    short.write_text("tiny\n")
    argv = ["lookup", "--hub", HUB, "--name", "bob", "--key-file", key]
    assert main([*argv, "--network-secret-file", str(short)]) == 2
    assert "network secret" in capsys.readouterr().err


def test_endpoint_types() -> None:
    assert _endpoint("192.0.2.7:5").type is EndpointType.HOST
    assert _endpoint("srflx:198.51.100.7:51820").type is EndpointType.SRFLX
    relay = _endpoint("relay:[2001:db8::1]:3478")
    assert (relay.type, relay.address) == (EndpointType.RELAY, "[2001:db8::1]:3478")


@given(st.text(max_size=60))
def test_endpoint_option_parser_never_crashes(text: str) -> None:
    try:
        endpoint = _endpoint(text)
    except UsageError as exc:
        error = str(exc)
    else:
        assert text.endswith(endpoint.address)
        return
    assert error.startswith(f"--endpoint {text}: ")
