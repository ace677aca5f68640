"""IPv6 in netsim: dual-stack and IPv6-only sites, the stateful IPv6 firewall, NAT66, no-route."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import re
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import netsim
from punchtrio.netsim import Filtering, Ipv6Firewall, NatBehavior, Verdict

AF_INET, AF_INET6 = trio.socket.AF_INET, trio.socket.AF_INET6
SERVER4, SERVER6 = "203.0.113.10", "2001:db8:ffff::10"
FIREWALL = Ipv6Firewall()


async def reflector(
    sock: netsim.UDPSocket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer every datagram with the source endpoint it came from, formatted."""
    task_status.started()
    while True:
        _, src = await sock.recvfrom(2048)
        await sock.sendto(f"{src[0]} {src[1]}".encode(), src)


async def start_reflector(nursery: trio.Nursery, host: netsim.Host, ip: str, port: int) -> None:
    sock = host.udp_socket(AF_INET6 if ":" in ip else AF_INET)
    await sock.bind((ip, port))
    await nursery.start(reflector, sock)


async def seen_as(sock: netsim.UDPSocket, server: tuple[str, int]) -> tuple[str, int]:
    """Send to a reflector and return the source endpoint it saw."""
    await sock.sendto(b"who am i", server)
    with trio.fail_after(5):
        data, src = await sock.recvfrom(2048)
    assert src[:2] == server
    ip, port = data.decode().split()
    return ip, int(port)


def dual_stack_world(
    ipv6: Ipv6Firewall | NatBehavior | None = FIREWALL,
    lan6: str = "2001:db8:1:1::/64",
) -> tuple[netsim.Internet, netsim.Host, netsim.NAT, netsim.Host]:
    net = netsim.Internet(seed=3)
    server = net.add_host(SERVER4, SERVER6, name="server")
    site = net.add_nat("198.51.100.1", name="home", address6="2001:db8:1::1", lan6=lan6, ipv6=ipv6)
    alice = site.lan.add_host(name="alice")
    return net, server, site, alice


# --- topology ------------------------------------------------------------------------------


def test_a_dual_stack_lan_gives_hosts_one_address_per_prefix_or_per_requested_version() -> None:
    net = netsim.Internet()
    site = net.add_nat(
        "198.51.100.1", address6="2001:db8:1::1", lan6=["2001:db8:1:1::/64", "fd00:1::/64"]
    )
    both = site.lan.add_host()
    only4 = site.lan.add_host(ip_version=4)
    only6 = site.lan.add_host(ip_version=6)
    assert [str(a) for a in both.addresses] == ["10.0.0.2", "2001:db8:1:1::2", "fd00:1::2"]
    assert [str(a) for a in only4.addresses] == ["10.0.0.3"]
    assert [str(a) for a in only6.addresses] == ["2001:db8:1:1::3", "fd00:1::3"]
    assert site.families == (4, 6)
    assert site.lan.prefix == ipaddress.ip_network("10.0.0.0/24")
    assert [str(p) for p in site.lan.prefixes] == [
        "10.0.0.0/24",
        "2001:db8:1:1::/64",
        "fd00:1::/64",
    ]
    assert site.external_address == ipaddress.ip_address("198.51.100.1")
    assert site.external_address6 == ipaddress.ip_address("2001:db8:1::1")
    assert net.network.prefixes == ()


def test_an_ipv6_only_site_has_no_ipv4_prefix_and_its_hosts_no_ipv4_address() -> None:
    net = netsim.Internet()
    site = net.add_nat(lan=None, address6="2001:db8:3::1", lan6="2001:db8:3:1::/64")
    dave = site.lan.add_host()
    assert [str(a) for a in dave.addresses] == ["2001:db8:3:1::2"]
    assert site.families == (6,)
    with pytest.raises(netsim.NetsimError, match="no IPv4 prefix"):
        site.lan.add_host(ip_version=4)
    with pytest.raises(netsim.NetsimError, match="outside"):
        site.lan.add_host("10.0.0.2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "198.51.100.1", "lan": None, "lan6": "2001:db8:1::/64"}, "takes no address"),
        ({"address": None, "lan": None}, "needs a LAN"),
        ({"address": "198.51.100.1", "address6": "2001:db8:1::1"}, "needs lan6"),
        (
            {"address": "198.51.100.1", "lan6": "fd00::/64", "ipv6": NatBehavior()},
            "needs address6",
        ),
        ({"address": "198.51.100.1", "lan6": "10.1.0.0/24"}, "must be an IPv6 prefix"),
        ({"address": "198.51.100.1", "lan6": "2001:db8::/127"}, "too small"),
        ({"address": "198.51.100.1", "lan6": []}, "at least one prefix"),
        ({"address": "198.51.100.1", "lan6": ["fd00::/64", "fd00::/48"]}, "overlap"),
        ({"address": "2001:db8::1", "lan": "10.0.0.0/24"}, "differ in family"),
        ({"address": "2001:db8::1", "lan": "fd00::/64", "lan6": "fd01::/64"}, "already IPv6"),
        ({"address": "198.51.100.1", "lan6": "fd00::/64", "ipv6": "firewall"}, "ipv6 must be"),
        ({"address": "198.51.100.1", "lan6": "fd00::/64", "address6": "192.0.2.9"}, "IPv6 address"),
    ],
)
def test_invalid_site_arguments_raise_netsim_error_and_add_nothing(
    kwargs: dict[str, object], message: str
) -> None:
    net = netsim.Internet()
    with pytest.raises(netsim.NetsimError, match=message):
        net.add_nat(**kwargs)  # type: ignore[arg-type]
    assert net.nodes == []
    assert net.network.nodes == []


def test_two_routed_sites_may_not_claim_overlapping_ipv6_prefixes() -> None:
    net = netsim.Internet()
    net.add_nat("198.51.100.1", lan6="2001:db8:1::/48")
    with pytest.raises(netsim.NetsimError, match="overlaps"):
        net.add_nat("198.51.100.2", lan6="2001:db8:1:5::/64")
    # NAT66 LANs are not routed, so their unique-local prefixes may repeat.
    net.add_nat("198.51.100.3", address6="2001:db8:3::1", lan6="fd00::/64", ipv6=NatBehavior())
    net.add_nat("198.51.100.4", address6="2001:db8:4::1", lan6="fd00::/64", ipv6=NatBehavior())


@given(st.text(max_size=40) | st.ip_addresses().map(lambda a: f"{a}/64"))
def test_lan6_parsing_either_accepts_an_ipv6_prefix_or_raises_netsim_error(text: str) -> None:
    net = netsim.Internet()
    try:
        site = net.add_nat("198.51.100.1", lan6=text)
    except netsim.NetsimError:
        assert net.nodes == []
        return
    network = ipaddress.ip_network(text)
    assert network.version == 6
    assert network.num_addresses >= 4
    assert site.lan.prefixes[1] == network


def test_firewall_parameters_are_checked() -> None:
    with pytest.raises(netsim.NetsimError, match="timeout"):
        Ipv6Firewall(timeout=0)
    with pytest.raises(netsim.NetsimError, match="tcp_timeout"):
        Ipv6Firewall(tcp_timeout=float("inf"))


# --- sending both families -----------------------------------------------------------------


async def test_a_dual_stack_host_goes_out_nated_over_ipv4_and_untranslated_over_ipv6() -> None:
    net, server, site, alice = dual_stack_world()
    async with net, trio.open_nursery() as nursery:
        await start_reflector(nursery, server, SERVER4, 3478)
        await start_reflector(nursery, server, SERVER6, 3478)
        sock4, sock6 = alice.udp_socket(AF_INET), alice.udp_socket(AF_INET6)
        await sock4.bind(("", 5000))
        await sock6.bind(("", 5000))
        assert await seen_as(sock4, (SERVER4, 3478)) == ("198.51.100.1", 5000)
        assert await seen_as(sock6, (SERVER6, 3478)) == ("2001:db8:1:1::2", 5000)
        rows = site.mappings()
        assert [(r.internal, r.external) for r in rows] == [
            ("10.0.0.2:5000", "198.51.100.1:5000"),
            ("[2001:db8:1:1::2]:5000", "[2001:db8:1:1::2]:5000"),
        ]
        assert rows[1].destination == f"[{SERVER6}]:3478"
        assert [r.internal for r in site.mappings(6)] == ["[2001:db8:1:1::2]:5000"]
        assert [r.internal for r in site.mappings(4)] == ["10.0.0.2:5000"]
        nursery.cancel_scope.cancel()


async def test_trio_code_on_a_dual_stack_host_reaches_both_families_with_plain_sockets() -> None:
    net, server, _, alice = dual_stack_world()
    async with net, trio.open_nursery() as nursery:
        await start_reflector(nursery, server, SERVER4, 7)
        await start_reflector(nursery, server, SERVER6, 7)
        with alice.activate():
            for family, ip in ((AF_INET, SERVER4), (AF_INET6, SERVER6)):
                sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
                await sock.sendto(b"x", (ip, 7))
                with trio.fail_after(1):
                    data, _ = await sock.recvfrom(100)
                assert data.split()[0].decode() in ("198.51.100.1", "2001:db8:1:1::2")
        nursery.cancel_scope.cancel()


async def test_source_address_selection_prefers_ula_for_ula_and_global_otherwise() -> None:
    net = netsim.Internet()
    server = net.add_host(SERVER6)
    site = net.add_nat("198.51.100.1", lan6=["fd00:1::/64", "2001:db8:1:1::/64"], ipv6=None)
    alice, bob = site.lan.add_host(), site.lan.add_host()
    ula = ipaddress.ip_address("fd00:1::3")
    assert alice.source_address(AF_INET6, ula) == ipaddress.ip_address("fd00:1::2")
    assert alice.source_address(AF_INET6, server.address) == ipaddress.ip_address("2001:db8:1:1::2")
    async with net:
        sock = bob.udp_socket(AF_INET6)
        await sock.bind(("", 9))
        sender = alice.udp_socket(AF_INET6)
        await sender.sendto(b"hi", ("fd00:1::3", 9))
        with trio.fail_after(1):
            _, src = await sock.recvfrom(10)
        assert src[0] == "fd00:1::2"


# --- no route --------------------------------------------------------------------------------


async def test_an_ipv6_only_host_gets_enetunreach_for_ipv4_as_the_kernel_gives() -> None:
    net = netsim.Internet()
    net.add_host(SERVER4, SERVER6)
    site = net.add_nat(lan=None, address6="2001:db8:3::1", lan6="2001:db8:3:1::/64")
    dave = site.lan.add_host(name="dave")
    async with net:
        with dave.activate():
            udp = trio.socket.socket(AF_INET, trio.socket.SOCK_DGRAM)
            with pytest.raises(OSError, match="unreachable") as sent:
                await udp.sendto(b"x", (SERVER4, 3478))
            assert sent.value.errno == errno.ENETUNREACH
            assert sent.value.strerror == "Network is unreachable"
            with pytest.raises(OSError, match="unreachable") as connected:
                await udp.connect((SERVER4, 3478))
            assert connected.value.errno == errno.ENETUNREACH
            with pytest.raises(OSError, match="connect") as streamed:
                await trio.open_tcp_stream(SERVER4, 443)
            assert errno.ENETUNREACH in _errnos(streamed.value)
            fast = dave.nonblocking_socket(AF_INET)
            with pytest.raises(OSError, match="unreachable") as fast_connected:
                fast.connect((SERVER4, 3478))
            assert fast_connected.value.errno == errno.ENETUNREACH
            fast.close()
    assert dave.counters[Verdict.SENT] == 0
    assert net.counters[Verdict.SENT] == 0


def _errnos(error: BaseException) -> set[int]:
    found = {error.errno} if isinstance(error, OSError) and error.errno else set()
    for inner in getattr(error, "exceptions", ()):
        found |= _errnos(inner)
    if error.__cause__ is not None:
        found |= _errnos(error.__cause__)
    return found


async def test_an_ipv4_only_host_gets_enetunreach_for_ipv6() -> None:
    net = netsim.Internet()
    net.add_host(SERVER6)
    carol = net.add_nat("198.51.100.1").lan.add_host()
    async with net:
        sock = carol.udp_socket(AF_INET6)
        with pytest.raises(OSError, match="unreachable") as raised:
            await sock.sendto(b"x", (SERVER6, 3478))
        assert raised.value.errno == errno.ENETUNREACH


async def test_a_packet_of_a_family_the_gateway_lacks_is_dropped_as_no_route() -> None:
    net = netsim.Internet()
    server = net.add_host(SERVER6)
    nat = net.add_nat("198.51.100.1")
    # A host given an IPv6 address by hand on an IPv4-only LAN can send, but its gateway has no
    # IPv6 side: the packet dies there.
    stray = nat.lan.add_host("10.0.0.9")
    stray.interface.addresses = (*stray.addresses, ipaddress.ip_address("2001:db8:9::9"))
    async with net:
        sock = stray.udp_socket(AF_INET6)
        await sock.sendto(b"x", (str(server.address), 1))
        await trio.sleep(1)
    assert nat.counters[Verdict.NO_ROUTE] == 1


# --- the stateful IPv6 firewall ----------------------------------------------------------------


async def test_the_firewall_drops_and_counts_unsolicited_inbound_and_admits_replies() -> None:
    net, server, site, alice = dual_stack_world()
    async with net:
        inside = alice.udp_socket(AF_INET6)
        await inside.bind(("", 5000))
        outside = server.udp_socket(AF_INET6)
        await outside.bind((SERVER6, 3478))
        other_port = server.udp_socket(AF_INET6)
        await other_port.bind((SERVER6, 3479))
        target = ("2001:db8:1:1::2", 5000)
        await outside.sendto(b"unsolicited", target)
        await trio.sleep(1)
        assert site.counters[Verdict.FILTERED] == 1
        await inside.sendto(b"out", (SERVER6, 3478))
        await outside.sendto(b"reply", target)
        await other_port.sendto(b"other port", target)  # APDF: not the endpoint alice sent to
        with trio.fail_after(1):
            data, src = await inside.recvfrom(100)
        assert (data, src[:2]) == (b"reply", (SERVER6, 3478))
        await trio.sleep(1)
        assert site.counters[Verdict.FILTERED] == 2
        assert net.counters[Verdict.FILTERED] == 2
        with pytest.raises(BlockingIOError):
            inside.recvfrom_nowait(100)


@pytest.mark.parametrize(
    ("filtering", "other_port_admitted", "other_host_admitted"),
    [
        (Filtering.ADDRESS_AND_PORT_DEPENDENT, False, False),
        (Filtering.ADDRESS_DEPENDENT, True, False),
        (Filtering.ENDPOINT_INDEPENDENT, True, True),
    ],
)
async def test_firewall_filtering_kinds_admit_what_their_key_covers(
    filtering: Filtering, other_port_admitted: bool, other_host_admitted: bool
) -> None:
    net, server, _, alice = dual_stack_world(Ipv6Firewall(filtering=filtering))
    stranger = net.add_host("2001:db8:eeee::1")
    async with net:
        inside = alice.udp_socket(AF_INET6)
        await inside.bind(("", 5000))
        await inside.sendto(b"out", (SERVER6, 3478))
        await trio.sleep(1)
        target = ("2001:db8:1:1::2", 5000)
        for host, ip, port in ((server, SERVER6, 3479), (stranger, "2001:db8:eeee::1", 3478)):
            sock = host.udp_socket(AF_INET6)
            await sock.bind((ip, port))
            await sock.sendto(b"in", target)
        await trio.sleep(1)
        got = []
        while True:
            try:
                got.append(inside.recvfrom_nowait(100)[1][:2])
            except BlockingIOError:
                break
    assert ((SERVER6, 3479) in got) is other_port_admitted
    assert (("2001:db8:eeee::1", 3478) in got) is other_host_admitted


async def test_firewall_states_expire_after_the_timeout_unless_refreshed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, site, alice = dual_stack_world(Ipv6Firewall(timeout=30, inbound_refresh=False))
    async with net:
        inside = alice.udp_socket(AF_INET6)
        await inside.bind(("", 5000))
        outside = server.udp_socket(AF_INET6)
        await outside.bind((SERVER6, 3478))
        target = ("2001:db8:1:1::2", 5000)
        await inside.sendto(b"open", (SERVER6, 3478))
        await trio.sleep(29)
        await outside.sendto(b"in time", target)
        with trio.fail_after(1):
            assert (await inside.recvfrom(100))[0] == b"in time"
        (row,) = site.mappings(6)
        assert row.expires == row.refreshed + 30
        await trio.sleep(2)  # 31 s after the last outbound packet
        await outside.sendto(b"too late", target)
        await trio.sleep(1)
        assert site.counters[Verdict.FILTERED] == 1
        assert site.table_for(6).expired == 1
        assert site.mappings(6) == []


async def test_inbound_refresh_keeps_a_firewall_state_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, site, alice = dual_stack_world(Ipv6Firewall(timeout=30))
    async with net:
        inside = alice.udp_socket(AF_INET6)
        await inside.bind(("", 5000))
        outside = server.udp_socket(AF_INET6)
        await outside.bind((SERVER6, 3478))
        await inside.sendto(b"open", (SERVER6, 3478))
        for _ in range(5):  # 100 s of inbound-only traffic, every 20 s
            await trio.sleep(20)
            await outside.sendto(b"keep", ("2001:db8:1:1::2", 5000))
        await trio.sleep(1)
        assert site.counters[Verdict.FILTERED] == 0
        assert len([inside.recvfrom_nowait(10) for _ in range(5)]) == 5


async def test_two_firewalled_sites_punch_a_direct_ipv6_path() -> None:
    net = netsim.Internet(seed=5)
    home = net.add_nat("198.51.100.1", lan6="2001:db8:1:1::/64", link=netsim.Link(latency=0.01))
    office = net.add_nat("192.0.2.1", lan6="2001:db8:2:1::/64", link=netsim.Link(latency=0.03))
    alice, bob = home.lan.add_host(), office.lan.add_host()
    a_end, b_end = ("2001:db8:1:1::2", 4000), ("2001:db8:2:1::2", 4000)
    async with net:
        a, b = alice.udp_socket(AF_INET6), bob.udp_socket(AF_INET6)
        await a.bind(("", 4000))
        await b.bind(("", 4000))
        await a.sendto(b"punch", b_end)  # dropped by office's firewall: no state there yet
        await trio.sleep(0.2)
        assert office.counters[Verdict.FILTERED] == 1
        await b.sendto(b"punch", a_end)  # opens office, passes home (alice's state)
        with trio.fail_after(1):
            assert (await a.recvfrom(10))[1][:2] == b_end
        await a.sendto(b"data", b_end)
        with trio.fail_after(1):
            assert (await b.recvfrom(10)) == (b"data", (*a_end, 0, 0))


async def test_the_firewall_keeps_tcp_state_apart_and_drops_unsolicited_syns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, server, site, alice = dual_stack_world()

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        with alice.activate():
            await nursery.start(trio.serve_tcp, echo, 22)
            stream = await trio.open_tcp_stream(SERVER6, 443)
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            await stream.aclose()
        assert next(r.external for r in site.tcp_mappings(6)).startswith("[2001:db8:1:1::2]:")
        with server.activate(), pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("2001:db8:1:1::2", 22)
        assert site.counters[Verdict.FILTERED] >= 1
        nursery.cancel_scope.cancel()


# --- NAT66 ----------------------------------------------------------------------------------


async def test_nat66_translates_the_source_with_the_nat_rules_and_filters_inbound() -> None:
    net, server, site, alice = dual_stack_world(NatBehavior.symmetric(), lan6="fd00:1::/64")
    async with net, trio.open_nursery() as nursery:
        await start_reflector(nursery, server, SERVER6, 3478)
        await start_reflector(nursery, server, SERVER6, 3479)
        sock = alice.udp_socket(AF_INET6)
        await sock.bind(("", 5000))
        first = await seen_as(sock, (SERVER6, 3478))
        second = await seen_as(sock, (SERVER6, 3479))
        assert first[0] == second[0] == "2001:db8:1::1"
        assert first[1] != second[1]  # symmetric: one mapping per destination
        rows = site.mappings(6)
        assert {r.internal for r in rows} == {"[fd00:1::2]:5000"}
        assert {r.external for r in rows} == {f"[2001:db8:1::1]:{p}" for p in (first[1], second[1])}
        assert site.table_for(6).external == ipaddress.ip_address("2001:db8:1::1")
        stranger = server.udp_socket(AF_INET6)
        await stranger.bind((SERVER6, 9999))
        await stranger.sendto(b"x", ("2001:db8:1::1", first[1]))
        await stranger.sendto(b"x", ("2001:db8:1::1", 1))
        await trio.sleep(1)
        assert site.counters[Verdict.DROPPED_BY_FILTER] == 1
        assert site.counters[Verdict.NO_MAPPING] == 1
        # The ULA LAN is not routed from outside.
        await stranger.sendto(b"x", ("fd00:1::2", 5000))
        await trio.sleep(1)
        assert server.counters[Verdict.NO_ROUTE] == 1
        nursery.cancel_scope.cancel()


async def test_a_nat66_port_preserving_cone_keeps_one_mapping_and_reset_forgets_both_sides() -> (
    None
):
    net, server, site, alice = dual_stack_world(NatBehavior.full_cone(), lan6="fd00:1::/64")
    async with net, trio.open_nursery() as nursery:
        await start_reflector(nursery, server, SERVER4, 3478)
        await start_reflector(nursery, server, SERVER6, 3478)
        await start_reflector(nursery, server, SERVER6, 3479)
        sock6, sock4 = alice.udp_socket(AF_INET6), alice.udp_socket(AF_INET)
        await sock6.bind(("", 6000))
        await sock4.bind(("", 6000))
        assert await seen_as(sock6, (SERVER6, 3478)) == ("2001:db8:1::1", 6000)
        assert await seen_as(sock6, (SERVER6, 3479)) == ("2001:db8:1::1", 6000)
        await seen_as(sock4, (SERVER4, 3478))
        assert len(site.mappings()) == 2
        site.reset()
        assert site.mappings() == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("hairpinning", [True, False])
async def test_nat66_hairpins_by_its_own_behaviour_not_the_ipv4_sides(hairpinning: bool) -> None:
    net = netsim.Internet()
    site = net.add_nat(
        "198.51.100.1",
        behavior=NatBehavior(hairpinning=not hairpinning),
        address6="2001:db8:1::1",
        lan6="fd00:1::/64",
        ipv6=NatBehavior.full_cone()
        if not hairpinning
        else NatBehavior(filtering=Filtering.ENDPOINT_INDEPENDENT, hairpinning=True),
    )
    alice, bob = site.lan.add_host(ip_version=6), site.lan.add_host(ip_version=6)
    async with net:
        b = bob.udp_socket(AF_INET6)
        await b.bind(("", 7000))
        await b.sendto(b"open", (SERVER6, 1))  # maps bob to [2001:db8:1::1]:7000
        a = alice.udp_socket(AF_INET6)
        await a.sendto(b"hairpin", ("2001:db8:1::1", 7000))
        await trio.sleep(1)
        arrived = []
        with contextlib.suppress(BlockingIOError):
            arrived.append(b.recvfrom_nowait(100))
    if hairpinning:
        assert arrived == [(b"hairpin", ("2001:db8:1::1", 49152, 0, 0))]
        assert site.counters[Verdict.HAIRPINNED] == 1
    else:
        assert arrived == []
        assert site.counters[Verdict.NO_HAIRPIN] == 1


def test_table_for_a_version_without_state_raises() -> None:
    net = netsim.Internet()
    routed = net.add_nat("198.51.100.1", lan6="2001:db8:1:1::/64", ipv6=None)
    assert routed.table_for(4) is routed.table
    with pytest.raises(netsim.NetsimError, match="no IPv6 state"):
        routed.table_for(6)
    assert isinstance(
        net.add_nat("198.51.100.2", lan6="2001:db8:2::/64").table_for(6, tcp=True),
        netsim.Ipv6FirewallTable,
    )


# --- routing without a firewall -------------------------------------------------------------


async def test_a_dual_stack_router_and_an_open_ipv6_side_route_both_ways() -> None:
    net = netsim.Internet()
    server = net.add_host(SERVER4, SERVER6)
    router = net.add_router("192.0.2.1", lan="192.0.2.128/25", lan6="2001:db8:5::/64")
    open_site = net.add_nat("198.51.100.1", lan6="2001:db8:6::/64", ipv6=None)
    v6only = net.add_router("2001:db8:7::1", lan=None, lan6="2001:db8:7:1::/64")
    hosts = [router.lan.add_host(), open_site.lan.add_host(), v6only.lan.add_host()]
    async with net:
        listener = server.udp_socket(AF_INET6)
        await listener.bind((SERVER6, 53))
        for host in hosts:
            sock = host.udp_socket(AF_INET6)
            await sock.bind(("", 53))
            v6 = str(host.source_address(AF_INET6, server.address))
            await listener.sendto(b"unsolicited ok", (v6, 53))  # nothing filters
            with trio.fail_after(1):
                assert (await sock.recvfrom(100))[0] == b"unsolicited ok"
    assert [str(a) for a in hosts[0].addresses] == ["192.0.2.130", "2001:db8:5::2"]
    assert [str(a) for a in hosts[2].addresses] == ["2001:db8:7:1::2"]


def test_the_ipv6_example_in_the_docs_builds_what_its_comments_say() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "netsim.md").read_text()
    section = text.split("\n## IPv6\n", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example is not None
    scope: dict[str, object] = {"__name__": "netsim_ipv6_doc_example"}
    exec(compile(example[1], "docs/netsim.md", "exec"), scope)
    hosts = re.findall(r"^(\w+) = \w+\.lan\.add_host\(.*#\s*(.*)$", example[1], re.M)
    assert [name for name, _ in hosts] == ["alice", "carol", "dave"]
    for name, comment in hosts:
        host = scope[name]
        assert isinstance(host, netsim.Host)
        documented = re.findall(r"[0-9a-f:.]*[.:][0-9a-f:.]+", comment)
        assert [str(a) for a in host.addresses] == documented, name
    home, office, mobile = (scope[n] for n in ("home", "office", "mobile"))
    assert isinstance(home, netsim.NAT)
    assert isinstance(office, netsim.NAT)
    assert isinstance(mobile, netsim.NAT)
    assert isinstance(home.table_for(6), netsim.Ipv6FirewallTable)
    assert not isinstance(office.table_for(6), netsim.Ipv6FirewallTable)
    assert mobile.families == (6,)


# --- determinism ----------------------------------------------------------------------------


async def _dual_stack_traffic(seed: int) -> list[tuple[object, ...]]:
    """Hosts on a firewalled, a NAT66 and an IPv4-only site all sending at the same instants."""
    trace: list[netsim.TraceRecord] = []
    net = netsim.Internet(seed=seed, trace=trace.append)
    server = net.add_host(SERVER4, SERVER6, name="server")
    lossy = netsim.Link(latency=0.02, jitter=0.015, loss=0.1, duplicate=0.1)
    sites = [
        net.add_nat("198.51.100.1", lan6="2001:db8:1:1::/64", link=lossy),
        net.add_nat(
            "198.51.100.2",
            behavior=NatBehavior.symmetric(),
            address6="2001:db8:2::1",
            lan6="fd00:2::/64",
            ipv6=NatBehavior.symmetric(),
            link=lossy,
        ),
        net.add_nat("198.51.100.3", link=lossy),
    ]
    hosts = [site.lan.add_host() for site in sites for _ in range(2)]

    async def echo(ip: str) -> None:
        sock = server.udp_socket(AF_INET6 if ":" in ip else AF_INET)
        await sock.bind((ip, 7))
        while True:
            data, src = await sock.recvfrom(100)
            await sock.sendto(data, src)

    async def client(host: netsim.Host) -> None:
        socks = [host.udp_socket(AF_INET)]
        if any(a.version == 6 for a in host.addresses):
            socks.append(host.udp_socket(AF_INET6))
        for round_ in range(8):
            for sock in socks:
                ip = SERVER6 if sock.family == AF_INET6 else SERVER4
                await sock.sendto(f"{host.name} {round_}".encode(), (ip, 7))
            await trio.sleep(0.2)

    async with net, trio.open_nursery() as nursery:
        nursery.start_soon(echo, SERVER4)
        nursery.start_soon(echo, SERVER6)
        for host in hosts:  # ephemeral ports are per host: no two tasks pick on one host
            nursery.start_soon(client, host)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    rows = [(s.name, m.internal, m.external) for s in sites for m in s.mappings()]
    return [(r.time, r.where, r.src, r.dst, r.verdict, r.detail) for r in trace] + [
        ("mappings", *rows)
    ]


def test_dual_stack_traces_repeat_exactly_for_a_seed() -> None:
    def run(seed: int) -> list[tuple[object, ...]]:
        return trio.run(
            _dual_stack_traffic, seed, clock=trio.testing.MockClock(autojump_threshold=0)
        )

    first = run(11)
    verdicts = {record[4] for record in first[:-1]}
    assert {Verdict.LOST, Verdict.DUPLICATED, Verdict.NAT_OUT, Verdict.FORWARDED} <= verdicts
    assert any("[2001:db8:2::1]" in str(record[2]) for record in first)  # NAT66 at work
    for _ in range(2):
        assert run(11) == first
    assert run(12) != first


# --- dual-stack names -----------------------------------------------------------------------


async def test_a_dual_stack_name_resolves_per_family_and_an_ipv6_only_host_connects_by_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = netsim.Internet()
    server = net.add_host(SERVER4, SERVER6, name="server")
    net.add_name("hub.example", SERVER4, SERVER6)
    site = net.add_nat(lan=None, address6="2001:db8:3::1", lan6="2001:db8:3:1::/64")
    dave = site.lan.add_host()
    assert net.resolve("hub.example") == ipaddress.ip_address(SERVER4)
    assert net.resolve("hub.example", AF_INET6) == ipaddress.ip_address(SERVER6)
    with pytest.raises(netsim.NetsimError, match="at least one address"):
        net.add_name("empty.example")

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(await stream.receive_some())

    async with net, trio.open_nursery() as nursery:
        with server.activate():
            await nursery.start(trio.serve_tcp, echo, 443)
        with dave.activate():
            infos = await trio.socket.getaddrinfo("hub.example", 443)
            assert [info[4][0] for info in infos] == [SERVER4, SERVER6]
            only6 = await trio.socket.getaddrinfo("hub.example", 443, family=AF_INET6)
            assert [info[4] for info in only6] == [(SERVER6, 443, 0, 0)]
            udp = trio.socket.socket(AF_INET6, trio.socket.SOCK_DGRAM)
            await udp.connect(("hub.example", 53))
            assert udp.getpeername() == (SERVER6, 53, 0, 0)
            stream = await trio.open_tcp_stream("hub.example", 443)  # IPv4 fails, IPv6 wins
            await stream.send_all(b"hello")
            assert await stream.receive_some() == b"hello"
            await stream.aclose()
        nursery.cancel_scope.cancel()
