"""NAT topologies built from network namespaces, bridges and nftables, torn down reliably.

The one builder of the NAT lab: the repository's ``labs.topology`` (the lab tests, scenarios and
benchmarks) re-exports it, and ``punchtrio demo`` builds its root lab with it, so the demo's NATs
are the lab's kinds. Public through :mod:`punchtrio.natlab`.

``build(["full", "sym"])`` is a context manager that yields a :class:`Network`:

- a ``wan`` namespace holding the bridge ``br0``, the lab's whole "internet" (``203.0.113.0/24``);
- a ``hub`` namespace on that bridge with two public addresses, ``203.0.113.1`` (primary) and
  ``203.0.113.2`` (alternate), for RFC 5780 servers;
- per NAT a namespace with ``wan0`` on the wan bridge (``203.0.113.11``, ``.12``, ...) and a LAN bridge
  ``lan0`` (``10.N.0.1/24``), an nftables table implementing its kind, and host namespaces on that LAN
  (``10.N.0.11``, ``.12``, ...) whose default route is the NAT.

NAT kinds, by RFC 4787 behaviour (the first four are the classic "cone" and symmetric NATs):

======  ==========================  ==========================  ====================================
kind    mapping                     filtering                   nftables
======  ==========================  ==========================  ====================================
full    endpoint-independent        endpoint-independent        masquerade; inbound UDP DNAT through
                                                                the mapping table
addr    endpoint-independent        address-dependent           as ``full``, only from remote
                                                                addresses the mapping has sent to
port    endpoint-independent        address-and-port-dependent  plain masquerade (conntrack filters)
sym     address-and-port-dependent  address-and-port-dependent  masquerade fully-random
addr-   address-dependent           address-dependent           as ``addr``, a new external port per
map                                                             remote address
======  ==========================  ==========================  ====================================

Every table records, after source NAT, which internal endpoint owns each external UDP port (the
dynamic map ``@mapping``) and which remote addresses each external port has sent to (``@contacted``).
``full``, ``addr`` and ``addr-map`` forward inbound datagrams through that map; ``hairpin=True`` forwards datagrams
that hosts send to the NAT's own public address the same way, with the sender's public mapping as
source. Without hairpinning such datagrams are dropped. Unsolicited inbound UDP is always dropped
silently (no ICMP), like a consumer NAT.

IPv6 (:data:`IPV6_KINDS`): ``NatSpec("firewall")`` is an IPv6-only site whose LAN is a global
``2001:db8:N::/64`` routed through its router, where a stateful firewall (:func:`nft6_ruleset`,
table ``ip6 ptfw``) lets out what the LAN sends and in only the replies; ``NatSpec("nat66")`` adds
masquerading of a unique-local ``fd00:db8:N::/64`` LAN; ``NatSpec(kind, ipv6="firewall")`` makes
an IPv4 site dual-stack. The wan bridge also carries ``2001:db8::/64`` (hub ``::1`` and ``::2``,
routers ``::11``, ...), the hub is dual-stack (or IPv6-only: ``build(..., hub="ipv6")``), and
every namespace on the IPv6 internet has a route to each firewalled site's /64 through its router.
Duplicate address detection is off, so every address is usable at once.

Everything lives in namespaces, so deleting the namespaces removes every interface, nftables table
and conntrack entry; :func:`cleanup` removes the leftovers of a crashed run by prefix.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .._netns import Lab, LabError, Namespace, require_binaries, run

KINDS = ("full", "addr", "port", "sym", "addr-map")
"""The IPv4 NAT kinds :func:`build` knows, in the order of the table above."""

IPV6_KINDS = ("firewall", "nat66")
"""The IPv6 kinds of a site: ``firewall`` (global prefix, stateful firewall, no translation) and
``nat66`` (unique-local LAN masqueraded to the router's address, behind the same firewall)."""

HUB_STACKS = ("ipv4", "dual", "ipv6")
"""The hub's address families :func:`build` accepts (``hub=``)."""

EXPECTED = {
    "full": ("endpoint-independent", "endpoint-independent"),
    "addr": ("endpoint-independent", "address-dependent"),
    "port": ("endpoint-independent", "address-and-port-dependent"),
    "sym": ("address-and-port-dependent", "address-and-port-dependent"),
    "addr-map": ("address-dependent", "address-dependent"),
}
"""For each kind, its RFC 4787 (mapping, filtering) behaviour, spelled as ``punchtrio nat --json``."""

REQUIRED_BINARIES = ("ip", "nft", "conntrack", "sysctl")
"""The programs :func:`build` needs on PATH (iproute2, nftables, conntrack, procps)."""

WAN_NET = ipaddress.IPv4Network("203.0.113.0/24")
"""The lab's internet: every public address (hub, NATs on the wan bridge) is in it."""
HUB_PRIMARY = "203.0.113.1"
"""The hub's primary address (RFC 5780's primary; a STUN server listens on it)."""
HUB_ALTERNATE = "203.0.113.2"
"""The hub's alternate address (RFC 5780's alternate)."""
WAN6_NET = ipaddress.IPv6Network("2001:db8::/64")
"""The lab's IPv6 internet (the wan bridge): the hub's and every IPv6 router's outside address."""
HUB_PRIMARY6 = "2001:db8::1"
"""The hub's primary IPv6 address (a STUN server listens on it)."""
HUB_ALTERNATE6 = "2001:db8::2"
"""The hub's alternate IPv6 address (RFC 5780's alternate)."""
_FIRST_NAT_WAN_HOST = 11
_FIRST_LAN_HOST = 11
# Longer than conntrack's UDP stream timeout (120 s): a binding outlives the flows that use it.
_MAPPING_TIMEOUT_S = 180
_BRIDGE_NF_CALL_IPTABLES = "/proc/sys/net/bridge/bridge-nf-call-iptables"
_BRIDGE_NF_CALL_IP6TABLES = "/proc/sys/net/bridge/bridge-nf-call-ip6tables"


@dataclass(frozen=True)
class NatSpec:
    """What :func:`build` should make: one NAT of ``kind`` with ``hosts`` host namespaces behind it.

    ``kind`` is an IPv4 NAT kind (:data:`KINDS`), or an IPv6 kind (:data:`IPV6_KINDS`) for an
    IPv6-only site (no IPv4 at all on its router and hosts). ``ipv6`` (default ``None``: IPv4
    only) makes an IPv4 site dual-stack with that IPv6 kind: ``NatSpec("sym", ipv6="firewall")``.
    ``hairpin`` makes the NAT forward datagrams its hosts send to its own public address (RFC 4787
    hairpinning; IPv4 only). ``block_udp`` makes it drop every UDP datagram its hosts send out, of
    both families (a guest or corporate network that lets only TCP through). ``behind`` puts this
    NAT on the LAN of another NAT (a NAT behind a NAT) instead of on the wan bridge; that outer NAT
    is built too and gets ``behind.hosts`` hosts of its own (IPv4 only). Raises :class:`LabError`
    for an unknown kind, ``hosts < 0``, or IPv6 with ``behind``.
    """

    kind: str
    hosts: int = 1
    hairpin: bool = False
    behind: NatSpec | None = None
    block_udp: bool = False
    ipv6: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS + IPV6_KINDS:
            known = ", ".join(KINDS + IPV6_KINDS)
            raise LabError(f"unknown NAT kind {self.kind!r}; known: {known}")
        if self.kind in IPV6_KINDS:
            if self.ipv6 not in (None, self.kind):
                raise LabError(f"an IPv6-only {self.kind!r} site cannot have ipv6={self.ipv6!r}")
            object.__setattr__(self, "ipv6", self.kind)
        elif self.ipv6 is not None and self.ipv6 not in IPV6_KINDS:
            raise LabError(f"unknown IPv6 kind {self.ipv6!r}; known: {', '.join(IPV6_KINDS)}")
        if self.hosts < 0:
            raise LabError("a NAT needs hosts >= 0")
        if self.behind is not None and (self.ipv6, self.behind.ipv6) != (None, None):
            raise LabError("a NAT behind a NAT is IPv4 only")


@dataclass
class Host:
    """A host namespace on a NAT's LAN.

    ``ip`` is its private IPv4 address (on an IPv6-only site: its IPv6 address); ``ip6`` its
    IPv6 address (global on a ``firewall`` site, unique-local on a ``nat66`` one; ``None``
    without IPv6).
    """

    name: str
    ns: Namespace
    ip: str
    nat: Nat
    ip6: str | None = None

    @property
    def internet_ip6(self) -> str | None:
        """The IPv6 address the hub sees for this host: its own on a ``firewall`` site, the
        router's on a ``nat66`` one, ``None`` without IPv6."""
        if self.nat.ipv6 == "nat66":
            return self.nat.public_ip6
        return self.ip6


@dataclass
class Nat:
    """A NAT namespace: ``public_ip`` on its outside (``wan0``), ``lan_ip`` the LAN's gateway.

    On an IPv6-only site (``kind`` in :data:`IPV6_KINDS`) ``public_ip``, ``lan_ip`` and
    ``lan_net`` hold the IPv6 ones. ``ipv6`` is the site's IPv6 kind (``None``: IPv4 only);
    ``public_ip6`` is the router's address on the IPv6 internet, ``lan_ip6`` its LAN address (the
    hosts' gateway) and ``lan_net6`` the LAN's /64.
    """

    name: str
    kind: str
    ns: Namespace
    public_ip: str
    lan_ip: str
    lan_net: ipaddress.IPv4Network | ipaddress.IPv6Network
    hairpin: bool
    hosts: list[Host] = field(default_factory=list)
    outer: Nat | None = None
    block_udp: bool = False
    ipv6: str | None = None
    public_ip6: str | None = None
    lan_ip6: str | None = None
    lan_net6: ipaddress.IPv6Network | None = None

    @property
    def has_ipv4(self) -> bool:
        """Whether the site has IPv4 (every kind but the IPv6-only ones)."""
        return self.kind in KINDS

    @property
    def internet_ip(self) -> str:
        """The address the hub sees for this NAT's hosts: the outermost NAT's ``public_ip``.

        On IPv4; on IPv6 see :attr:`Host.internet_ip6` (a ``firewall`` site's hosts are seen at
        their own addresses)."""
        return self.outer.internet_ip if self.outer is not None else self.public_ip

    def conntrack(self) -> str:
        """Return this NAT's UDP conntrack table (``conntrack -L -p udp``, IPv4 then IPv6), for
        debugging."""
        table = self.ns.run("conntrack", "-L", "-p", "udp", check=False)
        if self.ipv6 is not None:
            table += self.ns.run("conntrack", "-L", "-f", "ipv6", "-p", "udp", check=False)
        return table

    def flush_conntrack(self) -> None:
        """Forget every UDP mapping and filter state (conntrack entries of both families and the
        nftables sets), as after a reboot."""
        self.ns.run("conntrack", "-F", check=False)
        if self.ipv6 is not None:
            self.ns.run("conntrack", "-F", "-f", "ipv6", check=False)
        if self.has_ipv4:
            sets = ("map ip ptnat mapping", "map ip ptnat owned", "set ip ptnat contacted")
            self.ns.run("nft", "-f", "-", input="".join(f"flush {name}\n" for name in sets))


@dataclass
class Hub:
    """The public server namespace with two addresses per family (RFC 5780 primary and alternate).

    ``stack`` (one of :data:`HUB_STACKS`) says which families it has. ``primary_ip`` and
    ``alternate_ip`` are its IPv4 addresses, or on an ``ipv6`` hub (no IPv4 at all) its IPv6
    ones; ``primary_ip6`` and ``alternate_ip6`` are its IPv6 addresses (``None`` on an ``ipv4``
    hub).
    """

    ns: Namespace
    primary_ip: str = HUB_PRIMARY
    alternate_ip: str = HUB_ALTERNATE
    stack: str = "ipv4"
    primary_ip6: str | None = None
    alternate_ip6: str | None = None

    @property
    def address_pairs(self) -> list[tuple[str, str]]:
        """The hub's (primary, alternate) address pair of each family it has, IPv4 first."""
        pairs = []
        if self.stack != "ipv6":
            pairs.append((self.primary_ip, self.alternate_ip))
        if self.primary_ip6 is not None and self.alternate_ip6 is not None:
            pairs.append((self.primary_ip6, self.alternate_ip6))
        return pairs


@dataclass
class Network:
    """A built topology.

    ``nats`` lists every NAT, outer ones included, in build order; ``requested`` holds the NAT built
    for each entry given to :func:`build`, in that order.
    """

    lab: Lab
    wan: Namespace
    hub: Hub
    nats: list[Nat]
    requested: list[Nat]

    @property
    def hosts(self) -> list[Host]:
        """Every host namespace, in build order."""
        return [host for nat in self.nats for host in nat.hosts]

    def flush_conntrack(self) -> None:
        """Forget every NAT's mappings and filter state, so the next probe starts from nothing."""
        for nat in self.nats:
            nat.flush_conntrack()


def build(
    nats: Sequence[str | NatSpec],
    *,
    prefix: str | None = None,
    stop_timeout: float = 5.0,
    hub: str | None = None,
) -> contextlib.AbstractContextManager[Network]:
    """Build a topology with one NAT per entry of ``nats`` (a kind name or a :class:`NatSpec`).

    ``hub`` is the hub's stack, one of :data:`HUB_STACKS` (default ``None``: ``dual`` when some
    site has IPv6, else ``ipv4``); an IPv6-only site needs a hub with IPv6.

    Returns a context manager yielding the :class:`Network`; on exit (even after an exception, also
    one raised while building) every process the lab spawned is stopped and every namespace deleted.
    ``prefix`` overrides the random namespace prefix (``pt`` + 4 hex digits); ``stop_timeout`` is
    how long, in seconds (default 5), each process :meth:`Lab.spawn` started gets after SIGTERM
    before SIGKILL. Needs root and :data:`REQUIRED_BINARIES`; raises :class:`LabError` otherwise,
    for an unknown ``hub`` stack, or if a command fails (its message names the command and its
    stderr).
    """
    specs = [NatSpec(item) if isinstance(item, str) else item for item in nats]
    if hub is None:
        hub = "dual" if any(spec.ipv6 is not None for spec in specs) else "ipv4"
    if hub not in HUB_STACKS:
        raise LabError(f"unknown hub stack {hub!r}; known: {', '.join(HUB_STACKS)}")
    if hub == "ipv4" and any(spec.ipv6 is not None for spec in specs):
        raise LabError("IPv6 sites need a hub with IPv6 (hub='dual' or 'ipv6')")
    return _built(specs, prefix, stop_timeout, hub)


@contextlib.contextmanager
def _built(
    specs: list[NatSpec], prefix: str | None, stop_timeout: float, hub: str
) -> Iterator[Network]:
    if prefix is None:
        lab = Lab(stop_timeout=stop_timeout)
    else:
        lab = Lab(prefix=prefix, stop_timeout=stop_timeout)
    with lab:
        require_binaries(*REQUIRED_BINARIES)
        yield _Builder(lab).network(specs, hub)


@contextlib.contextmanager
def udp_blocked_between(net: Network, a: Nat, b: Nat) -> Iterator[None]:
    """Drop every UDP datagram between the internet addresses of NATs ``a`` and ``b``, both ways,
    while the context is open: a path between two peers that is blocked, then opens.

    The rule sits on the lab's internet (a ``bridge`` table in the ``wan`` namespace, so it drops
    what crosses the bridge and leaves both NATs' state alone); traffic with the hub and every
    other NAT passes. Both families are blocked where both sites have them (on IPv6, a
    ``firewall`` site's whole global /64: its hosts use their own addresses). Leaving the
    context deletes the rule. Raises :class:`LabError` if ``nft`` fails.
    """
    table = f"ptblock_{a.name}_{b.name}"
    rules = []
    if a.has_ipv4 and b.has_ipv4:
        rules += [("ip", a.internet_ip, b.internet_ip), ("ip", b.internet_ip, a.internet_ip)]
    first6, second6 = _internet6(a), _internet6(b)
    if first6 is not None and second6 is not None:
        rules += [("ip6", first6, second6), ("ip6", second6, first6)]
    lines = "\n".join(
        f"    {family} saddr {source} {family} daddr {dest} meta l4proto udp drop"
        for family, source, dest in rules
    )
    net.wan.run(
        "nft",
        "-f",
        "-",
        input=f"""\
table bridge {table} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
{lines}
  }}
}}
""",
    )
    try:
        yield
    finally:
        net.wan.run("nft", "delete", "table", "bridge", table)


def _internet6(nat: Nat) -> str | None:
    """What a site's IPv6 traffic comes from on the internet: a ``firewall`` site's /64, a
    ``nat66`` router's address, ``None`` without IPv6."""
    if nat.ipv6 == "firewall":
        return str(nat.lan_net6)
    return nat.public_ip6


def cleanup(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix + "-"``, killing its processes first.

    For leftovers of a run that was killed before it could tear down. Returns the deleted names.
    Use a full lab prefix (``pt1a2b``): other labs may be running on the same machine.
    """
    if len(prefix) < 2:
        raise LabError("refusing to clean up with a prefix shorter than 2 characters")
    out = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]
    for name in names:
        for pid in run(["ip", "netns", "pids", name], check=False).split():
            run(["kill", "-KILL", pid], check=False)
        run(["ip", "netns", "del", name], check=False)
    return names


class _Builder:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.next_nat = 1
        self.next_wan_host = _FIRST_NAT_WAN_HOST
        self.nats: list[Nat] = []
        self.lan_next: dict[str, int] = {}

    def network(self, specs: list[NatSpec], stack: str) -> Network:
        wan = self.lab.namespace("wan")
        _bridges_skip_netfilter(wan)
        wan.run("ip", "link", "add", "br0", "type", "bridge")
        wan.run("ip", "link", "set", "br0", "up")
        self.wan = wan
        hub_ns = self.lab.namespace("hub")
        if stack != "ipv4":
            _no_dad(hub_ns)
        self._bridge_port(hub_ns, "wan0", wan, "br0", "hub")
        hub = Hub(hub_ns, stack=stack)
        if stack != "ipv6":
            for address in (HUB_PRIMARY, HUB_ALTERNATE):
                hub_ns.run("ip", "addr", "add", f"{address}/{WAN_NET.prefixlen}", "dev", "wan0")
        if stack != "ipv4":
            for address in (HUB_PRIMARY6, HUB_ALTERNATE6):
                _add6(hub_ns, f"{address}/{WAN6_NET.prefixlen}", "wan0")
            hub.primary_ip6, hub.alternate_ip6 = HUB_PRIMARY6, HUB_ALTERNATE6
        if stack == "ipv6":
            hub.primary_ip, hub.alternate_ip = HUB_PRIMARY6, HUB_ALTERNATE6
        requested = [self._nat(spec) for spec in specs]
        self._route_ipv6_sites(hub_ns)
        return Network(self.lab, wan, hub, self.nats, requested)

    def _route_ipv6_sites(self, hub_ns: Namespace) -> None:
        """The IPv6 internet's routing: every namespace on it (the hub, each IPv6 router) reaches
        each ``firewall`` site's global /64 through that site's router, as if announced by BGP."""
        routers = [nat for nat in self.nats if nat.ipv6 is not None]
        for site in routers:
            if site.ipv6 != "firewall":
                continue  # a nat66 LAN is unique-local: never routed on the internet
            for ns in [hub_ns, *(nat.ns for nat in routers if nat is not site)]:
                ns.run("ip", "-6", "route", "add", str(site.lan_net6), "via", str(site.public_ip6))

    def _bridge_port(
        self, ns: Namespace, ifname: str, bridge_ns: Namespace, bridge: str, port: str
    ) -> None:
        self.lab.veth(ns, ifname, bridge_ns, port)
        bridge_ns.run("ip", "link", "set", port, "master", bridge)

    def _nat(self, spec: NatSpec) -> Nat:
        outer = self._nat(spec.behind) if spec.behind is not None else None
        index = self.next_nat
        self.next_nat += 1
        name = f"nat{index}"
        ns = self.lab.namespace(name)
        ipv4 = spec.kind in KINDS
        if ipv4:
            _sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0")
        if spec.ipv6 is not None:
            _no_dad(ns)
        _bridges_skip_netfilter(ns)
        wan_host = self.next_wan_host
        if outer is None:
            self.next_wan_host += 1
            self._bridge_port(ns, "wan0", self.wan, "br0", name)
            public_ip = str(WAN_NET[wan_host])
        else:
            public_ip = self._lan_address(outer)
            self._bridge_port(ns, "wan0", outer.ns, "lan0", name)
            ns.run("ip", "addr", "add", f"{public_ip}/{outer.lan_net.prefixlen}", "dev", "wan0")
            ns.run("ip", "route", "add", "default", "via", outer.lan_ip)
        ns.run("ip", "link", "add", "lan0", "type", "bridge")
        ns.run("ip", "link", "set", "lan0", "up")
        if spec.ipv6 is not None:  # after wan0 and lan0 exist: "all" reaches every interface
            _sysctl(ns, "net.ipv6.conf.all.forwarding=1")
        public_ip6 = lan_ip6 = None
        lan_net6: ipaddress.IPv6Network | None = None
        if spec.ipv6 is not None:
            # Written so the site's numbers read as in IPv4: router 2001:db8::11, LAN
            # 2001:db8:1::/64 (nat66: fd00:db8:1::/64), gateway ::1, hosts ::11, ::12.
            public_ip6 = str(ipaddress.IPv6Address(f"{WAN6_NET.network_address}{wan_host}"))
            _add6(ns, f"{public_ip6}/{WAN6_NET.prefixlen}", "wan0")
            head = "2001:db8" if spec.ipv6 == "firewall" else "fd00:db8"
            lan_net6 = ipaddress.IPv6Network(f"{head}:{index}::/64")
            lan_ip6 = str(lan_net6[1])
            _add6(ns, f"{lan_ip6}/64", "lan0")
        lan_net: ipaddress.IPv4Network | ipaddress.IPv6Network
        if ipv4:
            if outer is None:
                ns.run("ip", "addr", "add", f"{public_ip}/{WAN_NET.prefixlen}", "dev", "wan0")
            lan_net = ipaddress.IPv4Network(f"10.{index}.0.0/24")
            lan_ip = str(lan_net[1])
            ns.run("ip", "addr", "add", f"{lan_ip}/{lan_net.prefixlen}", "dev", "lan0")
        else:
            assert public_ip6 is not None
            assert lan_ip6 is not None
            assert lan_net6 is not None
            public_ip, lan_ip, lan_net = public_ip6, lan_ip6, lan_net6
        nat = Nat(
            name,
            spec.kind,
            ns,
            public_ip,
            lan_ip,
            lan_net,
            spec.hairpin,
            outer=outer,
            block_udp=spec.block_udp,
            ipv6=spec.ipv6,
            public_ip6=public_ip6,
            lan_ip6=lan_ip6,
            lan_net6=lan_net6,
        )
        self.lan_next[name] = _FIRST_LAN_HOST
        if ipv4:
            ns.run("nft", "-f", "-", input=nft_ruleset(nat))
        if spec.ipv6 is not None:
            ns.run("nft", "-f", "-", input=nft6_ruleset(nat))
        self.nats.append(nat)
        for number in range(1, spec.hosts + 1):
            host_name = f"h{index}{chr(ord('a') + number - 1)}" if spec.hosts > 1 else f"h{index}"
            host_ns = self.lab.namespace(host_name)
            if spec.ipv6 is not None:
                _no_dad(host_ns)
            host_number = self.lan_next[name]
            self.lan_next[name] = host_number + 1
            self._bridge_port(host_ns, "eth0", ns, "lan0", host_name)
            host_ip6 = None
            if lan_net6 is not None and lan_ip6 is not None:
                host_ip6 = str(ipaddress.IPv6Address(f"{lan_net6.network_address}{host_number}"))
                _add6(host_ns, f"{host_ip6}/64", "eth0")
                host_ns.run("ip", "-6", "route", "add", "default", "via", lan_ip6)
            if ipv4:
                host_ip = str(lan_net[host_number])
                host_ns.run("ip", "addr", "add", f"{host_ip}/{lan_net.prefixlen}", "dev", "eth0")
                host_ns.run("ip", "route", "add", "default", "via", lan_ip)
            else:
                assert host_ip6 is not None
                host_ip = host_ip6
            nat.hosts.append(Host(host_name, host_ns, host_ip, nat, ip6=host_ip6))
        return nat

    def _lan_address(self, nat: Nat) -> str:
        number = self.lan_next[nat.name]
        self.lan_next[nat.name] = number + 1
        return str(nat.lan_net[number])


def _no_dad(ns: Namespace) -> None:
    """Skip duplicate address detection in ``ns``, so addresses (link-local ones too) are usable
    at once instead of "tentative" for a second or more: nobody else shares a lab's LAN."""
    _sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")


def _add6(ns: Namespace, cidr: str, dev: str) -> None:
    ns.run("ip", "-6", "addr", "add", cidr, "dev", dev, "nodad")


def _sysctl(ns: Namespace, *settings: str) -> None:
    ns.run("sysctl", "-q", "-w", *settings)


def _bridges_skip_netfilter(ns: Namespace) -> None:
    """Keep bridged frames out of netfilter (only the NAT's routed packets are translated).

    The setting exists only while the ``br_netfilter`` module is loaded; without it bridged
    frames never reach netfilter anyway, so its absence is no error (a fresh machine running
    ``punchtrio demo`` from a wheel often lacks the module).
    """
    if os.path.exists(_BRIDGE_NF_CALL_IPTABLES):  # the module is global, its setting per netns
        _sysctl(ns, "net.bridge.bridge-nf-call-iptables=0")
    if os.path.exists(_BRIDGE_NF_CALL_IP6TABLES):
        _sysctl(ns, "net.bridge.bridge-nf-call-ip6tables=0")


def nft_ruleset(nat: Nat) -> str:
    """Return the nftables ruleset (table ``ip ptnat``) that makes ``nat`` behave as its kind.

    The NAT's binding table is kept in three dynamic sets, refreshed by outbound traffic and
    forgotten after ``_MAPPING_TIMEOUT_S`` idle seconds: ``@mapping`` (external port -> internal
    endpoint), ``@owned`` (internal endpoint -> external endpoint) and ``@contacted`` (remote
    address . external port). Conntrack still does the translation and the filtering of ``port``
    and ``sym``; the sets add what masquerade lacks (see docs/lab.md).
    """
    to_wan = 'oifname "wan0" meta l4proto udp'
    hairpinned = f'oifname "lan0" ip saddr {nat.lan_net} ct status dnat'
    # The binding's owner: the internal endpoint, plus the remote address for "addr-map".
    per_address = nat.kind == "addr-map"
    owner = "ip saddr . udp sport" + (" . ip daddr" if per_address else "")
    owned = f"{owner} @owned snat ip to {owner} map @owned"
    dnat = "udp dport @mapping dnat ip to udp dport map @mapping"
    prerouting = {
        "full": [f'iifname "wan0" {dnat}'],
        "addr": [f'iifname "wan0" ip saddr . udp dport @contacted {dnat}'],
        "addr-map": [f'iifname "wan0" ip saddr . udp dport @contacted {dnat}'],
    }.get(nat.kind, [])
    if nat.kind == "sym":
        postrouting = ['oifname "wan0" masquerade fully-random']
    else:
        # An owner keeps its external endpoint, even when ports clash, and nobody else gets that
        # external port: endpoint-independent (or, for addr-map, address-dependent) mapping.
        postrouting = [
            f"{to_wan} {owned}",
            f"{to_wan} udp sport @mapping masquerade random",
            'oifname "wan0" masquerade',
        ]
    if nat.hairpin:
        prerouting.append(f'iifname "lan0" ip daddr {nat.public_ip} {dnat}')
        if nat.kind in ("full", "addr", "port"):
            postrouting.append(f"{hairpinned} {owned}")
        random = " fully-random" if nat.kind == "sym" else ""
        postrouting.append(f"{hairpinned} snat ip to {nat.public_ip}{random}")
    original = f"{to_wan} ct direction original"
    internal = "ct original ip saddr . ct original proto-src"
    record = [
        f"{original} update @mapping {{ udp sport : {internal} }}",
        f"{original} update @owned {{ {internal}{' . ip daddr' if per_address else ''} : ip saddr . udp sport }}",
        f"{to_wan} update @contacted {{ ip daddr . udp sport }}",
    ]
    lines = "\n    ".join
    timeout = f"flags dynamic, timeout; timeout {_MAPPING_TIMEOUT_S}s;"
    # Explicit types: nft 1.0.6 derives a wrong key type from ``typeof ct original proto-src``.
    endpoint = "ipv4_addr . inet_service"
    return f"""\
table ip ptnat {{
  map mapping {{ type inet_service : {endpoint}; {timeout} }}
  map owned {{ type {endpoint}{" . ipv4_addr" if per_address else ""} : {endpoint}; {timeout} }}
  set contacted {{ type {endpoint}; {timeout} }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {lines(prerouting)}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {lines(postrouting)}
  }}
  chain record {{
    type filter hook postrouting priority srcnat + 10; policy accept;
    {lines(record)}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    meta l4proto udp drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    {'iifname "lan0" meta l4proto udp drop' if nat.block_udp else ""}
  }}
}}
"""


def nft6_ruleset(nat: Nat) -> str:
    """Return the IPv6 nftables ruleset (table ``ip6 ptfw``) of ``nat``'s site (``nat.ipv6``).

    Both IPv6 kinds are a stateful firewall in the forward chain, as in a home router (RFC 6092):
    what the LAN sends out is allowed, and only replies to it (``ct state established,related``)
    come back in; a new inbound datagram is dropped silently, so a peer's datagram gets in only
    after the host has sent to that peer's address and port (address-and-port-dependent
    filtering, and hole punching works as through a ``port`` NAT). ``firewall`` translates
    nothing (the hosts' global addresses are their internet addresses); ``nat66`` also
    masquerades the unique-local LAN to the router's address (port-preserving, like
    ``port``). ``block_udp`` drops every UDP datagram the LAN sends out. The router's own input
    drops UDP from the internet, as the IPv4 table does. Raises :class:`LabError` for a NAT
    without IPv6.
    """
    if nat.ipv6 is None:
        raise LabError(f"{nat.name} has no IPv6")
    nat66 = ""
    if nat.ipv6 == "nat66":
        # The empty prerouting chain registers the NAT hook that un-translates replies.
        nat66 = """
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }"""
    blocked = '\n    iifname "lan0" meta l4proto udp drop' if nat.block_udp else ""
    return f"""\
table ip6 ptfw {{{nat66}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan0" meta l4proto udp drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop{blocked}
    iifname "lan0" oifname "wan0" accept
  }}
}}
"""
