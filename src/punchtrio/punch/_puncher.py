"""The puncher, sans-IO: authenticated probes to every candidate, path choice, heartbeat.

One :class:`Puncher` serves every peer on one shared socket. The caller adds a peer (its static
public key), then calls :meth:`Puncher.start` with the peer's candidates and the time both sides
agreed to begin (the rendezvous "punch now" signal). From then on it is driven like every punchtrio
core: :meth:`~Puncher.receive_datagram` with probe datagrams the mux routes here,
:meth:`~Puncher.datagrams_to_send`, :meth:`~Puncher.get_timer` / :meth:`~Puncher.handle_timer`,
and :meth:`~Puncher.next_event` for :class:`PathChosen`, :class:`PathLost`, :class:`PunchFailed`
and :class:`DirectFailed`.

Each remote address is one *pair* (we have one local socket), in one of these states:

=========  ============================================================  =======================
state      what happens                                                  leaves for
=========  ============================================================  =======================
waiting    nothing is sent until the start time                          probing
probing    a ping every ``fast_interval`` for ``fast_period``, then the   succeeded, failed
           interval doubles up to ``backoff_max``
succeeded  answered; silent unless chosen, then a heartbeat every         probing (after a loss)
           ``heartbeat_interval`` (retries every ``heartbeat_retry``)
failed     ``max_unanswered`` pings went unanswered; never probed again   probing (the next
           in this attempt                                               :meth:`Puncher.start`,
                                                                         or an upgrade retry)
=========  ============================================================  =======================

Relayed paths (:meth:`Puncher.set_relays`) are pairs like the others, of kind ``"relay"``: they
start ``relay_delay`` after the attempt (so a direct path found at once is chosen first), and rank
below every direct and LAN path. While a relay carries the tunnel, the failed direct pairs are
probed again every ``upgrade_retry`` seconds (doubling up to ``upgrade_retry_max``) for as long as
the peer is known: a peer is never stuck on a relay. Each time every direct pair has failed
while a relay carries the tunnel, :class:`DirectFailed` says so, with the wait before the next
retry.

Birthday punching (:mod:`punchtrio.punch._birthday`) runs beside the pairs when one NAT maps per
destination and the other does not (:meth:`Puncher.start` is told both sides' mapping checks). The
hard side's extra sockets are the shell's: the puncher asks for them (:class:`OpenSockets`), hands
out the pings to send from them (:meth:`Puncher.socket_datagrams`), names the one whose mapping was
hit (:class:`KeepSocket`: from then on that socket carries the path to the peer's endpoint, as a
route) and has the others closed (:class:`CloseSockets`).
"""

from __future__ import annotations

import ipaddress
import os
import random as _random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from nacl.bindings import crypto_scalarmult_base

from .._exceptions import PunchtrioError
from ._birthday import (
    BirthdaySchedule,
    BirthdaySettings,
    Role,
    birthday_role,
    predicted_ports,
    probe_ports,
)
from ._candidates import Candidate, CandidateError, CandidateType
from ._probe import (
    PING,
    PONG,
    PROBE_WINDOW,
    ProbeGuard,
    ProbeKeyError,
    ProbeRejected,
    build_probe,
    derive_probe_key,
    key_id,
    probe_sender,
    verify_mac,
)

Address = tuple[str, int]
PathKind = Literal["lan", "direct", "relay"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DROP_REASONS = (
    "malformed",
    "unknown_key",
    "self",
    "mac",
    "stale",
    "replay",
    "unexpected_pong",
    "wrong_source",
    "pair_limit",
)
"""Names of the counters in :attr:`Puncher.counters`, one per reason a probe is dropped."""

_RANK: dict[str, int] = {"lan": 0, "direct": 1, "relay": 2}
_WAITING, _PROBING, _SUCCEEDED, _FAILED = "waiting", "probing", "succeeded", "failed"
_OUTSTANDING_LIMIT = 64
_INF = float("inf")


class PunchError(PunchtrioError):
    """A puncher call was wrong: an unknown or duplicate peer, our own key, or an unusable key."""


@dataclass(frozen=True)
class PunchSettings:
    """The puncher's pace and bounds (seconds and counts; the defaults are the documented choice).

    - ``fast_interval`` 0.05: a ping to every pair every 50 ms ...
    - ``fast_period`` 1.0: ... for the first second after the start (20 pings per pair);
    - ``backoff_max`` 1.0: then the interval doubles from ``2 * fast_interval`` up to this;
    - ``max_unanswered`` 30: pings to an address that has not answered before it counts as failed
      (so a failed pair has cost at most 30 probes, about 8.5 s after the start);
    - ``heartbeat_interval`` 5.0: a ping on the chosen path, to hold the NAT mapping and notice loss;
    - ``heartbeat_retry`` 1.0 and ``lost_after`` 4: an unanswered heartbeat is repeated every second,
      and after 4 unanswered the path is lost (4 to 9 s after it broke);
    - ``upgrade_ratio`` 0.5: a working path of the same kind replaces the chosen one only if its
      round trip is below half the chosen one's;
    - ``family_margin`` 0.010: between working paths of the same kind and different IP
      versions, IPv6 replaces IPv4 when its round trip is at most this much longer, and IPv4
      replaces IPv6 only when its round trip is below ``upgrade_ratio`` times (IPv6's minus this
      margin) (IPv6 paths usually cross no NAT mapping that can expire or rebind; as in Happy
      Eyeballs, RFC 8305);
    - ``max_pairs`` 16: remote addresses per peer, candidates and peer-reflexive ones together
      (relayed paths come on top);
    - ``window`` :data:`~punchtrio.punch.PROBE_WINDOW`: allowed clock difference between peers;
    - ``relay_delay`` 0.5: relayed paths are probed from this long after the start of an attempt
      (at once when the peer has no candidate we can reach), so that a direct path, which answers
      within a round trip or two when it exists, is the first path chosen;
    - ``upgrade_retry`` 2.0 and ``upgrade_retry_max`` 60.0: while the chosen path is a relay and
      every direct pair has failed, they are probed again after this long, the wait doubling after
      each failed retry up to the maximum;
    - ``birthday`` :class:`~punchtrio.punch.BirthdaySettings`: birthday punching when exactly one
      NAT maps per destination (``None`` turns it off).
    """

    fast_interval: float = 0.05
    fast_period: float = 1.0
    backoff_max: float = 1.0
    max_unanswered: int = 30
    heartbeat_interval: float = 5.0
    heartbeat_retry: float = 1.0
    lost_after: int = 4
    upgrade_ratio: float = 0.5
    family_margin: float = 0.010
    max_pairs: int = 16
    window: float = PROBE_WINDOW
    relay_delay: float = 0.5
    upgrade_retry: float = 2.0
    upgrade_retry_max: float = 60.0
    birthday: BirthdaySettings | None = field(default_factory=BirthdaySettings)

    def __post_init__(self) -> None:
        if self.relay_delay < 0 or not 0 < self.upgrade_retry <= self.upgrade_retry_max:
            raise PunchError("relay_delay must be >= 0 and 0 < upgrade_retry <= upgrade_retry_max")
        if min(self.fast_interval, self.backoff_max, self.heartbeat_interval) <= 0:
            raise PunchError("intervals must be positive")
        if self.heartbeat_retry <= 0 or self.fast_period < 0 or self.window <= 0:
            raise PunchError("heartbeat_retry and window must be positive, fast_period >= 0")
        if self.family_margin < 0:
            raise PunchError("family_margin must be >= 0")
        if min(self.max_unanswered, self.lost_after, self.max_pairs) < 1:
            raise PunchError("max_unanswered, lost_after and max_pairs must be at least 1")


@dataclass(frozen=True)
class PathChosen:
    """The best working path to ``peer`` (its static public key) is now ``endpoint``.

    ``kind`` is ``"lan"`` (the address is one of the peer's host candidates on a network we
    share: nothing translates between us), ``"direct"`` (any other address: server- or
    peer-reflexive, or a host candidate off our networks) or ``"relay"``; ``rtt`` is the measured
    round trip in seconds. Emitted again when a better path starts working (an upgrade), and when
    :meth:`Puncher.start` reclassifies the chosen path.
    """

    peer: bytes
    endpoint: Address
    kind: PathKind
    rtt: float


@dataclass(frozen=True)
class PathLost:
    """The chosen path to ``peer`` stopped answering heartbeats; the puncher probes again."""

    peer: bytes
    endpoint: Address
    kind: PathKind


@dataclass(frozen=True)
class PunchFailed:
    """No address of ``peer`` answered: every pair used its probe budget. ``probes_sent`` counts
    the pings sent in this attempt. The caller may :meth:`Puncher.start` again (or relay)."""

    peer: bytes
    probes_sent: int


@dataclass(frozen=True)
class DirectFailed:
    """A relay carries the path to ``peer``, and every direct and LAN pair of this round went
    unanswered (used its probe budget); they are probed again in ``retry_in`` seconds (the wait
    doubles after each such round, up to ``upgrade_retry_max``). Emitted once per round, while
    the relay stays chosen."""

    peer: bytes
    retry_in: float


PunchEvent = PathChosen | PathLost | PunchFailed | DirectFailed


@dataclass(frozen=True)
class OpenSockets:
    """For the shell: open ``count`` extra UDP sockets for birthday probes to ``peer``, numbered
    0 to ``count - 1`` (closing any the peer still has from before, and their route)."""

    peer: bytes
    count: int


@dataclass(frozen=True)
class KeepSocket:
    """For the shell: extra socket ``socket`` of ``peer`` got through. Close the others at once;
    from now on what is sent to ``endpoint`` goes out on that socket (WireGuard and probes alike),
    and what arrives on it from ``endpoint`` is handled as if the main socket had read it."""

    peer: bytes
    socket: int
    endpoint: Address


@dataclass(frozen=True)
class CloseSockets:
    """For the shell: close every extra socket of ``peer`` (a kept one too) and drop its route."""

    peer: bytes


SocketAction = OpenSockets | KeepSocket | CloseSockets


class SocketDatagram(NamedTuple):
    """A probe to send from extra socket ``socket`` of ``peer`` to ``address``."""

    peer: bytes
    socket: int
    data: bytes
    address: Address


class _Birthday:
    """One birthday attempt (or the next one, waiting for ``begin``) of one peer."""

    __slots__ = (
        "begin",
        "hit",
        "in_attempt",
        "kept",
        "predicted",
        "probed",
        "role",
        "schedule",
        "target",
        "txids",
    )

    def __init__(
        self, role: Role, begin: float, target: Address, predicted: list[int], in_attempt: bool
    ) -> None:
        self.role: Role = role
        self.begin = begin
        self.target = target  # hard: the peer's endpoint; easy: (the hard side's IP, 0)
        self.predicted = predicted
        self.in_attempt = in_attempt  # part of the current punch attempt (PunchFailed waits)
        self.schedule: BirthdaySchedule | None = None  # None until it begins
        self.txids: dict[bytes, tuple[int, float]] = {}  # ping txid: (socket or port, when)
        self.probed: set[int] = set()  # easy: the ports sent to
        self.kept: int | None = None  # hard: the socket that got through
        self.hit = False  # a probe got through: nothing more is sent


class _Pair:
    __slots__ = (
        "interval",
        "kind",
        "last_ping",
        "next_send",
        "preference",
        "priority",
        "remote",
        "rtt",
        "started",
        "state",
        "unanswered",
    )

    def __init__(self, remote: Address, kind: PathKind, priority: int) -> None:
        self.remote = remote
        self.kind: PathKind = kind
        self.priority = priority
        self.state = _WAITING
        self.unanswered = 0
        self.next_send: float | None = None
        self.started = 0.0
        self.last_ping = -_INF
        self.interval = 0.0
        self.rtt: float | None = None
        self.preference = 0  # among relayed paths: lower is better

    def begin(self, now: float, interval: float) -> None:
        self.state = _PROBING
        self.unanswered = 0
        self.started = now
        self.next_send = now
        self.interval = interval

    def rank(self) -> tuple[int, int, float]:
        return _RANK[self.kind], self.preference, self.rtt if self.rtt is not None else _INF


class _Peer:
    __slots__ = (
        "attempt_at",
        "bday",
        "bday_failures",
        "bday_kept",
        "bday_next",
        "chosen",
        "failed_reported",
        "guard",
        "key",
        "key_id",
        "lan",
        "outstanding",
        "pairs",
        "probes_sent",
        "public_key",
        "relays",
        "retry_at",
        "retry_wait",
        "routed",
        "seen_as",
        "started",
    )

    def __init__(self, public_key: bytes, key: bytes, window: float) -> None:
        self.public_key = public_key
        self.key = key
        self.key_id = key_id(public_key)
        self.guard = ProbeGuard(key, self.key_id, window=window)
        self.pairs: dict[Address, _Pair] = {}
        self.outstanding: dict[bytes, tuple[_Pair, float]] = {}
        self.chosen: _Pair | None = None
        self.started = False
        self.failed_reported = False
        self.probes_sent = 0
        self.seen_as: Address | None = None
        self.lan: frozenset[Address] = frozenset()  # host candidates on a network we share
        self.relays: dict[Address, int] = {}  # relayed paths and their preference
        self.routed: dict[Address, int] = {}  # relayed paths set by the caller (set_relays)
        self.attempt_at = 0.0  # when the current attempt started
        self.retry_at: float | None = None  # next upgrade retry while relayed
        self.retry_wait = 0.0
        self.bday: _Birthday | None = None
        self.bday_failures = 0
        self.bday_next = -_INF  # the earliest start of the next birthday attempt
        self.bday_kept = False  # the shell holds an extra socket of ours for this peer

    def kind_of(self, remote: Address, relayed: Mapping[Address, int]) -> PathKind:
        if remote in self.relays or remote in relayed:
            return "relay"
        return "lan" if remote in self.lan else "direct"

    def preference_of(self, remote: Address, relayed: Mapping[Address, int]) -> int:
        preference = self.relays.get(remote)
        return relayed.get(remote, 0) if preference is None else preference

    def direct_pairs(self) -> list[_Pair]:
        return [p for p in self.pairs.values() if p.kind != "relay"]


def _shared(address: str, networks: tuple[Network, ...] | None) -> bool:
    if networks is None:
        return True
    ip = ipaddress.ip_address(address)
    return any(ip.version == net.version and ip in net for net in networks)


def _normalize(addr: Address) -> Address | None:
    try:
        return str(ipaddress.ip_address(addr[0])), int(addr[1])
    except (ValueError, TypeError, IndexError):
        return None


class Puncher:
    """Hole punching for every peer of one socket, without I/O (see the module docs).

    ``private_key`` is our 32-byte WireGuard static private key; probe keys are derived from it
    and each peer's public key. ``settings`` sets the pace and bounds (:class:`PunchSettings`).
    ``families`` are the IP versions the socket can reach (candidates of others are ignored).
    ``wall_clock`` gives the Unix time for probe timestamps (default ``time.time``), ``random``
    transaction ids (default ``os.urandom``). Raises :class:`PunchError` for a bad key.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        settings: PunchSettings | None = None,
        families: Iterable[int] = (4, 6),
        wall_clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise PunchError("a private key is 32 bytes")
        self._private = private_key
        self.public_key: bytes = crypto_scalarmult_base(private_key)
        """Our static public key."""
        self.key_id = key_id(self.public_key)
        """Our 8-byte key id, carried in every probe we send."""
        self.settings = settings if settings is not None else PunchSettings()
        self.families = frozenset(families)
        self._wall = wall_clock
        self._random = random
        self._peers: dict[bytes, _Peer] = {}
        self._by_key_id: dict[bytes, _Peer] = {}
        self._out: list[tuple[bytes, Address]] = []
        self._events: deque[PunchEvent] = deque()
        self.counters: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        """Dropped probes by reason (see :data:`DROP_REASONS`)."""
        self.probes_sent = 0
        """Pings and pongs sent, all peers together."""
        self._relayed: dict[Address, int] = {}
        self._socket_out: list[SocketDatagram] = []
        self._actions: deque[SocketAction] = deque()
        self.birthday_probes = 0
        """Birthday pings sent, all peers and both roles together."""

    # ------------------------------------------------------------------ peers

    def add_peer(self, public_key: bytes) -> None:
        """Accept probes from the peer with this static public key and answer its pings.

        Raises :class:`PunchError` if the key is ours, already added, or unusable (low order).
        """
        if public_key == self.public_key:
            raise PunchError("a puncher cannot punch to itself")
        if public_key in self._peers:
            raise PunchError("this peer was already added")
        try:
            key = derive_probe_key(self._private, public_key)
        except ProbeKeyError as exc:
            raise PunchError(str(exc)) from None
        peer = _Peer(public_key, key, self.settings.window)
        if peer.key_id in self._by_key_id:
            raise PunchError("two peers share a key id")
        self._peers[public_key] = peer
        self._by_key_id[peer.key_id] = peer

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer: no more probes to or from it. Raises :class:`PunchError` if unknown."""
        peer = self._peers.pop(public_key, None)
        if peer is None:
            raise PunchError("no such peer")
        del self._by_key_id[peer.key_id]
        bday = peer.bday
        if peer.bday_kept or (
            bday is not None and bday.schedule is not None and bday.role == "hard"
        ):
            self._actions.append(CloseSockets(public_key))

    def start(
        self,
        public_key: bytes,
        candidates: Iterable[Candidate],
        at: float,
        *,
        local_networks: Iterable[Network] | None = None,
        mapping_varies: bool | None = None,
        peer_mapping_varies: bool | None = None,
    ) -> None:
        """Probe the peer's ``candidates`` from time ``at`` on (the caller's clock).

        Candidates of families the socket cannot reach are ignored; beyond ``max_pairs`` the lowest
        priorities are. Calling it again starts a new attempt: fresh probe budgets, the chosen path
        kept until a better one works or it is lost. Raises :class:`PunchError` if the peer is
        unknown.

        ``local_networks`` are the prefixes of our own interfaces. A path is ``"lan"`` when its
        address is one of the peer's host candidates inside one of them, however the address was
        first learnt (a ping from it may have made it a peer-reflexive pair before this call);
        ``None`` (not known) lets every host candidate count as shared. Every pair is classified
        again here, and a chosen path whose kind changes is announced again with
        :class:`PathChosen`.

        ``mapping_varies`` and ``peer_mapping_varies`` are the two sides' two-server mapping checks
        (:attr:`ReflexiveResult.mapping_varies`). When exactly one is ``True``, a birthday attempt
        begins ``birthday.delay`` after ``at`` unless a direct path works by then, or later if an
        earlier attempt failed (its backoff); one that runs goes on.
        """
        peer = self._peer(public_key)
        ordered = sorted(candidates, key=lambda c: -c.priority)
        networks = None if local_networks is None else tuple(local_networks)
        peer.lan = frozenset(
            c.endpoint
            for c in ordered
            if c.type is CandidateType.HOST and _shared(c.address, networks)
        )
        peer.relays = {c.endpoint: 1 for c in ordered if c.type is CandidateType.RELAY}
        peer.relays.update(peer.routed)
        pairs: dict[Address, _Pair] = {}
        for cand in ordered:
            if cand.version not in self.families or cand.endpoint in pairs:
                continue
            if len(pairs) >= self.settings.max_pairs:
                break
            old = peer.pairs.get(cand.endpoint)
            pair = old if old is not None else _Pair(cand.endpoint, "direct", 0)
            pair.priority = cand.priority
            pairs[cand.endpoint] = pair
        if peer.chosen is not None:
            pairs.setdefault(peer.chosen.remote, peer.chosen)
        for remote, old in peer.pairs.items():  # peer-reflexive addresses learnt so far
            if len(pairs) >= self.settings.max_pairs:
                break
            if remote not in peer.routed:
                pairs.setdefault(remote, old)
        for remote, preference in peer.routed.items():  # relayed paths: on top of max_pairs
            pair = peer.pairs.get(remote) or _Pair(remote, "relay", 0)
            pair.preference = preference
            pairs[remote] = pair
        peer.pairs = pairs
        for pair in pairs.values():
            before, pair.kind = pair.kind, peer.kind_of(pair.remote, self._relayed)
            pair.preference = peer.preference_of(pair.remote, self._relayed)
            if pair is peer.chosen and pair.kind != before and pair.rtt is not None:
                # Learnt from the peer's ping before its candidates arrived: now we know better.
                self._events.append(PathChosen(public_key, pair.remote, pair.kind, pair.rtt))
        peer.started = True
        peer.failed_reported = False
        peer.probes_sent = 0
        peer.attempt_at = at
        peer.retry_at = None
        peer.retry_wait = self.settings.upgrade_retry
        relay_at = self._relay_start(peer)
        for pair in pairs.values():
            if pair is not peer.chosen:
                pair.begin(relay_at if pair.kind == "relay" else at, self.settings.fast_interval)
        self._plan_birthday(peer, ordered, at, mapping_varies, peer_mapping_varies)

    def set_relays(self, public_key: bytes, relays: Mapping[Address, int], now: float) -> None:
        """Make ``relays`` the relayed paths to the peer, each with its preference (lower wins).

        A relayed path is an address the caller routes through a relay (the shell wraps what is
        sent there and unwraps what comes back as if from there). New ones are probed from
        ``relay_delay`` after the current attempt's start (or ``now``, if later); ones no longer
        listed are forgotten, and if one was the chosen path, that path is lost
        (:class:`PathLost`, then probing again). Raises :class:`PunchError` if the peer is unknown.
        """
        peer = self._peer(public_key)
        new = {remote: int(preference) for remote, preference in relays.items()}
        for remote in set(peer.routed) - set(new):
            pair = peer.pairs.pop(remote, None)
            peer.relays.pop(remote, None)
            if pair is not None and pair is peer.chosen:
                self._lose(peer, pair, now)
        peer.routed = new
        peer.relays.update(new)
        start = max(now, self._relay_start(peer))
        for remote, preference in new.items():
            pair = peer.pairs.get(remote)
            if pair is None:
                pair = peer.pairs[remote] = _Pair(remote, "relay", preference)
                if peer.started:
                    pair.begin(start, self.settings.fast_interval)
            pair.kind = "relay"
            pair.preference = preference

    def mark_relayed(self, address: Address, preference: int | None) -> None:
        """Say that ``address``, whoever it turns out to belong to, is reached through a relay.

        For addresses learnt from traffic rather than given in advance: a datagram that a TURN
        server relayed from a peer who sent to our relayed address directly. A pair with such an
        address is of kind ``"relay"``, with this ``preference``; ``None`` forgets the address.
        """
        if preference is None:
            self._relayed.pop(address, None)
        else:
            self._relayed[address] = int(preference)
        for peer in self._peers.values():
            pair = peer.pairs.get(address)
            if pair is not None:
                pair.kind = peer.kind_of(address, self._relayed)
                pair.preference = peer.preference_of(address, self._relayed)

    def _relay_start(self, peer: _Peer) -> float:
        """When relayed pairs of the current attempt may start: at once if nothing else can work."""
        if not any(p.kind != "relay" for p in peer.pairs.values()):
            return peer.attempt_at
        return peer.attempt_at + self.settings.relay_delay

    def path(self, public_key: bytes) -> PathChosen | None:
        """Return the chosen path to a peer, or ``None``. Raises :class:`PunchError` if unknown."""
        pair = self._peer(public_key).chosen
        if pair is None or pair.rtt is None:
            return None
        return PathChosen(public_key, pair.remote, pair.kind, pair.rtt)

    def probes_sent_to(self, public_key: bytes) -> int:
        """Return the probes sent to a peer in its current attempt (0 for an unknown peer)."""
        peer = self._peers.get(public_key)
        return 0 if peer is None else peer.probes_sent

    def seen_as(self, public_key: bytes) -> Address | None:
        """Return where the peer last saw our probes come from (the address in its latest
        authenticated pong), or ``None``. Raises :class:`PunchError` if the peer is unknown."""
        return self._peer(public_key).seen_as

    def _peer(self, public_key: bytes) -> _Peer:
        peer = self._peers.get(public_key)
        if peer is None:
            raise PunchError("no such peer")
        return peer

    # ------------------------------------------------------------------ shell interface

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Return and forget the probes to send, as ``(datagram, address)``."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> PunchEvent | None:
        """Return the oldest unread event, or ``None``."""
        return self._events.popleft() if self._events else None

    def socket_datagrams(self) -> list[SocketDatagram]:
        """Return and forget the birthday probes to send from extra sockets (:class:`OpenSockets`)."""
        out, self._socket_out = self._socket_out, []
        return out

    def next_socket_action(self) -> SocketAction | None:
        """Return the oldest unread instruction for the shell's extra sockets, or ``None``."""
        return self._actions.popleft() if self._actions else None

    def birthday_hit(
        self, public_key: bytes, socket: int, data: bytes, addr: Address, now: float
    ) -> bool:
        """Say whether a datagram that extra socket ``socket`` of the peer read got through.

        It did if it is a probe under the peer's key (key id and MAC; the full checks follow when
        the shell hands it on) from the peer's endpoint, while this peer's birthday attempt runs.
        The first one names the socket (:class:`KeepSocket`); later ones count only from it. The
        shell then hands the datagram to the main receive path as from ``addr``; anything else it
        drops. Never raises.
        """
        peer = self._peers.get(public_key)
        bday = peer.bday if peer is not None else None
        if peer is None or bday is None or bday.role != "hard" or bday.schedule is None:
            return False
        if _normalize(addr) != bday.target:
            return False
        if bday.kept is not None:
            return socket == bday.kept
        if probe_sender(data) != peer.key_id or not verify_mac(data, peer.key):
            return False
        bday.kept, bday.hit = socket, True
        peer.bday_kept = True
        self._actions.append(KeepSocket(public_key, socket, bday.target))
        pair = peer.pairs.get(bday.target)
        if pair is not None and pair.state in (_FAILED, _WAITING) and pair is not peer.chosen:
            pair.begin(
                now, self.settings.fast_interval
            )  # so the peer's ping gets a triggered check
        return True

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` should run next (the caller's clock), or ``None``."""
        deadline: float | None = None
        for peer in self._peers.values():
            retry = peer.retry_at
            if retry is not None and (deadline is None or retry < deadline):
                deadline = retry
            bday = peer.bday
            if bday is not None:
                schedule = bday.schedule
                if schedule is None:
                    when = bday.begin
                else:  # after a hit nothing more is sent: only the end is due
                    when = schedule.end if bday.hit else schedule.next_deadline()
                if deadline is None or when < deadline:
                    deadline = when
            for pair in peer.pairs.values():
                due = pair.next_send
                if due is not None and (deadline is None or due < deadline):
                    deadline = due
        return deadline

    def handle_timer(self, now: float) -> None:
        """Send the probes due at ``now`` and notice unanswered pairs and lost paths."""
        for peer in self._peers.values():
            if peer.retry_at is not None and peer.retry_at <= now:
                self._retry_direct(peer, now)
            for pair in list(peer.pairs.values()):
                if pair.next_send is not None and pair.next_send <= now:
                    self._due(peer, pair, now)
            if peer.bday is not None:
                self._birthday_due(peer, peer.bday, now)
            self._check_failed(peer)
            self._check_upgrade(peer, now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Process one probe datagram from ``addr`` received at ``now``.

        Probes that fail a check are dropped and counted in :attr:`counters`; never raises.
        """
        sender = probe_sender(data)
        source = _normalize(addr)
        if sender is None or source is None:
            self.counters["malformed"] += 1
            return
        peer = self._by_key_id.get(sender)
        if peer is None:
            self.counters["self" if sender == self.key_id else "unknown_key"] += 1
            return
        try:
            probe = peer.guard.check(data, self._wall())
        except ProbeRejected as exc:
            self.counters[exc.reason] += 1
            return
        txid = bytes(probe.txid)
        if probe.kind == PING:
            self._on_ping(peer, txid, source, now)
        else:
            self._on_pong(peer, txid, source, probe.observed, now)

    # ------------------------------------------------------------------ internals

    def _send(
        self, peer: _Peer, kind: int, txid: bytes, to: Address, observed: Address | None
    ) -> None:
        self._out.append(
            (build_probe(kind, txid, self.key_id, self._wall(), peer.key, observed), to)
        )
        self.probes_sent += 1

    def _ping(self, peer: _Peer, pair: _Pair, now: float) -> None:
        txid = self._random(12)
        peer.outstanding[txid] = (pair, now)
        if len(peer.outstanding) > _OUTSTANDING_LIMIT:
            del peer.outstanding[next(iter(peer.outstanding))]
        pair.unanswered += 1
        pair.last_ping = now
        peer.probes_sent += 1
        self._send(peer, PING, txid, pair.remote, None)

    def _due(self, peer: _Peer, pair: _Pair, now: float) -> None:
        s = self.settings
        if pair is peer.chosen:
            if pair.unanswered >= s.lost_after:
                self._lose(peer, pair, now)
                return
            self._ping(peer, pair, now)
            pair.next_send = now + s.heartbeat_retry
            return
        if pair.state != _PROBING:
            pair.next_send = None
            return
        if pair.unanswered >= s.max_unanswered:
            pair.state = _FAILED
            pair.next_send = None
            return
        self._ping(peer, pair, now)
        if now - pair.started >= s.fast_period - 1e-9:
            pair.interval = min(s.backoff_max, pair.interval * 2)
        pair.next_send = now + pair.interval

    def _lose(self, peer: _Peer, pair: _Pair, now: float) -> None:
        peer.chosen = None
        self._events.append(PathLost(peer.public_key, pair.remote, pair.kind))
        # Addresses that answered before get a fresh attempt; the lost one too, as a last resort.
        for other in peer.pairs.values():
            if other.state == _SUCCEEDED or other is pair:
                other.rtt = None
                other.begin(now, self.settings.fast_interval)
        peer.failed_reported = False
        peer.probes_sent = 0

    def _check_upgrade(self, peer: _Peer, now: float) -> None:
        """While a relay carries the path and no direct pair is left probing, plan a retry."""
        chosen = peer.chosen
        if chosen is None or chosen.kind != "relay" or peer.retry_at is not None:
            return
        direct = peer.direct_pairs()
        if direct and all(p.state == _FAILED for p in direct):
            peer.retry_at = now + peer.retry_wait
            self._events.append(DirectFailed(peer.public_key, peer.retry_wait))

    def _retry_direct(self, peer: _Peer, now: float) -> None:
        peer.retry_at = None
        peer.retry_wait = min(self.settings.upgrade_retry_max, peer.retry_wait * 2)
        for pair in peer.direct_pairs():
            if pair.state == _FAILED:
                pair.begin(now, self.settings.fast_interval)

    def _check_failed(self, peer: _Peer) -> None:
        if not peer.started or peer.failed_reported or peer.chosen is not None:
            return
        bday = peer.bday
        if bday is not None and (bday.schedule is not None or bday.in_attempt):
            return  # the birthday attempt belongs to this punch attempt: wait for it
        if peer.pairs and all(p.state == _FAILED for p in peer.pairs.values()):
            peer.failed_reported = True
            self._events.append(PunchFailed(peer.public_key, peer.probes_sent))

    def _on_ping(self, peer: _Peer, txid: bytes, source: Address, now: float) -> None:
        bday = peer.bday
        if (
            bday is not None
            and bday.role == "easy"
            and source[0] == bday.target[0]
            and source[1] in bday.probed
        ):
            bday.hit = True  # the hard side answers through a mapping we found: stop spraying
        pair = peer.pairs.get(source)
        if pair is None:
            try:
                priority = Candidate(CandidateType.PRFLX, source[0], source[1]).priority
            except CandidateError:  # port 0, loopback, broadcast...: no pong, no pair
                self.counters["wrong_source"] += 1
                return
        self._send(peer, PONG, txid, source, source)
        if pair is None:
            if len(peer.pairs) >= self.settings.max_pairs:
                self.counters["pair_limit"] += 1
                return
            pair = _Pair(source, peer.kind_of(source, self._relayed), priority)
            pair.preference = peer.preference_of(source, self._relayed)
            peer.pairs[source] = pair
        peer.started = True  # if the peer began first, start with it
        fast = self.settings.fast_interval
        if pair.state == _WAITING:
            pair.begin(now, fast)
        if (
            pair.state == _PROBING
            and pair.unanswered < self.settings.max_unanswered
            and now - pair.last_ping >= fast
        ):
            # A triggered check: the peer is at ``source`` now, so ping it back at once (within
            # the pair's probe budget: only a pong from an address refills it).
            self._ping(peer, pair, now)
            pair.next_send = now + pair.interval

    def _on_pong(
        self, peer: _Peer, txid: bytes, source: Address, observed: Address | None, now: float
    ) -> None:
        entry = peer.outstanding.get(txid)
        if entry is None:
            entry = self._birthday_pong(peer, txid, source)
        if entry is None:
            self.counters["unexpected_pong"] += 1
            return
        pair, sent = entry
        if source != pair.remote:
            self.counters["wrong_source"] += 1
            return
        peer.outstanding.pop(txid, None)
        if observed is not None:
            peer.seen_as = observed
        sample = max(0.0, now - sent)
        pair.rtt = sample if pair.rtt is None else 0.875 * pair.rtt + 0.125 * sample
        pair.unanswered = 0
        if pair is peer.chosen:
            pair.next_send = pair.last_ping + self.settings.heartbeat_interval
            return
        if pair.state == _SUCCEEDED:
            return
        pair.state = _SUCCEEDED
        pair.next_send = None
        chosen = peer.chosen
        if chosen is None or self._better(pair, chosen):
            if chosen is not None:
                chosen.next_send = None
            peer.chosen = pair
            if pair.kind != "relay":
                peer.retry_at = None
                peer.retry_wait = self.settings.upgrade_retry
            pair.next_send = now + self.settings.heartbeat_interval
            self._events.append(PathChosen(peer.public_key, pair.remote, pair.kind, sample))
        if pair.kind != "relay" and peer.bday is not None:
            self._birthday_done(peer, peer.bday, now)

    # ------------------------------------------------------------------ birthday punching

    def _plan_birthday(
        self,
        peer: _Peer,
        ordered: list[Candidate],
        at: float,
        ours: bool | None,
        theirs: bool | None,
    ) -> None:
        s = self.settings.birthday
        role = birthday_role(ours, theirs) if s is not None else None
        bday = peer.bday
        if bday is not None and bday.schedule is not None:
            return  # an attempt runs: let it finish
        peer.bday = None
        if s is None or role is None:
            return
        # Design decision: birthday punching is IPv4's: it answers NATs that map per destination,
        # and IPv6 has no address translation to defeat (its extra sockets are IPv4 ones too).
        srflx = [c for c in ordered if c.type is CandidateType.SRFLX and c.version == 4]
        if 4 not in self.families:
            return
        if not srflx:
            return
        if role == "hard":
            target, predicted = srflx[0].endpoint, []
        else:
            ip = srflx[0].address
            target = (ip, 0)
            predicted = predicted_ports([c.port for c in srflx if c.address == ip], s)
        begin = max(at + s.delay, peer.bday_next)
        peer.bday = _Birthday(role, begin, target, predicted, begin <= at + s.delay + 1e-9)

    def _birthday_due(self, peer: _Peer, bday: _Birthday, now: float) -> None:
        s = self.settings.birthday
        assert s is not None
        if bday.schedule is None:
            if now < bday.begin:
                return
            chosen = peer.chosen
            if chosen is not None and chosen.kind != "relay":
                peer.bday = None  # a direct path works: nothing to do
                return
            if bday.role == "hard":
                items: Sequence[int] = range(s.sockets)
                self._actions.append(OpenSockets(peer.public_key, s.sockets))
                peer.bday_kept = False
            else:
                rng = _random.Random(int.from_bytes(self._random(8), "big"))
                items = probe_ports(rng, bday.predicted, s)
            bday.schedule = BirthdaySchedule(bday.role, items, now, s)
        schedule = bday.schedule
        if not bday.hit:
            for item in schedule.due(now):
                txid = self._random(12)
                bday.txids[txid] = (item, now)
                peer.probes_sent += 1
                self.birthday_probes += 1
                wall = self._wall()
                data = build_probe(PING, txid, self.key_id, wall, peer.key)
                self.probes_sent += 1
                if bday.role == "hard":
                    self._socket_out.append(
                        SocketDatagram(peer.public_key, item, data, bday.target)
                    )
                else:
                    bday.probed.add(item)
                    self._out.append((data, (bday.target[0], item)))
        if now >= schedule.end - 1e-9:
            self._birthday_done(peer, bday, now)

    def _birthday_done(self, peer: _Peer, bday: _Birthday, now: float) -> None:
        """End an attempt: success if the chosen path is now a direct one it found."""
        s = self.settings.birthday
        assert s is not None
        peer.bday = None
        if bday.schedule is None:
            return  # never began (a direct path was found first): no sockets, no backoff
        chosen = peer.chosen
        won = chosen is not None and chosen.kind != "relay" and bday.hit
        if won:
            peer.bday_failures = 0
            peer.bday_next = -_INF
            return
        if bday.role == "hard" or peer.bday_kept:
            self._actions.append(CloseSockets(peer.public_key))
            peer.bday_kept = False
        if chosen is not None and chosen.kind != "relay":
            return  # the ordinary punch found a path meanwhile
        peer.bday_failures += 1
        peer.bday_next = now + s.backoff(peer.bday_failures)
        if chosen is not None:  # relayed: try again after the backoff, to upgrade
            peer.bday = _Birthday(bday.role, peer.bday_next, bday.target, bday.predicted, False)

    def _birthday_pong(
        self, peer: _Peer, txid: bytes, source: Address
    ) -> tuple[_Pair, float] | None:
        """The pair and send time of a birthday ping that ``source`` answered, or ``None``."""
        bday = peer.bday
        if bday is None:
            return None
        entry = bday.txids.get(txid)
        if entry is None:
            return None
        item, sent = entry
        expected = bday.target if bday.role == "hard" else (bday.target[0], item)
        if source != expected:
            return None
        bday.hit = True
        pair = peer.pairs.get(source)
        if pair is None:
            priority = Candidate(CandidateType.PRFLX, source[0], source[1]).priority
            pair = _Pair(source, peer.kind_of(source, self._relayed), priority)
            peer.pairs[source] = pair
        return pair, sent

    def _better(self, new: _Pair, old: _Pair) -> bool:
        new_rank, old_rank = _RANK[new.kind], _RANK[old.kind]
        if new_rank != old_rank:
            return new_rank < old_rank
        if new.kind == "relay" and new.preference != old.preference:
            return new.preference < old.preference
        if new.rtt is None or old.rtt is None:
            return False
        new_v6, old_v6 = ":" in new.remote[0], ":" in old.remote[0]
        if new_v6 != old_v6:
            # Design decision: IPv6 wins near-ties (no NAT mapping to expire or rebind); the
            # two thresholds leave a gap between them, so the choice cannot flap.
            margin = self.settings.family_margin
            if new_v6:
                return new.rtt <= old.rtt + margin
            return new.rtt < (old.rtt - margin) * self.settings.upgrade_ratio
        return new.rtt < old.rtt * self.settings.upgrade_ratio
