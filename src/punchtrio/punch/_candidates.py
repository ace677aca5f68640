"""Candidates: the addresses at which a peer may be reachable, and how to gather them.

- host candidates: the addresses of this machine's interfaces (``pyroute2`` netlink dump, no root
  needed), or of the simulated host inside :mod:`punchtrio.netsim`;
- server-reflexive candidates: what STUN servers saw. :class:`ReflexiveGatherer` (sans-IO) asks
  every server address given, or one server and then its OTHER-ADDRESS, so that two answers tell
  whether the NAT's mapping depends on the destination;
- relay candidates: the type exists; a TURN allocation will produce them.

Priorities follow RFC 8445 section 5.1.2: ``2**24 * type preference + 2**8 * local preference +
255``, with type preferences host 126, peer-reflexive 110, server-reflexive 100, relay 0.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._endpoint import EndpointError, check_endpoint_address
from .._exceptions import PunchtrioError
from ..stun import BindingSucceeded, StunTransaction

if TYPE_CHECKING:
    from ..rendezvous import Endpoint

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CandidateError(PunchtrioError):
    """A candidate's address or port cannot be used: not a literal unicast address, or bad port."""


class CandidateType(str, enum.Enum):
    """Where a candidate address was learnt (the ICE names)."""

    HOST = "host"
    """An address of one of the peer's own interfaces."""
    PRFLX = "prflx"
    """Peer-reflexive: where an authenticated probe from the peer came from."""
    SRFLX = "srflx"
    """Server-reflexive: the peer's public mapping as a STUN server saw it."""
    RELAY = "relay"
    """An address allocated on a TURN relay."""


TYPE_PREFERENCE = {
    CandidateType.HOST: 126,
    CandidateType.PRFLX: 110,
    CandidateType.SRFLX: 100,
    CandidateType.RELAY: 0,
}
"""RFC 8445's recommended type preferences."""


def check_candidate_address(ip: IPAddress) -> IPAddress:
    """Return ``ip`` if a peer could reach it; raise :class:`CandidateError` otherwise.

    The rule is :func:`punchtrio.check_endpoint_address`, the one the hub applies to endpoints
    (unspecified, loopback, multicast, link-local, broadcast and reserved IPv4, IPv4-mapped IPv6,
    discard-only ``100::/64`` and the other special IPv6 ranges are refused); the message is its
    reason (``fe80::1 is link-local without a scope id``).
    """
    try:
        return check_endpoint_address(ip)
    except EndpointError as exc:
        raise CandidateError(str(exc)) from None


def candidate_priority(type: CandidateType, local_preference: int = 65535) -> int:
    """Return the RFC 8445 priority of a candidate (higher is better).

    ``local_preference`` (0-65535, default 65535) orders candidates of the same type. Raises
    :class:`CandidateError` if it is out of range.
    """
    if not 0 <= local_preference <= 65535:
        raise CandidateError("local preference must be 0-65535")
    return (TYPE_PREFERENCE[type] << 24) | (local_preference << 8) | 255


@dataclass(frozen=True)
class Candidate:
    """One candidate endpoint: its ``type``, IP ``address`` (text, normalised), ``port`` and
    ``priority`` (computed from the type when left at 0; higher is tried and preferred first).

    Raises :class:`CandidateError` if the address is not a literal unicast IP address (see
    :func:`check_candidate_address`) or the port is not 1-65535.
    """

    type: CandidateType
    address: str
    port: int
    priority: int = 0

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            raise CandidateError(f"{self.address!r} is not an IP address") from None
        check_candidate_address(ip)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise CandidateError("a port is an integer")
        if not 0 < self.port < 65536:
            raise CandidateError(f"port {self.port} is not 1-65535")
        object.__setattr__(self, "type", CandidateType(self.type))
        object.__setattr__(self, "address", str(ip))
        if not self.priority:
            object.__setattr__(self, "priority", candidate_priority(self.type))

    @property
    def endpoint(self) -> Address:
        """``(address, port)``, as sockets take it."""
        return self.address, self.port

    @property
    def version(self) -> int:
        """The IP version, 4 or 6."""
        return 6 if ":" in self.address else 4

    def to_endpoint(self) -> Endpoint:
        """Return the rendezvous :class:`~punchtrio.rendezvous.Endpoint` advertising this candidate.

        A peer-reflexive candidate is advertised as server-reflexive (the hub knows three types).
        """
        # Imported here: the rendezvous package pulls in the hub's web stack.
        from ..rendezvous import Endpoint, EndpointType

        kind = CandidateType.SRFLX if self.type is CandidateType.PRFLX else self.type
        return Endpoint(EndpointType(kind.value), ipaddress.ip_address(self.address), self.port)

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint, local_preference: int = 65535) -> Candidate:
        """Return the candidate a peer's rendezvous :class:`~punchtrio.rendezvous.Endpoint` names.

        Raises :class:`CandidateError` (the hub checks endpoints, but the record is the peer's).
        """
        kind = CandidateType(endpoint.type.value)
        return cls(
            kind, str(endpoint.ip), endpoint.port, candidate_priority(kind, local_preference)
        )


def sort_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Return ``candidates`` without duplicate endpoints, best (highest priority) first."""
    best: dict[Address, Candidate] = {}
    for cand in candidates:
        known = best.get(cand.endpoint)
        if known is None or cand.priority > known.priority:
            best[cand.endpoint] = cand
    return sorted(best.values(), key=lambda c: (-c.priority, c.version, c.address, c.port))


def usable_host_address(ip: IPAddress) -> bool:
    """Return whether ``ip`` may be a host candidate (see :func:`check_candidate_address`)."""
    try:
        check_candidate_address(ip)
    except CandidateError:
        return False
    return True


def local_addresses(exclude_interfaces: Iterable[str] = ()) -> list[IPAddress]:
    """Return the usable addresses of this machine's interfaces, IPv4 first, in interface order.

    Loopback, link-local and the other refused addresses are skipped, and so are the interfaces
    named in ``exclude_interfaces`` (pass the tunnel's own: its addresses live inside the tunnel).
    Inside a :mod:`punchtrio.netsim` simulation (``host.activate()``), the simulated host's
    addresses. Needs no root: an unprivileged netlink dump. Returns ``[]`` if netlink is refused.
    """
    netsim = sys.modules.get("punchtrio.netsim")  # no simulation runs unless it was imported
    host = netsim.current_host() if netsim is not None else None
    if host is not None:
        return [ip for ip in host.addresses if usable_host_address(ip)]
    excluded = set(exclude_interfaces)
    found: list[tuple[int, int, IPAddress]] = []
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            messages: list[Any] = list(ipr.get_addr())
    except Exception:  # pyroute2's NetlinkError is not an OSError; no netlink, no host candidates
        return []
    for msg in messages:
        text = msg.get_attr("IFA_ADDRESS")
        index = int(msg["index"])
        try:
            ip = ipaddress.ip_address(text)
            name = socket.if_indextoname(index)
        except (ValueError, TypeError, OSError):
            continue
        if name in excluded or not usable_host_address(ip):
            continue
        found.append((ip.version, index, ip))
    return [ip for _, _, ip in sorted(found, key=lambda row: (row[0], row[1]))]


def local_networks(exclude_interfaces: Iterable[str] = ()) -> list[IPNetwork]:
    """Return the prefixes of this machine's interfaces that hold a usable address.

    The same interfaces as :func:`local_addresses` (``exclude_interfaces`` skipped); a peer
    address inside one of them is on a network we share. Inside a :mod:`punchtrio.netsim`
    simulation, the simulated host's LAN prefixes (IPv4 and IPv6 on a dual-stack LAN; none on the
    public internet, which is no shared network). Returns ``[]`` if netlink is refused.
    """
    netsim = sys.modules.get("punchtrio.netsim")  # no simulation runs unless it was imported
    host = netsim.current_host() if netsim is not None else None
    if host is not None:  # every prefix of a dual-stack LAN (netsim's ``prefixes``), else its one
        prefixes = getattr(host.network, "prefixes", None)
        if prefixes is not None:
            return list(prefixes)
        prefix = host.network.prefix
        return [] if prefix is None else [prefix]
    excluded = set(exclude_interfaces)
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            messages: list[Any] = list(ipr.get_addr())
    except Exception:  # pyroute2's NetlinkError is not an OSError
        return []
    found: list[IPNetwork] = []
    for msg in messages:
        try:
            ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            name = socket.if_indextoname(int(msg["index"]))
            net = ipaddress.ip_network(f"{ip}/{int(msg['prefixlen'])}", strict=False)
        except (ValueError, TypeError, OSError):
            continue
        if name not in excluded and usable_host_address(ip) and net not in found:
            found.append(net)
    return found


def host_candidates(
    port: int, addresses: Iterable[IPAddress | str] | None = None
) -> list[Candidate]:
    """Return one host candidate per usable address (default :func:`local_addresses`) at ``port``.

    Earlier addresses get a higher local preference, so they are tried first. Addresses that
    cannot be candidates are skipped. Raises :class:`CandidateError` for a bad ``port``.
    """
    ips = local_addresses() if addresses is None else [ipaddress.ip_address(a) for a in addresses]
    out = []
    for rank, ip in enumerate(ips):
        if not usable_host_address(ip):
            continue
        preference = max(0, 65535 - rank)
        out.append(
            Candidate(
                CandidateType.HOST,
                str(ip),
                port,
                candidate_priority(CandidateType.HOST, preference),
            )
        )
    return out


@dataclass(frozen=True)
class ReflexiveResult:
    """What STUN servers saw of one socket.

    ``mappings`` pairs each answering server address with the mapped endpoint it reported;
    ``candidates`` holds the distinct mapped endpoints as server-reflexive candidates;
    ``mapping_varies`` is ``True`` when two server addresses of one family saw different mappings
    (the NAT maps per destination: a plain punch to its reflexive address cannot work), ``False``
    when they saw the same, ``None`` with fewer than two answers in either family; IPv4's verdict
    when it has one, else IPv6's (mappings of different families are never compared: they are
    different addresses by nature). ``failed`` names the servers that did not answer or answered
    with an error.
    """

    mappings: tuple[tuple[Address, Address], ...]
    candidates: tuple[Candidate, ...]
    mapping_varies: bool | None
    failed: tuple[Address, ...] = field(default=())


def _version(ip: str) -> int:
    return 6 if ":" in ip else 4


class ReflexiveGatherer:
    """Ask STUN servers for our mapped address, sans-IO, over a socket the caller shares.

    Sends one Binding transaction (RFC 8489 retransmissions, see
    :class:`~punchtrio.stun.StunTransaction`; ``rto`` seconds, ``rc`` requests) to every address
    in ``servers`` at once. With a single server address of a family, the first answer's
    OTHER-ADDRESS (RFC 5780) of that family is asked too, so there are two destinations to
    compare. Servers of both families may be given: each family is judged on its own. Drive it like every punchtrio
    core: :meth:`datagrams_to_send`, :meth:`receive_datagram`, :meth:`get_timer`,
    :meth:`handle_timer` (and :meth:`unreachable` when a send fails for want of a route);
    :attr:`done` then :meth:`result`. Raises ``ValueError`` if ``servers``
    is empty or not IP literals.
    """

    def __init__(
        self, servers: Sequence[Address], now: float, *, rto: float = 0.5, rc: int = 7
    ) -> None:
        if not servers:
            raise ValueError("at least one STUN server address is needed")
        self._rto, self._rc = rto, rc
        self._transactions = [StunTransaction(s, now, rto=rto, rc=rc, rm=4) for s in servers]
        ips: dict[int, set[str]] = {}
        for server in servers:
            ips.setdefault(_version(server[0]), set()).add(server[0])
        # The families with one server address: follow its OTHER-ADDRESS to get a second.
        self._follow_other = {family for family, seen in ips.items() if len(seen) < 2}
        self._answers: list[tuple[Address, Address]] = []
        self._failed: list[Address] = []

    @property
    def done(self) -> bool:
        """Whether every transaction has finished (answered, failed or timed out)."""
        return all(t.done for t in self._transactions)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Return the Binding requests due at ``now``."""
        return [d for t in self._transactions for d in t.datagrams_to_send(now)]

    def receive_datagram(self, data: bytes, source: Address, now: float) -> bool:
        """Offer a received STUN datagram; return whether one of our transactions took it."""
        for t in self._transactions:
            if t.receive_datagram(data, source, now):
                self._collect(t, now)
                return True
        return False

    def unreachable(self, destination: Address) -> None:
        """Give up on ``destination`` now: the kernel refused to send there (no route: an IPv6
        server from a host with only unique-local IPv6, or IPv4 from an IPv6-only network), so
        its retransmissions would only delay :attr:`done`. It counts as failed."""
        for t in list(self._transactions):
            if t.destination == destination and not t.done:
                self._transactions.remove(t)
                self._failed.append(destination)

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` is due (the caller's clock), or ``None``."""
        timers = [d for t in self._transactions if (d := t.get_timer()) is not None]
        return min(timers, default=None)

    def handle_timer(self, now: float) -> None:
        """Advance the transactions' timers to ``now``."""
        for t in self._transactions:
            was_done = t.done
            t.handle_timer(now)
            if t.done and not was_done:
                self._collect(t, now)

    def _collect(self, transaction: StunTransaction, now: float) -> None:
        event = transaction.next_event()
        if not isinstance(event, BindingSucceeded):
            self._failed.append(transaction.destination)
            return
        self._answers.append((transaction.destination, event.mapped))
        other = event.other_address
        family = _version(transaction.destination[0])
        if (
            family in self._follow_other
            and other is not None
            and other[0] != transaction.destination[0]
            and _version(other[0]) == family
        ):
            self._follow_other.discard(family)
            self._transactions.append(StunTransaction(other, now, rto=self._rto, rc=self._rc, rm=4))

    def result(self) -> ReflexiveResult:
        """Return what was learnt so far (call it once :attr:`done`)."""
        mapped = [m for _, m in self._answers]
        by_server_ip: dict[int, dict[str, Address]] = {4: {}, 6: {}}
        for server, m in self._answers:
            by_server_ip[_version(server[0])].setdefault(server[0], m)
        verdicts = [
            None if len(seen) < 2 else len(set(seen.values())) > 1
            for seen in (by_server_ip[4], by_server_ip[6])
        ]
        varies = verdicts[0] if verdicts[0] is not None else verdicts[1]
        candidates = []
        for rank, endpoint in enumerate(dict.fromkeys(mapped)):
            try:
                candidates.append(
                    Candidate(
                        CandidateType.SRFLX,
                        endpoint[0],
                        endpoint[1],
                        candidate_priority(CandidateType.SRFLX, max(0, 65535 - rank)),
                    )
                )
            except CandidateError:
                continue  # a server reported something no peer could use
        return ReflexiveResult(tuple(self._answers), tuple(candidates), varies, tuple(self._failed))
