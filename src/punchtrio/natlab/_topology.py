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
"""The NAT kinds :func:`build` knows, in the order of the table above."""

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
_FIRST_NAT_WAN_HOST = 11
_FIRST_LAN_HOST = 11
# Longer than conntrack's UDP stream timeout (120 s): a binding outlives the flows that use it.
_MAPPING_TIMEOUT_S = 180
_BRIDGE_NF_CALL_IPTABLES = "/proc/sys/net/bridge/bridge-nf-call-iptables"


@dataclass(frozen=True)
class NatSpec:
    """What :func:`build` should make: one NAT of ``kind`` with ``hosts`` host namespaces behind it.

    ``hairpin`` makes the NAT forward datagrams its hosts send to its own public address (RFC 4787
    hairpinning). ``block_udp`` makes it drop every UDP datagram its hosts send out (a guest or
    corporate network that lets only TCP through). ``behind`` puts this NAT on the LAN of another NAT (a NAT behind a NAT) instead of
    on the wan bridge; that outer NAT is built too and gets ``behind.hosts`` hosts of its own.
    """

    kind: str
    hosts: int = 1
    hairpin: bool = False
    behind: NatSpec | None = None
    block_udp: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LabError(f"unknown NAT kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.hosts < 0:
            raise LabError("a NAT needs hosts >= 0")


@dataclass
class Host:
    """A host namespace on a NAT's LAN; ``ip`` is its private address."""

    name: str
    ns: Namespace
    ip: str
    nat: Nat


@dataclass
class Nat:
    """A NAT namespace: ``public_ip`` on its outside (``wan0``), ``lan_ip`` the LAN's gateway."""

    name: str
    kind: str
    ns: Namespace
    public_ip: str
    lan_ip: str
    lan_net: ipaddress.IPv4Network
    hairpin: bool
    hosts: list[Host] = field(default_factory=list)
    outer: Nat | None = None
    block_udp: bool = False

    @property
    def internet_ip(self) -> str:
        """The address the hub sees for this NAT's hosts: the outermost NAT's ``public_ip``."""
        return self.outer.internet_ip if self.outer is not None else self.public_ip

    def conntrack(self) -> str:
        """Return this NAT's UDP conntrack table (``conntrack -L -p udp``), for debugging."""
        return self.ns.run("conntrack", "-L", "-p", "udp", check=False)

    def flush_conntrack(self) -> None:
        """Forget every UDP mapping (conntrack entries and the nftables sets), as after a reboot."""
        self.ns.run("conntrack", "-F", check=False)
        sets = ("map ip ptnat mapping", "map ip ptnat owned", "set ip ptnat contacted")
        self.ns.run("nft", "-f", "-", input="".join(f"flush {name}\n" for name in sets))


@dataclass
class Hub:
    """The public server namespace with two addresses (RFC 5780 primary and alternate)."""

    ns: Namespace
    primary_ip: str = HUB_PRIMARY
    alternate_ip: str = HUB_ALTERNATE


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
    nats: Sequence[str | NatSpec], *, prefix: str | None = None, stop_timeout: float = 5.0
) -> contextlib.AbstractContextManager[Network]:
    """Build a topology with one NAT per entry of ``nats`` (a kind name or a :class:`NatSpec`).

    Returns a context manager yielding the :class:`Network`; on exit (even after an exception, also
    one raised while building) every process the lab spawned is stopped and every namespace deleted.
    ``prefix`` overrides the random namespace prefix (``pt`` + 4 hex digits); ``stop_timeout`` is
    how long, in seconds (default 5), each process :meth:`Lab.spawn` started gets after SIGTERM
    before SIGKILL. Needs root and :data:`REQUIRED_BINARIES`; raises :class:`LabError` otherwise
    or if a command fails (its message names the command and its stderr).
    """
    specs = [NatSpec(item) if isinstance(item, str) else item for item in nats]
    return _built(specs, prefix, stop_timeout)


@contextlib.contextmanager
def _built(specs: list[NatSpec], prefix: str | None, stop_timeout: float) -> Iterator[Network]:
    if prefix is None:
        lab = Lab(stop_timeout=stop_timeout)
    else:
        lab = Lab(prefix=prefix, stop_timeout=stop_timeout)
    with lab:
        require_binaries(*REQUIRED_BINARIES)
        yield _Builder(lab).network(specs)


@contextlib.contextmanager
def udp_blocked_between(net: Network, a: Nat, b: Nat) -> Iterator[None]:
    """Drop every UDP datagram between the internet addresses of NATs ``a`` and ``b``, both ways,
    while the context is open: a path between two peers that is blocked, then opens.

    The rule sits on the lab's internet (a ``bridge`` table in the ``wan`` namespace, so it drops
    what crosses the bridge and leaves both NATs' state alone); traffic with the hub and every
    other NAT passes. Leaving the context deletes the rule. Raises :class:`LabError` if ``nft``
    fails.
    """
    table = f"ptblock_{a.name}_{b.name}"
    first, second = a.internet_ip, b.internet_ip
    net.wan.run(
        "nft",
        "-f",
        "-",
        input=f"""\
table bridge {table} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {first} ip daddr {second} meta l4proto udp drop
    ip saddr {second} ip daddr {first} meta l4proto udp drop
  }}
}}
""",
    )
    try:
        yield
    finally:
        net.wan.run("nft", "delete", "table", "bridge", table)


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

    def network(self, specs: list[NatSpec]) -> Network:
        wan = self.lab.namespace("wan")
        _bridges_skip_netfilter(wan)
        wan.run("ip", "link", "add", "br0", "type", "bridge")
        wan.run("ip", "link", "set", "br0", "up")
        self.wan = wan
        hub_ns = self.lab.namespace("hub")
        self._bridge_port(hub_ns, "wan0", wan, "br0", "hub")
        for address in (HUB_PRIMARY, HUB_ALTERNATE):
            hub_ns.run("ip", "addr", "add", f"{address}/{WAN_NET.prefixlen}", "dev", "wan0")
        requested = [self._nat(spec) for spec in specs]
        return Network(self.lab, wan, Hub(hub_ns), self.nats, requested)

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
        _sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0")
        _bridges_skip_netfilter(ns)
        if outer is None:
            public_ip = str(WAN_NET[self.next_wan_host])
            self.next_wan_host += 1
            self._bridge_port(ns, "wan0", self.wan, "br0", name)
            ns.run("ip", "addr", "add", f"{public_ip}/{WAN_NET.prefixlen}", "dev", "wan0")
        else:
            public_ip = self._lan_address(outer)
            self._bridge_port(ns, "wan0", outer.ns, "lan0", name)
            ns.run("ip", "addr", "add", f"{public_ip}/{outer.lan_net.prefixlen}", "dev", "wan0")
            ns.run("ip", "route", "add", "default", "via", outer.lan_ip)
        lan_net = ipaddress.IPv4Network(f"10.{index}.0.0/24")
        lan_ip = str(lan_net[1])
        ns.run("ip", "link", "add", "lan0", "type", "bridge")
        ns.run("ip", "addr", "add", f"{lan_ip}/{lan_net.prefixlen}", "dev", "lan0")
        ns.run("ip", "link", "set", "lan0", "up")
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
        )
        self.lan_next[name] = _FIRST_LAN_HOST
        ns.run("nft", "-f", "-", input=nft_ruleset(nat))
        self.nats.append(nat)
        for number in range(1, spec.hosts + 1):
            host_name = f"h{index}{chr(ord('a') + number - 1)}" if spec.hosts > 1 else f"h{index}"
            host_ns = self.lab.namespace(host_name)
            host_ip = self._lan_address(nat)
            self._bridge_port(host_ns, "eth0", ns, "lan0", host_name)
            host_ns.run("ip", "addr", "add", f"{host_ip}/{lan_net.prefixlen}", "dev", "eth0")
            host_ns.run("ip", "route", "add", "default", "via", lan_ip)
            nat.hosts.append(Host(host_name, host_ns, host_ip, nat))
        return nat

    def _lan_address(self, nat: Nat) -> str:
        number = self.lan_next[nat.name]
        self.lan_next[nat.name] = number + 1
        return str(nat.lan_net[number])


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
