"""``punchtrio demo``: the whole story (NATs, hub, punch, WireGuard, traffic) on an embedded default.

As root, a real NAT lab in network namespaces (:mod:`punchtrio.cli._demo_lab`): a hub with STUN,
two hosts behind a port-restricted and a full-cone kernel NAT, two ``punchtrio up`` processes,
ping and a TCP transfer through the tunnel. Without root (or with ``--netsim``), the same story in
:mod:`punchtrio.netsim`: two connectors with in-memory interfaces, in virtual time. Either way a
short report follows and everything is torn down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .. import PunchtrioError
from ..connect import Connector, MemoryInterface, PeerConnected, PeerFailed
from ..keys import PrivateKey
from ..rendezvous import MemoryHub
from ..stun import discover_nat
from ._main import UsageError

# Imported where used: every command builds this parser, and the simulator pulls trio.testing.
if TYPE_CHECKING:
    from rich.console import Console

    from ..netsim import Host

PRIMARY = ("203.0.113.1", 3478)
ALTERNATE = ("203.0.113.2", 3479)
TUNNEL = {"alice": "10.99.0.1", "bob": "10.99.0.2"}
NETSIM_PACKETS = 400
NETSIM_PACKET_SIZE = 1400
NETSIM_WINDOW = 40
"""Packets in flight at once in the netsim transfer. Under the virtual clock the tunnel writes
every batch to its interface itself (no writer thread, which the clock could not see), so any
window arrives within virtual time."""
_NETSIM_DROPS = ("lost", "buffer-full", "no-route", "no-listener", "no-mapping", "ttl-exceeded")
_WALL = 1.7e9

NAT_NAMES = {
    ("endpoint-independent", "endpoint-independent"): "full cone",
    ("endpoint-independent", "address-dependent"): "restricted cone",
    ("endpoint-independent", "address-and-port-dependent"): "port-restricted cone",
    ("address-and-port-dependent", "address-and-port-dependent"): "symmetric",
}


_SHORT = {
    "endpoint-independent": "EI",
    "address-dependent": "AD",
    "address-and-port-dependent": "APD",
}


class DemoError(PunchtrioError):
    """The demo could not finish: ``str(error)`` names the step that failed. Exits with status 1."""

    exit_code = 1


@dataclass
class PeerReport:
    """One side of the demo: its NAT as detected (``mapping``, ``filtering``, a common ``kind``
    name) and the ``path``, ``endpoint`` and ``elapsed_ms`` its ``peer_connected`` reported."""

    name: str
    mapping: str = "unknown"
    filtering: str = "unknown"
    kind: str = "unknown"
    path: str | None = None
    endpoint: str | None = None
    elapsed_ms: float | None = None


@dataclass
class RelayAct:
    """The demo's second act: ``dave`` and ``erin``, with no direct path between them at first
    (in the lab a firewall drops the UDP between their NATs; in netsim dave's NAT filters what
    erin's mapping sends), connect through the hub's relay (``paths``, ``relay``,
    ``time_to_tunnel_s`` from starting both); then the way opens and they move to a direct path
    by themselves, ``upgrade_s`` after it opened (``upgraded_to``)."""

    paths: dict[str, str | None] = field(default_factory=dict)
    relay: dict[str, str | None] = field(default_factory=dict)
    time_to_tunnel_s: float | None = None
    upgraded_to: dict[str, str | None] = field(default_factory=dict)
    upgrade_s: float | None = None


@dataclass
class DemoReport:
    """What the demo measured.

    ``mode`` is ``"lab"`` (real kernel NATs, wall-clock seconds) or ``"netsim"`` (virtual
    seconds); ``time_to_tunnel_s`` from starting both peers to the first packet through the
    tunnel; ``ping_rtt_ms``; ``transfer_bytes`` moved through the tunnel in ``transfer_s``
    (``throughput_mbit_s``; in netsim the wall-clock rate of the simulated tunnel);
    ``relay_act`` the second act (:class:`RelayAct`).
    """

    mode: str
    peers: list[PeerReport] = field(default_factory=list)
    time_to_tunnel_s: float | None = None
    ping_rtt_ms: float | None = None
    transfer_bytes: int = 0
    transfer_s: float | None = None
    throughput_mbit_s: float | None = None
    relay_act: RelayAct = field(default_factory=RelayAct)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def register(subparsers: Any) -> None:
    """Add ``demo`` to the ``punchtrio`` parser."""
    demo = subparsers.add_parser(
        "demo",
        help="connect two peers behind NATs and show it (a NAT lab as root, else a simulation)",
        description=(
            "Run the whole story on an embedded default: a hub with STUN, two peers behind "
            "different NATs, hole punching, a WireGuard tunnel, ping and a transfer through it, "
            "and a short report; everything is torn down after. As root it builds a real NAT lab "
            "in network namespaces; otherwise (or with --netsim) it runs in punchtrio.netsim."
        ),
    )
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument("--netsim", action="store_true", help="simulate even as root")
    mode.add_argument("--lab", action="store_true", help="require the real NAT lab (root)")
    demo.add_argument("--json", action="store_true", help="print the report as one JSON object")
    demo.set_defaults(run=_demo)


def lab_available() -> bool:
    """Whether the real NAT lab can run here: root, and on PATH what
    :func:`punchtrio.natlab.build` needs (``ip``, ``nft``, ``conntrack``, ``sysctl``) plus
    ``ping`` and ``ss``."""
    from ..natlab import REQUIRED_BINARIES

    needed = (*REQUIRED_BINARIES, "ping", "ss")
    return os.geteuid() == 0 and all(shutil.which(b) for b in needed)


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, highlight=False, width=110)
    use_lab = args.lab or (not args.netsim and lab_available())
    if args.lab and not lab_available():
        raise UsageError("--lab needs root and ip, nft, conntrack, sysctl, ping and ss on PATH")
    if use_lab:
        from ._demo_lab import run_lab_demo

        console.print("[bold]punchtrio demo[/]: a real NAT lab in network namespaces")
        report = run_lab_demo(lambda text: console.print(f"  {text}", markup=False))
    else:
        console.print("[bold]punchtrio demo[/]: simulated in punchtrio.netsim (no root needed)")
        report = run_netsim_demo(lambda text: console.print(f"  {text}", markup=False))
    if args.json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        out = Console(highlight=False)
        if not out.is_terminal:
            out = Console(highlight=False, width=110)
        render(report, out)
    return 0


def render(report: DemoReport, console: Console) -> None:
    """Print ``report`` as a short table and summary on ``console``."""
    from rich.table import Table

    unit = "s" if report.mode == "lab" else "s (virtual)"
    table = Table(title=f"punchtrio demo ({report.mode})")
    for column in ("peer", "NAT detected", "mapping/filtering", "path", "endpoint", "connected"):
        table.add_column(column)
    for peer in report.peers:
        after = "-" if peer.elapsed_ms is None else f"{peer.elapsed_ms:.0f} ms"
        table.add_row(
            peer.name,
            peer.kind,
            f"{_SHORT.get(peer.mapping, peer.mapping)}/{_SHORT.get(peer.filtering, peer.filtering)}",
            peer.path or "-",
            peer.endpoint or "-",
            after,
        )
    console.print(table)
    if report.time_to_tunnel_s is not None:
        console.print(f"time to tunnel: {report.time_to_tunnel_s:.2f} {unit}")
    if report.ping_rtt_ms is not None:
        console.print(f"ping through the tunnel: {report.ping_rtt_ms:.1f} ms round trip")
    if report.transfer_s is not None and report.throughput_mbit_s is not None:
        console.print(
            f"transfer: {report.transfer_bytes / 1e6:.1f} MB in {report.transfer_s:.2f} s "
            f"= {report.throughput_mbit_s:.0f} Mbit/s"
        )
    act = report.relay_act
    if act.time_to_tunnel_s is not None:
        relays = ", ".join(f"{name} via {relay}" for name, relay in act.relay.items())
        console.print(
            f"relayed: dave and erin (no direct path between them yet) through the hub's relay "
            f"({relays}) after {act.time_to_tunnel_s:.2f} {unit}"
        )
    if act.upgrade_s is not None:
        console.print(
            f"upgraded: the way opened and both moved to a direct path by themselves "
            f"{act.upgrade_s:.2f} {unit} later"
        )
    for note in report.notes:
        console.print(note)


def nat_kind(mapping: str, filtering: str) -> str:
    """The classic name of a NAT with this RFC 4787 (mapping, filtering), else ``"other"``."""
    return NAT_NAMES.get((mapping, filtering), "other")


# -- the simulated story ----------------------------------------------------------------------


def run_netsim_demo(say: Any = print, *, seed: int = 7) -> DemoReport:
    """Run the netsim story under a virtual clock and return its report (no root needed).

    ``say(text)`` receives progress lines. Raises :class:`DemoError` if the peers do not connect.
    """
    import trio.testing

    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(netsim_story, say, seed, clock=clock)


def _wall_clock() -> float:
    return _WALL + trio.current_time()


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A minimal IPv4 packet carrying ``payload`` as UDP-numbered data (WireGuard reads only the
    version, length and addresses)."""
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0,
        0,
        64,
        17,
        0,
        bytes(int(p) for p in src.split(".")),
        bytes(int(p) for p in dst.split(".")),
    )
    return header + payload


async def netsim_story(say: Any, seed: int = 7) -> DemoReport:
    """The simulated story (call inside ``trio.run`` with a ``MockClock``): see :func:`run_netsim_demo`."""
    from ..netsim import Internet, Link, NatBehavior, serve_stun

    nats = {"alice": NatBehavior.port_restricted_cone(), "bob": NatBehavior.full_cone()}
    report = DemoReport("netsim")
    net = Internet(seed=seed)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="hub", link=Link(latency=0.005))
    hosts: dict[str, Host] = {}
    for number, (name, behavior) in enumerate(nats.items()):
        nat = net.add_nat(
            f"198.51.100.{number + 1}",
            behavior=behavior,
            link=Link(latency=0.02),
            name=f"nat-{name}",
        )
        hosts[name] = nat.lan.add_host(name=name)
    hub = MemoryHub()
    act = _NetsimAct(net, server, hub)
    keys = {name: PrivateKey.generate() for name in hosts}
    ifaces = {name: MemoryInterface(name) for name in hosts}
    try:
        async with net, trio.open_nursery() as nursery:
            await nursery.start(serve_stun, server, PRIMARY, ALTERNATE)
            say(
                f"hub with STUN on {PRIMARY[0]}:{PRIMARY[1]} (alternate {ALTERNATE[0]}:{ALTERNATE[1]})"
            )
            for name, host in hosts.items():
                with host.activate():
                    found = await discover_nat(PRIMARY, probe_timeout=1.0)
                mapping, filtering = found.mapping, found.filtering
                kind = nat_kind(mapping, filtering)
                report.peers.append(PeerReport(name, mapping, filtering, kind))
                say(f"{name} is behind a {kind} NAT ({mapping} mapping, {filtering} filtering)")
            start = trio.current_time()
            connectors = {}
            for name, host in hosts.items():
                other = "bob" if name == "alice" else "alice"
                connectors[name] = Connector(
                    name,
                    keys[name],
                    hub.peer(name, keys[name].public_key()),
                    f"{TUNNEL[name]}/24",
                    peers=[other],
                    interface=ifaces[name],
                    stun_servers=[PRIMARY],
                    wall_clock=_wall_clock,
                    wait_timeout=30.0,
                )
                with host.activate():
                    await nursery.start(connectors[name].run)
            say("alice and bob started: STUN, register, punch, WireGuard handshake")
            connected: dict[str, PeerConnected] = {}
            async with trio.open_nursery() as waiting:
                for name, connector in connectors.items():
                    waiting.start_soon(_wait_connected, name, connector, connected, say)
            for peer in report.peers:
                event = connected[peer.name]
                peer.path, peer.endpoint, peer.elapsed_ms = (
                    event.path,
                    event.endpoint,
                    round(event.elapsed_ms, 1),
                )
            alice, bob = ifaces["alice"], ifaces["bob"]
            ping = ipv4_packet(TUNNEL["alice"], TUNNEL["bob"], b"ping through the tunnel")
            sent = trio.current_time()
            await alice.send(ping)
            with trio.fail_after(10):
                if await bob.receive() != ping:
                    raise DemoError("ping: bob received a different packet")
                await bob.send(ipv4_packet(TUNNEL["bob"], TUNNEL["alice"], b"pong"))
                await alice.receive()
            report.time_to_tunnel_s = round(trio.current_time() - start, 3)
            report.ping_rtt_ms = round((trio.current_time() - sent) * 1000, 1)
            say(f"ping alice -> bob through the tunnel: {report.ping_rtt_ms} ms (virtual)")
            tunnel = connectors["bob"].tunnel
            assert tunnel is not None
            await _transfer(report, alice, bob, lambda: _losses(net, tunnel.counters))
            say(f"moved {report.transfer_bytes} bytes through the simulated tunnel")
            await _netsim_relay_act(report.relay_act, say, act, hub, nursery)
            nursery.cancel_scope.cancel()
    finally:
        for iface in ifaces.values():
            iface.close()
    report.notes.append(
        "netsim: times are virtual (links of 20 ms one way); the throughput is how fast this "
        "machine runs the simulated tunnel. Run as root for a real NAT lab."
    )
    say("everything torn down")
    return report


class _NetsimAct:
    """The second act's world, built with the first (a simulation's topology is fixed once it
    runs): dave and erin behind NATs that both map per address (so birthday punching is out of
    reach too), dave's filtering by port, so no punch can join them until dave's NAT stops
    filtering; the hub's relay on the hub host."""

    def __init__(self, net: Any, server: Host, hub: MemoryHub) -> None:
        from ..netsim import Filtering, Link, Mapping, NatBehavior

        kinds = {
            "dave": NatBehavior(Mapping.ADDRESS_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT),
            "erin": NatBehavior(Mapping.ADDRESS_DEPENDENT, Filtering.ADDRESS_DEPENDENT),
        }
        self.nats = {
            name: net.add_nat(
                f"198.51.100.{number + 3}",
                behavior=kind,
                link=Link(latency=0.02),
                name=f"nat-{name}",
            )
            for number, (name, kind) in enumerate(kinds.items())
        }
        self.hosts = {name: nat.lan.add_host(name=name) for name, nat in self.nats.items()}
        self.server = server
        self.hub = hub
        self.hub_key = PrivateKey.generate()


async def _netsim_relay_act(
    act: RelayAct, say: Any, world: _NetsimAct, hub: MemoryHub, nursery: trio.Nursery
) -> None:
    import dataclasses
    import ipaddress

    from ..connect import HubRelay, PathChanged
    from ..netsim import Filtering
    from ..relay import HubRelayServer, HubRelayService
    from ..rendezvous import HubRelayAddress

    def registered(key: bytes, network: str, wall: float) -> bool:
        return network == "" and any(r.public_key.raw == key for r in hub.records())

    relay_at = (PRIMARY[0], 7778)
    service = HubRelayService(
        HubRelayServer(world.hub_key, registered=registered, wall_clock=_wall_clock), relay_at
    )
    with world.server.activate():
        await nursery.start(service.serve)
    address = HubRelayAddress(ipaddress.ip_address(relay_at[0]), relay_at[1])
    relay = HubRelay(address, world.hub_key.public_key())
    say(
        f"act 2: the hub's relay on {relay_at[0]}:{relay_at[1]}; dave and erin cannot punch through"
    )
    tunnel = {"dave": "10.98.0.1", "erin": "10.98.0.2"}
    ifaces = {name: MemoryInterface(name) for name in world.hosts}
    connectors: dict[str, Connector] = {}
    try:
        start = trio.current_time()
        for name, host in world.hosts.items():
            key = PrivateKey.generate()
            connectors[name] = Connector(
                name,
                key,
                hub.peer(name, key.public_key()),
                f"{tunnel[name]}/24",
                peers=["erin" if name == "dave" else "dave"],
                interface=ifaces[name],
                stun_servers=[PRIMARY],
                wall_clock=_wall_clock,
                wait_timeout=30.0,
                hub_relay=relay,
            )
            with host.activate():
                await nursery.start(connectors[name].run)
        connected: dict[str, PeerConnected] = {}
        async with trio.open_nursery() as waiting:
            for name, connector in connectors.items():
                waiting.start_soon(_wait_connected, name, connector, connected, say)
        ping = ipv4_packet(tunnel["dave"], tunnel["erin"], b"relayed ping")
        await ifaces["dave"].send(ping)
        with trio.fail_after(10):
            await ifaces["erin"].receive()
        act.time_to_tunnel_s = round(trio.current_time() - start, 3)
        act.paths = {name: event.path for name, event in connected.items()}
        act.relay = {name: event.relay for name, event in connected.items()}
        await trio.sleep(5)
        nat = world.nats["dave"]
        nat.behavior = nat.table.behavior = dataclasses.replace(
            nat.behavior, filtering=Filtering.ENDPOINT_INDEPENDENT
        )
        opened = trio.current_time()
        say("act 2: dave's NAT stops filtering (a firewall rule lifted); nobody restarts")
        changed: dict[str, PathChanged] = {}

        async def upgrade(name: str) -> None:
            async for event in connectors[name].events:
                if isinstance(event, PathChanged) and event.new == "direct":
                    changed[name] = event
                    return

        with trio.move_on_after(60):
            async with trio.open_nursery() as waiting:
                for name in connectors:
                    waiting.start_soon(upgrade, name)
        if len(changed) == len(connectors):
            act.upgrade_s = round(trio.current_time() - opened, 3)
            act.upgraded_to = {name: event.new for name, event in changed.items()}
            say(f"act 2: relay -> direct on both sides {act.upgrade_s:.2f} s (virtual) later")
        else:
            raise DemoError("act 2: the relayed pair did not move to the direct path within 60 s")
    finally:
        for iface in ifaces.values():
            iface.close()


async def _wait_connected(
    name: str, connector: Connector, connected: dict[str, PeerConnected], say: Any
) -> None:
    with trio.fail_after(60):
        async for event in connector.events:
            if isinstance(event, PeerFailed):
                raise DemoError(f"{name}: {event.stage}: {event.reason}")
            if isinstance(event, PeerConnected):
                connected[name] = event
                say(
                    f"{name}: connected to {event.peer} ({event.path}, {event.endpoint}) after {event.elapsed_ms:.0f} ms"
                )
                return
    raise DemoError(f"{name}: the connector stopped before connecting")


def _losses(net: Any, tunnel_counters: Any) -> dict[str, int]:
    """Where packets can be lost on the way to bob: netsim's drop verdicts and the tunnel's
    interface write errors (cumulative counts, compared before and after the transfer)."""
    counts = {v.value: n for v, n in net.counters.items() if v.value in _NETSIM_DROPS}
    counts["interface-write-errors"] = tunnel_counters.tun_write_errors
    return counts


async def _transfer(
    report: DemoReport,
    alice: MemoryInterface,
    bob: MemoryInterface,
    losses: Callable[[], dict[str, int]],
) -> None:
    payload = bytes(NETSIM_PACKET_SIZE - 20)
    packet = ipv4_packet(TUNNEL["alice"], TUNNEL["bob"], payload)
    before = losses()
    wall = time.perf_counter()
    received = 0
    for _ in range(NETSIM_PACKETS // NETSIM_WINDOW):
        for _ in range(NETSIM_WINDOW):
            await alice.send(packet)
        for _ in range(NETSIM_WINDOW):
            with trio.move_on_after(2):  # a lost packet is counted, not waited for
                received += len(await bob.receive())
    seconds = time.perf_counter() - wall
    report.transfer_bytes = received
    report.transfer_s = round(seconds, 3)
    report.throughput_mbit_s = round(received * 8 / seconds / 1e6, 1)
    lost = NETSIM_PACKETS - received // len(packet)
    if lost:
        after = losses()
        causes = ", ".join(f"{n - before.get(k, 0)} {k}" for k, n in after.items())
        report.notes.append(
            f"{lost} of {NETSIM_PACKETS} packets did not arrive within 2 virtual seconds "
            f"(on the way: {causes or 'no counted drops'})"
        )
