"""UapiDevice: the connect core's calls as wireguard-go `set=1` requests, events from `get=1`.

Every request is read back with the userspace tunnel's own UAPI parser (`parse_set`, which gives
each line wireguard-go's meaning), so these tests check what wireguard-go would be told.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio.connect import UapiDevice
from punchtrio.connect._uapi_device import FAST_POLL, FAST_POLL_FOR, SLOW_POLL
from punchtrio.tunnel import DeviceInfo, PeerChange, PeerInfo, SetRequest, parse_set
from punchtrio.wireguard import ConfigError, HandshakeCompleted, PeerConfig

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
OURS = bytes(range(200, 232))
NET_A = ipaddress.ip_network("10.99.0.2/32")
DIRECT = ("203.0.113.12", 51820)
VIRTUAL = ("240.0.0.1", 1)  # a relayed path's name
PROXY = ("127.0.0.1", 40000)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _device(clock: Clock | None = None) -> tuple[UapiDevice, list[int]]:
    woken: list[int] = []
    device = UapiDevice(
        public_key=OURS, wall_clock=clock or Clock(), changed=lambda: woken.append(1)
    )
    return device, woken


def _request(device: UapiDevice, now: float = 0.0) -> SetRequest:
    text = device.next_request(now)
    assert text is not None
    assert text.startswith("set=1\n")
    assert text.endswith("\n\n")
    return parse_set(text.removeprefix("set=1\n").removesuffix("\n"))


def _info(*peers: PeerInfo) -> DeviceInfo:
    return DeviceInfo(private_key=bytes(32), listen_port=40001, peers=peers)


def _added(device: UapiDevice, key: bytes = KEY_A, keepalive: float | None = 25.0) -> None:
    device.add_peer(PeerConfig(key, allowed_ips=(NET_A,), persistent_keepalive=keepalive))
    _request(device)


def test_a_peer_is_added_without_endpoint_or_keepalive() -> None:
    device, woken = _device()
    device.add_peer(PeerConfig(KEY_A, allowed_ips=(NET_A,), persistent_keepalive=25.0))
    assert woken
    request = _request(device)
    assert request.peers == (
        PeerChange(KEY_A, replace_allowed_ips=True, allowed_ips=(NET_A,), persistent_keepalive=0),
        PeerChange(KEY_A),
    )
    assert device.next_request(0.0) is None  # nothing left
    assert device.peers() == [KEY_A]
    assert device.peer_config(KEY_A).allowed_ips == (NET_A,)
    with pytest.raises(ConfigError, match="already a peer"):
        device.add_peer(PeerConfig(KEY_A))


def test_the_first_endpoint_turns_the_keepalive_on_once() -> None:
    device, _ = _device()
    _added(device)
    device.set_endpoint(KEY_A, DIRECT)
    # 0 -> 25 makes wireguard-go send a keepalive at once: the first handshake starts.
    assert _request(device).peers == (PeerChange(KEY_A, endpoint=DIRECT, persistent_keepalive=25),)
    device.set_endpoint(KEY_A, ("198.51.100.7", 4000))
    assert _request(device).peers == (PeerChange(KEY_A, endpoint=("198.51.100.7", 4000)),)


def test_keepalives_are_whole_seconds_rounded_up() -> None:
    device, _ = _device()
    _added(device, keepalive=2.5)
    device.set_endpoint(KEY_A, DIRECT)
    assert _request(device).peers[0].persistent_keepalive == 3


def test_a_relayed_path_is_given_to_wireguard_go_as_its_proxy() -> None:
    device, woken = _device()
    _added(device)
    route_sent: list[bytes] = []
    device.set_route(VIRTUAL, route_sent.append)
    assert device.routes == {VIRTUAL: route_sent.append}
    assert device.routed(VIRTUAL) == route_sent.append
    device.set_endpoint(KEY_A, VIRTUAL)
    # No proxy yet: wireguard-go is not told an address it cannot reach.
    assert _request(device).peers == (PeerChange(KEY_A),)
    device.set_proxy(VIRTUAL, PROXY)
    assert device.proxy_of(VIRTUAL) == PROXY
    assert _request(device).peers == (PeerChange(KEY_A, endpoint=PROXY, persistent_keepalive=25),)
    # Statistics and events name the path as the core does, never the proxy.
    device.observe(
        _info(PeerInfo(KEY_A, endpoint=PROXY, last_handshake=999_990.0, rx_bytes=5)), 1.0
    )
    assert device.next_event() == HandshakeCompleted(KEY_A, VIRTUAL)
    assert device.peer_stats()[KEY_A].endpoint == VIRTUAL
    device.set_route(VIRTUAL, None)
    assert device.routed(VIRTUAL) is None
    device.set_proxy(VIRTUAL, None)
    assert device.proxy_of(VIRTUAL) is None
    assert len(woken) >= 4


def test_a_handshake_is_started_by_removing_and_adding_the_peer_again() -> None:
    device, _ = _device()
    _added(device)
    device.initiate_handshake(KEY_A, 10.0)
    assert device.next_request(10.0) is None  # no endpoint: nothing to start
    device.set_endpoint(KEY_A, DIRECT)
    _request(device)
    device.initiate_handshake(KEY_A, 10.0)
    assert _request(device).peers == (
        PeerChange(KEY_A, remove=True),
        PeerChange(KEY_A, replace_allowed_ips=True, allowed_ips=(NET_A,), persistent_keepalive=0),
        PeerChange(KEY_A, endpoint=DIRECT, persistent_keepalive=25),
    )
    device.initiate_handshake(KEY_A, 12.0)  # within REKEY_TIMEOUT: not again
    assert device.next_request(12.0) is None
    device.initiate_handshake(KEY_A, 12.0, restarted=True)  # a restarted peer: at once
    assert _request(device).peers[0] == PeerChange(KEY_A, remove=True)
    device.initiate_handshake(KEY_A, 20.0)
    assert _request(device).peers[0] == PeerChange(KEY_A, remove=True)
    with pytest.raises(ConfigError):
        device.initiate_handshake(KEY_B, 0.0)


def test_handshakes_are_read_from_get_replies() -> None:
    clock = Clock()
    device, _ = _device(clock)
    _added(device)
    _added(device, KEY_B)
    stranger = bytes(range(50, 82))
    device.observe(_info(PeerInfo(KEY_A), PeerInfo(stranger, last_handshake=5.0)), 0.0)
    assert device.next_event() is None
    assert device.peer_stats()[KEY_A].has_session is False
    # The responder: wireguard-go learnt the endpoint from the peer's initiation.
    found = PeerInfo(
        KEY_A, endpoint=DIRECT, last_handshake=clock.now - 1, rx_bytes=92, tx_bytes=148
    )
    device.observe(_info(found), 1.0)
    assert device.next_event() == HandshakeCompleted(KEY_A, DIRECT)
    assert device.next_event() is None
    stats = device.peer_stats()[KEY_A]
    assert (stats.endpoint, stats.rx_bytes, stats.tx_bytes) == (DIRECT, 92, 148)
    assert (stats.handshakes, stats.has_session) == (1, True)
    # Its keepalive is turned on now, so this side holds the NAT mapping too.
    assert _request(device, 1.0).peers == (PeerChange(KEY_A, persistent_keepalive=25),)
    device.observe(_info(found), 2.0)
    assert device.next_event() is None  # the same handshake again
    assert device.next_request(2.0) is None
    clock.now += 200
    assert device.peer_stats()[KEY_A].has_session is False  # older than REJECT_AFTER_TIME
    newer = PeerInfo(KEY_A, endpoint=DIRECT, last_handshake=clock.now)
    device.observe(_info(newer), 3.0)
    assert device.next_event() == HandshakeCompleted(KEY_A, DIRECT)


def test_a_removed_peer_is_removed_and_its_queued_changes_dropped() -> None:
    device, _ = _device()
    _added(device)
    device.set_endpoint(KEY_A, DIRECT)
    device.remove_peer(KEY_A)
    assert _request(device).peers == (PeerChange(KEY_A, remove=True),)
    assert device.peers() == []
    assert device.peer_stats() == {}
    with pytest.raises(ConfigError, match="no such peer"):
        device.remove_peer(KEY_A)
    with pytest.raises(ConfigError):
        device.set_endpoint(KEY_A, DIRECT)


def test_a_restarted_wireguard_go_gets_every_peer_where_the_old_one_was() -> None:
    clock = Clock()
    device, _ = _device(clock)
    _added(device)
    _added(device, KEY_B)
    device.set_endpoint(KEY_A, DIRECT)
    _request(device)
    learnt = ("198.51.100.9", 61000)
    device.observe(_info(PeerInfo(KEY_B, endpoint=learnt, last_handshake=clock.now)), 0.0)
    text = device.full_request()
    request = parse_set(text.removeprefix("set=1\n").removesuffix("\n"))
    assert request.replace_peers
    by_key: dict[bytes, list[PeerChange]] = {}
    for change in request.peers:
        by_key.setdefault(change.public_key, []).append(change)
    assert by_key[KEY_A][-1] == PeerChange(KEY_A, endpoint=DIRECT, persistent_keepalive=25)
    assert by_key[KEY_B][-1] == PeerChange(KEY_B, endpoint=learnt, persistent_keepalive=25)
    assert device.next_request(0.0) is None  # the full request replaced what was queued


def test_reads_are_fast_while_a_handshake_is_expected() -> None:
    device, _ = _device()
    assert device.poll_interval(0.0) == SLOW_POLL
    _added(device)
    assert device.poll_interval(100.0) == FAST_POLL  # no handshake yet
    device.observe(_info(PeerInfo(KEY_A, endpoint=DIRECT, last_handshake=5.0)), 100.0)
    assert device.poll_interval(100.0 + FAST_POLL_FOR) == SLOW_POLL
    device.set_endpoint(KEY_A, DIRECT)
    device.next_request(200.0)
    assert device.poll_interval(200.0 + FAST_POLL_FOR / 2) == FAST_POLL
    assert device.poll_interval(200.0 + FAST_POLL_FOR) == SLOW_POLL


_calls = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "endpoint", "initiate", "route", "proxy", "observe"]),
        st.sampled_from([KEY_A, KEY_B]),
        st.sampled_from([DIRECT, VIRTUAL]),
        st.booleans(),
    ),
    max_size=30,
)


@given(_calls)
def test_any_sequence_of_calls_gives_requests_wireguard_go_parses(
    calls: list[tuple[str, bytes, tuple[str, int], bool]],
) -> None:
    device, _ = _device()
    now = 0.0
    for op, key, address, flag in calls:
        now += 1.0
        try:
            if op == "add":
                device.add_peer(PeerConfig(key, allowed_ips=(NET_A,) if key == KEY_A else ()))
            elif op == "remove":
                device.remove_peer(key)
            elif op == "endpoint":
                device.set_endpoint(key, address)
            elif op == "initiate":
                device.initiate_handshake(key, now, restarted=flag)
            elif op == "route":
                device.set_route(VIRTUAL, (lambda _d: None) if flag else None)
            elif op == "proxy":
                device.set_proxy(VIRTUAL, PROXY if flag else None)
            else:
                device.observe(_info(PeerInfo(key, endpoint=PROXY, last_handshake=now)), now)
        except ConfigError:
            assert op in ("add", "remove", "endpoint", "initiate")
        text = device.next_request(now)
        if text is not None:
            request = parse_set(text.removeprefix("set=1\n").removesuffix("\n"))
            for change in request.peers:
                # Never a relayed path's name: wireguard-go could not reach it.
                if change.endpoint is not None:
                    assert device.routed(change.endpoint) is None
    assert set(device.peer_stats()) == set(device.peers())
    parse_set(device.full_request().removeprefix("set=1\n").removesuffix("\n"))
