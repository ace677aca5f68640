"""The UAPI core (framing, parsing, get replies, set plans applied to a real Device) and its socket."""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import stat
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.tunnel import (
    DeviceInfo,
    GetRequest,
    PeerChange,
    PeerInfo,
    ProtocolViolation,
    RefusedRequest,
    SetRequest,
    SocketInUseError,
    UapiConnection,
    UapiError,
    UapiServer,
    apply_plan,
    bind_unix_listener,
    device_info,
    format_get,
    parse_endpoint,
    parse_set,
    plan_set,
    serve_uapi,
)
from punchtrio.wireguard import Device, PeerConfig

OWN = bytes(range(1, 33))
KEY_A = Device(bytes([7] * 32)).public_key
KEY_B = Device(bytes([9] * 32)).public_key
NET = ipaddress.ip_network


def _device() -> Device:
    device = Device(OWN)
    device.add_peer(PeerConfig(KEY_A, allowed_ips=(NET("10.0.0.2/32"), NET("10.1.0.0/16"))))
    device.add_peer(PeerConfig(KEY_B, allowed_ips=(NET("10.0.0.3/32"),), endpoint=("192.0.2.1", 5)))
    return device


def _info(device: Device) -> DeviceInfo:
    return device_info(device, listen_port=51820)


def _configs(device: Device) -> dict[bytes, PeerConfig]:
    return {key: device.peer_config(key) for key in device.peers()}


# -- framing and parsing -------------------------------------------------------------------------


def test_requests_are_framed_across_reads_and_in_one_read() -> None:
    conn = UapiConnection()
    conn.receive_data(b"get=1\n")
    assert conn.next_request() is None
    conn.receive_data(b"\nset=1\nlisten_port=7\n")
    assert conn.next_request() == GetRequest()
    assert conn.next_request() is None
    conn.receive_data(b"\nget=1\n\n")
    assert conn.next_request() == SetRequest(listen_port=7)
    assert conn.next_request() == GetRequest()
    assert conn.next_request() is None


def test_unknown_operation_and_trailing_get_data_are_violations() -> None:
    conn = UapiConnection()
    conn.receive_data(b"hello=1\n\n")
    assert isinstance(conn.next_request(), ProtocolViolation)
    conn = UapiConnection()
    conn.receive_data(b"get=1\nx\n")
    violation = conn.next_request()
    assert isinstance(violation, ProtocolViolation)
    assert violation.errno == errno.EINVAL


def test_an_over_long_request_is_a_violation() -> None:
    conn = UapiConnection(max_request_bytes=100)
    conn.receive_data(b"set=1\n" + b"allowed_ip=10.0.0.0/8\n" * 10)
    violation = conn.next_request()
    assert isinstance(violation, ProtocolViolation)
    assert violation.errno == errno.EPROTO


def test_wg_set_request_parses() -> None:
    body = (
        f"private_key={OWN.hex()}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n"
        f"public_key={KEY_A.hex()}\npreshared_key={'00' * 32}\nendpoint=[2001:db8::1]:51820\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.9/24\n"
        f"protocol_version=1\npublic_key={KEY_B.hex()}\nremove=true\n"
    )
    request = parse_set(body)
    assert (request.private_key, request.listen_port) == (OWN, 51820)
    assert (request.fwmark, request.replace_peers) == (0, True)
    first, second = request.peers
    assert (first.preshared_key, first.endpoint) == (b"", ("2001:db8::1", 51820))
    assert (first.persistent_keepalive, first.replace_allowed_ips) == (25, True)
    assert first.allowed_ips == (NET("10.0.0.0/24"),)
    assert second == PeerChange(KEY_B, remove=True)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("listen_port=65536\n", errno.EINVAL),
        ("bogus=1\n", errno.EINVAL),
        ("no equals sign\n", errno.EPROTO),
        ("private_key=abc\n", errno.EINVAL),
        (f"public_key={KEY_A.hex()}\nendpoint=example.com:51820\n", errno.EINVAL),
        (f"public_key={KEY_A.hex()}\nendpoint=[10.0.0.1]:5\n", errno.EINVAL),
        (f"public_key={KEY_A.hex()}\nallowed_ip=10.0.0.0/33\n", errno.EINVAL),
        (f"public_key={KEY_A.hex()}\nprotocol_version=2\n", errno.EINVAL),
        (f"public_key={KEY_A.hex()}\nremove=false\n", errno.EINVAL),
        (f"public_key={KEY_A.hex()}\nlisten_port=1\n", errno.EINVAL),
    ],
)
def test_bad_set_lines_are_refused_with_their_errno(body: str, code: int) -> None:
    with pytest.raises(UapiError) as raised:
        parse_set(body)
    assert raised.value.errno == code


_keys = st.binary(min_size=32, max_size=32)
_v4 = st.builds(
    lambda a, p: ipaddress.ip_network((a, p), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
_v6 = st.builds(
    lambda a, p: ipaddress.ip_network((a, p), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
_endpoints = st.one_of(
    st.builds(
        lambda a, p: (str(ipaddress.IPv4Address(a)), p),
        st.integers(0, 2**32 - 1),
        st.integers(1, 65535),
    ),
    st.builds(
        lambda a, p: (str(ipaddress.IPv6Address(a)), p),
        st.integers(0, 2**128 - 1),
        st.integers(1, 65535),
    ),
)
_peers = st.builds(
    PeerChange,
    public_key=_keys,
    remove=st.booleans(),
    update_only=st.booleans(),
    preshared_key=st.one_of(st.none(), st.just(b""), _keys.filter(any)),
    endpoint=st.one_of(st.none(), _endpoints),
    persistent_keepalive=st.one_of(st.none(), st.integers(0, 65535)),
    replace_allowed_ips=st.booleans(),
    allowed_ips=st.lists(st.one_of(_v4, _v6), max_size=4).map(tuple),
)
_requests = st.builds(
    SetRequest,
    private_key=st.one_of(st.none(), st.just(b""), _keys.filter(any)),
    listen_port=st.one_of(st.none(), st.integers(0, 65535)),
    fwmark=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    replace_peers=st.booleans(),
    peers=st.lists(_peers, max_size=4).map(tuple),
)


def _write(request: SetRequest) -> str:
    """The request as the wg tool writes it (the reverse of parse_set)."""
    lines = []
    if request.private_key is not None:
        lines.append(f"private_key={(request.private_key or bytes(32)).hex()}")
    if request.listen_port is not None:
        lines.append(f"listen_port={request.listen_port}")
    if request.fwmark is not None:
        lines.append(f"fwmark={request.fwmark}")
    if request.replace_peers:
        lines.append("replace_peers=true")
    for peer in request.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        for flag in ("remove", "update_only", "replace_allowed_ips"):
            if getattr(peer, flag):
                lines.append(f"{flag}=true")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={(peer.preshared_key or bytes(32)).hex()}")
        if peer.endpoint is not None:
            host, port = peer.endpoint
            lines.append(f"endpoint={f'[{host}]' if ':' in host else host}:{port}")
        if peer.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return "".join(line + "\n" for line in lines)


@settings(max_examples=200, deadline=None)
@given(_requests)
def test_set_requests_round_trip_through_the_text(request: SetRequest) -> None:
    assert parse_set(_write(request)) == request


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_any_bytes_give_requests_refusals_or_violations_never_exceptions(
    chunks: list[bytes],
) -> None:
    conn = UapiConnection(max_request_bytes=200)
    for chunk in [b"set=1\n", *chunks, b"\n\n"]:
        conn.receive_data(chunk)
        while (item := conn.next_request()) is not None:
            assert isinstance(item, (GetRequest, SetRequest, RefusedRequest, ProtocolViolation))
            if isinstance(item, ProtocolViolation):
                return


@given(st.text(max_size=40))
def test_endpoint_parser_accepts_only_ip_literals_and_ports(text: str) -> None:
    try:
        host, port = parse_endpoint(text)
    except UapiError as exc:
        code = exc.errno
        host, port = "", 0
    else:
        code = 0
    if code:
        assert code == errno.EINVAL
        return
    assert 0 < port < 65536
    ipaddress.ip_address(host.split("%")[0])


# -- get -----------------------------------------------------------------------------------------


def test_get_reply_is_written_as_wireguard_go_writes_it() -> None:
    info = DeviceInfo(
        OWN,
        51820,
        0,
        (
            PeerInfo(
                KEY_A,
                None,
                ("192.0.2.1", 5),
                1700000000.25,
                10,
                20,
                25,
                (NET("10.0.0.2/32"), NET("fd00::/64")),
            ),
        ),
    )
    assert format_get(info).decode() == (
        f"private_key={OWN.hex()}\nlisten_port=51820\npublic_key={KEY_A.hex()}\n"
        f"preshared_key={'00' * 32}\nprotocol_version=1\nendpoint=192.0.2.1:5\n"
        "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=250000000\n"
        "tx_bytes=20\nrx_bytes=10\npersistent_keepalive_interval=25\n"
        "allowed_ip=10.0.0.2/32\nallowed_ip=fd00::/64\nerrno=0\n\n"
    )


# -- set: plans applied to a real device ----------------------------------------------------------


def test_allowed_ip_moves_between_peers_and_sessions_stay() -> None:
    device = _device()
    request = parse_set(
        f"public_key={KEY_B.hex()}\nallowed_ip=10.1.0.0/16\npersistent_keepalive_interval=5\n"
    )
    apply_plan(device, plan_set(request, _info(device)))
    configs = _configs(device)
    assert configs[KEY_A].allowed_ips == (NET("10.0.0.2/32"),)
    assert configs[KEY_B].allowed_ips == (NET("10.0.0.3/32"), NET("10.1.0.0/16"))
    assert configs[KEY_B].persistent_keepalive == 5.0
    # Turning keepalive on with a known endpoint makes the device due at once (a keepalive now).
    timer = device.get_timer()
    assert timer is not None
    assert timer < 0


def test_a_set_with_one_bad_peer_changes_nothing() -> None:
    device = _device()
    before = _configs(device)
    low_order = bytes(32)  # the identity point: no shared secret
    request = parse_set(
        f"public_key={KEY_A.hex()}\nreplace_allowed_ips=true\nallowed_ip=10.9.0.0/16\n"
        f"public_key={low_order.hex()}\nallowed_ip=10.8.0.0/16\n"
    )
    with pytest.raises(UapiError) as raised:
        plan_set(request, _info(device))
    assert raised.value.errno == errno.EINVAL
    assert _configs(device) == before


@pytest.mark.parametrize(
    "body", [f"private_key={'11' * 32}\n", "listen_port=1\n"], ids=["private_key", "listen_port"]
)
def test_changes_a_running_tunnel_cannot_make_are_refused(body: str) -> None:
    device = _device()
    with pytest.raises(UapiError) as raised:
        plan_set(parse_set(body), _info(device))
    assert raised.value.errno == errno.EOPNOTSUPP


def test_setconf_of_the_current_state_changes_nothing() -> None:
    device = _device()
    text = format_get(_info(device)).decode()
    keep = ("private_key", "listen_port", "public_key", "preshared_key", "endpoint", "allowed_ip")
    body = "replace_peers=true\n" + "".join(
        line + "\n" for line in text.splitlines() if line.split("=")[0] in keep
    )
    assert plan_set(parse_set(body), _info(device)).empty


def test_replace_peers_removes_others_and_adds_new_ones() -> None:
    device = _device()
    new = Device(bytes([5] * 32)).public_key
    request = parse_set(
        f"replace_peers=true\npublic_key={KEY_A.hex()}\nallowed_ip=10.0.0.2/32\n"
        f"public_key={new.hex()}\nallowed_ip=10.0.0.3/32\nendpoint=192.0.2.9:1\n"
        f"public_key={KEY_B.hex()}\nupdate_only=true\n"
        f"public_key={Device(OWN).public_key.hex()}\nallowed_ip=0.0.0.0/0\n"
    )
    apply_plan(device, plan_set(request, _info(device)))
    configs = _configs(device)
    assert set(configs) == {KEY_A, new}
    assert configs[new].endpoint == ("192.0.2.9", 1)
    assert configs[KEY_A].allowed_ips == (NET("10.0.0.2/32"),)


# -- the server: requests answered from the device ------------------------------------------------


class _FakeTunnel:
    name = "pt-test"
    listen_port = 51820

    def __init__(self) -> None:
        self.flushed = 0
        self.sockets: list[socket.socket] = []

    def flush(self) -> None:
        self.flushed += 1


def test_server_answers_get_set_and_errors_on_one_connection() -> None:
    device = _device()
    tunnel = _FakeTunnel()
    server = UapiServer(tunnel, device)
    conn = UapiConnection()
    reply, close = server.handle(
        conn,
        b"get=1\n\nset=1\nlisten_port=9\n\n"
        + f"set=1\npublic_key={KEY_A.hex()}\npersistent_keepalive_interval=7\n\n".encode(),
    )
    replies = reply.decode().split("\n\n")
    assert replies[0].startswith(f"private_key={OWN.hex()}\nlisten_port=51820\n")
    assert replies[0].endswith("errno=0")
    assert replies[1:] == ["errno=-95", "errno=0", ""]
    assert device.peer_config(KEY_A).persistent_keepalive == 7.0
    assert (tunnel.flushed, close) == (1, False)
    reply, close = server.handle(conn, b"nonsense\n")
    assert (reply, close) == (b"errno=-71\n\n", True)


async def test_served_socket_is_root_only_answers_and_is_removed(tmp_path: Path) -> None:
    device = _device()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_uapi, directory=str(tmp_path))
        path = await nursery.start(serve, _FakeTunnel(), device)
        assert path == str(tmp_path / "pt-test.sock")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(b"get=1\n\n")
            data = b""
            while not data.endswith(b"errno=0\n\n"):
                data += await stream.receive_some(65536)
        assert f"public_key={KEY_B.hex()}".encode() in data
        nursery.cancel_scope.cancel()
    assert not await trio.Path(path).exists()


def test_stale_socket_is_replaced_and_a_live_one_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "x.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed process leaves
    with bind_unix_listener(path):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with pytest.raises(SocketInUseError), bind_unix_listener(path):
            pass
        assert os.path.exists(path)  # the refused second listener did not remove ours
    assert not os.path.exists(path)
