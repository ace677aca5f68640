"""Two punchers through simulated NATs: STUN and probes share one socket through the mux."""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass

import pytest
import trio
from nacl.bindings import crypto_scalarmult_base

from punchtrio import netsim
from punchtrio.mux import Datagram, Kind, Mux, MuxedDevice, serve_mux
from punchtrio.netsim import NatBehavior
from punchtrio.punch import (
    PING,
    Candidate,
    PathChosen,
    Puncher,
    PunchEvent,
    PunchFailed,
    PunchSession,
    ReflexiveResult,
    build_probe,
    derive_probe_key,
    gather_reflexive,
    host_candidates,
    key_id,
)
from punchtrio.tunnel import UserspaceTunnel
from punchtrio.wireguard import Device, PeerConfig
from tests.packets import ipv4

PRIMARY = ("203.0.113.10", 3478)
ALTERNATE = ("203.0.113.11", 3479)
ATTACKER = "203.0.113.66"
PORT = 51820
WALL = 1.7e9
KEYS = {
    "alice": bytes(range(1, 33)),
    "bob": bytes(range(101, 133)),
    "mallory": bytes(range(50, 82)),
}
PUBS = {name: crypto_scalarmult_base(key) for name, key in KEYS.items()}
WAN = netsim.Link(latency=0.02, jitter=0.005)


@dataclass
class Peer:
    name: str
    session: PunchSession
    candidates: list[Candidate]
    reflexive: ReflexiveResult
    events: trio.MemoryReceiveChannel[PunchEvent]

    async def next_event(self) -> PunchEvent:
        with trio.fail_after(60):
            return await self.events.receive()


async def bring_up(nursery: trio.Nursery, host: netsim.Host, name: str) -> Peer:
    """One peer's side: shared socket, mux, STUN through the mux, candidates, punch session."""
    sock = host.udp_socket()
    await sock.bind(("", PORT))
    mux = Mux()
    stun = mux.open_queue(Kind.STUN)
    probes = mux.open_queue(Kind.PROBE)
    await nursery.start(serve_mux, sock, mux)
    reflexive = await gather_reflexive(sock, stun, [PRIMARY], rc=3)
    with host.activate():
        candidates = host_candidates(PORT) + list(reflexive.candidates)
    send, receive = trio.open_memory_channel[PunchEvent](math.inf)
    puncher = Puncher(KEYS[name], families=(4,), wall_clock=lambda: WALL + trio.current_time())
    session = PunchSession(puncher, sock, probes, on_event=send.send_nowait)
    await nursery.start(session.run)
    return Peer(name, session, candidates, reflexive, receive)


async def punch(alice: Peer, bob: Peer) -> None:
    """Exchange candidates (the rendezvous' job) and start both at the same "punch now" time."""
    alice.session.puncher.add_peer(PUBS["bob"])
    bob.session.puncher.add_peer(PUBS["alice"])
    go = trio.current_time() + 0.1
    alice.session.start(PUBS["bob"], bob.candidates, go)
    bob.session.start(PUBS["alice"], alice.candidates, go)


async def test_peers_behind_endpoint_independent_nats_find_the_direct_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet(seed=5)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    cone = NatBehavior.port_restricted_cone()
    nat_a = net.add_nat("198.51.100.1", behavior=cone, link=WAN, name="nat-a")
    nat_b = net.add_nat("192.0.2.1", behavior=cone, link=WAN, name="nat-b")
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        alice = await bring_up(nursery, nat_a.lan.add_host(name="alice"), "alice")
        bob = await bring_up(nursery, nat_b.lan.add_host(name="bob"), "bob")
        assert alice.reflexive.mapping_varies is False
        assert [c.endpoint for c in alice.reflexive.candidates] == [("198.51.100.1", PORT)]
        await punch(alice, bob)
        got_a, got_b = await alice.next_event(), await bob.next_event()
        nursery.cancel_scope.cancel()
    assert isinstance(got_a, PathChosen)
    assert isinstance(got_b, PathChosen)
    assert (got_a.peer, got_a.endpoint, got_a.kind) == (PUBS["bob"], ("192.0.2.1", PORT), "direct")
    assert (got_b.endpoint, got_b.kind) == (("198.51.100.1", PORT), "direct")
    # Both LANs use 10.0.0.2: each peer's probes to the other's host candidate came back to itself.
    assert alice.session.puncher.counters["self"] > 0


async def test_peers_behind_the_same_nat_find_the_lan_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet(seed=6)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    nat = net.add_nat("198.51.100.1", behavior=NatBehavior.port_restricted_cone(), link=WAN)
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        alice = await bring_up(nursery, nat.lan.add_host(name="alice"), "alice")
        bob = await bring_up(nursery, nat.lan.add_host(name="bob"), "bob")
        await punch(alice, bob)
        got_a, got_b = await alice.next_event(), await bob.next_event()
        nursery.cancel_scope.cancel()
    assert isinstance(got_a, PathChosen)
    assert isinstance(got_b, PathChosen)
    assert (got_a.endpoint, got_a.kind) == (("10.0.0.3", PORT), "lan")
    assert (got_b.endpoint, got_b.kind) == (("10.0.0.2", PORT), "lan")


async def test_a_lan_address_first_learnt_from_a_ping_is_still_the_lan_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bob learns Alice's LAN address from her ping (a peer-reflexive pair) and chooses it before
    her candidates reach him: once they do, it is one of her host candidates on his LAN, so lan."""
    net = netsim.Internet(seed=16)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    nat = net.add_nat("198.51.100.1", behavior=NatBehavior.port_restricted_cone(), link=WAN)
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        alice = await bring_up(nursery, nat.lan.add_host(name="alice"), "alice")
        bob = await bring_up(nursery, nat.lan.add_host(name="bob"), "bob")
        alice.session.puncher.add_peer(PUBS["bob"])
        bob.session.puncher.add_peer(PUBS["alice"])
        lan = [nat.lan.prefix]
        alice.session.start(PUBS["bob"], bob.candidates, trio.current_time(), local_networks=lan)
        early = await bob.next_event()  # from Alice's triggered ping alone
        assert bob.session.puncher.counters == dict.fromkeys(bob.session.puncher.counters, 0)
        await trio.sleep(1)  # her record arrives late (a slow rendezvous)
        bob.session.start(PUBS["alice"], alice.candidates, trio.current_time(), local_networks=lan)
        late = await bob.next_event()
        got_a = await alice.next_event()
        # A host candidate outside our networks (another LAN, or the public internet) is direct.
        bob.session.start(PUBS["alice"], alice.candidates, trio.current_time(), local_networks=[])
        off_lan = await bob.next_event()
        nursery.cancel_scope.cancel()
    assert isinstance(early, PathChosen)
    assert (early.endpoint, early.kind) == (("10.0.0.2", PORT), "direct")  # nothing known yet
    assert isinstance(late, PathChosen)
    assert (late.endpoint, late.kind) == (("10.0.0.2", PORT), "lan")
    assert isinstance(got_a, PathChosen)
    assert (got_a.endpoint, got_a.kind) == (("10.0.0.3", PORT), "lan")
    assert isinstance(off_lan, PathChosen)
    assert (off_lan.endpoint, off_lan.kind) == (("10.0.0.2", PORT), "direct")


async def test_spoofed_probes_from_a_third_host_do_not_change_the_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet(seed=7)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    attacker = net.add_host(ATTACKER, name="mallory")
    # Alice's NAT lets anyone in, so every spoofed probe reaches her puncher.
    nat_a = net.add_nat("198.51.100.1", behavior=NatBehavior.full_cone(), link=WAN)
    nat_b = net.add_nat("192.0.2.1", behavior=NatBehavior.port_restricted_cone(), link=WAN)

    async def spoof(target: tuple[str, int]) -> None:
        sock = attacker.udp_socket()
        await sock.bind(("", 666))
        forged_key = derive_probe_key(KEYS["mallory"], PUBS["alice"])
        for i in range(200):
            wall = WALL + trio.current_time()
            txid = i.to_bytes(12, "big")
            # Claiming to be Bob without Bob's key, and as itself (a peer Alice does not know).
            await sock.sendto(
                build_probe(PING, txid, key_id(PUBS["bob"]), wall, forged_key), target
            )
            await sock.sendto(
                build_probe(PING, txid, key_id(PUBS["mallory"]), wall, forged_key), target
            )
            await trio.sleep(0.05)

    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        alice = await bring_up(nursery, nat_a.lan.add_host(name="alice"), "alice")
        bob = await bring_up(nursery, nat_b.lan.add_host(name="bob"), "bob")
        nursery.start_soon(spoof, ("198.51.100.1", PORT))
        await punch(alice, bob)
        got_a = await alice.next_event()
        await trio.sleep(15)  # the attacker keeps trying through and after the punch
        nursery.cancel_scope.cancel()
    assert isinstance(got_a, PathChosen)
    assert got_a.endpoint == ("192.0.2.1", PORT)
    with pytest.raises(trio.WouldBlock):
        alice.events.receive_nowait()  # no second path was ever chosen
    counters = alice.session.puncher.counters
    assert counters["mac"] == 200
    assert counters["unknown_key"] == 200
    path = alice.session.puncher.path(PUBS["bob"])
    assert path is not None
    assert (path.endpoint, path.kind) == (("192.0.2.1", PORT), "direct")


async def test_symmetric_nats_on_both_sides_fail_cleanly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet(seed=8)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    nat_a = net.add_nat("198.51.100.1", behavior=NatBehavior.symmetric(), link=WAN)
    nat_b = net.add_nat("192.0.2.1", behavior=NatBehavior.symmetric(), link=WAN)
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        alice = await bring_up(nursery, nat_a.lan.add_host(name="alice"), "alice")
        bob = await bring_up(nursery, nat_b.lan.add_host(name="bob"), "bob")
        assert alice.reflexive.mapping_varies is True
        await punch(alice, bob)
        got_a, got_b = await alice.next_event(), await bob.next_event()
        nursery.cancel_scope.cancel()
    assert got_a == PunchFailed(PUBS["bob"], got_a.probes_sent)  # type: ignore[union-attr]
    assert isinstance(got_b, PunchFailed)
    # Bounded: each of Bob's addresses got at most the probe budget.
    assert 0 < got_a.probes_sent <= 30 * len(bob.candidates)


async def test_wireguard_runs_over_the_mapping_the_punch_opened(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The whole shared-socket story: the tunnel drains the socket, STUN and probes go through the
    mux beside WireGuard, and the chosen endpoint becomes WireGuard's."""
    net = netsim.Internet(seed=9)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    cone = NatBehavior.port_restricted_cone()
    nats = {
        "alice": net.add_nat("198.51.100.1", behavior=cone, link=WAN, name="nat-a"),
        "bob": net.add_nat("192.0.2.1", behavior=cone, link=WAN, name="nat-b"),
    }
    inner = {"alice": "10.99.0.1", "bob": "10.99.0.2"}
    tuns = {name: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for name in nats}
    apps = {name: trio.socket.from_stdlib_socket(outside) for name, (_, outside) in tuns.items()}
    chosen: dict[str, PathChosen] = {}
    both_chosen = trio.Event()
    try:
        async with net, trio.open_nursery() as nursery:
            await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
            sessions: dict[str, PunchSession] = {}
            candidates: dict[str, list[Candidate]] = {}
            devices: dict[str, Device] = {}
            for name, nat in nats.items():
                host = nat.lan.add_host(name=name)
                other = "bob" if name == "alice" else "alice"
                device = Device(KEYS[name])
                device.add_peer(
                    PeerConfig(
                        PUBS[other], allowed_ips=(ipaddress.ip_network(f"{inner[other]}/32"),)
                    )
                )
                devices[name] = device
                sock = host.nonblocking_socket()
                sock.bind(("", PORT))
                mux = Mux()
                stun, probes = mux.open_queue(Kind.STUN), mux.open_queue(Kind.PROBE)
                tun = tuns[name][0]
                tun.setblocking(False)
                tunnel = UserspaceTunnel(MuxedDevice(device, mux), tun, [sock], gso=False)  # type: ignore[list-item]
                await nursery.start(tunnel.serve)
                reflexive = await gather_reflexive(sock, stun, [PRIMARY], rc=3)
                with host.activate():
                    candidates[name] = host_candidates(PORT) + list(reflexive.candidates)

                def on_event(event: PunchEvent, device: Device = device, name: str = name) -> None:
                    if isinstance(event, PathChosen):
                        device.set_endpoint(event.peer, event.endpoint)
                        chosen[name] = event
                        if len(chosen) == 2:
                            both_chosen.set()

                puncher = Puncher(KEYS[name], wall_clock=lambda: WALL + trio.current_time())
                sessions[name] = PunchSession(puncher, sock, probes, on_event=on_event)
                await nursery.start(sessions[name].run)
                puncher.add_peer(PUBS[other])
            go = trio.current_time() + 0.1
            sessions["alice"].start(PUBS["bob"], candidates["bob"], go)
            sessions["bob"].start(PUBS["alice"], candidates["alice"], go)
            with trio.fail_after(30):
                await both_chosen.wait()
            packet = ipv4(inner["alice"], inner["bob"], b"over the punched path")
            await apps["alice"].send(packet)
            with trio.fail_after(30):
                assert await apps["bob"].recv(2048) == packet
            nursery.cancel_scope.cancel()
    finally:
        for name, (inside, _) in tuns.items():
            apps[name].close()
            inside.close()
    assert chosen["alice"].endpoint == ("192.0.2.1", PORT)
    assert devices["bob"].peer_stats()[PUBS["alice"]].endpoint == ("198.51.100.1", PORT)
    # One mapping on each NAT: STUN, probes and WireGuard all used the same external port.
    for nat in nats.values():
        assert [m.external.rsplit(":", 1)[1] for m in nat.mappings()] == [str(PORT)]


class _Silent:
    """A socket whose datagrams go nowhere (a network that drops UDP)."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, tuple[str, int]]] = []

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self.sent.append((trio.current_time(), address))
        return len(data)


async def test_gather_gives_up_early_when_no_server_answers_within_answer_within(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _send, replies = trio.open_memory_channel[Datagram](math.inf)
    sock = _Silent()
    began = trio.current_time()
    result = await gather_reflexive(sock, replies, [PRIMARY], rto=0.5, rc=3, answer_within=0.75)
    assert trio.current_time() - began == pytest.approx(0.75)
    assert result.candidates == ()
    assert [at - began for at, _ in sock.sent] == pytest.approx([0.0, 0.5])
    began = trio.current_time()
    await gather_reflexive(sock, replies, [PRIMARY], rto=0.5, rc=3)  # the whole exchange
    assert trio.current_time() - began == pytest.approx(3.5)


async def test_gather_with_answer_within_still_collects_a_prompt_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet(seed=7)
    server = net.add_host(PRIMARY[0], ALTERNATE[0], name="stun")
    nat = net.add_nat("198.51.100.1", behavior=NatBehavior.port_restricted_cone(), link=WAN)
    host = nat.lan.add_host(name="alice")
    async with net, trio.open_nursery() as nursery:
        await nursery.start(netsim.serve_stun, server, PRIMARY, ALTERNATE)
        sock = host.udp_socket()
        await sock.bind(("", PORT))
        mux = Mux()
        stun = mux.open_queue(Kind.STUN)
        await nursery.start(serve_mux, sock, mux)
        result = await gather_reflexive(sock, stun, [PRIMARY], rc=3, answer_within=0.75)
        assert [c.address for c in result.candidates] == ["198.51.100.1"]
        nursery.cancel_scope.cancel()
