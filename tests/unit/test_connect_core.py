"""The connector's sans-IO core, driven input by input with a fake clock: no sockets, no Trio."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.connect import (
    TRANSITIONS,
    ConnectCore,
    CoreError,
    DirectPathFailed,
    FetchRecord,
    Gathered,
    ListenForSignals,
    LookupFailed,
    PeerConnected,
    PeerFailed,
    PeerRecordLoaded,
    PeerSettled,
    RecordFound,
    RegisterDone,
    RegisterFailed,
    SendSignal,
    SignalFailed,
    SignallingUnsupported,
    SignalReceived,
    WaitForRecord,
    WireGuardEvent,
    signal_text,
    state_diagram,
)
from punchtrio.punch import Candidate, CandidateType, Puncher
from punchtrio.rendezvous import PeerRecord
from punchtrio.wireguard import Device, HandshakeCompleted

DOCS = Path(__file__).resolve().parents[2] / "docs" / "connect.md"
KEYS = {"alice": PrivateKey(bytes(range(1, 33))), "bob": PrivateKey(bytes(range(101, 133)))}
WALL = 1.7e9


def record(name: str, revision: int = 1, key: PrivateKey | None = None) -> PeerRecord:
    key = key or KEYS[name]
    return PeerRecord(
        name,
        key.public_key(),
        (Candidate(CandidateType.SRFLX, "192.0.2.1", 5000).to_endpoint(),),
        (ipaddress.ip_network("10.99.0.2/32"),),
        revision,
        300.0,
    )


def make_core(
    me: str = "alice", retry_backoff: float | None = None, **timeouts: float
) -> ConnectCore:
    key = KEYS[me]
    return ConnectCore(
        public_key=key.public_key(),
        device=Device(key.raw, wall_clock=lambda: WALL),
        puncher=Puncher(key.raw, families=(4,), wall_clock=lambda: WALL),
        persistent_keepalive=25.0,
        wait_timeout=timeouts.get("wait", 30.0),
        handshake_timeout=timeouts.get("handshake", 15.0),
        repunch_delay=30.0,
        describe_path=lambda address: (f"{address[0]}:{address[1]}", None),
        relay_status=lambda: "no relay is available",
        start=0.0,
        retry_backoff=retry_backoff,
        session=f"{me}-run1",
    )


def gathered() -> Gathered:
    return Gathered((Candidate(CandidateType.HOST, "10.0.0.2", 51820),), False, None, ())


def drain(core: ConnectCore) -> tuple[list[object], list[object]]:
    actions, events = [], []
    while (action := core.next_action()) is not None:
        actions.append(action)
    while (event := core.next_event()) is not None:
        events.append(event)
    return actions, events


def ready(core: ConnectCore, *, registered: bool = True) -> None:
    """Bob added, candidates gathered, our record stored."""
    core.add_peer("bob", 0.0)
    core.handle(gathered(), 0.0)
    if registered:
        core.handle(RegisterDone(record("alice", 3)), 0.1)


def test_the_wait_ends_with_the_record_and_a_signal_of_its_revision() -> None:
    core = make_core()
    ready(core)
    actions, _ = drain(core)
    assert WaitForRecord("bob") in actions
    assert ListenForSignals("bob") in actions
    assert core.peer("bob").stage == "wait"
    core.handle(RecordFound("bob", record("bob", 5)), 0.2)
    actions, _ = drain(core)
    # Our own "punch now" names our record's revision and our NAT word.
    assert actions == [
        PeerRecordLoaded("bob", KEYS["bob"].public_key(), core.peer("bob").candidates),
        SendSignal("bob", "punchtrio-punch/1 3 fixed alice-run1"),
    ]
    assert actions[1] == SendSignal("bob", signal_text(3, False, "alice-run1"))
    core.handle(SignalReceived("bob", "punchtrio-punch/1 5 varies"), 0.3)
    assert core.peer("bob").stage == "punch"
    assert core.peer("bob").their_nat is True
    # The puncher probes bob's candidate from now on.
    assert core.get_timer() == pytest.approx(0.3)
    core.handle_timer(0.3)
    assert [address for _, address in core.datagrams_to_send()] == [("192.0.2.1", 5000)]


def test_signals_are_listened_for_only_once_we_are_registered() -> None:
    # A hub accepts GET /messages only from a registered key.
    core = make_core()
    ready(core, registered=False)
    actions, _ = drain(core)
    assert actions == [WaitForRecord("bob")]
    core.handle(RegisterDone(record("alice", 3)), 0.1)
    assert drain(core)[0] == [ListenForSignals("bob")]


def test_a_signal_before_the_record_is_judged_when_the_record_arrives() -> None:
    core = make_core()
    ready(core)
    core.handle(SignalReceived("bob", "punchtrio-punch/1 5 fixed"), 0.2)
    assert core.peer("bob").stage == "wait"
    core.handle(RecordFound("bob", record("bob", 5)), 0.3)
    assert core.peer("bob").stage == "punch"


def test_a_leftover_signal_of_an_earlier_run_is_ignored() -> None:
    core = make_core()
    ready(core)
    core.handle(SignalReceived("bob", "punchtrio-punch/1 4 fixed"), 0.2)
    core.handle(RecordFound("bob", record("bob", 5)), 0.3)
    assert core.peer("bob").stage == "wait"
    core.handle(SignalReceived("bob", "punchtrio-punch/1 4 fixed"), 0.4)
    assert core.peer("bob").stage == "wait"


def test_a_newer_signal_fetches_the_record_again_then_punches() -> None:
    core = make_core()
    ready(core)
    core.handle(RecordFound("bob", record("bob", 5)), 0.2)
    drain(core)
    core.handle(SignalReceived("bob", "punchtrio-punch/1 6 fixed"), 0.3)
    actions, _ = drain(core)
    assert actions == [FetchRecord("bob")]
    assert core.peer("bob").stage == "wait"
    core.handle(RecordFound("bob", record("bob", 6)), 0.4)
    assert core.peer("bob").stage == "punch"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "punchtrio-punch/1",
        "punchtrio-punch/1 x fixed",
        "punchtrio-punch/2 5 fixed",
        "punchtrio-punch/1 5 fixed run1 extra",
        "punchtrio-punch/1 5 fixed run\x00",
        "punchtrio-punch/1 -5 fixed",
    ],
)
def test_malformed_signals_change_nothing(text: str) -> None:
    core = make_core()
    ready(core)
    core.handle(RecordFound("bob", record("bob", 5)), 0.2)
    core.handle(SignalReceived("bob", text), 0.3)
    assert core.peer("bob").stage == "wait"


def test_without_signalling_the_punch_starts_with_the_record() -> None:
    core = make_core()
    ready(core)
    core.handle(SignallingUnsupported("bob"), 0.2)
    assert core.peer("bob").stage == "wait"
    core.handle(RecordFound("bob", record("bob", 1)), 0.3)
    assert core.peer("bob").stage == "punch"


def test_the_wait_times_out_with_the_reason_that_applies() -> None:
    core = make_core(wait=30.0)
    ready(core)
    assert core.get_timer() == pytest.approx(30.0)
    core.handle_timer(30.0)
    actions, events = drain(core)
    assert PeerSettled("bob") in actions
    assert events[-1] == PeerFailed(
        "bob", "wait", "bob did not appear at the rendezvous within 30 s"
    )
    core = make_core(wait=30.0)
    ready(core)
    core.handle(RecordFound("bob", record("bob")), 1.0)
    core.handle_timer(30.0)
    assert drain(core)[1][-1] == PeerFailed("bob", "wait", "bob did not signal within 30 s")


def test_a_refused_registration_fails_every_peer_at_the_register_stage() -> None:
    core = make_core()
    ready(core, registered=False)
    core.add_peer("carol", 0.1)
    core.handle(RegisterFailed("name is registered to another key"), 0.2)
    failed = [e for e in drain(core)[1] if isinstance(e, PeerFailed)]
    reason = "the rendezvous refused or could not be reached: name is registered to another key"
    assert failed == [
        PeerFailed("bob", "register", reason),
        PeerFailed("carol", "register", reason),
    ]
    core.add_peer("dave", 0.3)  # a later peer fails the same way at once
    assert drain(core)[1] == [PeerFailed("dave", "register", reason)]


def test_records_that_cannot_be_used_fail_the_wait() -> None:
    core = make_core()
    ready(core)
    core.handle(RecordFound("bob", record("bob", key=KEYS["alice"])), 0.2)
    assert drain(core)[1][-1] == PeerFailed("bob", "wait", "bob has our own public key")
    core = make_core()
    ready(core)
    core.handle(LookupFailed("bob", "hub unreachable"), 0.2)
    assert drain(core)[1][-1] == PeerFailed("bob", "wait", "looking up bob: hub unreachable")
    core = make_core()
    ready(core)
    core.handle(SignalFailed("bob", "queue full"), 0.2)
    assert drain(core)[1][-1] == PeerFailed("bob", "wait", "signalling bob failed: queue full")


def _punching(me: str, retry_backoff: float | None = None) -> tuple[ConnectCore, str]:
    other = "bob" if me == "alice" else "alice"
    core = make_core(me, retry_backoff=retry_backoff)
    core.add_peer(other, 0.0)
    core.handle(gathered(), 0.0)
    core.handle(RegisterDone(record(me, 1)), 0.0)
    core.handle(RecordFound(other, record(other, 1)), 0.0)
    core.handle(SignalReceived(other, "punchtrio-punch/1 1 fixed"), 0.0)
    drain(core)
    return core, other


def _answer_first_ping(core: ConnectCore, other: str) -> None:
    """Play the peer: answer the first ping at once, from the address it went to."""
    from punchtrio.punch import PONG, build_probe, derive_probe_key, key_id

    peer_key = KEYS[other]
    probe_key = derive_probe_key(peer_key.raw, core.public_key.raw)
    core.handle_timer(0.0)
    data, address = core.datagrams_to_send()[0]
    txid = data[8:20]
    pong = build_probe(PONG, txid, key_id(peer_key.public_key().raw), WALL, probe_key, address)
    core.receive_probe(pong, address, 0.05)


@pytest.mark.parametrize("me", ["alice", "bob"])
def test_only_the_lower_key_sets_the_endpoint_before_the_first_handshake(me: str) -> None:
    core, other = _punching(me)
    _answer_first_ping(core, other)
    peer = core.peer(other)
    assert peer.stage == "handshake"
    assert peer.key is not None
    endpoint = core.device.peer_stats()[peer.key].endpoint
    lower = core.public_key.raw < peer.key
    assert (endpoint is not None) == lower


def test_handshake_then_established_and_its_timeout() -> None:
    core, other = _punching("alice")
    _answer_first_ping(core, other)
    key = core.peer(other).key
    assert key is not None
    assert core.get_timer() is not None
    core.handle(WireGuardEvent(HandshakeCompleted(key, ("192.0.2.1", 5000))), 0.2)
    actions, events = drain(core)
    assert core.peer(other).stage == "established"
    assert isinstance(events[-1], PeerConnected)
    assert events[-1].path == "direct"
    assert PeerSettled(other) in actions
    core, other = _punching("alice")
    _answer_first_ping(core, other)
    core.handle_timer(15.1)
    failed = drain(core)[1][-1]
    assert isinstance(failed, PeerFailed)
    assert failed.stage == "handshake"


def test_a_session_made_before_our_own_path_was_chosen_counts() -> None:
    # The peer chose its path first; its initiation made the session while we still punched.
    core, other = _punching("bob")
    key = core.peer(other).key
    assert key is not None
    core.handle(WireGuardEvent(HandshakeCompleted(key, ("192.0.2.1", 5000))), 0.01)
    assert core.peer(other).stage == "punch"
    _answer_first_ping(core, other)
    assert core.peer(other).stage == "established"


def test_a_path_found_while_waiting_moves_on_when_the_punch_starts() -> None:
    # The peer began first: its pings reached us (and our pong proved the path) before its
    # signal did. The punch stage then goes straight on to the handshake.
    core = make_core("alice")
    core.add_peer("bob", 0.0)
    core.handle(gathered(), 0.0)
    core.handle(RegisterDone(record("alice", 1)), 0.0)
    core.handle(RecordFound("bob", record("bob", 1)), 0.0)
    core.handle(SignallingUnsupported("bob"), 0.0)  # punching at once, as without signals
    _answer_first_ping(core, "bob")
    assert core.peer("bob").stage == "handshake"
    core = make_core("alice")
    core.add_peer("bob", 0.0)
    core.handle(gathered(), 0.0)
    core.handle(RegisterDone(record("alice", 1)), 0.0)
    core.handle(RecordFound("bob", record("bob", 1)), 0.0)
    core.puncher.start(KEYS["bob"].public_key().raw, core.peer("bob").candidates, 0.0)
    _answer_first_ping(core, "bob")
    assert (core.peer("bob").stage, core.peer("bob").path) == ("wait", "direct")
    core.handle(SignalReceived("bob", "punchtrio-punch/1 1 fixed"), 0.1)
    assert core.peer("bob").stage == "handshake"


def test_a_relayed_peer_s_record_is_fetched_again_every_minute() -> None:
    # While relayed, the direct-path retries must aim at the peer's current candidates.
    core, other = _punching("alice")
    key = core.peer(other).key
    assert key is not None
    core.puncher.set_relays(key, {("240.0.0.1", 1): 0}, 0.0)
    for _ in range(40):  # no direct pair answers; the relayed one does (played here)
        when = core.get_timer()
        assert when is not None
        if when >= 1.0:
            break
        core.handle_timer(when)
        for data, address in core.datagrams_to_send():
            if address == ("240.0.0.1", 1):
                _answer(core, other, data, address, when)
    assert core.peer(other).path == "relay"
    core.handle(WireGuardEvent(HandshakeCompleted(key, ("240.0.0.1", 1))), 1.0)
    assert core.peer(other).stage == "established"
    drain(core)
    core.handle_timer(61.5)
    assert FetchRecord(other) in drain(core)[0]
    core.handle(RecordFound(other, record(other, 2)), 61.6)
    core.handle_timer(122.0)
    assert FetchRecord(other) in drain(core)[0]


def test_a_relayed_peer_says_once_why_no_direct_path_answered_until_it_is_retried() -> None:
    core, other = _punching("alice", retry_backoff=2.0)
    key = core.peer(other).key
    assert key is not None
    relayed = ("240.0.0.1", 1)
    core.puncher.set_relays(key, {relayed: 0}, 0.0)
    said: list[DirectPathFailed] = []
    failed: list[PeerFailed] = []
    now = 0.0
    while not failed and now < 30.0:  # the relayed pair answers, no direct one, no handshake
        when = core.get_timer()
        assert when is not None
        now = when
        core.handle_timer(now)
        for data, address in core.datagrams_to_send():
            if address == relayed:
                _answer(core, other, data, address, now)
        events = drain(core)[1]
        said += [e for e in events if isinstance(e, DirectPathFailed)]
        failed += [e for e in events if isinstance(e, PeerFailed)]
    why = "no probe got through the NATs between us"
    # The direct pair failed after its probe budget while the relay carried the path (no
    # handshake came within 15 s of choosing it, so the peer failed, to be retried).
    assert said == [DirectPathFailed(other, why, 2.0)]
    assert [(f.stage, f.retry_in) for f in failed] == [("handshake", 2.0)]
    assert core.peer(other).direct_error == why
    core.handle_timer(now + 2.1)
    assert core.peer(other).stage == "wait"
    assert core.peer(other).direct_error is None  # the retry starts afresh


def _answer(
    core: ConnectCore, other: str, ping: bytes, address: tuple[str, int], now: float
) -> None:
    from punchtrio.punch import PONG, build_probe, derive_probe_key, key_id

    peer_key = KEYS[other]
    probe_key = derive_probe_key(peer_key.raw, core.public_key.raw)
    pong = build_probe(
        PONG, ping[8:20], key_id(peer_key.public_key().raw), WALL, probe_key, address
    )
    core.receive_probe(pong, address, now)


def test_a_lan_address_first_seen_in_a_ping_is_connected_as_lan() -> None:
    # Bob's ping (from his LAN address) arrives before his record: the path is "direct" at first;
    # once the record says it is his host candidate on our network, it is connected as "lan".
    core = make_core("alice")
    core.add_peer("bob", 0.0)
    networks = (ipaddress.ip_network("10.0.0.0/24"),)
    core.handle(
        Gathered((Candidate(CandidateType.HOST, "10.0.0.2", 51820),), False, None, networks), 0.0
    )
    core.handle(RegisterDone(record("alice", 1)), 0.0)
    lan = PeerRecord(
        "bob",
        KEYS["bob"].public_key(),
        (Candidate(CandidateType.HOST, "10.0.0.3", 51820).to_endpoint(),),
        (ipaddress.ip_network("10.99.0.2/32"),),
        1,
        300.0,
    )
    core.handle(RecordFound("bob", lan), 0.0)
    key = KEYS["bob"].public_key().raw
    core.puncher.start(key, [], 0.0)  # as if bob's ping had started it: no candidates known yet
    core.puncher.receive_datagram(_ping_from("bob", core), ("10.0.0.3", 51820), 0.01)
    _answer_first_ping_to(core, "bob", ("10.0.0.3", 51820))
    assert core.peer("bob").path == "direct"
    drain(core)
    # Bob's session ends our wait (as his signal would), and the path is classified again with
    # his record before the tunnel counts as connected.
    core.handle(WireGuardEvent(HandshakeCompleted(key, ("10.0.0.3", 51820))), 0.03)
    core.handle(SignalReceived("bob", "punchtrio-punch/1 1 fixed"), 0.04)
    events = drain(core)[1]
    connected = [e for e in events if isinstance(e, PeerConnected)]
    assert [e.path for e in connected] == ["lan"]


def _ping_from(other: str, core: ConnectCore) -> bytes:
    from punchtrio.punch import PING, build_probe, derive_probe_key, key_id

    peer_key = KEYS[other]
    probe_key = derive_probe_key(peer_key.raw, core.public_key.raw)
    return build_probe(PING, bytes(12), key_id(peer_key.public_key().raw), WALL, probe_key, None)


def _answer_first_ping_to(core: ConnectCore, other: str, address: tuple[str, int]) -> None:
    core.handle_timer(0.02)
    for data, to in core.datagrams_to_send():
        if to == address and data[5] == 1:  # our ping (the pong to bob's ping is kind 2)
            _answer(core, other, data, address, 0.02)
            return
    raise AssertionError("no ping to answer")


def test_inputs_for_unknown_peers_are_errors() -> None:
    core = make_core()
    with pytest.raises(CoreError):
        core.handle(RecordFound("nobody", record("bob")), 0.0)


INPUTS = st.sampled_from(
    [
        RecordFound("bob", record("bob", 1)),
        RecordFound("bob", record("bob", 2)),
        SignalReceived("bob", "punchtrio-punch/1 1 fixed"),
        SignalReceived("bob", "punchtrio-punch/1 2 varies"),
        SignalReceived("bob", "punchtrio-punch/1 2 varies bob-run2"),
        SignalReceived("bob", "punchtrio-punch/1 2 fixed bob-run3"),
        SignalReceived("bob", "garbage"),
        SignallingUnsupported("bob"),
        LookupFailed("bob", "down"),
        SignalFailed("bob", "down"),
        RegisterDone(record("alice", 1)),
        RegisterFailed("refused"),
        "timer",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(INPUTS, max_size=12), st.sampled_from([None, 4.0]))
def test_every_stage_change_is_a_row_of_the_transition_table(
    inputs: list[object], backoff: float | None
) -> None:
    core = make_core(retry_backoff=backoff)
    core.add_peer("bob", 0.0)
    core.handle(gathered(), 0.0)
    now = 0.0
    allowed = {(stage, target) for (stage, _), target in TRANSITIONS.items()}
    for item in inputs:
        before = core.peer("bob").stage, core.peer("bob").error is not None
        now += 5.0
        if item == "timer":
            core.handle_timer(now)
        else:
            core.handle(item, now)  # type: ignore[arg-type]
        after = core.peer("bob").stage, core.peer("bob").error is not None
        drain(core)
        if before == after:
            continue
        if backoff is None:
            assert not before[1], (before, after, item)  # without retries a failure is final
        state = "failed" if before[1] else before[0]
        target = "failed" if after[1] else after[0]
        assert (state, target) in allowed, (before, after, item)


def test_the_docs_show_the_diagram_drawn_from_the_table() -> None:
    diagram = state_diagram()
    for (stage, event), target in TRANSITIONS.items():
        if stage != target:
            assert f"{stage} --> {target}: {event}" in diagram
    assert diagram in DOCS.read_text()


def test_a_session_the_peer_made_while_we_waited_ends_the_wait() -> None:
    # The peer punched first and its handshake reached us before its signal counted here.
    core = make_core("bob")
    core.add_peer("alice", 0.0)
    core.handle(gathered(), 0.0)
    core.handle(RegisterDone(record("bob", 1)), 0.0)
    core.handle(RecordFound("alice", record("alice", 1)), 0.0)
    key = core.peer("alice").key
    assert key is not None
    core.handle(WireGuardEvent(HandshakeCompleted(key, ("192.0.2.1", 5000))), 0.1)
    # No signal, yet the session ends the wait; the punch then finds the path, and the session
    # already made completes the stages.
    assert core.peer("alice").stage == "punch"
    core.handle_timer(0.1)
    ping, address = core.datagrams_to_send()[0]
    _answer(core, "alice", ping, address, 0.12)
    assert core.peer("alice").stage == "established"
