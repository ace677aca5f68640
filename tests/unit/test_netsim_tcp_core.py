"""The sans-IO TCP core on its own: segments moved by hand between two connections."""

from __future__ import annotations

import heapq
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.netsim import (
    TCP_MSS,
    TCP_RECEIVE_BUFFER,
    TCP_SEND_BUFFER,
    TcpConnection,
    TcpEstablished,
    TcpSegment,
    TcpState,
    TcpTerminated,
)


def run_transfer(
    data: bytes, rng: random.Random, *, loss: float, reorder: float, duplicate: float
) -> tuple[bytes, float, int, TcpConnection, TcpConnection]:
    """Send ``data`` from a client core to a server core over a lossy, reordering wire."""
    now = 0.0
    client = TcpConnection.active(1000, now)
    server: TcpConnection | None = None
    wire: list[tuple[float, int, str, TcpSegment]] = []
    counter = 0
    received = bytearray()
    offset = 0
    finished_at = [0.0]
    shipped = [0]

    def ship(to: str, segments: list[TcpSegment]) -> None:
        nonlocal counter
        for segment in segments:
            shipped[0] += to == "server" and bool(segment.data)
            copies = 0 if rng.random() < loss else 2 if rng.random() < duplicate else 1
            for _ in range(copies):
                delay = 0.05 + (rng.uniform(0, 0.08) if rng.random() < reorder else 0.0)
                counter += 1
                heapq.heappush(wire, (now + delay, counter, to, segment))

    def pump() -> None:
        nonlocal offset
        while client.established and offset < len(data) and client.send_space:
            offset += client.write(data[offset : offset + 10_000])
        if client.established and offset == len(data):
            client.shutdown_write()
        if server is not None:
            received.extend(server.read(1 << 20))
            if server.peer_finished and not server.write_shut:
                finished_at[0] = now
                server.close()
        ship("server", client.segments_to_send(now))
        if server is not None:
            ship("client", server.segments_to_send(now))

    pump()
    for _ in range(200_000):
        pump()
        timers = [t for t in (client.get_timer(), server and server.get_timer()) if t]
        due = min([*timers, *(wire[0][:1] if wire else [])], default=None)
        if due is None:
            break
        now = max(now, due)
        while wire and wire[0][0] <= now:
            _, _, to, segment = heapq.heappop(wire)
            if to == "client":
                client.receive_segment(segment, now)
            elif server is None:
                if segment.syn:
                    server = TcpConnection.passive(5000, segment, now)
            else:
                server.receive_segment(segment, now)
        for connection in (client, server):
            timer = connection.get_timer() if connection is not None else None
            if connection is not None and timer is not None and timer <= now:
                connection.handle_timer(now)
    assert server is not None
    return bytes(received), finished_at[0], shipped[0], client, server


def events(connection: TcpConnection) -> list[object]:
    found: list[object] = []
    while (event := connection.next_event()) is not None:
        found.append(event)
    return found


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 300_000),
    seed=st.integers(0, 2**32),
    loss=st.sampled_from([0.0, 0.05, 0.3]),
    reorder=st.sampled_from([0.0, 0.5]),
    duplicate=st.sampled_from([0.0, 0.1]),
)
def test_any_loss_reorder_and_duplication_delivers_the_bytes_in_order(
    size: int, seed: int, loss: float, reorder: float, duplicate: float
) -> None:
    data = random.Random(seed).randbytes(size)
    received, _, _, client, server = run_transfer(
        data, random.Random(seed), loss=loss, reorder=reorder, duplicate=duplicate
    )
    assert received == data
    assert server.peer_finished
    assert client.state in (TcpState.TIME_WAIT, TcpState.CLOSED)
    assert client.error is None
    assert events(client)[0] == TcpEstablished()
    if server.error is None:
        assert events(server)[-1] == TcpTerminated(None)
    else:
        # Every byte arrived and both FINs were seen, but on a lossy wire the client's last ACK
        # and all its answers to the server's retransmitted FIN can be lost until the client's
        # TIME-WAIT (60 s) ends: the server in LAST-ACK then times out, as a real one does.
        assert loss > 0
        assert isinstance(server.error, TimeoutError)
        assert events(server)[-1] == TcpTerminated(server.error)


def test_a_perfect_wire_needs_no_retransmission() -> None:
    data = bytes(range(256)) * 1000
    received, finished, shipped, client, _ = run_transfer(
        data, random.Random(0), loss=0.0, reorder=0.0, duplicate=0.0
    )
    assert received == data
    assert shipped == -(-len(data) // TCP_MSS)
    # The handshake (one 0.1 s round trip), then one full window (64 KiB) per round trip.
    rounds = -(-len(data) // min(TCP_SEND_BUFFER, TCP_RECEIVE_BUFFER))
    assert finished == pytest.approx(0.1 + 0.1 * (rounds - 1) + 0.05)
    assert client.state is TcpState.CLOSED
    assert client.error is None


def test_handshake_segments_and_refusal() -> None:
    client = TcpConnection.active(41, 0.0)
    [syn] = client.segments_to_send(0.0)
    assert (syn.seq, syn.syn, syn.ack, syn.flags, syn.length) == (41, True, None, "S", 1)
    assert client.state is TcpState.SYN_SENT
    assert client.get_timer() == 1.0
    client.receive_segment(TcpSegment(0, 42, rst=True), 0.01)
    assert client.terminated
    assert isinstance(client.error, ConnectionRefusedError)
    assert events(client) == [TcpTerminated(client.error)]

    client = TcpConnection.active(41, 0.0)
    client.segments_to_send(0.0)
    for attempt in range(6):  # the SYN is sent again 6 times, then the connect times out
        deadline = client.get_timer()
        assert deadline is not None
        client.handle_timer(deadline)
        assert [s.syn for s in client.segments_to_send(deadline)] == [True], attempt
    deadline = client.get_timer()
    assert deadline == 127.0
    client.handle_timer(deadline)
    assert isinstance(client.error, TimeoutError)


def test_a_stray_syn_ack_is_answered_with_a_reset() -> None:
    client = TcpConnection.active(41, 0.0)
    client.segments_to_send(0.0)
    client.receive_segment(TcpSegment(7, 999, 100, syn=True), 0.01)
    assert client.segments_to_send(0.01) == [TcpSegment(999, rst=True)]
    assert client.state is TcpState.SYN_SENT
