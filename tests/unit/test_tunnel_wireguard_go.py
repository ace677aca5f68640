"""The wireguard-go backend's UAPI text: set requests we write, get replies we read (sans-IO)."""

from __future__ import annotations

import errno
import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.tunnel import (
    DeviceInfo,
    PeerChange,
    PeerInfo,
    PeerSection,
    SetRequest,
    UapiError,
    format_get,
    format_uapi_set,
    parse_set,
    parse_uapi_get,
)
from punchtrio.tunnel._uapi_client import stats_from_info

NET = ipaddress.ip_network
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))

# The lines, their order and spelling as wireguard-go v0.0.20220316 answers `get=1` (checked
# against a live process), with test keys and counters.
WIREGUARD_GO_REPLY = (
    f"private_key={KEY_A.hex()}\n"
    "listen_port=51820\n"
    f"public_key={KEY_B.hex()}\n"
    f"preshared_key={bytes(32).hex()}\n"
    "protocol_version=1\n"
    "endpoint=10.0.0.2:51820\n"
    "last_handshake_time_sec=1796226970\n"
    "last_handshake_time_nsec=484381766\n"
    "tx_bytes=732\n"
    "rx_bytes=676\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=10.9.0.2/32\n"
    "allowed_ip=fd09::/64\n"
    "errno=0\n"
    "\n"
)


def test_a_real_wireguard_go_reply_is_read_field_by_field() -> None:
    info = parse_uapi_get(WIREGUARD_GO_REPLY)
    assert (info.private_key, info.listen_port, info.fwmark) == (KEY_A, 51820, 0)
    (peer,) = info.peers
    assert peer.public_key == KEY_B
    assert peer.preshared_key is None  # all zeros: none
    assert peer.endpoint == ("10.0.0.2", 51820)
    assert peer.last_handshake == pytest.approx(1796226970.484381766)
    assert (peer.tx_bytes, peer.rx_bytes, peer.persistent_keepalive) == (732, 676, 0)
    assert peer.allowed_ips == (NET("10.9.0.2/32"), NET("fd09::/64"))


def test_unknown_keys_are_ignored_and_errors_are_raised_with_their_errno() -> None:
    assert parse_uapi_get("listen_port=7\nfuture_key=1\nerrno=0\n\n").listen_port == 7
    with pytest.raises(UapiError) as raised:
        parse_uapi_get("errno=-98\n\n")
    assert raised.value.errno == errno.EADDRINUSE
    for bad in ("", "listen_port=1\n\n", "listen_port\nerrno=0\n", "listen_port=x\nerrno=0\n"):
        with pytest.raises(UapiError):
            parse_uapi_get(bad)
    with pytest.raises(UapiError):
        parse_uapi_get(f"public_key={KEY_B.hex()}\nallowed_ip=10.0.0.300/32\nerrno=0\n")


def test_stats_report_what_uapi_knows() -> None:
    recent = time.time() - 5
    info = DeviceInfo(
        KEY_A,
        51820,
        peers=(
            PeerInfo(KEY_A, endpoint=("192.0.2.1", 1), last_handshake=recent, rx_bytes=9),
            PeerInfo(KEY_B, last_handshake=recent - 600, tx_bytes=3),
        ),
    )
    stats = stats_from_info(info)
    assert stats[KEY_A].endpoint == ("192.0.2.1", 1)
    assert (stats[KEY_A].rx_bytes, stats[KEY_A].handshakes, stats[KEY_A].has_session) == (
        9,
        1,
        True,
    )
    assert (stats[KEY_B].tx_bytes, stats[KEY_B].has_session) == (3, False)  # expired session
    never = stats_from_info(DeviceInfo(KEY_A, 1, peers=(PeerInfo(KEY_B),)))[KEY_B]
    assert (never.handshakes, never.last_handshake, never.has_session) == (0, None, False)


def test_set_request_names_every_setting() -> None:
    text = format_uapi_set(
        private_key=KEY_A,
        listen_port=51820,
        replace_peers=True,
        peers=[
            PeerSection(
                KEY_B,
                preshared_key=KEY_A,
                allowed_ips=(NET("10.9.0.2/32"),),
                endpoint=("2001:db8::1", 7),
                persistent_keepalive=25,
            )
        ],
    )
    assert text == (
        f"set=1\nprivate_key={KEY_A.hex()}\nlisten_port=51820\nreplace_peers=true\n"
        f"public_key={KEY_B.hex()}\npreshared_key={KEY_A.hex()}\nendpoint=[2001:db8::1]:7\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.9.0.2/32\n\n"
    )
    with pytest.raises(ValueError, match="32 bytes"):
        format_uapi_set(private_key=b"short")
    with pytest.raises(ValueError, match="0-65535"):
        format_uapi_set(listen_port=65536)


_keys = st.binary(min_size=32, max_size=32)
_nets = st.one_of(
    st.builds(
        lambda a, p: NET((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
    ),
    st.builds(
        lambda a, p: NET((a, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
    ),
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
_sections = st.builds(
    PeerSection,
    public_key=_keys,
    preshared_key=st.one_of(st.none(), _keys.filter(any)),
    allowed_ips=st.lists(_nets, max_size=4).map(tuple),
    endpoint=st.one_of(st.none(), _endpoints),
    persistent_keepalive=st.one_of(st.none(), st.integers(1, 65535)),
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), _keys.filter(any)),
    st.one_of(st.none(), st.integers(0, 65535)),
    st.lists(_sections, max_size=4),
    st.booleans(),
)
def test_set_requests_mean_what_wireguard_go_parses_them_to(
    private_key: bytes | None, port: int | None, peers: list[PeerSection], replace: bool
) -> None:
    text = format_uapi_set(
        private_key=private_key, listen_port=port, peers=peers, replace_peers=replace
    )
    assert text.startswith("set=1\n")
    assert text.endswith("\n\n")
    assert "\n\n" not in text[:-2]
    # The userspace tunnel's UAPI parser reads set requests with wireguard-go's meanings.
    expected = SetRequest(
        private_key=private_key,
        listen_port=port,
        replace_peers=replace,
        peers=tuple(
            PeerChange(
                public_key=peer.public_key,
                preshared_key=peer.preshared_key,
                endpoint=peer.endpoint,
                persistent_keepalive=peer.persistent_keepalive or 0,
                replace_allowed_ips=True,
                allowed_ips=peer.allowed_ips,
            )
            for peer in peers
        ),
    )
    assert parse_set(text.removeprefix("set=1\n").removesuffix("\n")) == expected


_infos = st.builds(
    DeviceInfo,
    private_key=_keys,
    listen_port=st.integers(1, 65535),
    fwmark=st.integers(0, 2**32 - 1),
    peers=st.lists(
        st.builds(
            PeerInfo,
            public_key=_keys,
            preshared_key=st.one_of(st.none(), _keys.filter(any)),
            endpoint=st.one_of(st.none(), _endpoints),
            last_handshake=st.one_of(st.none(), st.integers(1, 2**33).map(float)),
            rx_bytes=st.integers(0, 2**63),
            tx_bytes=st.integers(0, 2**63),
            persistent_keepalive=st.integers(0, 65535),
            allowed_ips=st.lists(_nets, max_size=4).map(tuple),
        ),
        max_size=4,
    ).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(_infos)
def test_get_replies_round_trip(info: DeviceInfo) -> None:
    assert parse_uapi_get(format_get(info).decode()) == info


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_device_or_a_uapi_error(text: str) -> None:
    try:
        info = parse_uapi_get(text)
    except UapiError:
        return
    assert isinstance(info, DeviceInfo)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(WIREGUARD_GO_REPLY.splitlines()), max_size=20))
def test_shuffled_lines_of_a_real_reply_give_a_device_or_a_uapi_error(lines: list[str]) -> None:
    try:
        parse_uapi_get("\n".join(lines) + "\n")
    except UapiError:
        pass
