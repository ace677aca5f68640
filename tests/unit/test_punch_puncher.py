"""The sans-IO puncher: two punchers joined by an in-memory network with a fake clock."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult_base

from punchtrio.punch import (
    PING,
    PONG,
    Candidate,
    CandidateType,
    DirectFailed,
    PathChosen,
    PathLost,
    Puncher,
    PunchError,
    PunchEvent,
    PunchFailed,
    PunchSettings,
    build_probe,
    derive_probe_key,
    key_id,
)

PRIV = {"a": bytes(range(1, 33)), "b": bytes(range(101, 133)), "x": bytes(range(50, 82))}
PUB = {name: crypto_scalarmult_base(key) for name, key in PRIV.items()}
LAN = {"a": ("10.0.0.2", 5000), "b": ("10.0.1.2", 5000)}
PUBLIC = {"a": ("198.51.100.1", 5000), "b": ("192.0.2.1", 5000), "x": ("203.0.113.66", 666)}
WALL = 1.7e9
Address = tuple[str, int]


def candidates(name: str) -> list[Candidate]:
    return [
        Candidate(CandidateType.HOST, *LAN[name]),
        Candidate(CandidateType.SRFLX, *PUBLIC[name]),
    ]


class World:
    """Two punchers "a" and "b" and a network of ``latency`` seconds each way.

    ``links[(sender, destination address)]`` says what the network does with a datagram: deliver
    it to a node, seen as coming from some address, or drop it (missing key). ``sent`` logs every
    datagram handed to the network.
    """

    def __init__(self, latency: float = 0.02, settings: PunchSettings | None = None) -> None:
        self.now = 0.0
        self.latency = latency
        self.punchers = {
            name: Puncher(
                PRIV[name],
                settings=settings,
                wall_clock=lambda: WALL + self.now,
                random=random.Random(name).randbytes,
            )
            for name in ("a", "b")
        }
        self.punchers["a"].add_peer(PUB["b"])
        self.punchers["b"].add_peer(PUB["a"])
        self.links: dict[tuple[str, Address], tuple[str, Address]] = {}
        self.events: dict[str, list[PunchEvent]] = {"a": [], "b": []}
        self.sent: list[tuple[float, str, Address, bytes]] = []
        self._queue: list[tuple[float, int, str, Address, bytes]] = []
        self._seq = 0
        self.tap: Callable[[str, Address, bytes], None] | None = None

    def connect_direct(self) -> None:
        """Both NATs let the other's public address through (a punched, cone-like path)."""
        self.links[("a", PUBLIC["b"])] = ("b", PUBLIC["a"])
        self.links[("b", PUBLIC["a"])] = ("a", PUBLIC["b"])

    def connect_lan(self) -> None:
        self.links[("a", LAN["b"])] = ("b", LAN["a"])
        self.links[("b", LAN["a"])] = ("a", LAN["b"])

    def start(self, at: float = 0.0) -> None:
        self.punchers["a"].start(PUB["b"], candidates("b"), at)
        self.punchers["b"].start(PUB["a"], candidates("a"), at)

    def inject(self, to: str, data: bytes, source: Address) -> None:
        heapq.heappush(self._queue, (self.now, self._seq, to, source, data))
        self._seq += 1

    def _collect(self) -> None:
        for name, p in self.punchers.items():
            for data, dst in p.datagrams_to_send():
                self.sent.append((self.now, name, dst, data))
                if self.tap is not None:
                    self.tap(name, dst, data)
                link = self.links.get((name, dst))
                if link is not None:
                    to, seen = link
                    heapq.heappush(
                        self._queue, (self.now + self.latency, self._seq, to, seen, data)
                    )
                    self._seq += 1
            while (event := p.next_event()) is not None:
                self.events[name].append(event)

    def run(self, until: float) -> None:
        self._collect()
        while True:
            timers = [t for p in self.punchers.values() if (t := p.get_timer()) is not None]
            next_timer = min(timers, default=float("inf"))
            next_arrival = self._queue[0][0] if self._queue else float("inf")
            step = min(next_timer, next_arrival)
            if step > until:
                break
            self.now = max(self.now, step)
            if next_arrival <= next_timer:
                _, _, to, source, data = heapq.heappop(self._queue)
                self.punchers[to].receive_datagram(data, source, self.now)
            else:
                for p in self.punchers.values():
                    p.handle_timer(self.now)
            self._collect()
        self.now = until

    def chosen(self, name: str) -> list[PathChosen]:
        return [e for e in self.events[name] if isinstance(e, PathChosen)]

    def pings_to(self, name: str, dst: Address) -> int:
        return sum(1 for _, n, d, data in self.sent if n == name and d == dst and data[5] == PING)


def test_two_peers_behind_nats_find_the_direct_path() -> None:
    w = World()
    w.connect_direct()
    w.start()
    w.run(2.0)
    [a] = w.chosen("a")
    [b] = w.chosen("b")
    assert (a.peer, a.endpoint, a.kind) == (PUB["b"], PUBLIC["b"], "direct")
    assert (b.peer, b.endpoint, b.kind) == (PUB["a"], PUBLIC["a"], "direct")
    assert a.rtt == pytest.approx(0.04)
    assert w.punchers["a"].path(PUB["b"]) == a
    # B's pongs tell A where its probes came from: A's public mapping.
    assert w.punchers["a"].seen_as(PUB["b"]) == PUBLIC["a"]


def test_the_lan_path_wins_over_the_direct_one() -> None:
    w = World()
    w.connect_direct()
    w.connect_lan()
    w.start()
    w.run(2.0)
    for name, other in (("a", "b"), ("b", "a")):
        path = w.punchers[name].path(PUB[other])
        assert path is not None
        assert (path.endpoint, path.kind) == (LAN[other], "lan")


def test_a_better_path_that_starts_working_later_is_an_upgrade() -> None:
    w = World()
    w.connect_direct()
    w.start()
    w.run(3.0)
    assert [e.kind for e in w.chosen("a")] == ["direct"]
    w.connect_lan()  # e.g. a firewall rule lifted while the LAN pair is still being probed
    w.run(10.0)
    assert [e.kind for e in w.chosen("a")] == ["direct", "lan"]
    assert w.chosen("a")[-1].endpoint == LAN["b"]


def test_an_address_that_never_answers_gets_a_bounded_number_of_probes() -> None:
    settings = PunchSettings()
    w = World(settings=settings)
    w.start()
    w.run(1.0 - 1e-9)
    assert w.pings_to("a", PUBLIC["b"]) == 20  # the fast phase: every 50 ms for one second
    w.run(600.0)
    for dst in (LAN["b"], PUBLIC["b"]):
        assert w.pings_to("a", dst) == settings.max_unanswered
    [failed] = [e for e in w.events["a"] if isinstance(e, PunchFailed)]
    assert failed == PunchFailed(PUB["b"], 2 * settings.max_unanswered)
    assert w.punchers["a"].get_timer() is None
    assert w.punchers["a"].path(PUB["b"]) is None


def test_the_heartbeat_holds_the_path_and_notices_its_loss() -> None:
    w = World()
    w.connect_direct()
    w.start()
    w.run(60.0)
    assert len(w.chosen("a")) == 1
    assert not [e for e in w.events["a"] if isinstance(e, PathLost)]
    # The heartbeat is light: a few pings per minute on the chosen path.
    heartbeats = [t for t, n, d, data in w.sent if n == "a" and t > 10 and data[5] == PING]
    assert 0 < len(heartbeats) <= 12
    w.links.clear()
    w.run(80.0)
    assert [e for e in w.events["a"] if isinstance(e, PathLost)] == [
        PathLost(PUB["b"], PUBLIC["b"], "direct")
    ]
    assert w.punchers["a"].path(PUB["b"]) is None
    w.connect_direct()  # the path comes back while it is probed again
    w.run(81.0)
    assert w.chosen("a")[-1].endpoint == PUBLIC["b"]


def test_a_peer_that_starts_late_is_reached_by_a_new_attempt() -> None:
    """A's budget is spent before B starts: B's pings do not refill it, a new attempt does."""
    w = World()
    # A's NAT lets B in (A has sent to B); B's NAT filters A until B sends to A.
    w.links[("b", PUBLIC["a"])] = ("a", PUBLIC["b"])
    w.punchers["a"].start(PUB["b"], candidates("b"), 0.0)
    w.run(30.0)
    assert [type(e) for e in w.events["a"]] == [PunchFailed]
    w.connect_direct()
    w.punchers["b"].start(PUB["a"], candidates("a"), 30.0)
    w.run(32.0)
    assert w.chosen("b")[-1].endpoint == PUBLIC["a"]  # A answers B's pings...
    assert w.chosen("a") == []  # ... but sends no ping beyond its budget
    w.punchers["a"].start(PUB["b"], candidates("b"), 32.0)  # the caller's reaction to PunchFailed
    w.run(33.0)
    assert w.chosen("a")[-1].endpoint == PUBLIC["b"]


def test_pings_before_our_start_are_answered_and_start_us() -> None:
    """A symmetric peer: B's pings arrive from a port no candidate names (peer-reflexive)."""
    w = World()
    other_port = ("192.0.2.1", 41234)
    w.links[("b", PUBLIC["a"])] = ("a", other_port)
    w.links[("a", other_port)] = ("b", PUBLIC["a"])
    w.punchers["b"].start(PUB["a"], candidates("a"), 0.0)
    w.run(2.0)
    [a] = w.chosen("a")
    assert (a.endpoint, a.kind) == (other_port, "direct")
    assert w.chosen("b")[-1].endpoint == PUBLIC["a"]


def test_a_third_party_cannot_steer_the_path() -> None:
    w = World()
    w.connect_direct()
    captured: list[bytes] = []
    undelivered: list[bytes] = []

    def tap(sender: str, dst: Address, data: bytes) -> None:
        if sender == "b":
            (captured if dst == PUBLIC["a"] else undelivered).append(data)

    w.tap = tap
    w.start()
    w.run(2.0)
    assert w.chosen("a")[-1].endpoint == PUBLIC["b"]
    w.tap = None
    puncher = w.punchers["a"]
    # Replays of B's real probes, from the attacker's address: refused as replays.
    for data in captured:
        w.inject("a", data, PUBLIC["x"])
    # Probes the attacker makes itself: under its own key (an unknown peer) ...
    x_key = derive_probe_key(PRIV["x"], PUB["a"])
    w.inject(
        "a", build_probe(PING, b"\x01" * 12, key_id(PUB["x"]), WALL + w.now, x_key), PUBLIC["x"]
    )
    # ... or claiming to be B without B's key.
    w.inject(
        "a", build_probe(PING, b"\x02" * 12, key_id(PUB["b"]), WALL + w.now, x_key), PUBLIC["x"]
    )
    w.run(30.0)
    assert puncher.counters["replay"] == len(captured)
    assert puncher.counters["unknown_key"] == 1
    assert puncher.counters["mac"] == 1
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC["b"]]
    assert w.pings_to("a", PUBLIC["x"]) == 0
    # Pings B sent to an address A never received are fresh to A. Replayed from X they make A
    # check X (a peer-reflexive candidate, with the usual probe budget), but X cannot answer.
    for data in undelivered:
        w.inject("a", data, PUBLIC["x"])
    w.run(60.0)
    assert [e.endpoint for e in w.chosen("a")] == [PUBLIC["b"]]
    assert w.punchers["a"].path(PUB["b"]).endpoint == PUBLIC["b"]  # type: ignore[union-attr]
    assert w.pings_to("a", PUBLIC["x"]) <= PunchSettings().max_unanswered


def test_a_genuine_pong_relayed_from_elsewhere_does_not_count() -> None:
    """An attacker who forwards B's pong from its own address makes no path through itself."""
    w = World()
    w.links[("a", PUBLIC["b"])] = ("b", PUBLIC["a"])
    w.links[("b", PUBLIC["a"])] = ("a", PUBLIC["x"])  # everything B sends reaches A via X
    w.start()
    w.run(3.0)
    assert w.punchers["a"].counters["wrong_source"] > 0
    assert not [e for e in w.chosen("a") if e.endpoint == PUBLIC["b"]]


@pytest.mark.parametrize("source", [("198.51.100.7", 0), ("127.0.0.1", 40000)])
def test_a_genuine_ping_replayed_from_an_unusable_address_is_dropped(source: Address) -> None:
    """A captured ping replayed from port 0 or loopback gets no pong and makes no pair."""
    w = World()
    captured: list[bytes] = []
    w.tap = lambda name, dst, data: (
        captured.append(data) if name == "b" and data[5] == PING else None
    )
    w.start()
    w.run(0.01)
    assert captured
    a = w.punchers["a"]
    a.datagrams_to_send()
    a.receive_datagram(captured[0], source, w.now)
    assert a.counters["wrong_source"] == 1
    assert all(dst != source for _, dst in a.datagrams_to_send())


def test_own_probes_reflected_back_are_dropped() -> None:
    w = World()
    w.links[("a", LAN["b"])] = ("a", LAN["a"])  # B's LAN address is A's own on another LAN
    w.start()
    w.run(0.5)
    assert w.punchers["a"].counters["self"] > 0
    assert w.chosen("a") == []


def test_api_errors() -> None:
    p = Puncher(PRIV["a"])
    with pytest.raises(PunchError):
        p.add_peer(PUB["a"])
    with pytest.raises(PunchError):
        p.add_peer(bytes(32))
    with pytest.raises(PunchError):
        p.start(PUB["b"], [], 0.0)
    p.add_peer(PUB["b"])
    with pytest.raises(PunchError):
        p.add_peer(PUB["b"])
    p.remove_peer(PUB["b"])
    with pytest.raises(PunchError):
        p.remove_peer(PUB["b"])
    with pytest.raises(PunchError):
        Puncher(b"short")
    with pytest.raises(PunchError):
        PunchSettings(max_unanswered=0)


def test_garbage_is_counted_not_raised() -> None:
    p = Puncher(PRIV["a"])
    p.add_peer(PUB["b"])
    for data in (b"", b"\xf0pun", bytes(72), b"\xf0pun" + bytes(68)):
        p.receive_datagram(data, PUBLIC["b"], 0.0)
    p.receive_datagram(b"\xf0pun" + bytes(68), ("not an address", 1), 0.0)
    assert p.counters["malformed"] == 4
    assert p.counters["unknown_key"] == 1
    assert p.datagrams_to_send() == []


def test_candidates_of_an_unreachable_family_are_skipped() -> None:
    p = Puncher(PRIV["a"], families=(4,))
    p.add_peer(PUB["b"])
    p.start(
        PUB["b"],
        [
            Candidate(CandidateType.HOST, "2001:db8::2", 5000),
            Candidate(CandidateType.SRFLX, *PUBLIC["b"]),
        ],
        0.0,
    )
    p.handle_timer(0.0)
    assert [dst for _, dst in p.datagrams_to_send()] == [PUBLIC["b"]]


def _genuine_probe(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([PING, PONG]))
    observed = PUBLIC["a"] if kind == PONG else None
    key = derive_probe_key(PRIV["b"], PUB["a"])
    wall = WALL + draw(st.floats(-60, 60))
    data = bytearray(
        build_probe(
            kind, draw(st.binary(min_size=12, max_size=12)), key_id(PUB["b"]), wall, key, observed
        )
    )
    for index, flip in draw(
        st.lists(st.tuples(st.integers(0, 71), st.integers(0, 255)), max_size=3)
    ):
        data[index] ^= flip
    return bytes(data)


@settings(max_examples=50)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.binary(max_size=100), st.composite(_genuine_probe)()),
            st.sampled_from([PUBLIC["b"], PUBLIC["x"], LAN["b"]]),
        ),
        max_size=20,
    )
)
def test_no_input_makes_the_puncher_raise_or_choose_a_path(
    datagrams: list[tuple[bytes, Address]],
) -> None:
    """Without a pong to a ping it sent, nothing (garbage, forged or genuine pings) chooses a path."""
    p = Puncher(PRIV["a"], wall_clock=lambda: WALL)
    p.add_peer(PUB["b"])
    p.start(PUB["b"], candidates("b"), 0.0)
    for i, (data, source) in enumerate(datagrams):
        p.receive_datagram(data, source, i * 0.01)
        p.handle_timer(i * 0.01)
    events = []
    while (event := p.next_event()) is not None:
        events.append(event)
    assert not [e for e in events if isinstance(e, PathChosen)]
    assert p.path(PUB["b"]) is None
    sent = p.datagrams_to_send()
    assert all(len(data) == 72 for data, _ in sent)


# -- relayed paths --------------------------------------------------------------------------

RELAYED = {"a": ("240.0.0.2", 1), "b": ("240.0.0.1", 1)}  # how each side names the other
TCP_RELAYED = {"a": ("240.1.0.2", 1), "b": ("240.1.0.1", 1)}


def connect_relay(w: World, names: dict[str, Address] = RELAYED) -> None:
    """A relay between a and b: what a sends to its name for b arrives at b from b's name for a."""
    w.links[("a", names["b"])] = ("b", names["a"])
    w.links[("b", names["a"])] = ("a", names["b"])


def set_relays(w: World, now: float = 0.0, **preferences: dict[Address, int]) -> None:
    w.punchers["a"].set_relays(PUB["b"], {RELAYED["b"]: 0, **preferences.get("a", {})}, now)
    w.punchers["b"].set_relays(PUB["a"], {RELAYED["a"]: 0, **preferences.get("b", {})}, now)


def test_a_relay_carries_the_path_when_nothing_direct_works() -> None:
    w = World()
    connect_relay(w)
    set_relays(w)
    w.start()
    w.run(3.0)
    [a] = w.chosen("a")
    assert (a.endpoint, a.kind) == (RELAYED["b"], "relay")
    # Relayed pairs wait for relay_delay: nothing went to the relay before it.
    first = min(t for t, n, d, _ in w.sent if n == "a" and d == RELAYED["b"])
    assert first == pytest.approx(PunchSettings().relay_delay)
    assert not [e for e in w.events["a"] if isinstance(e, PunchFailed)]


def test_a_direct_path_found_at_once_is_chosen_before_the_relay_is_tried() -> None:
    w = World()
    w.connect_direct()
    connect_relay(w)
    set_relays(w)
    w.start()
    w.run(3.0)
    assert [e.kind for e in w.chosen("a")] == ["direct"]
    assert [e.kind for e in w.chosen("b")] == ["direct"]


def test_relayed_then_direct_once_it_opens_and_back_to_the_relay_when_it_dies() -> None:
    w = World()
    connect_relay(w)
    set_relays(w)
    w.start()
    w.run(20.0)  # every direct pair has failed by now; the relay carries the path
    assert [e.kind for e in w.chosen("a")] == ["relay"]
    w.connect_direct()  # the firewall opens: upgrade retries find it without a new start()
    w.run(140.0)
    assert [e.kind for e in w.chosen("a")] == ["relay", "direct"]
    assert [e.kind for e in w.chosen("b")] == ["relay", "direct"]
    del w.links[("a", PUBLIC["b"])]
    del w.links[("b", PUBLIC["a"])]
    w.run(160.0)
    lost = [e for e in w.events["a"] if isinstance(e, PathLost)]
    assert [e.kind for e in lost] == ["direct"]
    assert [e.kind for e in w.chosen("a")] == ["relay", "direct", "relay"]


def test_upgrade_retries_back_off_and_stay_bounded() -> None:
    settings = PunchSettings()
    w = World(settings=settings)
    connect_relay(w)
    set_relays(w)
    w.start()
    w.run(3600.0)
    # After the first attempt, the retries come at 2, 4, ..., 60 s: about 60 retries in an hour,
    # each at most max_unanswered pings per pair.
    pings = w.pings_to("a", PUBLIC["b"])
    retries = pings / settings.max_unanswered
    assert 40 <= retries <= 80
    assert [e.kind for e in w.chosen("a")] == ["relay"]


def test_each_direct_round_that_fails_while_relayed_is_reported_with_the_next_wait() -> None:
    settings = PunchSettings()
    w = World(settings=settings)
    connect_relay(w)
    set_relays(w)
    w.start()
    w.run(200.0)
    failed = [e for e in w.events["a"] if isinstance(e, DirectFailed)]
    # One event per failed round, each naming the wait before the next: 2, 4, 8, ... s.
    assert [e.retry_in for e in failed[:5]] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert all(e.peer == PUB["b"] for e in failed)
    assert max(e.retry_in for e in failed) == settings.upgrade_retry_max
    # The first round's pairs fail after their probe budget, long after the relay was chosen.
    first = w.events["a"].index(failed[0])
    assert [type(e) for e in w.events["a"][:first]] == [PathChosen]
    assert not [e for e in w.events["a"] if isinstance(e, PunchFailed)]


def test_no_direct_failure_is_reported_once_a_direct_path_is_chosen() -> None:
    w = World()
    connect_relay(w)
    set_relays(w)
    w.start()
    w.run(20.0)
    assert [e.retry_in for e in w.events["a"] if isinstance(e, DirectFailed)][:1] == [2.0]
    w.connect_direct()
    w.run(40.0)
    assert [e.kind for e in w.chosen("a")] == ["relay", "direct"]
    reported = len([e for e in w.events["a"] if isinstance(e, DirectFailed)])
    w.run(400.0)
    assert len([e for e in w.events["a"] if isinstance(e, DirectFailed)]) == reported


def test_the_preferred_relay_wins_and_a_removed_relay_is_lost() -> None:
    w = World()
    connect_relay(w)
    connect_relay(w, TCP_RELAYED)
    w.punchers["a"].set_relays(PUB["b"], {RELAYED["b"]: 0, TCP_RELAYED["b"]: 2}, 0.0)
    w.punchers["b"].set_relays(PUB["a"], {RELAYED["a"]: 0, TCP_RELAYED["a"]: 2}, 0.0)
    w.start()
    w.run(3.0)
    assert w.punchers["a"].path(PUB["b"]).endpoint == RELAYED["b"]  # type: ignore[union-attr]
    # The UDP relay goes away (e.g. the network starts dropping UDP): the TCP one takes over.
    w.punchers["a"].set_relays(PUB["b"], {TCP_RELAYED["b"]: 2}, w.now)
    w.run(6.0)
    assert [e.endpoint for e in w.events["a"] if isinstance(e, PathLost)] == [RELAYED["b"]]
    assert w.punchers["a"].path(PUB["b"]).endpoint == TCP_RELAYED["b"]  # type: ignore[union-attr]


def test_relays_only_start_at_once() -> None:
    w = World()
    connect_relay(w)
    set_relays(w)
    w.punchers["a"].start(PUB["b"], [], 0.0)
    w.punchers["b"].start(PUB["a"], [], 0.0)
    w.run(1.0)
    first = min(t for t, n, d, _ in w.sent if n == "a" and d == RELAYED["b"])
    assert first == 0.0
    assert [e.kind for e in w.chosen("a")] == ["relay"]


def test_bad_relay_settings_are_refused() -> None:
    with pytest.raises(PunchError):
        PunchSettings(relay_delay=-1)
    with pytest.raises(PunchError):
        PunchSettings(upgrade_retry=10, upgrade_retry_max=5)
