"""RFC 4787 NAT behaviour as a pure translation table: mapping, port allocation, filtering, expiry."""

from __future__ import annotations

import enum
import ipaddress
import math
import random
from dataclasses import dataclass, field

from ._addresses import Endpoint, IPAddress, NetsimError, format_endpoint


class Mapping(enum.Enum):
    """When a NAT reuses an external port for an internal endpoint (RFC 4787 section 4.1)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    """One mapping per internal endpoint, whatever the destination ("cone")."""
    ADDRESS_DEPENDENT = "address-dependent"
    """A new mapping per destination IP address."""
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    """A new mapping per destination IP address and port ("symmetric")."""


class Filtering(enum.Enum):
    """Which inbound packets a NAT admits on an existing mapping (RFC 4787 section 5)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    """Anyone may send to the mapped endpoint ("full cone")."""
    ADDRESS_DEPENDENT = "address-dependent"
    """Only IP addresses the internal endpoint has sent to through this mapping."""
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    """Only IP address and port pairs the internal endpoint has sent to through this mapping."""


class PortAllocation(enum.Enum):
    """How a NAT picks the external port of a new mapping (RFC 4787 section 4.2)."""

    PRESERVING = "preserving"
    """Use the internal port if it is free, else the next free port above it."""
    SEQUENTIAL = "sequential"
    """The next free port after the previously allocated one, from the start of the range."""
    RANDOM = "random"
    """A free port drawn from the simulation's seeded RNG."""


@dataclass(frozen=True)
class NatBehavior:
    """The configuration of a simulated NAT; the defaults are a typical home router.

    - ``mapping``: :class:`Mapping` (default endpoint-independent).
    - ``filtering``: :class:`Filtering` (default address-and-port-dependent).
    - ``port_allocation``: :class:`PortAllocation` (default preserving).
    - ``hairpinning``: whether a packet from inside to the NAT's own external address is turned
      back inside (default False).
    - ``mapping_timeout``: seconds a mapping lives after its last refresh (default 120, RFC 4787
      REQ-5's minimum).
    - ``inbound_refresh``: whether admitted inbound packets also refresh a mapping (default False:
      only outbound traffic does, RFC 4787 REQ-6).
    - ``port_range``: the inclusive range of external ports for new, non-preserved mappings
      (default 1024-65535).
    - ``tcp_mapping_timeout``: seconds a TCP mapping lives after its last refresh (default 7440,
      RFC 5382 REQ-5's minimum for established connections: 2 hours 4 minutes). TCP mappings
      live in a table of their own; every other field applies to them as to UDP.

    Raises :class:`NetsimError` for a non-positive timeout or an invalid port range.
    """

    mapping: Mapping = Mapping.ENDPOINT_INDEPENDENT
    filtering: Filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    port_allocation: PortAllocation = PortAllocation.PRESERVING
    hairpinning: bool = False
    mapping_timeout: float = 120.0
    inbound_refresh: bool = False
    port_range: tuple[int, int] = (1024, 65535)
    tcp_mapping_timeout: float = 7440.0

    def __post_init__(self) -> None:
        for name in ("mapping_timeout", "tcp_mapping_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise NetsimError(f"{name} must be > 0 seconds, got {value!r}")
        low, high = self.port_range
        if not 1 <= low <= high <= 65535:
            raise NetsimError(
                f"port_range must satisfy 1 <= low <= high <= 65535, got {low}-{high}"
            )

    @classmethod
    def full_cone(cls) -> NatBehavior:
        """Endpoint-independent mapping and filtering."""
        return cls(filtering=Filtering.ENDPOINT_INDEPENDENT)

    @classmethod
    def restricted_cone(cls) -> NatBehavior:
        """Endpoint-independent mapping, address-dependent filtering."""
        return cls(filtering=Filtering.ADDRESS_DEPENDENT)

    @classmethod
    def port_restricted_cone(cls) -> NatBehavior:
        """Endpoint-independent mapping, address-and-port-dependent filtering (the default)."""
        return cls()

    @classmethod
    def symmetric(cls) -> NatBehavior:
        """Address-and-port-dependent mapping and filtering, random port allocation."""
        return cls(
            mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
            port_allocation=PortAllocation.RANDOM,
        )


@dataclass(frozen=True)
class Ipv6Firewall:
    """A stateful IPv6 firewall without translation: ``ct state established,related accept; drop``.

    Outbound packets pass unchanged and create (or refresh) a state; an inbound packet passes
    only if it matches a live state, and is dropped otherwise (verdict ``filtered``).

    - ``filtering``: :class:`Filtering`: what a state admits. Address-and-port-dependent (default:
      conntrack's per-flow states) admits only the remote IP and port the inside endpoint sent
      to; address-dependent any port of that IP; endpoint-independent anyone, once the inside
      endpoint has sent something.
    - ``timeout``: seconds a UDP state lives after its last refresh (default 120, conntrack's
      ``nf_conntrack_udp_timeout_stream``).
    - ``tcp_timeout``: the same for TCP (default 7440).
    - ``inbound_refresh``: whether admitted inbound packets refresh the state too (default True,
      as conntrack does).

    Raises :class:`NetsimError` for a non-positive or infinite timeout.
    """

    filtering: Filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    timeout: float = 120.0
    tcp_timeout: float = 7440.0
    inbound_refresh: bool = True

    def __post_init__(self) -> None:
        for name in ("timeout", "tcp_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise NetsimError(f"{name} must be > 0 seconds, got {value!r}")

    def behavior(self, *, tcp: bool = False) -> NatBehavior:
        """Return the :class:`NatBehavior` its state table runs with (UDP, or TCP if ``tcp``).

        A state is keyed as finely as the filter: per remote endpoint (APDF), per remote address
        (ADF) or per inside endpoint (EIF), so every key expires on its own, as conntrack's do.
        """
        mapping = {
            Filtering.ENDPOINT_INDEPENDENT: Mapping.ENDPOINT_INDEPENDENT,
            Filtering.ADDRESS_DEPENDENT: Mapping.ADDRESS_DEPENDENT,
            Filtering.ADDRESS_AND_PORT_DEPENDENT: Mapping.ADDRESS_AND_PORT_DEPENDENT,
        }[self.filtering]
        timeout = self.tcp_timeout if tcp else self.timeout
        return NatBehavior(
            mapping=mapping,
            filtering=self.filtering,
            mapping_timeout=timeout,
            tcp_mapping_timeout=self.tcp_timeout,
            inbound_refresh=self.inbound_refresh,
        )


@dataclass(frozen=True)
class NatBinding:
    """A snapshot of one row of a NAT's mapping table, for inspection.

    ``internal`` and ``external`` are ``"ip:port"`` texts; ``destination`` is what the mapping is
    specific to (``None`` for endpoint-independent, an IP text, or an ``"ip:port"`` text);
    ``permitted`` lists the remote endpoints the inside has sent to through this mapping;
    ``created``, ``refreshed`` and ``expires`` are ``trio.current_time()`` values in seconds.
    """

    internal: str
    external: str
    destination: str | None
    permitted: tuple[str, ...]
    created: float
    refreshed: float
    expires: float


_Key = tuple[Endpoint, "IPAddress | Endpoint | None"]


@dataclass
class _Binding:
    internal: Endpoint
    port: int
    destination: IPAddress | Endpoint | None
    created: float
    refreshed: float
    addresses: set[IPAddress] = field(default_factory=set)
    endpoints: set[Endpoint] = field(default_factory=set)


class NatTable:
    """The translation state of one NAT with one external address (sans-IO: the caller gives ``now``).

    :meth:`outbound` and :meth:`inbound` return the translated endpoint or ``None`` with a reason;
    they never do I/O. The simulator's NAT node drives it; researchers may drive it directly.
    """

    def __init__(self, external: IPAddress, behavior: NatBehavior, rng: random.Random) -> None:
        self.external = external
        self.behavior = behavior
        self._rng = rng
        self._by_key: dict[_Key, _Binding] = {}
        self._by_port: dict[int, _Binding] = {}
        self._next_port = behavior.port_range[0]
        self._translate = True
        self.expired = 0
        """How many mappings have expired so far."""

    def _destination(self, dst: Endpoint) -> IPAddress | Endpoint | None:
        mapping = self.behavior.mapping
        if mapping is Mapping.ENDPOINT_INDEPENDENT:
            return None
        if mapping is Mapping.ADDRESS_DEPENDENT:
            return dst[0]
        return dst

    def _live(self, binding: _Binding | None, now: float) -> _Binding | None:
        if binding is None:
            return None
        if now < binding.refreshed + self.behavior.mapping_timeout:
            return binding
        del self._by_key[(binding.internal, binding.destination)]
        if self._translate:
            del self._by_port[binding.port]
        self.expired += 1
        return None

    def outbound(self, src: Endpoint, dst: Endpoint, now: float) -> Endpoint | None:
        """Map an outbound packet's source; return the external endpoint, or None if out of ports.

        Creates a mapping if none is live, refreshes it, and permits ``dst`` for filtering.
        """
        key = (src, self._destination(dst))
        binding = self._live(self._by_key.get(key), now)
        if binding is None:
            if self._translate:
                port = self._allocate(src[1], now)
                if port is None:
                    return None
            else:
                port = src[1]
            binding = _Binding(src, port, key[1], now, now)
            self._by_key[key] = binding
            if self._translate:
                self._by_port[port] = binding
        binding.refreshed = now
        binding.addresses.add(dst[0])
        binding.endpoints.add(dst)
        return (self.external, binding.port) if self._translate else src

    def inbound(
        self, src: Endpoint, port: int, now: float, *, address: IPAddress | None = None
    ) -> tuple[Endpoint | None, str]:
        """Look up an inbound packet to external ``port`` from ``src``.

        ``address`` is the packet's destination address; a NAT table has one external address and
        ignores it (an :class:`Ipv6FirewallTable` needs it). Return ``(internal endpoint, "")`` if
        admitted, else ``(None, reason)`` with reason ``"no-mapping"`` or ``"dropped-by-filter"``.
        """
        binding = self._live(self._by_port.get(port), now)
        if binding is None:
            return None, "no-mapping"
        filtering = self.behavior.filtering
        if (filtering is Filtering.ADDRESS_DEPENDENT and src[0] not in binding.addresses) or (
            filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT and src not in binding.endpoints
        ):
            return None, "dropped-by-filter"
        if self.behavior.inbound_refresh:
            binding.refreshed = now
        return binding.internal, ""

    def _free(self, port: int, now: float) -> bool:
        return self._live(self._by_port.get(port), now) is None

    def _allocate(self, internal_port: int, now: float) -> int | None:
        low, high = self.behavior.port_range
        kind = self.behavior.port_allocation
        if kind is PortAllocation.PRESERVING:
            if self._free(internal_port, now):
                return internal_port
            start = internal_port + 1 if low <= internal_port < high else low
        elif kind is PortAllocation.SEQUENTIAL:
            start = self._next_port
        else:
            for _ in range(32):
                port = self._rng.randint(low, high)
                if self._free(port, now):
                    return port
            start = self._rng.randint(low, high)
        span = high - low + 1
        for offset in range(span):
            port = low + (start - low + offset) % span
            if self._free(port, now):
                self._next_port = low + (port - low + 1) % span
                return port
        return None

    def clear(self) -> None:
        """Forget every mapping (a NAT reboot); port allocation starts over."""
        self._by_key.clear()
        self._by_port.clear()
        self._next_port = self.behavior.port_range[0]

    def _rows(self) -> list[_Binding]:
        return [self._by_port[port] for port in sorted(self._by_port)]

    def bindings(self, now: float) -> list[NatBinding]:
        """Return the live mappings, sorted by external port, dropping expired ones."""
        rows = []
        for row in self._rows():
            binding = self._live(row, now)
            if binding is None:
                continue
            destination = binding.destination
            external = (self.external, binding.port) if self._translate else binding.internal
            rows.append(
                NatBinding(
                    internal=format_endpoint(binding.internal),
                    external=format_endpoint(external),
                    destination=(
                        None
                        if destination is None
                        else format_endpoint(destination)
                        if isinstance(destination, tuple)
                        else str(destination)
                    ),
                    permitted=tuple(sorted(format_endpoint(e) for e in binding.endpoints)),
                    created=binding.created,
                    refreshed=binding.refreshed,
                    expires=binding.refreshed + self.behavior.mapping_timeout,
                )
            )
        return rows


class Ipv6FirewallTable(NatTable):
    """The state table of an :class:`Ipv6Firewall` (sans-IO): a :class:`NatTable` that never translates.

    :meth:`outbound` returns the source unchanged after creating or refreshing its state;
    :meth:`inbound` needs the destination ``address`` and returns ``(None, "filtered")`` for a
    packet that matches no live state. States are keyed as finely as ``firewall.filtering`` (see
    :meth:`Ipv6Firewall.behavior`) and expire like mappings (``expired`` counts them).
    ``external`` is unused (:attr:`UNUSED_EXTERNAL`). ``tcp=True`` makes the TCP table
    (``tcp_timeout``).
    """

    UNUSED_EXTERNAL = ipaddress.IPv6Address("::")
    """The placeholder ``external`` address of a table that never translates."""

    def __init__(self, firewall: Ipv6Firewall, *, tcp: bool = False) -> None:
        super().__init__(self.UNUSED_EXTERNAL, firewall.behavior(tcp=tcp), random.Random(0))
        self.firewall = firewall
        """The configuration this table was made from."""
        self._translate = False

    def inbound(
        self, src: Endpoint, port: int, now: float, *, address: IPAddress | None = None
    ) -> tuple[Endpoint | None, str]:
        """Admit an inbound packet from ``src`` to ``(address, port)`` if it matches a live state.

        Return ``((address, port), "")`` if admitted, else ``(None, "filtered")``. Raises
        :class:`NetsimError` without ``address``.
        """
        if address is None:
            raise NetsimError("a firewall table needs the inbound packet's destination address")
        internal = (address, port)
        binding = self._live(self._by_key.get((internal, self._destination(src))), now)
        if binding is None:
            return None, "filtered"
        if self.behavior.inbound_refresh:
            binding.refreshed = now
        return internal, ""

    def has_state(self, src: Endpoint, dst: Endpoint, now: float) -> bool:
        """True if an outbound packet from ``src`` to ``dst`` would find a live state."""
        return self._live(self._by_key.get((src, self._destination(dst))), now) is not None

    def _rows(self) -> list[_Binding]:
        return sorted(self._by_key.values(), key=_state_order)


def _state_order(binding: _Binding) -> tuple[int, ...]:
    (ip, port), destination = binding.internal, binding.destination
    if destination is None:
        rest: tuple[int, ...] = ()
    elif isinstance(destination, tuple):
        rest = (destination[0].version, int(destination[0]), destination[1])
    else:
        rest = (destination.version, int(destination))
    return (ip.version, int(ip), port, *rest)
