"""The NAT lab on IPv6: global prefixes behind stateful firewalls, NAT66, IPv6-only sites (root).

First the topology itself, with plain UDP sockets (:func:`labs.udpprobe.start_agent`): a host's
global address is unreachable until the host has sent to the peer (hole punching on IPv6, with no
translation), NAT66 translates to the router's address, an IPv6-only host has no IPv4 at all, a
dual-stack site is NATted on IPv4 only, and teardown leaves nothing. Then punchtrio itself:
``punchtrio up`` pairs reaching each other directly over IPv6, and ``punchtrio nat`` in an IPv6 site.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs import discovery, udpprobe
from labs.netns import LabError, leftover_namespaces, run
from labs.scenarios.punch_matrix import LivePair, running_pair, start_hub
from labs.topology import HUB_PRIMARY6, Host, Nat, NatSpec, Network, build, udp_blocked_between

from tests.conftest import require_root_and
from tests.lab.conftest import LAB_BINARIES

pytestmark = pytest.mark.lab

UP_BINARIES = (*LAB_BINARIES, "ping")

V6_SPECS = (
    NatSpec("firewall"),
    NatSpec("firewall"),
    NatSpec("nat66"),
    NatSpec("port", ipv6="firewall"),
    NatSpec("firewall", block_udp=True),
)
"""Two IPv6-only firewalled sites, an IPv6-only NAT66 site, a dual-stack site (a ``port`` NAT on
IPv4, the firewall on IPv6) and a firewalled IPv6-only site that drops outgoing UDP."""


@pytest.fixture(scope="module")
def _v6_lab() -> Iterator[Network]:
    require_root_and(*LAB_BINARIES)
    with build(V6_SPECS) as net:
        yield net


@pytest.fixture
def v6_lab(_v6_lab: Network) -> Network:
    """The module's lab with every firewall's and NAT's state forgotten."""
    _v6_lab.flush_conntrack()
    return _v6_lab


def _site(net: Network, index: int) -> tuple[Nat, Host]:
    nat = net.requested[index]
    return nat, nat.hosts[0]


def _hub_agent(net: Network, family: int) -> udpprobe.Agent:
    """An agent on the hub's primary address of ``family`` (the hub has two per family)."""
    address = net.hub.primary_ip6 if family == 6 else net.hub.primary_ip
    return udpprobe.start_agent(net.lab, net.hub.ns, family=family, address=address)


def _global(host: Host) -> str:
    assert host.ip6 is not None
    return host.ip6


def test_a_global_address_is_firewalled_until_the_host_has_sent_to_the_peer(
    v6_lab: Network,
) -> None:
    (_, a), (_, b) = _site(v6_lab, 0), _site(v6_lab, 1)
    agent_a = udpprobe.start_agent(v6_lab.lab, a.ns, family=6)
    agent_b = udpprobe.start_agent(v6_lab.lab, b.ns, family=6)
    # A's first datagram dies at B's firewall (new inbound), but opens A's own firewall for B.
    assert agent_a.send(_global(b), agent_b.port, "first") is None
    assert agent_b.receive(0.5) is None
    # B answers: a reply at A's router, and now B's router has seen B -> A.
    assert agent_b.send(_global(a), agent_a.port, "from-b") is None
    assert agent_a.receive(2) == (_global(b), agent_b.port, "from-b")
    # A's next datagram is a reply at B's router: through, from A's own address (no translation).
    assert agent_a.send(_global(b), agent_b.port, "second") is None
    assert agent_b.receive(2) == (_global(a), agent_a.port, "second")


def test_the_hole_is_for_that_address_and_port_only(v6_lab: Network) -> None:
    (_, a), (_, b) = _site(v6_lab, 0), _site(v6_lab, 1)
    agent_a = udpprobe.start_agent(v6_lab.lab, a.ns, family=6)
    other_port = udpprobe.start_agent(v6_lab.lab, a.ns, family=6)
    hub = _hub_agent(v6_lab, 6)
    agent_b = udpprobe.start_agent(v6_lab.lab, b.ns, family=6)
    assert agent_b.send(_global(a), agent_a.port, "open") is None  # B's router now knows B -> A
    assert agent_a.send(_global(b), agent_b.port, "reply") is None
    assert agent_b.receive(2) == (_global(a), agent_a.port, "reply")
    # Another port on A, and another address (the hub): new inbound flows, dropped.
    assert other_port.send(_global(b), agent_b.port, "other-port") is None
    assert hub.send(_global(b), agent_b.port, "other-address") is None
    assert agent_b.receive(0.5) is None


def test_forgetting_conntrack_closes_the_hole(v6_lab: Network) -> None:
    (_, a), (_, b) = _site(v6_lab, 0), _site(v6_lab, 1)
    agent_a = udpprobe.start_agent(v6_lab.lab, a.ns, family=6)
    agent_b = udpprobe.start_agent(v6_lab.lab, b.ns, family=6)
    assert agent_b.send(_global(a), agent_a.port, "open") is None
    assert agent_a.send(_global(b), agent_b.port, "through") is None
    assert agent_b.receive(2) == (_global(a), agent_a.port, "through")
    v6_lab.flush_conntrack()
    assert agent_a.send(_global(b), agent_b.port, "after-flush") is None
    assert agent_b.receive(0.5) is None


def test_udp_blocked_between_blocks_ipv6_sites_until_it_ends(v6_lab: Network) -> None:
    (nat_a, a), (nat_b, b) = _site(v6_lab, 0), _site(v6_lab, 1)
    agent_a = udpprobe.start_agent(v6_lab.lab, a.ns, family=6)
    agent_b = udpprobe.start_agent(v6_lab.lab, b.ns, family=6)
    hub = _hub_agent(v6_lab, 6)
    with udp_blocked_between(v6_lab, nat_a, nat_b):
        assert agent_a.send(_global(b), agent_b.port, "blocked") is None
        assert agent_b.send(_global(a), agent_a.port, "blocked") is None
        assert agent_a.receive(0.5) is None
        assert agent_b.receive(0.1) is None
        assert agent_a.send(HUB_PRIMARY6, hub.port, "hub-passes") is None
        assert hub.receive(2) == (_global(a), agent_a.port, "hub-passes")
    assert agent_b.send(_global(a), agent_a.port, "open") is None
    assert agent_a.receive(2) == (_global(b), agent_b.port, "open")


def test_nat66_translates_to_the_routers_address_and_filters_like_a_port_nat(
    v6_lab: Network,
) -> None:
    nat, host = _site(v6_lab, 2)
    assert host.ip.startswith("fd00:db8:")
    assert host.internet_ip6 == nat.public_ip6
    hub = _hub_agent(v6_lab, 6)
    hub_other = _hub_agent(v6_lab, 6)
    agent = udpprobe.start_agent(v6_lab.lab, host.ns, family=6)
    assert agent.send(HUB_PRIMARY6, hub.port, "out") is None
    got = hub.receive(2)
    assert got is not None
    assert got[0] == nat.public_ip6
    assert got[1] == agent.port  # masquerade preserves a free port
    assert hub.send(got[0], got[1], "back") is None
    assert agent.receive(2) == (HUB_PRIMARY6, hub.port, "back")
    assert hub_other.send(got[0], got[1], "unsolicited") is None
    assert agent.receive(0.5) is None


def test_an_ipv6_only_host_has_no_ipv4(v6_lab: Network) -> None:
    _, host = _site(v6_lab, 0)
    assert host.ns.run("ip", "-4", "route").strip() == ""  # the main table (loopback is local)
    assert host.ns.run("ip", "-4", "addr", "show", "dev", "eth0").strip() == ""
    ipv4 = udpprobe.start_agent(v6_lab.lab, host.ns, family=4)
    assert ipv4.send(v6_lab.hub.primary_ip, 3478, "v4") == "ENETUNREACH"
    hub = _hub_agent(v6_lab, 6)
    ipv6 = udpprobe.start_agent(v6_lab.lab, host.ns, family=6)
    assert ipv6.send(HUB_PRIMARY6, hub.port, "v6") is None
    assert hub.receive(2) == (_global(host), ipv6.port, "v6")


def test_a_dual_stack_site_is_natted_on_ipv4_and_firewalled_on_ipv6(v6_lab: Network) -> None:
    nat, host = _site(v6_lab, 3)
    assert (nat.kind, nat.ipv6, nat.has_ipv4) == ("port", "firewall", True)
    assert host.ip.startswith("10.")
    hub4 = _hub_agent(v6_lab, 4)
    hub6 = _hub_agent(v6_lab, 6)
    agent4 = udpprobe.start_agent(v6_lab.lab, host.ns, family=4)
    agent6 = udpprobe.start_agent(v6_lab.lab, host.ns, family=6)
    assert agent4.send(v6_lab.hub.primary_ip, hub4.port, "v4") is None
    got4 = hub4.receive(2)
    assert got4 is not None
    assert got4[0] == nat.public_ip
    assert agent6.send(HUB_PRIMARY6, hub6.port, "v6") is None
    assert hub6.receive(2) == (_global(host), agent6.port, "v6")
    # Unsolicited IPv6 from the internet is dropped here too.
    hub6_other = _hub_agent(v6_lab, 6)
    assert hub6_other.send(_global(host), agent6.port, "unsolicited") is None
    assert agent6.receive(0.5) is None


def test_block_udp_drops_outgoing_ipv6_udp(v6_lab: Network) -> None:
    _, host = _site(v6_lab, 4)
    hub = _hub_agent(v6_lab, 6)
    agent = udpprobe.start_agent(v6_lab.lab, host.ns, family=6)
    assert agent.send(HUB_PRIMARY6, hub.port, "blocked") is None
    assert hub.receive(0.5) is None


def test_the_hub_is_dual_stack_by_default_and_ipv6_only_on_request() -> None:
    require_root_and(*LAB_BINARIES)
    with build([NatSpec("firewall", hosts=0)]) as net:
        assert net.hub.stack == "dual"
        assert net.hub.address_pairs == [
            ("203.0.113.1", "203.0.113.2"),
            ("2001:db8::1", "2001:db8::2"),
        ]
    with build([NatSpec("firewall", hosts=0)], hub="ipv6") as net:
        assert net.hub.address_pairs == [("2001:db8::1", "2001:db8::2")]
        assert net.hub.primary_ip == "2001:db8::1"
        assert net.hub.ns.run("ip", "-4", "addr", "show", "dev", "wan0").strip() == ""


def test_bad_ipv6_specs_are_refused_with_a_reason() -> None:
    with pytest.raises(LabError, match="behind a NAT is IPv4 only"):
        NatSpec("port", ipv6="firewall", behind=NatSpec("full"))
    with pytest.raises(LabError, match="unknown IPv6 kind 'nat64'"):
        NatSpec("port", ipv6="nat64")
    with pytest.raises(LabError, match="need a hub with IPv6"):
        build(["firewall"], hub="ipv4")
    with pytest.raises(LabError, match="unknown hub stack"):
        build(["port"], hub="ipx")


def test_teardown_of_an_ipv6_lab_leaves_nothing() -> None:
    require_root_and(*LAB_BINARIES)
    prefix = "pt" + secrets.token_hex(2)

    def state() -> tuple[str, str, str]:
        links = "\n".join(line for line in run(["ip", "-o", "link"]).splitlines() if prefix in line)
        return links, run(["nft", "list", "ruleset"]), run(["ip", "-6", "route"])

    before = state()
    rules: list[str] = []

    def failing_test_body() -> None:
        with build(V6_SPECS[:4], prefix=prefix) as net:
            rules.extend(nat.ns.run("nft", "list", "ruleset") for nat in net.nats)
            assert len(leftover_namespaces(prefix)) == 2 + 4 + 4  # wan, hub, routers, hosts
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_test_body()
    assert all("table ip6 ptfw" in ruleset for ruleset in rules)
    assert ["table ip ptnat" in ruleset for ruleset in rules] == [False, False, False, True]
    assert leftover_namespaces(prefix) == []
    assert state() == before


# --- punchtrio itself on IPv6 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stun_servers(
    _v6_lab: Network, tmp_path_factory: pytest.TempPathFactory
) -> tuple[discovery.Server, discovery.Server]:
    """``punchtrio stun-server`` on the hub's IPv4 pair (5478/5479) and IPv6 pair (5488/5489)."""
    logs = tmp_path_factory.mktemp("stun6")
    return (
        discovery.start_punchtrio_stun(_v6_lab, 5478, 5479, logs / "stun4.log"),
        discovery.start_punchtrio_stun(_v6_lab, 5488, 5489, logs / "stun6.log", family=6),
    )


def _nat_report(host: Host, *servers: discovery.Server) -> dict[str, object]:
    stuns = [arg for server in servers for arg in ("--stun", server.endpoint)]
    argv = host.ns.exec(*discovery.PUNCHTRIO, "nat", *stuns, "--json", "--timeout", "1")
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert isinstance(report, dict)
    return report


def test_punchtrio_nat_reports_the_ipv6_side_of_each_site(
    v6_lab: Network, stun_servers: tuple[discovery.Server, discovery.Server]
) -> None:
    stun4, stun6 = stun_servers
    (_, firewalled), (nat66, behind_nat66) = _site(v6_lab, 0), _site(v6_lab, 2)
    dual_nat, dual = _site(v6_lab, 3)
    # An IPv6-only host: the whole report is about IPv6; no translation, port-dependent filter.
    report = _nat_report(firewalled, stun6)
    ipv6 = report["ipv6"]
    assert isinstance(ipv6, dict)
    assert ipv6["tested"] is True, ipv6
    assert ipv6["public_endpoint"] == ipv6["local_endpoint"]
    assert str(ipv6["public_endpoint"]).startswith(f"[{_global(firewalled)}]:")
    assert (ipv6["translation"], ipv6["address_changed"]) == ("none", False)
    assert (ipv6["filtering"], ipv6["unsolicited_inbound"]) == ("address-and-port-dependent", False)
    # NAT66: the server sees the router's address; the port is kept.
    ipv6 = _nat_report(behind_nat66, stun6)["ipv6"]
    assert isinstance(ipv6, dict)
    assert str(ipv6["public_endpoint"]).startswith(f"[{nat66.public_ip6}]:")
    assert (ipv6["address_changed"], ipv6["port_changed"]) == (True, False)
    assert ipv6["translation"] != "none"
    assert ipv6["unsolicited_inbound"] is False
    # Dual stack: the RFC 5780 report is the IPv4 NAT's, the IPv6 side untranslated.
    report = _nat_report(dual, stun4, stun6)
    assert str(report["public_endpoint"]).startswith(f"{dual_nat.public_ip}:")
    assert report["mapping"] == "endpoint-independent"
    ipv6 = report["ipv6"]
    assert isinstance(ipv6, dict)
    assert str(ipv6["public_endpoint"]).startswith(f"[{_global(dual)}]:")
    assert ipv6["translation"] == "none"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*discovery.PUNCHTRIO, *args], capture_output=True, text=True, check=False, timeout=30
    )


def _assert_direct_over_ipv6(pair: LivePair) -> None:
    """Both sides connected directly, each to the other's IPv6 internet address (its own global
    one, or its NAT66 router's)."""
    assert pair.result.seconds is not None, pair.result.stderr
    for name, peer in ((pair.names[0], pair.b), (pair.names[1], pair.a)):
        event = pair.result.connected(name)
        assert event is not None, (name, pair.events[name])
        assert event["path"] == "direct", event
        assert str(event["endpoint"]).startswith(f"[{peer.internet_ip6}]:"), event
    assert pair.ping(3) == 3


@pytest.mark.parametrize("stack", ["dual", "ipv6"])
def test_two_ipv6_only_up_peers_connect_directly_and_ping(stack: str) -> None:
    require_root_and(*UP_BINARIES)
    specs = [NatSpec("firewall"), NatSpec("firewall")]
    with tempfile.TemporaryDirectory(prefix="pt-v6-") as tmp, build(specs, hub=stack) as net:
        start_hub(net, Path(tmp) / "hub.log")
        a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
        ifaces = (f"{net.lab.prefix}ta", f"{net.lab.prefix}tb")
        with running_pair(net, "v6", a, b, Path(tmp), interfaces=ifaces) as pair:
            _assert_direct_over_ipv6(pair)
            shown = _cli("status", "--json", ifaces[0])
            assert shown.returncode == 0, shown.stderr
            (peer,) = json.loads(shown.stdout)["peers"]
            assert (peer["name"], peer["path"], peer["connected"]) == ("v6-b", "direct", True)
            assert peer["endpoint"].startswith(f"[{_global(b)}]:")
            text = _cli("status", ifaces[1])
            assert text.returncode == 0, text.stderr
            assert f"v6-a  direct [{_global(a)}]:" in text.stdout
        assert pair.result.returncodes == {"v6-a": 0, "v6-b": 0}


def test_dual_stack_peers_behind_symmetric_nats_get_direct_over_ipv6() -> None:
    require_root_and(*UP_BINARIES)
    specs = [NatSpec("sym", ipv6="firewall"), NatSpec("sym", ipv6="firewall")]
    with tempfile.TemporaryDirectory(prefix="pt-v6-") as tmp, build(specs) as net:
        start_hub(net, Path(tmp) / "hub.log")
        a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
        ifaces = (f"{net.lab.prefix}ta", f"{net.lab.prefix}tb")
        with running_pair(net, "sy", a, b, Path(tmp), interfaces=ifaces) as pair:
            _assert_direct_over_ipv6(pair)
        assert pair.result.returncodes == {"sy-a": 0, "sy-b": 0}


@pytest.mark.parametrize(
    "first",
    [NatSpec("nat66"), NatSpec("sym", ipv6="firewall")],
    ids=["nat66", "dual-stack-sym"],
)
def test_an_ipv6_only_peer_meets_a_nat66_or_dual_stack_peer_directly(first: NatSpec) -> None:
    require_root_and(*UP_BINARIES)
    specs = [first, NatSpec("firewall")]
    with tempfile.TemporaryDirectory(prefix="pt-v6-") as tmp, build(specs) as net:
        start_hub(net, Path(tmp) / "hub.log")
        a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
        ifaces = (f"{net.lab.prefix}ta", f"{net.lab.prefix}tb")
        with running_pair(net, "mx", a, b, Path(tmp), interfaces=ifaces) as pair:
            _assert_direct_over_ipv6(pair)
        assert pair.result.returncodes == {"mx-a": 0, "mx-b": 0}


def test_an_ipv6_only_peer_whose_network_drops_udp_is_relayed_over_ipv6() -> None:
    """A firewalled IPv6-only site that drops all outgoing UDP, and one that does not, at a
    dual-stack hub relaying on both families: the blocked side binds at the relay's IPv6 address
    over TCP, the other over UDP, and the tunnel carries pings."""
    require_root_and(*UP_BINARIES)
    specs = [NatSpec("firewall", block_udp=True), NatSpec("firewall")]
    with tempfile.TemporaryDirectory(prefix="pt-v6-") as tmp, build(specs) as net:
        start_hub(net, Path(tmp) / "hub.log")
        a, b = net.requested[0].hosts[0], net.requested[1].hosts[0]
        with running_pair(net, "rl", a, b, Path(tmp)) as pair:
            assert pair.result.seconds is not None, pair.result.stderr
            relay = f"[{HUB_PRIMARY6}]:7778"
            for name, transport in (("rl-a", "hub/tcp"), ("rl-b", "hub/udp")):
                event = pair.result.connected(name)
                assert event is not None, (name, pair.events[name])
                assert (event["path"], event["relay"], event["endpoint"]) == (
                    "relay",
                    transport,
                    relay,
                ), event
            assert pair.ping(3) == 3
        assert pair.result.returncodes == {"rl-a": 0, "rl-b": 0}
