"""Kernel steering with real packets: WireGuard datagrams to port P reach wireguard-go's port Q.

Two namespaces joined by a veth (IPv4 and IPv6). In ``a`` (the host), this process holds UDP
sockets on the shared port P, on Q (where wireguard-go would listen) and on a loopback port R,
and runs :func:`punchtrio.tunnel.steer_wireguard` there; in ``b`` (the far peer) it holds one
socket. Sockets stay in the namespace they were created in, so the test switches this thread
into a namespace (``setns``) only to create sockets and run ``nft``; sending and receiving then
happen from here. Every test fails, never skips, without root, ``nft`` or ``ip``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labs.netns import Lab, Namespace
from labs.wireguard import PYTHON, ROOT, UNDERLAY, make_pair

from punchtrio.tunnel import TunnelError, steer_wireguard, steering_ruleset, steering_table_name
from tests.conftest import require_root_and

pytestmark = [pytest.mark.root, pytest.mark.interop]

P, Q, R, FAR = 51820, 51821, 40001, 40000  # shared, wireguard-go's, loopback, the far peer's
UNDERLAY6 = ("fd00:57ee::1", "fd00:57ee::2")
FAMILIES = {"ipv4": UNDERLAY, "ipv6": UNDERLAY6}
ROUTED = {"ipv4": ("10.1.0.1", "10.1.0.2"), "ipv6": ("fd00:57ef::1", "fd00:57ef::2")}  # a, c
TABLE = steering_table_name("wg0")
ARRIVES = 2.0  # seconds to wait for a datagram that must arrive
ABSENT = 0.2  # seconds to wait before saying a datagram did not arrive (same veth, ordered)

# WireGuard's four messages with their real lengths: type, three zero bytes, then the body.
WIREGUARD = {
    1: b"\x01\x00\x00\x00" + os.urandom(144),  # handshake initiation, 148 bytes
    2: b"\x02\x00\x00\x00" + os.urandom(88),  # handshake response, 92 bytes
    3: b"\x03\x00\x00\x00" + os.urandom(60),  # cookie reply, 64 bytes
    4: b"\x04\x00\x00\x00" + os.urandom(28),  # data, 32 bytes (a keepalive)
}
NOT_WIREGUARD = {
    "probe": b"\xf0pun" + os.urandom(60),
    # A STUN Binding request: type 0x0001, length 0, magic cookie, transaction ID.
    "stun": b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12),
    # Type 1 but a reserved byte set: not WireGuard, so not steered.
    "type-1-reserved-set": b"\x01\x00\x00\x01" + os.urandom(144),
    "type-5": b"\x05\x00\x00\x00" + os.urandom(60),
}

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@contextlib.contextmanager
def inside(ns: Namespace) -> Iterator[None]:
    """Move this thread into ``ns``'s network namespace for the block, then back."""
    with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{ns.name}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def _udp(port: int, host: str = "::") -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def _v6(host: str) -> str:
    """``host`` as a dual-stack socket names it (IPv4 as ``::ffff:a.b.c.d``)."""
    return host if ":" in host else f"::ffff:{host}"


@dataclass
class Host:
    """The sockets: ``p``, ``q`` and ``r`` in namespace ``a``, ``far`` in namespace ``b``."""

    a: Namespace
    p: socket.socket
    q: socket.socket
    r: socket.socket
    far: socket.socket

    def receive(self, sock: socket.socket, timeout: float = ARRIVES) -> tuple[bytes, str, int]:
        """Return the next datagram on ``sock`` and its source ``(data, host, port)``."""
        readable, _, _ = select.select([sock], [], [], timeout)
        assert readable, f"nothing arrived at port {sock.getsockname()[1]} within {timeout} s"
        data, source = sock.recvfrom(65536)
        return data, source[0], source[1]

    def assert_silent(self, *socks: socket.socket) -> None:
        """Fail if any of ``socks`` has a datagram waiting."""
        readable, _, _ = select.select(list(socks), [], [], ABSENT)
        assert not readable, [s.getsockname()[1] for s in readable]

    def tables(self) -> str:
        """Return ``nft list tables`` in namespace ``a``."""
        return self.a.run("nft", "list", "tables")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_root_and("nft", "ip")
    with Lab() as built:
        pair = make_pair(built)
        pair.a.run("ip", "addr", "add", f"{UNDERLAY6[0]}/64", "dev", "va", "nodad")
        pair.b.run("ip", "addr", "add", f"{UNDERLAY6[1]}/64", "dev", "vb", "nodad")
        # A third namespace ``c`` behind ``a``, which forwards between ``b`` and ``c``.
        c = built.namespace("c")
        built.veth(pair.a, "vc", c, "vc")
        for (ours, theirs), prefix in zip(ROUTED.values(), ("24", "64"), strict=True):
            pair.a.run("ip", "addr", "add", f"{ours}/{prefix}", "dev", "vc", "nodad")
            c.run("ip", "addr", "add", f"{theirs}/{prefix}", "dev", "vc", "nodad")
        pair.a.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        for family, (gateway, _) in FAMILIES.items():
            pair.b.run("ip", f"-{family[-1]}", "route", "add", "default", "via", gateway)
        for family, (gateway, _) in ROUTED.items():
            c.run("ip", f"-{family[-1]}", "route", "add", "default", "via", gateway)
        yield built


@pytest.fixture
def host(lab: Lab) -> Iterator[Host]:
    a, b, _ = lab.namespaces
    with contextlib.ExitStack() as stack:
        with inside(a):
            p, q, r = _udp(P), _udp(Q), _udp(R)
        with inside(b):
            far = _udp(FAR)
        for sock in (p, q, r, far):
            stack.enter_context(sock)
        yield Host(a, p, q, r, far)
    # Whatever a test did, it leaves no table behind for the next one.
    assert "punchtrio" not in a.run("nft", "list", "tables")


@contextlib.contextmanager
def steering(host: Host, *, wireguard_port: int = Q) -> Iterator[None]:
    """:func:`steer_wireguard` run in namespace ``a`` (the block runs there too: harmless, as
    every socket is already bound and ``Namespace.run`` names its namespace)."""
    with (
        inside(host.a),
        steer_wireguard(shared_port=P, wireguard_port=wireguard_port, table=TABLE),
    ):
        yield


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", WIREGUARD)
def test_a_wireguard_message_to_p_arrives_at_q(host: Host, family: str, kind: int) -> None:
    ours, theirs = FAMILIES[family]
    with steering(host):
        host.far.sendto(WIREGUARD[kind], (_v6(ours), P))
        assert host.receive(host.q) == (WIREGUARD[kind], _v6(theirs), FAR)
        host.assert_silent(host.p)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", NOT_WIREGUARD)
def test_anything_else_to_p_still_arrives_at_p(host: Host, family: str, kind: str) -> None:
    ours, theirs = FAMILIES[family]
    with steering(host):
        host.far.sendto(NOT_WIREGUARD[kind], (_v6(ours), P))
        assert host.receive(host.p) == (NOT_WIREGUARD[kind], _v6(theirs), FAR)
        host.assert_silent(host.q)


@pytest.mark.parametrize("family", FAMILIES)
def test_what_q_sends_leaves_from_p_and_replies_come_back_to_q(host: Host, family: str) -> None:
    ours, theirs = FAMILIES[family]
    with steering(host):
        host.q.sendto(WIREGUARD[1], (_v6(theirs), FAR))
        assert host.receive(host.far) == (WIREGUARD[1], _v6(ours), P)
        host.far.sendto(WIREGUARD[2], (_v6(ours), P))  # the reply, to the address it saw
        assert host.receive(host.q) == (WIREGUARD[2], _v6(theirs), FAR)
        # punchtrio's own socket on P is untouched by the rules in both directions.
        host.p.sendto(NOT_WIREGUARD["probe"], (_v6(theirs), FAR))
        assert host.receive(host.far) == (NOT_WIREGUARD["probe"], _v6(ours), P)


@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1"])
def test_loopback_traffic_from_q_keeps_its_port(host: Host, loopback: str) -> None:
    with steering(host):
        host.q.sendto(WIREGUARD[4], (_v6(loopback), R))
        assert host.receive(host.r) == (WIREGUARD[4], _v6(loopback), Q)


def test_leaving_removes_the_table_and_p_gets_wireguard_again(host: Host) -> None:
    with steering(host):
        assert f"table inet {TABLE}" in host.tables()
    assert TABLE not in host.tables()
    host.far.sendto(WIREGUARD[1], (_v6(UNDERLAY[0]), P))
    assert host.receive(host.p) == (WIREGUARD[1], _v6(UNDERLAY[1]), FAR)
    host.q.sendto(WIREGUARD[2], (_v6(UNDERLAY[1]), FAR))
    assert host.receive(host.far) == (WIREGUARD[2], _v6(UNDERLAY[0]), Q)
    host.assert_silent(host.q)


def test_an_exception_inside_the_block_still_removes_the_table(host: Host) -> None:
    def fail_while_steering() -> None:
        with steering(host):
            assert TABLE in host.tables()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_steering()
    assert TABLE not in host.tables()


def test_a_table_deleted_by_someone_else_is_fine_on_leaving(host: Host) -> None:
    with steering(host):
        host.a.run("nft", "delete", "table", "inet", TABLE)
    assert TABLE not in host.tables()


def test_a_stale_table_of_the_same_name_is_replaced(host: Host) -> None:
    # A killed run left its table, steering to another port: entering replaces it whole.
    stale = steering_ruleset(table=TABLE, shared_port=P, wireguard_port=R)
    host.a.run("nft", "-f", "-", input=stale)
    host.far.sendto(WIREGUARD[1], (_v6(UNDERLAY[0]), P))
    assert host.receive(host.r)[0] == WIREGUARD[1]  # the stale rules are live
    with steering(host):
        assert host.tables().count(TABLE) == 1
        host.far.sendto(WIREGUARD[1], (_v6(UNDERLAY[0]), P))
        assert host.receive(host.q)[0] == WIREGUARD[1]
        host.assert_silent(host.r, host.p)
    assert TABLE not in host.tables()


@pytest.mark.parametrize("family", FAMILIES)
def test_wireguard_forwarded_through_the_host_is_not_steered(
    lab: Lab, host: Host, family: str
) -> None:
    # ``a`` routes for ``c``, whose own WireGuard listens on P (the default port, so a common
    # case): what ``b`` sends there passes ``a``'s prerouting hook but is not for ``a``.
    c = lab.namespaces[2]
    with inside(c):
        c_p, c_q = _udp(P), _udp(Q)
    with c_p, c_q, steering(host):
        host.far.sendto(WIREGUARD[1], (_v6(ROUTED[family][1]), P))
        assert host.receive(c_p) == (WIREGUARD[1], _v6(FAMILIES[family][1]), FAR)
        host.assert_silent(c_q, host.p, host.q)
        # The host's own WireGuard is steered meanwhile.
        host.far.sendto(WIREGUARD[1], (_v6(FAMILIES[family][0]), P))
        assert host.receive(host.q)[0] == WIREGUARD[1]


def test_without_root_the_error_is_one_line_naming_the_fix(host: Host) -> None:
    require_root_and("setpriv")
    code = (
        "from punchtrio.tunnel import TunnelError, steer_wireguard\n"
        "try:\n"
        f"    with steer_wireguard(shared_port={P}, wireguard_port={Q}, table={TABLE!r}):\n"
        "        pass\n"
        "except TunnelError as exc:\n"
        "    print(exc)\n"
    )
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    result = subprocess.run(
        host.a.exec(*argv, PYTHON, "-c", code),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"nft could not create table inet {TABLE}: netlink: Error: cache initialization failed: "
        "Operation not permitted (steering needs root or CAP_NET_ADMIN)\n"
    )
    assert TABLE not in host.tables()


def test_missing_nft_is_a_tunnel_error_in_a_namespace_too(
    host: Host, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    with pytest.raises(TunnelError, match=r"^nft not found: install nftables"), steering(host):
        pass  # pragma: no cover - never entered
    monkeypatch.undo()
    assert TABLE not in host.tables()
