"""`punchtrio status` / `ping`: the snapshot, its rendering, the control server and client errors."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from punchtrio.cli import main
from punchtrio.cli._control import (
    ControlError,
    ControlServer,
    echo_request,
    parse_echo_reply,
    request,
    serve_control,
    status_snapshot,
)
from punchtrio.cli._status import render_ping, render_status
from punchtrio.keys import PublicKey
from punchtrio.wireguard import Device, PeerConfig

OWN = bytes(range(1, 33))
PEER = Device(bytes([7] * 32)).public_key


class _Tunnel:
    name = "pt-st0"
    listen_port = 51820


def _static_device() -> Device:
    device = Device(OWN, wall_clock=lambda: 1000.0)
    device.add_peer(
        PeerConfig(
            PEER,
            allowed_ips=(ipaddress.ip_network("10.5.0.0/24"), ipaddress.ip_network("10.9.0.2/32")),
            endpoint=("192.0.2.4", 51820),
        )
    )
    return device


def test_snapshot_of_a_static_peer_has_its_endpoint_bytes_and_tunnel_address() -> None:
    status = status_snapshot(_Tunnel(), _static_device(), None, now=1010.0)  # type: ignore[arg-type]
    assert status["interface"] == "pt-st0"
    assert status["public_key"] == str(PublicKey(Device(OWN).public_key))
    (peer,) = status["peers"]
    assert peer["name"] is None
    assert peer["public_key"] == str(PublicKey(PEER))
    assert peer["endpoint"] == "192.0.2.4:51820"
    assert peer["tunnel_ip"] == "10.9.0.2"
    assert (peer["connected"], peer["last_handshake"], peer["rx_bytes"]) == (False, None, 0)


def _peer(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "bob",
        "public_key": "K" * 44,
        "stage": "established",
        "connected": True,
        "path": "direct",
        "relay": None,
        "endpoint": "203.0.113.5:51820",
        "rtt_ms": 12.34,
        "error": None,
        "last_handshake": 1.0,
        "handshake_age_s": 8.0,
        "rx_bytes": 2048,
        "tx_bytes": 100,
        "tunnel_ip": "10.99.0.2",
    }
    base.update(fields)
    return base


def test_status_text_shows_path_rtt_handshake_bytes_and_stages() -> None:
    status = {
        "interface": "tun0",
        "name": "alice",
        "public_key": "A" * 44,
        "listen_port": 51820,
        "address": "10.99.0.1/24",
        "peers": [
            _peer(),
            _peer(
                name="carol",
                path="relay",
                relay="hub/udp",
                endpoint="198.51.100.1:7778",
                rtt_ms=None,
                direct_error="both NATs map per destination",
            ),
            _peer(name="dave", stage="punch", connected=False, path=None, handshake_age_s=None),
            _peer(name="erin", stage="wait", connected=False, error="erin never registered"),
        ],
    }
    lines = render_status(status).splitlines()
    assert lines[0].startswith("tun0  alice  10.99.0.1/24  port 51820")
    assert lines[1] == (
        "  bob    direct 203.0.113.5:51820  rtt 12.3 ms  handshake 8 s ago  rx 2.0 KiB tx 100 B"
    )
    assert lines[2].startswith("  carol  relay hub/udp 198.51.100.1:7778  handshake 8 s ago")
    assert lines[2].endswith("  no direct path: both NATs map per destination")
    assert lines[3] == "  dave   punch"
    assert lines[4] == "  erin   failed at wait: erin never registered"


def test_ping_line_names_the_path_and_round_trip() -> None:
    result = {
        "peer": "bob",
        "address": "10.99.0.2",
        "rtt_ms": 1.5,
        "path": "relay",
        "relay": "hub/tcp",
        "endpoint": "198.51.100.1:7778",
    }
    assert render_ping(result) == (
        "pong from bob (10.99.0.2) via relay hub/tcp 198.51.100.1:7778 in 1.50 ms"
    )


def _ip_packet(icmp: bytes, source: str) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        0,
        0,
        64,
        1,
        0,
        ipaddress.IPv4Address(source).packed,
        bytes(4),
    )
    return header + icmp


def test_echo_reply_parser_matches_our_request() -> None:
    request_bytes = echo_request(0x1234, 1, b"x")
    reply = bytes([0]) + request_bytes[1:]  # type 0: the same body echoed back
    assert parse_echo_reply(_ip_packet(reply, "10.99.0.2")) == ("10.99.0.2", 0x1234, 1)
    assert parse_echo_reply(_ip_packet(request_bytes, "10.99.0.2")) is None  # a request


@given(st.binary(max_size=64))
def test_echo_reply_parser_never_raises(data: bytes) -> None:
    result = parse_echo_reply(data)
    assert result is None or len(result) == 3


async def test_control_server_answers_status_and_refuses_bad_requests() -> None:
    server = ControlServer(_Tunnel(), _static_device(), None)  # type: ignore[arg-type]
    status = await server.answer(b'{"op": "status"}')
    assert status["ok"]
    assert status["status"]["peers"][0]["tunnel_ip"] == "10.9.0.2"
    assert (await server.answer(b"not json"))["ok"] is False
    unknown = await server.answer(b'{"op": "reboot"}')
    assert "unknown op" in unknown["error"]
    missing = await server.answer(b'{"op": "ping", "peer": "mallory"}')
    assert "no peer 'mallory'" in missing["error"]


async def test_control_socket_serves_json_lines(tmp_path: Path) -> None:
    server_args = (_Tunnel(), _static_device(), None)
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            await serve_control(*server_args, directory=str(tmp_path), task_status=task_status)  # type: ignore[arg-type]

        path = await nursery.start(serve)
        reply = await trio.to_thread.run_sync(request, path, {"op": "status"})
        assert reply["status"]["interface"] == "pt-st0"
        nursery.cancel_scope.cancel()


def test_client_errors_name_the_socket_and_what_to_do(tmp_path: Path) -> None:
    missing = str(tmp_path / "tun9.ctl")
    with pytest.raises(ControlError, match=r"tun9\.ctl does not exist; start `punchtrio up`"):
        request(missing, {"op": "status"})
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "old.ctl"))
    stale.close()
    with pytest.raises(ControlError, match="stale socket"):
        request(str(tmp_path / "old.ctl"), {"op": "status"})


@pytest.mark.parametrize(
    "argv",
    [["status", "pt-no-such-if"], ["ping", "--interface", "pt-no-such-if", "bob"]],
    ids=["status", "ping"],
)
def test_cli_without_a_running_up_prints_one_line_and_fails(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "/run/punchtrio/pt-no-such-if.ctl" in err[0]
    assert "start `punchtrio up`" in err[0]
