"""Hard NATs with real kernel NATs: birthday punching, and port mapping on a real miniupnpd.

- Two real ``punchtrio up --hub``, one behind the lab's port-restricted cone (``port``), one
  behind its ``masquerade fully-random`` NAT (``sym``), in both orders: both sides must report
  the direct path (``punchtrio status --json``), a ping must cross the tunnel, and the hard side
  must have closed its birthday sockets (its ``/proc/PID/fd`` count against the easy side's).
- A real ``miniupnpd`` (Debian ``miniupnpd-nftables``) as the ``port`` NAT's gateway: PCP and
  NAT-PMP mappings from :class:`punchtrio.punch.PortMapper`, and UPnP IGD ones from
  :class:`punchtrio.punch.UpnpMapping`, let a datagram from the internet in, are refreshed
  before their lifetime ends, and are deleted when the session ends; and ``punchtrio up
  --port-mapping`` behind a symmetric NAT with miniupnpd gets a direct path to a peer behind
  another symmetric NAT, which no punch reaches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks.birthday_lab import direct_since_start
from labs.discovery import PUNCHTRIO
from labs.scenarios.punch_matrix import running_pair, start_hub
from labs.topology import Host, Nat, Network, build

from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

BINARIES = ("ip", "nft", "conntrack", "sysctl", "ss", "ping")
DIRECT_WITHIN_S = 40.0
"""From starting both ``up`` to both sides direct. The punch itself takes 0.3-2 s after
``punch_started``; the rest is two interpreters starting on a loaded 2-core machine."""


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Network, Path]]:
    require_root_and(*BINARIES)
    with tempfile.TemporaryDirectory(prefix="pt-hard-") as tmp, build(["port", "sym"]) as net:
        start_hub(net, Path(tmp) / "hub.log")
        yield net, Path(tmp)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status(interface: str) -> dict[str, object]:
    shown = subprocess.run(
        [*PUNCHTRIO, "status", "--json", interface],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    status: dict[str, object] = json.loads(shown.stdout)
    return status


@pytest.mark.parametrize("order", ["port/sym", "sym/port"])
def test_port_restricted_and_symmetric_reach_a_direct_path(
    lab: tuple[Network, Path], order: str
) -> None:
    require_root_and(*BINARIES)
    net, workdir = lab
    port_nat, sym_nat = net.requested
    hosts = {"port": port_nat.hosts[0], "sym": sym_nat.hosts[0]}
    first, second = order.split("/")
    a, b = hosts[first], hosts[second]
    net.flush_conntrack()
    label = f"hn{first[0]}{second[0]}"
    ifaces = (f"{net.lab.prefix}{label}a", f"{net.lab.prefix}{label}b")
    with running_pair(net, label, a, b, workdir, interfaces=ifaces) as pair:
        assert pair.result.seconds is not None, f"no ping at all: {pair.result.stderr}"
        took = direct_since_start(pair, DIRECT_WITHIN_S)
        assert took is not None, f"not direct: {pair.events}"
        print(f"{order}: both sides direct {took:.2f} s after both up started")
        public = {pair.names[0]: b.nat.public_ip, pair.names[1]: a.nat.public_ip}
        for iface, name in zip(ifaces, pair.names, strict=True):
            status = _status(iface)
            peers = status["peers"]
            assert isinstance(peers, list)
            (peer,) = peers
            assert peer["path"] == "direct", peer
            assert str(peer["endpoint"]).startswith(public[name] + ":"), peer
        assert pair.ping(count=5) >= 4
        # The hard side kept one birthday socket and closed the other 255 at the hit: it holds
        # at most two descriptors more than the easy side, which never opens extra sockets.
        easy, hard = (pair.names[0], pair.names[1]) if first == "port" else pair.names[::-1]
        fds = {name: _fds(pair.procs[name].pid) for name in pair.names}
        print(f"{order}: open descriptors {fds} (hard side {hard})")
        assert fds[hard] <= fds[easy] + 2, fds
        assert fds[easy] < 64, fds
    for name in pair.names:
        assert pair.result.returncodes[name] == 0, pair.result.stderr[name]


# -- port mapping against a real miniupnpd -------------------------------------------------------

MINIUPNPD_CONF = """\
ext_ifname=wan0
listening_ip=lan0
enable_natpmp=yes
enable_upnp=yes
ext_perform_stun=yes
ext_stun_host={stun}
ext_stun_port=3478
min_lifetime=2
max_lifetime=86400
secure_mode=yes
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
allow 1024-65535 {lan} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
uuid=3e2b6ed2-8c89-4a2e-9a4b-6d27c2ff0001
"""
# miniupnpd adds its rules to these chains; the gateway's own NAT (the lab's ``port`` table)
# keeps translating everything else. The lab's documentation addresses count as "reserved" for
# miniupnpd, so it asks STUN (the hub) whether the outside is really reachable: the NAT must let
# those answers, and the LAN's requests to 5351, in.
MINIUPNPD_NFT = """\
table inet miniupnpd {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -101; policy accept; jump prerouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting { type nat hook postrouting priority 99; policy accept; jump postrouting_miniupnpd; }
  chain postrouting_miniupnpd { }
}
"""

CLIENT = """\
import json, signal, socket, sys, trio
from functools import partial
from punchtrio.punch import (
    PortMapper, PortMapSession, PortMapSettings, UpnpMapping, address_towards, discover_igd,
    keep_port_mapped,
)

protocol, lifetime, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gateway = sys.argv[4]

async def main():
    echo = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await echo.bind(("0.0.0.0", port))
    def report(event):
        print(json.dumps({"event": type(event).__name__, **vars(event)}), flush=True)
    async def serve_echo():
        while True:
            data, source = await echo.recvfrom(2048)
            await echo.sendto(data, source)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_echo)
        if protocol == "upnp":
            service = await discover_igd()
            print(json.dumps({"event": "found", "control_url": service.control_url}), flush=True)
            mapping = UpnpMapping(service, address_towards(gateway), port, lease=lifetime,
                                  on_event=report)
            nursery.start_soon(mapping.run)
        elif protocol == "auto":  # PCP/NAT-PMP first, UPnP when they fail
            settings = PortMapSettings(lifetime=lifetime)
            mapper = PortMapper(gateway, address_towards(gateway), port, settings=settings)
            nursery.start_soon(partial(keep_port_mapped, mapper, on_event=report))
        else:
            settings = PortMapSettings(lifetime=lifetime, pcp=protocol == "pcp")
            mapper = PortMapper(gateway, address_towards(gateway), port, settings=settings)
            nursery.start_soon(PortMapSession(mapper, on_event=report).run)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
    print(json.dumps({"event": "stopped"}), flush=True)

trio.run(main)
"""

ECHO_CHECK = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(3):
    s.sendto(b"through the mapping", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(100)[0].decode()); break
    except socket.timeout:
        pass
"""


def _start_miniupnpd(net: Network, nat: Nat, workdir: Path) -> None:
    """Run a real miniupnpd as ``nat``'s gateway (PCP, NAT-PMP and UPnP IGD on its LAN side)
    until the lab closes; wait until it listens on 5351."""
    nat.ns.run("nft", "-f", "-", input=MINIUPNPD_NFT)
    for rule in (
        ("iifname", "lan0", "udp", "dport", "{ 1900, 5351 }", "accept"),
        ("iifname", "wan0", "udp", "sport", "{ 3478, 3479 }", "accept"),
    ):
        nat.ns.run("nft", "insert", "rule", "ip", "ptnat", "input", *rule)
    conf = workdir / f"miniupnpd-{nat.name}.conf"
    conf.write_text(MINIUPNPD_CONF.format(stun=net.hub.primary_ip, lan=nat.lan_net))
    log_path = workdir / f"miniupnpd-{nat.name}.log"
    with log_path.open("wb") as log:
        pidfile = workdir / f"miniupnpd-{nat.name}.pid"  # one per instance: two labs may run one
        proc = net.lab.spawn(
            nat.ns, "miniupnpd", "-d", "-f", str(conf), "-P", str(pidfile),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while f"{nat.lan_ip}:5351" not in nat.ns.run("ss", "-H", "-uln"):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "miniupnpd did not listen on 5351"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway_lab() -> Iterator[tuple[Network, Nat, Host]]:
    require_root_and(*BINARIES, "miniupnpd")
    with tempfile.TemporaryDirectory(prefix="pt-upnpd-") as tmp, build(["port"]) as net:
        nat = net.requested[0]
        start_hub(net, Path(tmp) / "hub.log", relay=False)
        _start_miniupnpd(net, nat, Path(tmp))
        yield net, nat, nat.hosts[0]


def _echo_through(net: Network, ip: str, port: int) -> bool:
    argv = net.hub.ns.exec(sys.executable, "-c", ECHO_CHECK, ip, str(port))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    return out.stdout.strip() == "through the mapping"


def _wait_event(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while not line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert line, "the port-mapping client printed nothing"
    event: dict[str, object] = json.loads(line)
    return event


@pytest.mark.parametrize(
    ("protocol", "internal"), [("pcp", 45001), ("natpmp", 45002), ("upnp", 45003)]
)
def test_a_mapping_on_miniupnpd_lets_the_internet_in_is_refreshed_and_deleted(
    gateway_lab: tuple[Network, Nat, Host], protocol: str, internal: int
) -> None:
    require_root_and(*BINARIES, "miniupnpd")
    net, nat, host = gateway_lab
    lifetime = 4
    argv = host.ns.exec(
        sys.executable, "-c", CLIENT, protocol, str(lifetime), str(internal), nat.lan_ip
    )
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        obtained = _wait_event(proc, 20)
        if protocol == "upnp":  # found by SSDP on the LAN, its control URL on the gateway
            assert obtained["event"] == "found", obtained
            assert str(obtained["control_url"]).startswith(f"http://{nat.lan_ip}:"), obtained
            obtained = _wait_event(proc, 20)
        assert obtained["event"] == "MappingObtained", obtained
        assert obtained["protocol"] == protocol
        external = obtained["external"]
        assert isinstance(external, list)
        ip, port = str(external[0]), int(external[1])
        assert ip == nat.public_ip
        assert _echo_through(net, ip, port)
        rules = nat.ns.run("nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd")
        assert f"dnat ip to {host.ip}:{internal}" in rules
        # Three lifetimes later the mapping still works: it was refreshed (miniupnpd removes
        # a mapping whose lifetime ran out).
        time.sleep(3 * lifetime)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert _echo_through(net, ip, port)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == json.dumps({"event": "stopped"}), out
    # Deleted on teardown, not left to expire: the rule is gone at once, nothing gets in.
    rules = nat.ns.run("nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd")
    assert f"{host.ip}:{internal}" not in rules, rules
    assert not _echo_through(net, ip, port)


def test_without_pcp_and_nat_pmp_the_mapping_falls_back_to_upnp(
    gateway_lab: tuple[Network, Nat, Host],
) -> None:
    """The gateway's port 5351 dropped (a router with only UPnP): keep_port_mapped gives up on
    PCP/NAT-PMP, finds the IGD by SSDP and maps the port there; deleted on teardown."""
    require_root_and(*BINARIES, "miniupnpd")
    net, nat, host = gateway_lab
    internal = 45004
    block = (
        "table ip ptblock {\n chain out {\n  type filter hook output priority 0;\n"
        "  udp dport 5351 drop\n }\n}\n"
    )
    host.ns.run("nft", "-f", "-", input=block)
    argv = host.ns.exec(sys.executable, "-c", CLIENT, "auto", "4", str(internal), nat.lan_ip)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = [_wait_event(proc, 30)]
        while seen[-1]["event"] != "MappingObtained":
            seen.append(_wait_event(proc, 30))
        assert [e["event"] for e in seen[:-1]] == ["MappingFailed"] * (len(seen) - 1), seen
        assert seen[-1]["protocol"] == "upnp", seen
        ip, port = str(seen[-1]["external"][0]), int(seen[-1]["external"][1])  # type: ignore[index]
        assert _echo_through(net, ip, port)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
        host.ns.run("nft", "delete", "table", "ip", "ptblock", check=False)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == json.dumps({"event": "stopped"}), out
    rules = nat.ns.run("nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd")
    assert f"{host.ip}:{internal}" not in rules, rules


def test_up_port_mapping_gives_two_symmetric_nats_a_direct_path() -> None:
    """Two ``masquerade fully-random`` NATs and no relay: no punch, not even birthday probing,
    joins them. With ``up --port-mapping`` and a miniupnpd on a's gateway, a publishes its
    mapped endpoint, b reaches it, and both sides report the direct path (b at a's mapping)."""
    require_root_and(*BINARIES, "miniupnpd")
    with tempfile.TemporaryDirectory(prefix="pt-upnpd-") as tmp, build(["sym", "sym"]) as net:
        work = Path(tmp)
        mapped, other = net.requested
        start_hub(net, work / "hub.log", relay=False)
        # A real router owns its public address: its own traffic (miniupnpd's STUN check, which
        # turns port forwarding off when the port it sent from changes) is not remapped.
        rule = ("ip", "saddr", mapped.public_ip, "accept")
        mapped.ns.run("nft", "insert", "rule", "ip", "ptnat", "postrouting", *rule)
        _start_miniupnpd(net, mapped, work)
        a, b = mapped.hosts[0], other.hosts[0]
        ifaces = (f"{net.lab.prefix}pma", f"{net.lab.prefix}pmb")
        extra = ("--port-mapping",)
        with running_pair(net, "pm", a, b, work, interfaces=ifaces, extra=extra) as pair:
            assert pair.result.seconds is not None, f"no ping: {pair.result.stderr}"
            rules = mapped.ns.run(
                "nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"
            )
            assert f"dnat ip to {a.ip}:51820" in rules, rules
            b_status = _status(ifaces[1])["peers"]
            assert isinstance(b_status, list)
            (peer,) = b_status
            assert peer["path"] == "direct", peer
            assert str(peer["endpoint"]).startswith(mapped.public_ip + ":"), peer
            a_status = _status(ifaces[0])["peers"]
            assert isinstance(a_status, list)
            assert a_status[0]["path"] == "direct", a_status
            assert pair.ping(count=3) >= 2
        for name in pair.names:
            assert pair.result.returncodes[name] == 0, pair.result.stderr[name]
        # Deleted when a's up stopped.
        rules = mapped.ns.run("nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd")
        assert f"{a.ip}:51820" not in rules, rules
