"""Simulated UDP sockets behave like trio sockets; the simulation scope cleans up after itself."""

from __future__ import annotations

import errno
import ipaddress
import socket as stdlib_socket

import pytest
import trio
import trio.socket as tsocket
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import netsim
from punchtrio.netsim._addresses import parse_sockaddr


def two_hosts() -> tuple[netsim.Internet, netsim.Host, netsim.Host]:
    net = netsim.Internet()
    alice = net.add_host("192.0.2.1", "2001:db8::1", name="alice")
    bob = net.add_host("192.0.2.2", "2001:db8::2", name="bob")
    return net, alice, bob


async def test_plain_trio_code_runs_unchanged_on_a_host(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def echo_once(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = tsocket.socket(tsocket.AF_INET, tsocket.SOCK_DGRAM)
        with sock:
            await sock.bind(("0.0.0.0", 9000))
            task_status.started()
            data, addr = await sock.recvfrom(100)
            await sock.sendto(data.upper(), addr)

    async def client() -> bytes:
        sock = tsocket.socket(tsocket.AF_INET, tsocket.SOCK_DGRAM)
        with sock:
            await sock.connect(("192.0.2.2", 9000))
            assert sock.getsockname() == ("192.0.2.1", 49152)
            assert sock.getpeername() == ("192.0.2.2", 9000)
            await sock.send(b"ping")
            return await sock.recv(100)

    net, alice, bob = two_hosts()
    async with net, trio.open_nursery() as nursery:
        with bob.activate():
            await nursery.start(echo_once)
        with alice.activate():
            assert await client() == b"PING"
    assert isinstance(alice.udp_socket(), tsocket.SocketType)


async def test_ipv6_and_loopback(autojump_clock: trio.testing.MockClock) -> None:
    net, alice, bob = two_hosts()
    async with net:
        a = alice.udp_socket(stdlib_socket.AF_INET6)
        b = bob.udp_socket(stdlib_socket.AF_INET6)
        await b.bind(("::", 7000))
        await a.sendto(b"v6", ("2001:db8::2", 7000))
        assert await b.recvfrom(10) == (b"v6", ("2001:db8::1", 49152, 0, 0))
        local = alice.udp_socket()
        await local.bind(("127.0.0.1", 53))
        other = alice.udp_socket()
        await other.sendto(b"self", ("127.0.0.1", 53))
        assert await local.recvfrom(10) == (
            b"self",
            ("127.0.0.1", 49153),
        )  # one port space per host
        with pytest.raises(OSError, match="family"):
            await a.sendto(b"x", ("192.0.2.2", 7000))


async def test_bind_errors_match_the_kernel(autojump_clock: trio.testing.MockClock) -> None:
    net, alice, _ = two_hosts()
    async with net:
        first = alice.udp_socket()
        await first.bind(("", 5000))
        with pytest.raises(OSError, match="in use") as info:
            await alice.udp_socket().bind(("192.0.2.1", 5000))
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError, match="assign") as info:
            await alice.udp_socket().bind(("192.0.2.99", 5001))
        assert info.value.errno == errno.EADDRNOTAVAIL
        with pytest.raises(OSError, match="already bound") as info:
            await first.bind(("", 5002))
        assert info.value.errno == errno.EINVAL
        # One port on two specific addresses is fine (a STUN server with two IPs does this).
        multi = net.add_host("203.0.113.1", "203.0.113.2")
        await multi.udp_socket().bind(("203.0.113.1", 3478))
        await multi.udp_socket().bind(("203.0.113.2", 3478))
        assert [s.getsockname() for s in multi.sockets] == [
            ("203.0.113.1", 3478),
            ("203.0.113.2", 3478),
        ]
        first.close()
        await alice.udp_socket().bind(("", 5000))  # the port is free again


async def test_datagram_semantics(autojump_clock: trio.testing.MockClock) -> None:
    net, alice, bob = two_hosts()
    async with net:
        a, b = alice.udp_socket(), bob.udp_socket()
        await b.bind(("", 4000))
        await a.sendto(b"0123456789", 0, ("192.0.2.2", 4000))
        assert await b.recvfrom(4) == (b"0123", ("192.0.2.1", 49152))  # truncated, rest discarded
        await a.sendto(b"abc", ("192.0.2.2", 4000))
        buffer = bytearray(8)
        assert await b.recvfrom_into(buffer) == (3, ("192.0.2.1", 49152))
        assert buffer[:3] == b"abc"
        with pytest.raises(OSError, match="too long") as info:
            await a.sendto(bytes(netsim.MAX_DATAGRAM + 1), ("192.0.2.2", 4000))
        assert info.value.errno == errno.EMSGSIZE
        with pytest.raises(OSError, match="Destination") as info:
            await alice.udp_socket().send(b"x")
        assert info.value.errno == errno.EDESTADDRREQ
        # A connected socket ignores other sources.
        c = bob.udp_socket()
        await c.bind(("", 4001))
        await c.connect(("192.0.2.1", 1))
        await a.sendto(b"not from 1", ("192.0.2.2", 4001))
        await trio.sleep(1)
        assert not c.is_readable()
        assert bob.counters[netsim.Verdict.NO_LISTENER] == 1


async def test_nowait_interface_for_fast_paths(autojump_clock: trio.testing.MockClock) -> None:
    net, alice, bob = two_hosts()
    async with net:
        a, b = alice.udp_socket(), bob.udp_socket()
        await b.bind(("", 4000))
        with pytest.raises(BlockingIOError):
            b.recvfrom_nowait(100)
        for i in range(5):
            assert a.sendto_nowait(bytes([i]) * 3, ("192.0.2.2", 4000)) == 3
        await b.wait_readable()
        drained = []
        buffer = bytearray(64)
        while True:
            try:
                n, _ = b.recvfrom_into_nowait(buffer)
            except BlockingIOError:
                break
            drained.append(bytes(buffer[:n]))
        assert drained == [bytes([i]) * 3 for i in range(5)]


async def test_names_are_refused_unless_added(autojump_clock: trio.testing.MockClock) -> None:
    net, alice, bob = two_hosts()
    net.add_name("bob.example", "192.0.2.2")
    async with net:
        with pytest.raises(stdlib_socket.gaierror):
            await tsocket.getaddrinfo("nowhere.example", 80)
        [info] = await tsocket.getaddrinfo("bob.example", 4000, type=tsocket.SOCK_DGRAM)
        assert info[4] == ("192.0.2.2", 4000)
        assert await tsocket.getaddrinfo("192.0.2.7", 1, type=tsocket.SOCK_DGRAM)  # literals work
        b = bob.udp_socket()
        await b.bind(("", 4000))
        await alice.udp_socket().sendto(b"by name", ("bob.example", 4000))
        assert await b.recv(10) == b"by name"
        with pytest.raises(stdlib_socket.gaierror):
            await alice.udp_socket().sendto(b"x", ("nowhere.example", 4000))


async def test_socket_factory_errors(autojump_clock: trio.testing.MockClock) -> None:
    net, alice, _ = two_hosts()
    async with net:
        with pytest.raises(netsim.NoCurrentHostError):
            tsocket.socket(tsocket.AF_INET, tsocket.SOCK_DGRAM)
        with alice.activate(), pytest.raises(netsim.UnsupportedSocketError) as info:
            tsocket.socket(tsocket.AF_INET, tsocket.SOCK_RAW)  # UDP and TCP only
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.EPROTONOSUPPORT


class _Sentinel(trio.abc.SocketFactory):
    def socket(self, family: int = 0, type: int = 0, proto: int = 0) -> tsocket.SocketType:
        raise AssertionError("not used")


async def test_scope_exit_restores_the_factory_and_closes_sockets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sentinel = _Sentinel()
    tsocket.set_custom_socket_factory(sentinel)
    try:
        net, _, bob = two_hosts()
        async with trio.open_nursery() as outer:
            async with net:
                waiting = bob.udp_socket()
                await waiting.bind(("", 4000))
                result: list[BaseException] = []

                async def receive() -> None:
                    try:
                        await waiting.recvfrom(10)
                    except trio.ClosedResourceError as exc:
                        result.append(exc)

                outer.start_soon(receive)
                await trio.sleep(1)
            await trio.sleep(1)
        assert len(result) == 1
        assert waiting.closed
        assert bob.sockets == []
        with pytest.raises(OSError, match="closed") as info:
            await waiting.sendto(b"x", ("192.0.2.1", 1))
        assert info.value.errno == errno.EBADF
        assert tsocket.set_custom_socket_factory(None) is sentinel
    finally:
        tsocket.set_custom_socket_factory(None)
    assert tsocket.set_custom_hostname_resolver(None) is None


async def test_sync_with_scope_runs_the_engine_as_a_system_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, alice, bob = two_hosts()
    with net:
        b = bob.udp_socket()
        await b.bind(("", 4000))
        await alice.udp_socket().sendto(b"sync", ("192.0.2.2", 4000))
        assert await b.recv(10) == b"sync"
        with pytest.raises(netsim.NetsimError):
            net.__enter__()
    assert b.closed
    assert tsocket.set_custom_socket_factory(None) is None


def test_topology_errors() -> None:
    net = netsim.Internet()
    net.add_host("192.0.2.1", name="a")
    with pytest.raises(netsim.NetsimError, match="already used"):
        net.add_host("192.0.2.1")
    with pytest.raises(netsim.NetsimError, match="already exists"):
        net.add_host("192.0.2.3", name="a")
    with pytest.raises(netsim.NetsimError, match="IP literal"):
        net.add_host("example.com")
    with pytest.raises(netsim.NetsimError, match="explicit address"):
        net.add_host()
    with pytest.raises(netsim.NetsimError, match="CIDR"):
        net.add_nat("198.51.100.1", lan="10.0.0.0/99")
    with pytest.raises(netsim.NetsimError, match="already exists"):
        net.add_router("198.51.100.1", lan="203.0.113.0/24", name="a")
    assert [node.name for node in net.nodes] == ["a"]  # refused nodes leave nothing behind
    assert net.add_nat("198.51.100.1").name == "nat1"
    nat = net.add_nat("198.51.100.2", lan="10.9.0.0/30")
    nat.lan.add_host()
    with pytest.raises(netsim.NetsimError, match="no free address"):
        nat.lan.add_host()
    with pytest.raises(netsim.NetsimError, match="outside"):
        nat.lan.add_host("10.8.0.1")
    assert net.node("a").name == "a"
    with pytest.raises(netsim.NetsimError):
        net.node("zz")


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_literal_socket_addresses_round_trip(ip: object, port: int) -> None:
    family = stdlib_socket.AF_INET if ip.version == 4 else stdlib_socket.AF_INET6  # type: ignore[attr-defined]
    assert parse_sockaddr(family, (str(ip), port), allow_wildcard=False) == (ip, port)


@given(
    st.integers(min_value=0, max_value=1)
    | st.sampled_from([stdlib_socket.AF_INET, stdlib_socket.AF_INET6]),
    st.one_of(
        st.tuples(st.text(max_size=40), st.integers()),
        st.tuples(st.text(max_size=40), st.integers(), st.integers(), st.integers()),
        st.tuples(st.none(), st.booleans()),
        st.text(max_size=10),
        st.lists(st.integers(), max_size=3).map(tuple),
    ),
    st.booleans(),
)
def test_socket_address_parser_fails_only_with_socket_errors(
    family: int, address: object, wildcard: bool
) -> None:
    try:
        ip, port = parse_sockaddr(family, address, allow_wildcard=wildcard)
    except (TypeError, OverflowError, OSError):
        return
    assert 0 <= port <= 65535
    assert ip is not None or wildcard


async def test_errors_inside_the_scope_propagate_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, _, _ = two_hosts()
    with pytest.raises(KeyError):
        async with net:
            raise KeyError("mine")
    assert tsocket.set_custom_socket_factory(None) is None


def test_public_names_are_documented() -> None:
    for name in netsim.__all__:
        obj = getattr(netsim, name)
        if isinstance(obj, type):
            assert obj.__doc__, name
            assert obj.__module__.startswith("punchtrio.netsim"), name
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert member.__doc__, f"{name}.{attr}"


@given(st.text(max_size=60) | st.ip_addresses().map(str))
def test_node_addresses_are_literals_or_one_clear_error(text: str) -> None:
    net = netsim.Internet()
    try:
        host = net.add_host(text)
    except netsim.NetsimError:
        assert net.nodes == []  # refused without a half-built node
    else:
        assert host.address == ipaddress.ip_address(text)
        assert not host.address.is_loopback


@given(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=2),
)
def test_link_parameters_are_valid_or_refused(latency: float, jitter: float, loss: float) -> None:
    try:
        link = netsim.Link(latency=latency, jitter=jitter, loss=loss)
    except netsim.NetsimError:
        return
    assert 0 <= link.jitter <= link.latency
    assert 0 <= link.loss <= 1
