"""Birthday punching: the sans-IO core's invariants, its arithmetic, the netsim matrix, the
puncher's side of it, the shell's sockets (real ones counted by file descriptor), and full
connectors relayed first, then direct."""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from benchmarks.birthday import EASY, HARD, matrix
from hypothesis import example, given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.connect import MemoryInterface, PathChanged, PeerConnected
from punchtrio.netsim import Filtering, Mapping, NatBehavior, PortAllocation
from punchtrio.punch import (
    BirthdayError,
    BirthdaySchedule,
    BirthdaySettings,
    BirthdaySockets,
    Candidate,
    CandidateType,
    CloseSockets,
    KeepSocket,
    OpenSockets,
    PathChosen,
    Puncher,
    PunchFailed,
    PunchSettings,
    birthday_role,
    birthday_success,
    predicted_ports,
    probe_ports,
    simulate_birthday,
)
from tests.packets import ipv4

from .test_connect_basic import INNER, connector_for, start_world
from .test_connect_relay import HUB_RELAY, relay_world

PORT_RESTRICTED = NatBehavior.port_restricted_cone()
SYMMETRIC = NatBehavior(
    mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
    filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
    port_allocation=PortAllocation.RANDOM,
)


# -- the sans-IO core --------------------------------------------------------------------------


def test_roles_follow_the_two_mapping_checks() -> None:
    assert birthday_role(True, False) == "hard"
    assert birthday_role(False, True) == "easy"
    for ours, theirs in ((True, True), (False, False), (None, True), (True, None), (None, None)):
        assert birthday_role(ours, theirs) is None


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    predicted=st.lists(st.integers(-10, 70000), max_size=600),
    low=st.integers(1, 65535),
    span=st.integers(0, 5000),
    max_probes=st.integers(1, 3000),
)
def test_probe_order_never_repeats_and_puts_predictions_first(
    seed: int, predicted: list[int], low: int, span: int, max_probes: int
) -> None:
    high = min(65535, low + span)
    s = BirthdaySettings(port_range=(low, high), max_probes=max_probes)
    order = list(probe_ports(random.Random(seed), predicted, s))
    assert len(order) == len(set(order)) == min(max_probes, high - low + 1)
    assert all(low <= p <= high for p in order)
    wanted = list(dict.fromkeys(p for p in predicted if low <= p <= high))[:max_probes]
    assert order[: len(wanted)] == wanted


@given(ports=st.lists(st.integers(1, 65535), min_size=0, max_size=6))
@example(ports=[512, 513])  # the window reaches the bottom of port_range
def test_predictions_only_for_close_reflexive_ports(ports: list[int]) -> None:
    s = BirthdaySettings()
    got = predicted_ports(ports, s)
    seen = sorted(set(ports))
    if len(seen) < 2 or seen[-1] - seen[0] > s.predict_spread:
        assert got == []
        return
    low, high = s.port_range
    window = range(seen[0] + 1, seen[0] + 1 + s.predict_window)  # predict_window ports
    assert got == [p for p in window if low <= p <= high and p not in seen]
    assert len(got) <= s.predict_window


@settings(max_examples=100, deadline=None)
@given(
    role=st.sampled_from(["hard", "easy"]),
    count=st.integers(1, 300),
    rate=st.floats(50, 5000),
    ticks=st.lists(st.floats(0, 0.5), min_size=1, max_size=60),
)
def test_a_schedule_is_paced_and_hands_out_each_item_once(
    role: str, count: int, rate: float, ticks: list[float]
) -> None:
    s = BirthdaySettings(rate=rate, open_rate=rate, max_probes=count, sockets=count)
    schedule = BirthdaySchedule(role, list(range(count)), 10.0, s, burst=16)  # type: ignore[arg-type]
    now, out = 10.0, []
    first = 10.0 if role == "hard" else 10.0 + s.spray_start
    for step in ticks:
        now += step
        got = schedule.due(now)
        assert len(got) <= 16
        if got:
            assert now >= first - 1e-9
        # Never faster than the rate: n items need (n - 1) intervals since the first.
        out += got
        if now < first:
            assert not out
        else:
            assert len(out) <= 1 + (now - first) * rate + 1e-6
    assert out == list(range(len(out)))
    assert schedule.end == pytest.approx(10.0 + s.duration)


def test_backoff_doubles_to_minutes_and_bad_settings_are_refused() -> None:
    s = BirthdaySettings()
    assert [s.backoff(n) for n in (1, 2, 3, 4, 5, 6, 50)] == [60, 120, 240, 480, 960, 960, 960]
    for bad in ({"sockets": 0}, {"rate": 0.0}, {"retry": 2000.0}, {"port_range": (0, 10)}):
        with pytest.raises(BirthdayError):
            BirthdaySettings(**bad)


def test_the_published_arithmetic_and_the_simulation_agree() -> None:
    # 256 mappings among ports 1025-65535: 98.3% with 1024 probes, 99.97% with 2048.
    assert birthday_success(256, 1024, 64511) == pytest.approx(0.983, abs=0.0005)
    assert birthday_success(256, 2048, 64511) == pytest.approx(0.9997, abs=0.00005)
    s = BirthdaySettings(port_range=(1025, 65535), max_probes=1024)
    result = simulate_birthday(3000, 7, s)
    # 3000 trials at p = 0.983: the standard deviation is 0.24 points; allow four.
    assert result.rate == pytest.approx(0.983, abs=0.01)
    # Probes per success: a geometric-like count around 64511 / 257 = 251.
    assert 200 < result.mean_probes < 300


def test_every_easy_nat_meets_every_hard_allocation_in_netsim_models() -> None:
    results = matrix(40)
    assert set(results) == {(e, h) for e in EASY for h in HARD}
    for (easy, hard), runs in results.items():
        hits = [r for r in runs if r.hit]
        assert len(hits) >= 39, (easy, hard, len(hits))
        if easy != "port-restricted cone":
            # The hard side's first ping gets in at once: no probe of the easy side needed.
            assert max(r.probes for r in hits) == 0
    predicted = [
        r.probes for h in ("sequential", "preserving") for r in results[("port-restricted cone", h)]
    ]
    randoms = sorted(r.probes for r in results[("port-restricted cone", "random")])
    assert max(predicted) < 64  # the predicted ports come first and find the mapping
    assert randoms[len(randoms) // 2] > 64


# -- the puncher's side: two punchers, a hard NAT modelled in the test ------------------------

ALICE, BOB = PrivateKey(bytes(range(1, 33))), PrivateKey(bytes(range(101, 133)))
HARD_IP, EASY_IP = "198.51.100.1", "192.0.2.1"
EASY_EP = (EASY_IP, 40000)


def _punchers(birthday: BirthdaySettings) -> tuple[Puncher, Puncher]:
    s = PunchSettings(birthday=birthday)
    hard = Puncher(ALICE.raw, settings=s, wall_clock=lambda: 1e9)
    easy = Puncher(BOB.raw, settings=s, wall_clock=lambda: 1e9)
    hard.add_peer(easy.public_key)
    easy.add_peer(hard.public_key)
    return hard, easy


def _actions(puncher: Puncher) -> Iterator[object]:
    while (action := puncher.next_socket_action()) is not None:
        yield action


def test_the_hard_side_asks_for_sockets_and_keeps_the_one_that_got_through() -> None:
    small = BirthdaySettings(sockets=8, max_probes=4000, port_range=(20000, 23999))
    hard, easy = _punchers(small)
    hard_cands = [Candidate(CandidateType.SRFLX, HARD_IP, p) for p in (21000, 22500)]
    easy_cands = [Candidate(CandidateType.SRFLX, *EASY_EP)]
    hard.start(easy.public_key, easy_cands, 0.0, mapping_varies=True, peer_mapping_varies=False)
    easy.start(hard.public_key, hard_cands, 0.0, mapping_varies=False, peer_mapping_varies=True)
    mapped = {j: 20003 + 499 * j for j in range(8)}  # the hard NAT's ports for the 8 sockets
    now, kept = 0.0, None
    while now < 8.0 and kept is None:
        now += 0.01
        for p in (hard, easy):
            p.handle_timer(now)
        actions = list(_actions(hard))
        if now < 0.5:
            assert not actions
            assert not hard.socket_datagrams()
            continue
        for action in actions:
            if isinstance(action, OpenSockets):
                assert action.count == 8
            elif isinstance(action, KeepSocket):
                kept = action
        for item in hard.socket_datagrams():
            assert item.address == EASY_EP
            assert 0 <= item.socket < 8
        for data, (ip, port) in easy.datagrams_to_send():
            if ip != HARD_IP:
                continue
            for j, ext in mapped.items():
                if ext == port and kept is None:  # the easy side's ping lands on j's mapping
                    assert hard.birthday_hit(easy.public_key, j, data, EASY_EP, now)
                    assert not hard.birthday_hit(easy.public_key, (j + 1) % 8, data, EASY_EP, now)
                    assert not hard.birthday_hit(easy.public_key, j, data, (EASY_IP, 1), now)
                    hard.receive_datagram(data, EASY_EP, now)
                    kept = next(a for a in _actions(hard) if isinstance(a, KeepSocket))
        list(_actions(hard))
    assert isinstance(kept, KeepSocket)
    assert kept.endpoint == EASY_EP
    assert 0 < easy.birthday_probes <= 4000
    assert easy.counters["mac"] == 0
    # The hard side answered through the kept socket (routed, so it shows as sent to EASY_EP).
    answers = [d for d, a in hard.datagrams_to_send() if a == EASY_EP]
    assert answers
    for data in answers:
        easy.receive_datagram(data, (HARD_IP, mapped[kept.socket]), now + 0.01)
    events = []
    while (event := easy.next_event()) is not None:
        events.append(event)
    assert any(
        isinstance(e, PathChosen) and e.endpoint == (HARD_IP, mapped[kept.socket]) for e in events
    )


def test_after_a_hit_the_spray_stops_and_no_deadline_stays_in_the_past() -> None:
    hard, easy = _punchers(BirthdaySettings(port_range=(20000, 29999)))
    hard_cands = [Candidate(CandidateType.SRFLX, HARD_IP, p) for p in (21000, 26000)]
    easy.start(hard.public_key, hard_cands, 0.0, mapping_varies=False, peer_mapping_varies=True)
    hard.start(easy.public_key, [], 0.0)
    now, port = 0.0, None
    while port is None:
        now += 0.01
        easy.handle_timer(now)
        sprayed = [a[1] for _, a in easy.datagrams_to_send() if a[1] not in (21000, 26000)]
        port = sprayed[0] if sprayed else None
    # The hard side's socket behind that port pings back (a triggered check after a ping of
    # the easy side): a hit, though no pong came yet.
    hard.receive_datagram(_ping_from(hard), EASY_EP, now)
    ping = next(d for d, _ in hard.datagrams_to_send() if d[5] == 1)  # the ping, not the pong
    easy.receive_datagram(ping, (HARD_IP, port), now + 0.02)
    easy.datagrams_to_send()
    sent = easy.birthday_probes
    for step in range(1, 20):
        later = now + 0.02 + step * 0.05
        easy.handle_timer(later)
        deadline = easy.get_timer()
        assert deadline is not None
        assert deadline > later - 0.01  # one stuck in the past would spin the timer
    assert easy.birthday_probes == sent


def _ping_from(hard: Puncher) -> bytes:
    """A ping from bob's key to ``hard`` (which answers it with a pong and a ping)."""
    easy_only = Puncher(BOB.raw, wall_clock=lambda: 1e9)
    easy_only.add_peer(hard.public_key)
    easy_only.start(hard.public_key, [Candidate(CandidateType.SRFLX, HARD_IP, 1024)], 0.0)
    easy_only.handle_timer(0.0)
    return easy_only.datagrams_to_send()[0][0]


def test_a_failed_attempt_closes_the_sockets_and_backs_off_to_minutes() -> None:
    small = BirthdaySettings(sockets=4, max_probes=50)
    hard, easy = _punchers(small)
    easy_cands = [Candidate(CandidateType.SRFLX, *EASY_EP)]
    relay = ("240.0.0.1", 1)
    hard.set_relays(easy.public_key, {relay: 0}, 0.0)
    easy.set_relays(hard.public_key, {relay: 0}, 0.0)
    easy.start(hard.public_key, [], 0.0)
    hard.start(easy.public_key, easy_cands, 0.0, mapping_varies=True, peer_mapping_varies=False)
    actions: list[object] = []
    now = 0.0
    opened_at: list[float] = []
    while now < 400.0:
        now += 0.05
        hard.handle_timer(now)
        for data, address in hard.datagrams_to_send():
            if address == relay:  # the peer answers through the relay: the path is relayed
                easy.receive_datagram(data, relay, now)
        for data, address in easy.datagrams_to_send():
            if address == relay:
                hard.receive_datagram(data, relay, now)
        for action in _actions(hard):
            actions.append(action)
            if isinstance(action, OpenSockets):
                opened_at.append(now)
        hard.socket_datagrams()
    # Three attempts within 400 s (at 0.5 s, after one minute, after two more), each of which
    # closes exactly the sockets it opened before the next one opens any; the fourth would begin
    # four minutes after the third ended.
    kinds = [type(a) for a in actions if isinstance(a, (OpenSockets, CloseSockets))]
    assert kinds == [OpenSockets, CloseSockets] * 3
    assert all(a.peer == easy.public_key for a in actions if isinstance(a, CloseSockets))
    # After the first failure the next attempt waits a minute (retry), then two.
    gaps = [b - a for a, b in itertools.pairwise(opened_at)]
    assert gaps == [
        pytest.approx(small.duration + 60, abs=0.2),
        pytest.approx(small.duration + 120, abs=0.2),
    ]


def test_no_birthday_when_both_map_per_destination() -> None:
    hard, easy = _punchers(BirthdaySettings(sockets=4, max_probes=10))
    cands = [Candidate(CandidateType.SRFLX, *EASY_EP)]
    hard.start(easy.public_key, cands, 0.0, mapping_varies=True, peer_mapping_varies=True)
    failed = None
    for step in range(1, 400):
        hard.handle_timer(step * 0.05)
        hard.datagrams_to_send()
        assert hard.next_socket_action() is None
        event = hard.next_event()
        failed = event if isinstance(event, PunchFailed) else failed
    assert isinstance(failed, PunchFailed)
    assert hard.birthday_probes == 0


# -- the shell's sockets: real ones, counted by file descriptor ------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_the_extra_sockets_are_real_and_all_closed_on_cancel() -> None:
    hard, easy = _punchers(BirthdaySettings(sockets=256, delay=0.0))
    target = ("198.51.100.7", 9)  # TEST-NET-2: nothing answers
    hard.start(
        easy.public_key,
        [Candidate(CandidateType.SRFLX, *target)],
        trio.current_time(),
        mapping_varies=True,
        peer_mapping_varies=False,
    )
    shell = BirthdaySockets(
        hard, route=lambda address, route: None, deliver=lambda d, s: None, base_port=lambda: 0
    )
    before = _open_fds()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(shell.run)
            hard.handle_timer(trio.current_time() + 0.01)
            shell.flush()
            assert shell.open_count == 256
            assert _open_fds() - before == 256
            for _ in range(20):
                await trio.sleep(0.01)
                hard.handle_timer(trio.current_time())
                shell.flush()
            assert hard.birthday_probes > 0
            scope.cancel()
    assert shell.open_count == 0
    assert _open_fds() == before


async def test_a_failed_attempt_with_real_sockets_closes_every_extra_one() -> None:
    # Few probes, no linger: the attempt is over 0.1 s after the last mapping opened.
    small = BirthdaySettings(sockets=32, max_probes=1, delay=0.0, settle=0.0, linger=0.0)
    hard, easy = _punchers(small)
    target = ("198.51.100.7", 9)  # TEST-NET-2: nothing answers
    start = trio.current_time()
    hard.start(
        easy.public_key,
        [Candidate(CandidateType.SRFLX, *target)],
        start,
        mapping_varies=True,
        peer_mapping_varies=False,
    )
    shell = BirthdaySockets(
        hard, route=lambda address, route: None, deliver=lambda d, s: None, base_port=lambda: 0
    )
    before = _open_fds()
    async with trio.open_nursery() as nursery:
        await nursery.start(shell.run)
        hard.handle_timer(start + 0.001)
        shell.flush()
        assert shell.open_count == 32
        assert _open_fds() - before == 32
        # The puncher's clock is the argument: drive it past the attempt's end at once.
        now = start
        while now < start + small.duration + 1.0:
            now += 0.005
            hard.handle_timer(now)
            shell.flush()
            await trio.lowlevel.checkpoint()
        assert hard.birthday_probes == 32  # one ping from each socket, none answered
        assert shell.open_count == 0  # closed by the failure, while run() still runs
        await trio.sleep(0.01)  # the readers of the closed sockets end
        assert _open_fds() == before
        nursery.cancel_scope.cancel()
    assert shell.open_count == 0
    assert _open_fds() == before


# -- full connectors in netsim: relayed while the attempt runs, then direct ------------------


@pytest.mark.parametrize("hard_side", ["alice", "bob"])
async def test_relayed_then_direct_through_a_symmetric_nat(
    hard_side: str, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = (SYMMETRIC, PORT_RESTRICTED) if hard_side == "alice" else (PORT_RESTRICTED, SYMMETRIC)
    world, services, server = relay_world(a, b, seed=11)
    ifaces = {name: MemoryInterface(name) for name in ("alice", "bob")}
    connectors = {n: connector_for(world, n, ifaces[n], hub_relay=HUB_RELAY) for n in ifaces}
    changes: dict[str, list[PathChanged]] = {"alice": [], "bob": []}
    connected: dict[str, PeerConnected] = {}
    try:
        async with world.net, trio.open_nursery() as nursery:
            await start_world(nursery, world, connectors, services)

            async def collect(name: str) -> None:
                async for event in connectors[name].events:
                    if isinstance(event, PathChanged):
                        changes[name].append(event)
                    elif isinstance(event, PeerConnected):
                        connected[name] = event

            for name in connectors:
                nursery.start_soon(collect, name)
            await trio.sleep(10)
            host = world.hosts[hard_side]
            for name, other in (("alice", "bob"), ("bob", "alice")):
                assert connectors[name].peers[other].path == "direct", name
            # Relayed first on at least one side (the relay answers at 0.5 s; the spray takes
            # longer against random ports), then the upgrade: never relayed at the end.
            assert any(c.old == "relay" and c.new == "direct" for n in changes for c in changes[n])
            assert server.counters["forwarded"] > 0
            # The hard side holds its main sockets (IPv4 and IPv6) and the one kept extra
            # (IPv4) socket, no more.
            assert sorted(int(s.family) for s in host.sockets) == sorted(
                [socket.AF_INET, socket.AF_INET, socket.AF_INET6]
            )
            packet = ipv4(INNER["alice"], INNER["bob"], b"through the kept socket")
            await ifaces["alice"].send(packet)
            with trio.fail_after(5):
                assert await ifaces["bob"].receive() == packet
            # Idle for three of the NATs' mapping lifetimes: what the tunnel sends on the kept
            # socket by itself (path heartbeats, WireGuard keepalives) holds the hit mapping, so
            # the path is still the same direct one, and carries.
            endpoints = {
                n: connectors[n].peers[o].endpoint for n, o in (("alice", "bob"), ("bob", "alice"))
            }
            await trio.sleep(3 * world.nats[0].behavior.mapping_timeout)
            for name, other in (("alice", "bob"), ("bob", "alice")):
                assert connectors[name].peers[other].path == "direct", name
                assert connectors[name].peers[other].endpoint == endpoints[name], name
            await ifaces["alice"].send(packet)
            with trio.fail_after(5):
                assert await ifaces["bob"].receive() == packet
            nursery.cancel_scope.cancel()
        assert world.hosts[hard_side].sockets == []
    finally:
        for iface in ifaces.values():
            iface.close()
    assert set(connected) == {"alice", "bob"}
