"""The hub relay's sans-IO server and client, moving frames in memory: binding and every abuse."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from punchtrio import PrivateKey
from punchtrio.relay import (
    MAX_PAYLOAD,
    HubRelayClient,
    HubRelayLimits,
    HubRelayServer,
    RefusalCode,
    RelayBound,
    RelayRefused,
)
from punchtrio.relay._hub_frames import (
    Bind,
    bind_body,
    bind_mac_message,
    encode_hello,
    parse_control,
)
from punchtrio.rendezvous import NetworkSecret
from punchtrio.rendezvous._auth import keyed_mac

WALL = 1_800_000_000.0
NET1 = NetworkSecret(b"network-one-secret-0123456789")
NET2 = NetworkSecret(b"network-two-secret-0123456789")


@dataclass
class World:
    """A relay server and its registrations; time is ``now`` (monotonic) and ``WALL + now``."""

    hub_key: PrivateKey = field(default_factory=PrivateKey.generate)
    registered: set[tuple[bytes, str]] = field(default_factory=set)
    now: float = 0.0
    limits: HubRelayLimits = field(default_factory=HubRelayLimits)
    networks: tuple[NetworkSecret, ...] = (NET1, NET2)

    def __post_init__(self) -> None:
        self.server = HubRelayServer(
            self.hub_key,
            self.networks,
            registered=lambda key, net, wall: (key, net) in self.registered,
            limits=self.limits,
            wall_clock=self.wall,
        )

    def wall(self) -> float:
        return WALL + self.now

    def client(self, network: NetworkSecret | None = NET1, *, register: bool = True) -> Client:
        key = PrivateKey.generate()
        if register:
            self.registered.add(
                (key.public_key().raw, "" if network is None else network.network_id)
            )
        relay = HubRelayClient(
            key.raw,
            self.hub_key.public_key().raw,
            network_secret=network,
            wall_clock=self.wall,
        )
        return Client(self, relay, (f"192.0.2.{len(self.registered) + 1}", 40000))

    def deliver(self) -> dict[object, list[bytes]]:
        """Take every frame the server queued, by route."""
        out: dict[object, list[bytes]] = {}
        for frame, route in self.server.datagrams_to_send():
            out.setdefault(route, []).append(frame)
        return out


@dataclass
class Client:
    world: World
    relay: HubRelayClient
    addr: tuple[str, int]
    inbox: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.relay.public_key

    def pump(self, rounds: int = 4) -> None:
        """Move control frames both ways between this client and the server."""
        world = self.world
        for _ in range(rounds):
            for frame in self.relay.datagrams_to_send():
                world.server.receive_datagram(frame, self.addr, world.now)
            for frame in world.deliver().get(self.addr, []):
                result = self.relay.receive_frame(frame, world.now)
                if result is not None:
                    self.inbox.append(result)

    def bind(self) -> None:
        self.relay.connect(self.world.now)
        self.pump()
        assert self.relay.bound
        assert isinstance(self.relay.next_event(), RelayBound)

    def send(self, to: Client, payload: bytes) -> None:
        self.world.server.receive_datagram(
            self.relay.wrap(to.key, payload), self.addr, self.world.now
        )

    def receive_all(self, routed: dict[object, list[bytes]]) -> list[tuple[bytes, bytes]]:
        got = []
        for frame in routed.get(self.addr, []):
            result = self.relay.receive_frame(frame, self.world.now)
            if result is not None:
                got.append(result)
        return got


def test_two_bound_peers_exchange_frames() -> None:
    world = World()
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    assert world.server.bound_peers == 2
    a.send(b, b"hello b")
    b.send(a, b"hello a")
    routed = world.deliver()
    assert b.receive_all(routed) == [(a.key, b"hello b")]
    assert a.receive_all(routed) == [(b.key, b"hello a")]
    assert world.server.counters["forwarded"] == 2
    assert world.server.counters["forwarded_bytes"] == 14


def test_open_hub_binds_without_a_network() -> None:
    world = World(networks=())
    a, b = world.client(None), world.client(None)
    a.bind()
    b.bind()
    a.send(b, b"x")
    assert b.receive_all(world.deliver()) == [(a.key, b"x")]


def test_unauthenticated_data_is_dropped_and_never_sent_anywhere() -> None:
    world = World()
    a, b = world.client(), world.client()
    b.bind()
    a.send(b, b"from an unbound source")
    assert world.server.datagrams_to_send() == []
    assert world.server.dropped["unbound"] == 1


def test_unregistered_key_is_refused() -> None:
    world = World()
    a = world.client(register=False)
    a.relay.connect(world.now)
    a.pump()
    assert not a.relay.bound
    event = a.relay.next_event()
    assert isinstance(event, RelayRefused)
    assert event.code == RefusalCode.NOT_REGISTERED
    assert world.server.counters["refused_not_registered"] == 1


def test_registered_in_another_network_is_refused() -> None:
    world = World()
    key = PrivateKey.generate()
    world.registered.add((key.public_key().raw, NET2.network_id))
    relay = HubRelayClient(
        key.raw, world.hub_key.public_key().raw, network_secret=NET1, wall_clock=world.wall
    )
    client = Client(world, relay, ("192.0.2.50", 1))
    relay.connect(0.0)
    client.pump()
    event = relay.next_event()
    assert isinstance(event, RelayRefused)
    assert event.code == RefusalCode.NOT_REGISTERED


def test_spoofed_source_key_cannot_bind() -> None:
    """Binding the victim's key needs the victim's private key: a forged MAC is refused."""
    world = World()
    victim, attacker = world.client(), world.client()
    victim.bind()
    attacker_addr = ("198.51.100.9", 5000)
    world.server.receive_datagram(encode_hello(victim.key), attacker_addr, world.now)
    (challenge,) = world.deliver()[attacker_addr]
    cookie = parse_control(challenge).cookie  # type: ignore[union-attr]
    body = bind_body(victim.key, bytes.fromhex(NET1.network_id), cookie, int(world.wall() * 1000))
    forged_key = keyed_mac(b"k" * 32, bind_mac_message(body))  # not derivable without the key
    world.server.receive_datagram(body + forged_key, attacker_addr, world.now)
    (refused,) = world.deliver()[attacker_addr]
    assert parse_control(refused).code == RefusalCode.AUTHENTICATION  # type: ignore[union-attr]
    assert not world.server.is_bound(attacker_addr)
    # The attacker's own bound transport always sends as the attacker's key.
    attacker.bind()
    attacker.send(victim, b"x")
    assert victim.receive_all(world.deliver()) == [(attacker.key, b"x")]


def test_a_network_secret_is_needed_to_bind_in_its_network() -> None:
    world = World()
    key = PrivateKey.generate()
    world.registered.add((key.public_key().raw, NET1.network_id))
    wrong = NetworkSecret(b"not-the-network-secret-000000")
    relay = HubRelayClient(key.raw, world.hub_key.public_key().raw, network_secret=wrong,
                           wall_clock=world.wall)  # fmt: skip
    client = Client(world, relay, ("192.0.2.51", 1))
    relay.connect(0.0)
    client.pump()
    event = relay.next_event()
    assert isinstance(event, RelayRefused)
    assert event.code == RefusalCode.AUTHENTICATION
    # Without a secret on a hub that has networks: refused too.
    bare = HubRelayClient(key.raw, world.hub_key.public_key().raw, wall_clock=world.wall)
    bare_client = Client(world, bare, ("192.0.2.52", 1))
    bare.connect(0.0)
    bare_client.pump()
    assert not bare.bound


def _captured_bind(world: World, client: Client) -> bytes:
    client.relay.connect(world.now)
    (hello,) = client.relay.datagrams_to_send()
    world.server.receive_datagram(hello, client.addr, world.now)
    (challenge,) = world.deliver()[client.addr]
    client.relay.receive_frame(challenge, world.now)
    (bind,) = client.relay.datagrams_to_send()
    return bind


def test_replayed_bind_is_refused_from_the_same_and_from_another_source() -> None:
    world = World()
    a = world.client()
    bind = _captured_bind(world, a)
    world.server.receive_datagram(bind, a.addr, world.now)
    assert world.server.is_bound(a.addr)
    world.deliver()
    world.server.receive_datagram(bind, a.addr, world.now + 1)
    (refused,) = world.deliver()[a.addr]
    assert parse_control(refused).code == RefusalCode.STALE  # type: ignore[union-attr]
    other = ("203.0.113.66", 999)
    world.server.receive_datagram(bind, other, world.now + 1)
    (refused,) = world.deliver()[other]
    assert parse_control(refused).code == RefusalCode.BAD_COOKIE  # type: ignore[union-attr]
    assert not world.server.is_bound(other)


def test_a_bind_outside_the_time_window_is_stale() -> None:
    world = World()
    a = world.client()
    a.relay._wall_clock = lambda: WALL - 600  # a client clock ten minutes slow
    a.relay.connect(0.0)
    a.pump()
    event = a.relay.next_event()
    assert isinstance(event, RelayRefused)
    assert event.code == RefusalCode.STALE


def test_an_expired_cookie_is_refused() -> None:
    world = World()
    a = world.client()
    a.relay.connect(0.0)
    (hello,) = a.relay.datagrams_to_send()
    world.server.receive_datagram(hello, a.addr, 0.0)
    (challenge,) = world.deliver()[a.addr]
    a.relay.receive_frame(challenge, 0.0)
    (bind,) = a.relay.datagrams_to_send()
    world.now = 61.0
    world.server.receive_datagram(bind, a.addr, 61.0)
    (refused,) = world.deliver()[a.addr]
    assert parse_control(refused).code == RefusalCode.BAD_COOKIE  # type: ignore[union-attr]


def test_cross_network_destination_is_dropped() -> None:
    world = World()
    a, c = world.client(NET1), world.client(NET2)
    a.bind()
    c.bind()
    a.send(c, b"across")
    assert world.deliver() == {}
    assert world.server.dropped["cross_network"] == 1


def test_destination_that_is_not_a_peer_is_dropped() -> None:
    world = World()
    a, b = world.client(), world.client()
    a.bind()
    a.send(b, b"nobody bound")  # b is registered but not bound
    world.server.receive_datagram(a.relay.wrap(bytes(32), b"zero"), a.addr, world.now)
    assert world.deliver() == {}
    assert world.server.dropped["unknown_destination"] == 2


def test_oversized_and_malformed_frames_are_dropped() -> None:
    world = World()
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    a.send(b, b"x" * (MAX_PAYLOAD + 1))
    a.send(b, b"x" * MAX_PAYLOAD)
    world.server.receive_datagram(a.relay.wrap(b.key, b"")[:20], a.addr, world.now)
    world.server.receive_datagram(b"\xf1prl\x7f", a.addr, world.now)
    routed = world.deliver()
    assert len(routed[b.addr]) == 1
    assert world.server.dropped["oversized"] == 1
    assert world.server.dropped["malformed"] == 2


def test_one_flooding_peer_does_not_starve_another() -> None:
    world = World(limits=HubRelayLimits(rate=100_000, burst=20_000, total_rate=0))
    a, b, c = world.client(), world.client(), world.client()
    for peer in (a, b, c):
        peer.bind()
    payload = b"f" * 1000
    forwarded_from_b = 0
    for step in range(100):  # one second
        world.now = step / 100
        for _ in range(20):  # a: 2 MB/s, twenty times its rate
            a.send(c, payload)
        b.send(c, payload)  # b: 100 kB/s, its rate
        forwarded_from_b += sum(1 for src, _ in c.receive_all(world.deliver()) if src == b.key)
    assert forwarded_from_b == 100
    assert world.server.dropped["rate_limited"] > 1500


def test_fair_share_divides_the_total_rate_between_active_senders() -> None:
    world = World(limits=HubRelayLimits(rate=1000.0, burst=1000, total_rate=1000.0))
    a, b, c = world.client(), world.client(), world.client()
    for peer in (a, b, c):
        peer.bind()
    world.server.handle_timer(world.now)
    assert world.server.share_rate == 1000.0
    a.send(c, b"x")
    b.send(c, b"y")
    world.server.handle_timer(world.now + 1)
    assert world.server.share_rate == 500.0
    world.server.handle_timer(world.now + 2)  # nobody sent since: back to the full rate
    assert world.server.share_rate == 1000.0


def test_bindings_expire_unless_the_client_renews_them() -> None:
    world = World(limits=HubRelayLimits(lifetime=90.0))
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    # a renews on its timer; b's frames to the server are lost from now on.
    while world.now < 200:
        world.now += 1.0
        for peer in (a, b):
            timer = peer.relay.get_timer()
            if timer is not None and timer <= world.now:
                peer.relay.handle_timer(world.now)
        a.pump()
        b.relay.datagrams_to_send()
        world.server.handle_timer(world.now)
    assert a.relay.bound
    assert world.server.is_bound(a.addr)
    assert not b.relay.bound
    assert not world.server.is_bound(b.addr)
    assert b.relay.counters["expired"] == 1
    assert world.server.counters["expired"] == 1
    assert a.relay.counters["bound"] >= 5


def test_client_retries_with_backoff_when_the_relay_is_silent() -> None:
    world = World()
    a = world.client()
    a.relay.connect(0.0)
    sent_at = []
    now = 0.0
    while now < 100:
        if a.relay.datagrams_to_send():
            sent_at.append(now)
        timer = a.relay.get_timer()
        assert timer is not None
        now = timer
        a.relay.handle_timer(now)
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
    assert gaps[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_peer_that_moves_rebinds_and_its_old_address_is_unbound() -> None:
    world = World()
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    old = a.addr
    a.addr = ("192.0.2.200", 40001)
    a.relay.connect(world.now + 1)  # a fresh bind from the new address
    world.now += 1
    a.pump()
    assert world.server.is_bound(a.addr)
    assert not world.server.is_bound(old)
    b.send(a, b"to the new address")
    routed = world.deliver()
    assert old not in routed
    assert a.receive_all(routed) == [(b.key, b"to the new address")]


def test_bound_with_a_wrong_mac_is_ignored() -> None:
    world = World()
    a = world.client()
    bind = _captured_bind(world, a)
    parsed = parse_control(bind)
    assert isinstance(parsed, Bind)
    from punchtrio.relay._hub_frames import bound_body

    forged = bound_body(parsed.timestamp, 90_000, 7) + bytes(32)
    assert a.relay.receive_frame(forged, world.now) is None
    assert not a.relay.bound
    assert a.relay.counters["bad_mac"] == 1


def test_client_drops_data_before_connecting_and_garbage_always() -> None:
    world = World()
    a, b = world.client(), world.client()
    frame = b"\xf1prl\x11" + b.key + b"payload"
    assert a.relay.receive_frame(frame, 0.0) is None
    assert a.relay.counters["unexpected"] == 1
    a.bind()
    assert a.relay.receive_frame(frame, 0.0) == (b.key, b"payload")
    assert a.relay.receive_frame(b"junk", 0.0) is None
    assert a.relay.counters["malformed"] == 1


def test_wrap_refuses_a_bad_destination() -> None:
    world = World()
    with pytest.raises(ValueError, match="32-byte"):
        world.client().relay.wrap(b"short", b"x")


def test_binds_from_one_address_are_rate_limited() -> None:
    world = World(limits=HubRelayLimits(bind_rate=1.0, bind_burst=2))
    a = world.client()
    codes = []
    for _ in range(4):
        bind = _captured_bind(world, a)
        world.server.receive_datagram(bind, a.addr, world.now)
        (reply,) = world.deliver()[a.addr]
        frame = parse_control(reply)
        codes.append(getattr(frame, "code", 0))
        a.relay.receive_frame(reply, world.now)
    assert codes == [0, 0, RefusalCode.RATE_LIMITED, RefusalCode.RATE_LIMITED]


def test_the_relay_holds_at_most_max_bindings() -> None:
    world = World(limits=HubRelayLimits(max_bindings=1))
    a, b = world.client(), world.client()
    a.bind()
    b.relay.connect(0.0)
    b.pump()
    event = b.relay.next_event()
    assert isinstance(event, RelayRefused)
    assert event.code == RefusalCode.FULL


def test_stream_transports_bind_and_unbind_on_close() -> None:
    world = World()
    a, b = world.client(), world.client()
    b.bind()
    stream = world.server.open_stream(("192.0.2.99", 5555), world.now)
    a.relay.connect(world.now)
    for _ in range(3):
        for frame in a.relay.datagrams_to_send():
            world.server.receive_stream_frame(stream, frame, world.now)
        for frame in world.deliver().get(stream, []):
            a.relay.receive_frame(frame, world.now)
    assert a.relay.bound
    assert world.server.is_bound(stream)
    world.server.receive_stream_frame(stream, a.relay.wrap(b.key, b"over tcp"), world.now)
    assert b.receive_all(world.deliver()) == [(a.key, b"over tcp")]
    b.send(a, b"back")
    (frame,) = world.deliver()[stream]
    assert a.relay.receive_frame(frame, world.now) == (b.key, b"back")
    world.server.close_stream(stream)
    assert not world.server.is_bound(stream)
    world.server.receive_stream_frame(stream, a.relay.wrap(b.key, b"late"), world.now)
    assert world.server.dropped["unbound"] == 1


def test_metrics_lines_name_every_drop_reason() -> None:
    world = World()
    text = "\n".join(world.server.metrics_lines())
    for reason in world.server.dropped:
        assert f'punchtrio_hub_relay_dropped_frames_total{{reason="{reason}"}} 0' in text
    assert "punchtrio_hub_relay_bound_peers 0" in text


def test_reprs_hide_keys() -> None:
    world = World()
    a = world.client()
    bind = _captured_bind(world, a)
    for text in (repr(a.relay), repr(world.server), repr(parse_control(bind))):
        assert a.key.hex() not in text
        assert "mac" not in text.lower()


# -- channels: short data frames after the relay names a peer ----------------------------------


def _learn_channels(world: World, a: Client, b: Client) -> None:
    """Both send keyed frames, learn their channels from the relay's CHANNEL frames."""
    a.send(b, b"keyed a")
    b.send(a, b"keyed b")
    routed = world.deliver()
    assert a.receive_all(routed) == [(b.key, b"keyed b")]
    assert b.receive_all(routed) == [(a.key, b"keyed a")]
    assert a.relay.channel_of(b.key) is not None
    assert b.relay.channel_of(a.key) is not None


def test_peers_switch_to_channel_frames_after_the_relay_names_them() -> None:
    world = World()
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    _learn_channels(world, a, b)
    assert world.server.counters["channels"] == 2
    assert len(a.relay.wrap(b.key, b"x" * 100)) == 7 + 100
    # a uses its channel first: b has not yet, so b still gets a keyed frame from a
    a.send(b, b"short from a")
    (to_b,) = world.deliver()[b.addr]
    assert to_b[4] == 0x11
    assert b.relay.receive_frame(to_b, world.now) == (a.key, b"short from a")
    # b uses its channel: now both directions are short
    b.send(a, b"short from b")
    (to_a,) = world.deliver()[a.addr]
    assert to_a[4] == 0x13
    assert len(to_a) == 7 + len(b"short from b")
    assert a.relay.receive_frame(to_a, world.now) == (b.key, b"short from b")
    a.send(b, b"again")
    (to_b,) = world.deliver()[b.addr]
    assert to_b[4] == 0x13
    assert b.relay.receive_frame(to_b, world.now) == (a.key, b"again")
    assert world.server.counters["forwarded"] == 5


def test_channel_announcements_repeat_at_most_once_a_second() -> None:
    world = World()
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    for _ in range(3):
        world.server.receive_datagram(b"\xf1prl\x10" + b.key + b"k", a.addr, world.now)
    assert world.server.counters["channels"] == 1
    world.now += 1.0
    world.server.receive_datagram(b"\xf1prl\x10" + b.key + b"k", a.addr, world.now)
    assert world.server.counters["channels"] == 2
    frames = world.deliver()[a.addr]
    assert [f[4] for f in frames] == [0x06, 0x06]
    assert len({f[5:11] for f in frames}) == 1  # the same epoch and number each time


def test_unknown_channels_and_unbound_senders_are_dropped_and_counted() -> None:
    world = World()
    a, b, c = world.client(), world.client(), world.client()
    a.bind()
    b.bind()
    c.bind()
    _learn_channels(world, a, b)
    channel = a.relay.channel_of(b.key)
    assert channel is not None
    frame = a.relay.wrap(b.key, b"hijack")
    # c never got that channel: its table does not name b, nothing is forwarded
    world.server.receive_datagram(frame, c.addr, world.now)
    assert world.server.dropped["unknown_channel"] == 1
    world.server.receive_datagram(frame, ("198.51.100.9", 9), world.now)
    assert world.server.dropped["unbound"] == 1
    world.server.receive_datagram(b"\xf1prl\x12\x00", a.addr, world.now)
    assert world.server.dropped["malformed"] == 1
    world.server.receive_datagram(b"\xf1prl\x12\x00\x01" + bytes(MAX_PAYLOAD + 1), a.addr, 0.0)
    assert world.server.dropped["oversized"] == 1
    assert world.deliver() == {}
    # a data frame on a channel the client was never told of is dropped by the client
    assert a.relay.receive_frame(b"\xf1prl\x13\x7f\x7fdata", world.now) is None
    assert a.relay.counters["unknown_channel"] == 1


def test_forged_or_stale_channel_frames_are_ignored() -> None:
    from punchtrio.relay._hub_frames import channel_body

    world = World()
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    a.send(b, b"keyed")
    (announce,) = world.deliver()[a.addr]
    forged = announce[:-32] + bytes(32)
    assert a.relay.receive_frame(forged, world.now) is None
    assert a.relay.counters["bad_mac"] == 1
    epoch = int.from_bytes(announce[5:9], "big")
    other_epoch = channel_body((epoch + 1) % 2**32, 1, b.key) + announce[-32:]
    assert a.relay.receive_frame(other_epoch, world.now) is None
    assert a.relay.channel_of(b.key) is None
    assert a.relay.receive_frame(announce, world.now) is None
    assert a.relay.channel_of(b.key) == 1


def test_renewal_keeps_channels_and_a_new_address_starts_afresh() -> None:
    world = World()
    a, b = world.client(), world.client()
    a.bind()
    b.bind()
    _learn_channels(world, a, b)
    world.now += 35.0  # past the renewal point (a third of 90 s, jittered by 10 %: 27-33 s)
    a.relay.handle_timer(world.now)
    a.pump()
    assert isinstance(a.relay.next_event(), RelayBound)
    assert a.relay.channel_of(b.key) is not None
    a.send(b, b"after renewal")
    assert b.receive_all(world.deliver()) == [(a.key, b"after renewal")]
    # a moves: a fresh binding, a new channel table, back to keyed frames
    a.addr = ("192.0.2.201", 40002)
    a.relay.connect(world.now)
    a.pump()
    assert a.relay.channel_of(b.key) is None
    assert a.relay.wrap(b.key, b"")[4] == 0x10
    a.send(b, b"keyed again")
    assert b.receive_all(world.deliver()) == [(a.key, b"keyed again")]
