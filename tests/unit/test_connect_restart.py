"""The core's decisions for peers that restart or vanish (found with real processes in the lab:
``tests/lab/test_restart_lab.py``)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from punchtrio.connect import MemoryInterface, PeerConnected, PeerFailed
from punchtrio.connect._core import (
    PEER_DOWN_AFTER,
    ConnectCore,
    PathLost,
    RecordFound,
    RegisterDone,
    SignalReceived,
    WireGuardEvent,
)
from punchtrio.netsim import NatBehavior
from punchtrio.wireguard import HandshakeCompleted
from tests.packets import ipv4

from .test_connect_basic import INNER, build_world, connector_for, serve_stun
from .test_connect_core import (
    KEYS,
    WALL,
    _answer_first_ping,
    drain,
    gathered,
    make_core,
    record,
)

INITIATION = 1  # WireGuard message type


def _established(me: str, *, retry_backoff: float | None = None) -> tuple[ConnectCore, str]:
    """``me`` connected to the other (as ``_punching`` and the first ping in the core's tests)."""
    other = "bob" if me == "alice" else "alice"
    core = make_core(me, retry_backoff=retry_backoff)
    core.add_peer(other, 0.0)
    core.handle(gathered(), 0.0)
    core.handle(RegisterDone(record(me, 1)), 0.0)
    core.handle(RecordFound(other, record(other, 1)), 0.0)
    core.handle(SignalReceived(other, "punchtrio-punch/1 1 fixed"), 0.0)
    drain(core)
    _answer_first_ping(core, other)
    key = core.peer(other).key
    assert key is not None
    core.handle(WireGuardEvent(HandshakeCompleted(key, ("192.0.2.1", 5000))), 0.2)
    events = drain(core)[1]
    assert isinstance(events[-1], PeerConnected)
    core.handle(SignalReceived(other, "punchtrio-punch/1 1 fixed other-run1"), 0.3)  # its run
    drain(core)
    core.device.datagrams_to_send()  # whatever the first connection sent
    return core, other


def _initiations(core: ConnectCore) -> int:
    return sum(1 for data, _ in core.device.datagrams_to_send() if data[0] == INITIATION)


def _lower(core: ConnectCore, other: str) -> bool:
    key = core.peer(other).key
    assert key is not None
    return core.public_key.raw < key


@pytest.mark.parametrize("me", ["alice", "bob"])
def test_a_restarted_peer_gets_an_initiation_at_once_from_the_initiator(me: str) -> None:
    core, other = _established(me)
    # One second after the first handshake (well within WireGuard's REKEY_TIMEOUT, which limits
    # initiations to one per 5 s), the peer's new run signals; its record is unchanged.
    core.handle(SignalReceived(other, "punchtrio-punch/1 1 fixed other-run2"), 1.2)
    sent = _initiations(core)
    assert sent == (1 if _lower(core, other) else 0)
    # The record fetched again repunches; the path that still works is not chosen again, so
    # nothing else would have started the handshake the responder waits for.
    core.handle(RecordFound(other, record(other, 1)), 1.3)
    assert _initiations(core) == 0
    assert core.peer(other).stage == "established"


def test_a_signal_of_a_run_seen_before_changes_nothing() -> None:
    core, other = _established("alice")
    core.handle(SignalReceived(other, "punchtrio-punch/1 1 fixed other-run2"), 1.2)
    core.handle(SignalReceived(other, "punchtrio-punch/1 1 fixed other-run3"), 7.0)
    drain(core)
    core.device.datagrams_to_send()
    core.handle(SignalReceived(other, "punchtrio-punch/1 1 fixed other-run2"), 8.0)  # stale
    assert _initiations(core) == 0
    assert drain(core)[0] == []


def _lose_the_path(core: ConnectCore, until: float) -> float | None:
    """Run the timers with every heartbeat unanswered; return when ``PathLost`` came."""
    now = 0.2
    lost: float | None = None
    while now < until:
        deadline = core.get_timer()
        if deadline is None or deadline > until:
            break
        now = max(now, deadline)
        core.handle_timer(now)
        core.datagrams_to_send()
        core.device.datagrams_to_send()
        for event in drain(core)[1]:
            if isinstance(event, PathLost) and lost is None:
                lost = now
    return lost


def _answer_a_ping(core: ConnectCore, other: str, now: float) -> None:
    """Play the peer coming back: answer the next ping the puncher sends after ``now``."""
    from punchtrio.punch import PONG, build_probe, derive_probe_key, key_id

    peer_key = KEYS[other]
    probe_key = derive_probe_key(peer_key.raw, core.public_key.raw)
    sent: list[tuple[bytes, tuple[str, int]]] = []
    while not sent:
        deadline = core.get_timer()
        assert deadline is not None
        now = max(now, deadline)
        core.handle_timer(now)
        sent = core.datagrams_to_send()
    data, address = sent[0]
    pong = build_probe(
        PONG, data[8:20], key_id(peer_key.public_key().raw), WALL, probe_key, address
    )
    core.receive_probe(pong, address, now + 0.05)


def test_a_peer_without_a_path_is_reported_down_after_a_bounded_time() -> None:
    core, other = _established("alice", retry_backoff=2.0)
    lost = _lose_the_path(core, until=12.0)
    assert lost is not None
    assert 4.0 <= lost <= 10.0
    assert core.peer(other).stage == "established"
    assert core.peer(other).error is None
    failed: list[PeerFailed] = []
    now = lost
    while not failed and now <= lost + PEER_DOWN_AFTER + 1:
        deadline = core.get_timer()
        assert deadline is not None
        now = deadline
        core.handle_timer(now)
        core.datagrams_to_send()
        failed = [e for e in drain(core)[1] if isinstance(e, PeerFailed)]
    (down,) = failed
    assert now == pytest.approx(lost + PEER_DOWN_AFTER)
    assert (down.peer, down.stage, down.retry_in) == (other, "established", 2.0)
    assert "stopped answering" in down.reason
    assert f"{PEER_DOWN_AFTER:g} s" in down.reason
    assert core.peer(other).error is not None
    # The retry goes back to waiting for the peer's record and signal.
    core.handle_timer(now + 2.0)
    assert core.peer(other).stage == "wait"
    assert core.peer(other).error is None


def test_a_path_found_in_time_is_not_a_failure() -> None:
    core, other = _established("alice", retry_backoff=2.0)
    lost = _lose_the_path(core, until=12.0)
    assert lost is not None
    assert core.peer(other).deadline == pytest.approx(lost + PEER_DOWN_AFTER)
    # The puncher probes again; the peer answers: a path again, the deadline is gone.
    _answer_a_ping(core, other, lost)
    assert core.peer(other).path == "direct"
    assert core.peer(other).deadline is None
    _lose_the_path(core, until=lost + PEER_DOWN_AFTER + 1)
    assert not [e for e in drain(core)[1] if isinstance(e, PeerFailed)]


@pytest.mark.parametrize("restarted", ["alice", "bob"])
async def test_a_restarted_peer_is_connected_again_without_waiting_for_wireguard_timers(
    restarted: str, autojump_clock: trio.testing.MockClock
) -> None:
    # In netsim, end to end: the side that stays answers the new run's signal (a send that must
    # outlive the peer's first connection) and, when it initiates, starts the handshake at once.
    stays = "bob" if restarted == "alice" else "alice"
    cone = NatBehavior.port_restricted_cone()
    world = build_world(cone, cone, seed=11)
    ifaces = {name: MemoryInterface(name) for name in (restarted, stays)}
    try:
        async with world.net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, world.stun)
            keep = connector_for(world, stays, ifaces[stays])
            with world.hosts[stays].activate():
                await nursery.start(keep.run)
            first = connector_for(world, restarted, ifaces[restarted])
            first_scope = trio.CancelScope()

            async def run_first(*, task_status: trio.TaskStatus[None]) -> None:
                with first_scope:
                    await first.run(task_status=task_status)

            with world.hosts[restarted].activate():
                await nursery.start(run_first)
            with trio.fail_after(30):
                await keep.connect(restarted)
                await first.connect(stays)
            await trio.sleep(1.0)  # within WireGuard's REKEY_TIMEOUT of the first handshake
            first_scope.cancel()
            await trio.sleep(1.0)
            second = connector_for(world, restarted, ifaces[restarted])
            with world.hosts[restarted].activate():
                await nursery.start(second.run)
            began = trio.current_time()
            with trio.fail_after(30):
                await second.connect(stays)
            took = trio.current_time() - began
            # Not the rekey timers (5 s, or 15 s when the initiator's data goes unanswered).
            assert took < 2.0, took
            assert keep.peers[restarted].connected
            # The new run speaks first: a responder keeps sending in its old session until the
            # initiator's first packet in the new one arrives (as in WireGuard everywhere).
            for source, target in ((restarted, stays), (stays, restarted)):
                packet = ipv4(INNER[source], INNER[target], b"after the restart")
                await ifaces[source].send(packet)
                with trio.fail_after(5):
                    assert await ifaces[target].receive() == packet
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()
