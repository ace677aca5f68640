"""Simulated TCP: ordinary Trio stream code over simulated links, routers and NATs."""

from __future__ import annotations

import errno
import hashlib
import random
import re
import socket as stdlib_socket
from pathlib import Path

import pytest
import trio
import trio.socket as tsocket
import trio.testing

from punchtrio import netsim
from punchtrio.netsim import NatBehavior, Verdict

SERVER = "203.0.113.1"


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


def nat_world(
    *, link: netsim.Link | None = None, block_udp: bool = False, trace: bool = False
) -> tuple[netsim.Internet, netsim.Host, netsim.NAT, netsim.Host, list[netsim.TraceRecord]]:
    records: list[netsim.TraceRecord] = []
    net = netsim.Internet(seed=7, trace=records.append if trace else None)
    server = net.add_host(SERVER, name="server")
    nat = net.add_nat("198.51.100.1", name="home", link=link, block_udp=block_udp)
    alice = nat.lan.add_host(name="alice")
    return net, server, nat, alice, records


async def test_stream_echo_across_a_nat(autojump_clock: trio.testing.MockClock) -> None:
    net, server, nat, alice, _ = nat_world(link=netsim.Link(latency=0.025))
    seen: list[object] = []

    async def handler(stream: trio.SocketStream) -> None:
        seen.append(stream.socket.getpeername())
        await echo(stream)

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            listeners = await nursery.start(trio.serve_tcp, handler, 443)
        with alice.activate():
            start = trio.current_time()
            stream = await trio.open_tcp_stream(SERVER, 443)
            assert trio.current_time() - start == pytest.approx(0.05)  # one round trip
            assert stream.socket.getsockname() == ("10.0.0.2", 49152)
            assert stream.socket.getpeername() == (SERVER, 443)
            assert stream.getsockopt(tsocket.IPPROTO_TCP, tsocket.TCP_NODELAY) == 1
            for message in (b"hello", b"x" * 100_000, b"bye"):
                await stream.send_all(message)
                received = b""
                while len(received) < len(message):
                    received += await stream.receive_some()
                assert received == message
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()
        assert seen == [("198.51.100.1", 49152)]  # the server sees the NAT's mapping
        [row] = nat.tcp_mappings()
        assert (row.internal, row.external) == ("10.0.0.2:49152", "198.51.100.1:49152")
        assert row.expires - row.refreshed == NatBehavior().tcp_mapping_timeout == 7440
        assert nat.mappings() == []  # TCP has a table of its own
        assert {type(listener) for listener in listeners} == {trio.SocketListener}
        nursery.cancel_scope.cancel()


async def test_megabytes_through_a_lossy_link_arrive_intact_and_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lossy = netsim.Link(latency=0.02, jitter=0.01, loss=0.05, duplicate=0.02)
    net, server, _, alice, _ = nat_world(link=lossy)
    payload = random.Random(1).randbytes(3 * 1024 * 1024)
    digest: list[str] = []
    done = trio.Event()

    async def sink(stream: trio.SocketStream) -> None:
        hasher, size = hashlib.sha256(), 0
        async with stream:
            while data := await stream.receive_some():
                hasher.update(data)
                size += len(data)
            assert size == len(payload)
            digest.append(hasher.hexdigest())
            done.set()

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, sink, 9000)
        with alice.activate():
            stream = await trio.open_tcp_stream(SERVER, 9000)
            for offset in range(0, len(payload), 200_000):
                await stream.send_all(payload[offset : offset + 200_000])
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()
        with trio.fail_after(60):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert digest == [hashlib.sha256(payload).hexdigest()]
    assert net.counters[Verdict.LOST] > 100
    assert net.counters[Verdict.DUPLICATED] > 10


async def test_connecting_to_a_closed_port_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, _, alice, records = nat_world(trace=True)
    async with net:
        with alice.activate():
            sock = tsocket.socket(tsocket.AF_INET, tsocket.SOCK_STREAM)
            with pytest.raises(ConnectionRefusedError):
                await sock.connect((SERVER, 80))  # the RST comes back through the NAT
            sock.close()
            with pytest.raises(OSError, match="all attempts to connect") as info:
                await trio.open_tcp_stream(SERVER, 80)
        assert trio.current_time() < 1
    errors = getattr(info.value.__cause__, "exceptions", None)
    assert errors is not None
    assert [type(error) for error in errors] == [ConnectionRefusedError]
    assert server.counters[Verdict.NO_LISTENER] == 2
    assert any(r.where == "server" and r.tcp.startswith("[R.]") for r in records)


async def test_a_nat_drops_unsolicited_inbound_tcp(autojump_clock: trio.testing.MockClock) -> None:
    net, server, nat, alice, _ = nat_world()
    async with net, trio.open_nursery() as nursery:
        with alice.activate():  # even with a listener behind the NAT, nothing maps to it
            await nursery.start(trio.serve_tcp, echo, 5000)
        with server.activate():
            sock = tsocket.socket(tsocket.AF_INET, tsocket.SOCK_STREAM)
            start = trio.current_time()
            with pytest.raises(TimeoutError):
                await sock.connect(("198.51.100.1", 5000))
            # Six retransmissions with exponential backoff, as Linux: 1 + 2 + ... + 64 s.
            assert trio.current_time() - start == pytest.approx(127)
            sock.close()
        assert nat.counters[Verdict.NO_MAPPING] == 7
        assert alice.counters[Verdict.DELIVERED] == 0
        nursery.cancel_scope.cancel()


async def test_an_outbound_connection_admits_only_its_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, nat, alice, _ = nat_world()
    stranger = net.add_host("192.0.2.99", name="stranger")
    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        with alice.activate():
            stream = await trio.open_tcp_stream(SERVER, 443)
        with stranger.activate():  # knows the mapped port, but the filter admits only SERVER:443
            sock = tsocket.socket(tsocket.AF_INET, tsocket.SOCK_STREAM)
            with trio.move_on_after(5):
                await sock.connect(("198.51.100.1", 49152))
            assert nat.counters[Verdict.DROPPED_BY_FILTER] >= 2
        await stream.send_all(b"still fine")
        assert await stream.receive_some() == b"still fine"
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_udp_is_blocked_but_tcp_passes(autojump_clock: trio.testing.MockClock) -> None:
    net, server, nat, alice, records = nat_world(block_udp=True, trace=True)
    async with net, trio.open_nursery() as nursery:
        udp = server.udp_socket()
        await udp.bind(("", 3478))
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        with alice.activate():
            sock = tsocket.socket(tsocket.AF_INET, tsocket.SOCK_DGRAM)
            await sock.sendto(b"stun?", (SERVER, 3478))
            stream = await trio.open_tcp_stream(SERVER, 443)
            await stream.send_all(b"relay me")
            assert await stream.receive_some() == b"relay me"
        await udp.sendto(b"in", ("198.51.100.1", 49152))  # inbound UDP is blocked as well
        await trio.sleep(1)
        assert udp.is_readable() is False
        blocked = [r for r in records if r.verdict is Verdict.BLOCKED]
        assert [(r.where, r.protocol, r.dst) for r in blocked] == [
            ("home", "udp", f"{SERVER}:3478"),
            ("home", "udp", "198.51.100.1:49152"),
        ]
        assert nat.mappings() == []
        assert len(nat.tcp_mappings()) == 1
        nat.block_udp = False  # a setting that may change while the simulation runs
        await sock.sendto(b"stun?", (SERVER, 3478))
        assert await udp.recv(10) == b"stun?"
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_router_can_block_udp_too(autojump_clock: trio.testing.MockClock) -> None:
    net = netsim.Internet()
    server = net.add_host(SERVER)
    office = net.add_router("192.0.2.1", lan="192.0.2.128/25", block_udp=True)
    bob = office.lan.add_host()
    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        with bob.activate():
            stream = await trio.open_tcp_stream(SERVER, 443)
            await stream.send_all(b"ok")
            assert await stream.receive_some() == b"ok"
            await stream.aclose()
            udp = tsocket.socket(tsocket.AF_INET, tsocket.SOCK_DGRAM)
            await udp.sendto(b"x", (SERVER, 53))
        await trio.sleep(1)
        assert office.counters[Verdict.BLOCKED] == 1
        nursery.cancel_scope.cancel()


async def test_aclose_wakes_a_blocked_receive_and_the_peer_sees_eof(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, _, alice, _ = nat_world(link=netsim.Link(latency=0.01))
    peer_saw: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        peer_saw.append(await stream.receive_some())
        await stream.aclose()

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, handler, 443)
        with alice.activate():
            stream = await trio.open_tcp_stream(SERVER, 443)
        with trio.move_on_after(1):  # cancelling a blocked receive leaves the stream usable
            await stream.receive_some()
        outcome: list[BaseException] = []

        async def receiver() -> None:
            try:
                await stream.receive_some()
            except trio.ClosedResourceError as error:
                outcome.append(error)

        async with trio.open_nursery() as inner:
            inner.start_soon(receiver)
            await trio.sleep(1)
            await stream.aclose()
        assert len(outcome) == 1
        await trio.sleep(1)
        assert peer_saw == [b""]  # an orderly FIN
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"late")
        assert alice.tcp_connections  # TIME-WAIT keeps the connection for a while
        await trio.sleep(61)
        assert alice.tcp_connections == []
        assert server.tcp_connections == []
        nursery.cancel_scope.cancel()


async def test_a_slow_reader_blocks_the_sender(autojump_clock: trio.testing.MockClock) -> None:
    net, server, _, alice, _ = nat_world(link=netsim.Link(latency=0.01))
    accepted: list[trio.SocketStream] = []

    async def keep(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, keep, 443)
        with alice.activate():
            stream = await trio.open_tcp_stream(SERVER, 443)
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for _ in range(100):
                await stream.send_all(b"y" * 10_000)
                sent += 10_000

        nursery.start_soon(sender)
        await trio.sleep(30)  # the reader reads nothing: both buffers fill, then send_all blocks
        assert sent <= netsim.TCP_SEND_BUFFER + netsim.TCP_RECEIVE_BUFFER
        assert sent >= netsim.TCP_RECEIVE_BUFFER
        [reader] = accepted
        received = 0
        while received < 1_000_000:  # zero-window probes and window updates resume the sender
            received += len(await reader.receive_some(5000))
            await trio.sleep(0.01)
        assert sent == received == 1_000_000
        nursery.cancel_scope.cancel()


async def test_closing_with_unread_data_resets_the_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, _, alice, _ = nat_world()

    async def rude(stream: trio.SocketStream) -> None:
        await trio.sleep(1)  # data arrives and is never read
        await stream.aclose()

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, rude, 443)
        with alice.activate():
            stream = await trio.open_tcp_stream(SERVER, 443)
        await stream.send_all(b"unread")
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some()
        assert isinstance(info.value.__cause__, ConnectionResetError)
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"more")
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_half_close_and_listeners_on_every_family(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet()
    host = net.add_host("192.0.2.1", "2001:db8::1", name="both")
    other = net.add_host("192.0.2.2", "2001:db8::2", name="other")

    async def reply_after_eof(stream: trio.SocketStream) -> None:
        request = b""
        while data := await stream.receive_some():
            request += data
        await stream.send_all(request[::-1])
        await stream.aclose()

    async with net, trio.open_nursery() as nursery:
        with host.activate():
            listeners = await nursery.start(trio.serve_tcp, reply_after_eof, 8080)
            families = {listener.socket.family for listener in listeners}
            assert stdlib_socket.AF_INET in families
            local = await trio.testing.open_stream_to_socket_listener(listeners[0])
            await local.send_all(b"loopback")
            await local.send_eof()
            assert await local.receive_some() == b"kcabpool"
        with other.activate():
            for address in ("192.0.2.1", "2001:db8::1"):
                stream = await trio.open_tcp_stream(address, 8080)
                await stream.send_all(b"abc")
                await stream.send_eof()
                assert await stream.receive_some() == b"cba"
                assert await stream.receive_some() == b""
                await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_socket_level_errors(autojump_clock: trio.testing.MockClock) -> None:
    net, server, _, alice, _ = nat_world()
    async with net:
        sock = alice.tcp_socket()
        assert sock.state == "CLOSED"
        assert sock.fileno() >= 0
        with pytest.raises(OSError, match="not connected") as info:
            await sock.recv(10)
        assert info.value.errno == errno.ENOTCONN
        with pytest.raises(BrokenPipeError):
            await sock.send(b"x")
        with pytest.raises(netsim.UnsupportedSocketError):
            await sock.sendto(b"x", (SERVER, 1))
        with pytest.raises(netsim.UnsupportedSocketError):
            await sock.recvmsg(10)
        with pytest.raises(OSError, match="not listening"):
            await sock.accept()
        listener = server.tcp_socket()
        await listener.bind(("", 443))
        listener.listen(1)
        assert listener.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_ACCEPTCONN) == 1
        with pytest.raises(OSError, match="in use") as info:
            await server.tcp_socket().bind(("", 443))
        assert info.value.errno == errno.EADDRINUSE
        udp = server.udp_socket()
        await udp.bind(("", 443))  # UDP ports are separate
        await sock.connect((SERVER, 443))
        assert sock.state == "ESTABLISHED"
        with pytest.raises(OSError, match="already connected"):
            await sock.connect((SERVER, 443))
        child, address = await listener.accept()
        assert address == ("198.51.100.1", 49152)
        sock.close()
        assert sock.fileno() == -1
        with pytest.raises(OSError, match="Bad file descriptor"):
            await sock.recv(1)
        child.close()
        listener.close()


async def test_simulation_exit_closes_tcp_sockets(autojump_clock: trio.testing.MockClock) -> None:
    net, server, _, alice, _ = nat_world()
    outcome: list[BaseException] = []
    async with trio.open_nursery() as outer, net:
        with server.activate():
            listeners = await trio.open_tcp_listeners(443, host="0.0.0.0")
        with alice.activate():
            stream = await trio.open_tcp_stream(SERVER, 443)

        async def receive() -> None:
            try:
                await stream.receive_some()
            except trio.ClosedResourceError as error:
                outcome.append(error)

        outer.start_soon(receive)
        await trio.sleep(1)
    assert len(outcome) == 1
    assert listeners[0].socket.fileno() == -1
    assert alice.tcp_connections == []


async def test_names_and_tcp_mappings_that_outlive_udp_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, nat, alice, _ = nat_world()
    net.add_name("relay.example", SERVER)
    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        with alice.activate():
            stream = await trio.open_tcp_stream("relay.example", 443)
        await trio.sleep(NatBehavior().mapping_timeout + 80)  # a UDP mapping would be gone
        await stream.send_all(b"idle but alive")
        assert await stream.receive_some() == b"idle but alive"
        assert nat.table.expired == 0
        assert len(nat.tcp_mappings()) == 1
        [accepted] = [s for s in server.tcp_connections if s.state == "ESTABLISHED"]
        await trio.sleep(NatBehavior().tcp_mapping_timeout + 1)
        assert nat.tcp_mappings() == []
        await accepted.send(b"after the mapping expired")  # the server speaks first: dropped
        await trio.sleep(1)
        assert nat.counters[Verdict.NO_MAPPING] >= 1
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_full_backlog_drops_syns_until_accept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, _, alice, _ = nat_world()
    async with net, trio.open_nursery() as nursery:
        listener = server.tcp_socket()
        await listener.bind((SERVER, 443))
        listener.listen(1)
        with alice.activate():
            first = await trio.open_tcp_stream(SERVER, 443)
            second_done = trio.Event()

            async def second() -> None:
                stream = await trio.open_tcp_stream(SERVER, 443)
                await stream.aclose()
                second_done.set()

            nursery.start_soon(second)
        await trio.sleep(2)
        assert server.counters[Verdict.BUFFER_FULL] >= 1
        assert not second_done.is_set()
        accepted, _ = await listener.accept()  # room again: the retransmitted SYN gets in
        await second_done.wait()
        accepted.close()
        await first.aclose()
        listener.close()
        nursery.cancel_scope.cancel()


async def test_a_cut_link_times_the_connection_out_as_linux_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, nat, alice, _ = nat_world()
    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        with alice.activate():
            stream = await trio.open_tcp_stream(SERVER, 443)
        nat.outside.link = netsim.Link(loss=1.0)
        start = trio.current_time()
        await stream.send_all(b"into the void")
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some()
        assert isinstance(info.value.__cause__, TimeoutError)
        # 0.2 s doubling to the 120 s cap, 15 retransmissions: 924.6 s (Linux's tcp_retries2).
        assert trio.current_time() - start == pytest.approx(924.6)
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_the_tcp_example_in_the_docs_prints_what_it_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "netsim.md").read_text()
    section = text.split("\n## TCP\n", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    documented = re.search(r"It prints.*?\n\n```\n(.*?)```", section, re.S)
    assert example is not None
    assert documented is not None
    exec(compile(example[1], "docs/netsim.md", "exec"), {"__name__": "netsim_tcp_example"})
    assert capsys.readouterr().out == documented[1]
