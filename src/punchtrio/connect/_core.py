"""The connector's decisions, sans-IO: per-peer stages as one transition table.

:class:`ConnectCore` holds every rule of the pipeline that is not I/O: when a peer's wait ends,
what the "punch now" signal says and which signals count, who starts the first WireGuard
handshake, what a punch failure means before and after the tunnel is up, and every timeout. It is
driven like the other punchtrio cores: :meth:`ConnectCore.handle` takes one input (a frozen
dataclass: :data:`CoreInput`) and ``now``; :meth:`~ConnectCore.receive_probe` takes a probe
datagram; :meth:`~ConnectCore.get_timer` / :meth:`~ConnectCore.handle_timer` drive its deadlines.
Out come probes (:meth:`~ConnectCore.datagrams_to_send`), actions for the shell
(:meth:`~ConnectCore.next_action`: rendezvous calls to make) and the connector's events
(:meth:`~ConnectCore.next_event`). It composes the two lower cores it decides for: the
:class:`~punchtrio.punch.Puncher` and the WireGuard :class:`~punchtrio.wireguard.Device` (only
their synchronous, pure methods are called).

Every stage change of a peer is a row of :data:`TRANSITIONS`, and nothing else changes a stage;
``docs/connect.md`` shows the table as a diagram drawn by :func:`state_diagram`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from .._exceptions import PunchtrioError
from ..keys import PublicKey
from ..punch import Candidate, CandidateError, Puncher
from ..punch import DirectFailed as _PunchDirectFailed
from ..punch import PathChosen as _PunchPathChosen
from ..punch import PathLost as _PunchPathLost
from ..punch import PunchFailed as _PunchFailed
from ..rendezvous import PeerRecord
from ..wireguard import ConfigError, PeerConfig, PeerStats
from ..wireguard import HandshakeCompleted as _WgHandshakeCompleted
from ._events import (
    CandidatesGathered,
    ConnectEvent,
    DirectPathFailed,
    HandshakeCompleted,
    PathChanged,
    PathChosen,
    PathKind,
    PathLost,
    PeerConnected,
    PeerFailed,
    PeerFound,
    PeerRemoved,
    PunchStarted,
    Registered,
    Stage,
    StageStarted,
)

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RELAYED_REFRESH = 60.0
"""Seconds between fetches of a relayed peer's record: its candidates may have changed (a new
NAT mapping), and the direct-path retries should aim at the current ones."""

SIGNAL_PREFIX = "punchtrio-punch/1"
"""First word of the "punch now" signal:
``punchtrio-punch/1 <sender's revision> <nat> <sender's session>`` (the session word is
optional on receipt: the first release did not send it)."""

REGATHER_INTERVAL = 5.0
"""Seconds at least between two re-STUNs asked for by lost paths (several peers lose theirs at
once when our NAT forgets its mappings)."""

PEER_DOWN_AFTER = 20.0
"""Seconds a connected peer may be without a path (its last one stopped answering heartbeats, and
no new one was found) before it is reported down: :class:`PeerFailed` at the ``"established"``
stage, then retried. The puncher notices a dead path 4 to 9 s after it broke, so a peer that
vanished is reported within about 30 s."""

LISTEN_RETRY = 5.0
"""Seconds before listening for a peer's signals again after the rendezvous dropped the
listener (it restarted, or the network failed) while the peer was connected."""

_NAT_WORDS = {True: "varies", False: "fixed", None: "unknown"}

Input = Literal[
    "record",
    "signal",
    "no_signalling",
    "path",
    "punch_failed",
    "handshake",
    "timeout",
    "failed",
    "retry",
]
"""What can happen to a peer, as the transition table names it."""

FAILED: Literal["failed"] = "failed"
"""The state a peer is in after a stage failed (it keeps the stage it failed at), until its
retry begins."""

State = Stage | Literal["failed"]
"""A peer's place in :data:`TRANSITIONS`: a stage, or :data:`FAILED`."""

TRANSITIONS: dict[tuple[State, Input], State] = {
    ("wait", "record"): "wait",
    ("wait", "signal"): "punch",
    ("wait", "no_signalling"): "punch",
    ("wait", "handshake"): "punch",
    ("wait", "timeout"): FAILED,
    ("wait", "failed"): FAILED,
    ("register", "failed"): FAILED,
    ("punch", "path"): "handshake",
    ("punch", "punch_failed"): FAILED,
    ("handshake", "handshake"): "established",
    ("handshake", "path"): "handshake",
    ("handshake", "timeout"): FAILED,
    ("established", "timeout"): FAILED,
    ("established", "path"): "established",
    ("established", "punch_failed"): "established",
    ("established", "handshake"): "established",
    ("established", "record"): "established",
    ("established", "signal"): "established",
    (FAILED, "retry"): "wait",
}
"""Every stage change of a peer: ``(stage, input) -> next stage`` (or :data:`FAILED`).

A peer starts in ``"wait"`` once our candidates are known (``"register"`` while our own
registration is outstanding only matters for failing). ``"record"`` is the peer's record arriving,
``"signal"`` its "punch now" signal (counted only once we hold a record at least as new; a
WireGuard session the peer made with us while we waited counts as well: it proves the peer is
punching), ``"path"``
the puncher choosing a path, ``"handshake"`` a completed WireGuard handshake, ``"timeout"`` the
stage's deadline passing (for a connected peer: :data:`PEER_DOWN_AFTER` without a path), ``"failed"`` an error (a refused lookup, an unusable record, our own
registration refused), ``"retry"`` the end of a failed peer's backoff. A ``"signal"`` while
established comes from a peer that restarted or moved: its record is fetched again and the
tunnel re-punched. An input with no row for the peer's state is ignored.
"""


def state_diagram() -> str:
    """Return :data:`TRANSITIONS` as a Mermaid state diagram (the one in ``docs/connect.md``)."""
    lines = ["stateDiagram-v2", "    [*] --> wait: candidates gathered"]
    for (stage, event), target in TRANSITIONS.items():
        if stage == target:
            continue
        lines.append(f"    {stage} --> {target}: {event}")
    lines.append("    established --> [*]: scope ends")
    return "\n".join(lines) + "\n"


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    """Our candidates are known (also after each re-STUN): ``networks`` are our interfaces'
    prefixes, which decide what ``"lan"`` means; ``announce`` is False for a quiet refresh."""

    candidates: tuple[Candidate, ...]
    mapping_varies: bool | None
    stun_error: str | None
    networks: tuple[Network, ...]
    announce: bool = True


@dataclass(frozen=True)
class RegisterDone:
    """The rendezvous stored our record."""

    record: PeerRecord


@dataclass(frozen=True)
class RegisterFailed:
    """The rendezvous refused our registration or could not be reached; ``reason`` is one line."""

    reason: str


@dataclass(frozen=True)
class RecordFound:
    """The rendezvous returned ``peer``'s record (an answer to :class:`WaitForRecord` or
    :class:`FetchRecord`)."""

    peer: str
    record: PeerRecord


@dataclass(frozen=True)
class LookupFailed:
    """Looking ``peer`` up failed; ``reason`` is one line."""

    peer: str
    reason: str


@dataclass(frozen=True)
class SignalReceived:
    """A message from ``peer`` arrived through the rendezvous (any text: it is checked here)."""

    peer: str
    data: str


@dataclass(frozen=True)
class SignalFailed:
    """Sending to or receiving from ``peer`` through the rendezvous failed."""

    peer: str
    reason: str


@dataclass(frozen=True)
class SignallingUnsupported:
    """The rendezvous cannot carry messages: punching starts at once."""

    peer: str


@dataclass(frozen=True)
class WireGuardEvent:
    """An event of the WireGuard device (only its ``HandshakeCompleted`` matters here)."""

    event: object


@dataclass(frozen=True)
class RemovePeer:
    """Forget ``peer`` (its record expired or was deleted): its WireGuard peer and allowed IPs,
    its path and every timer. ``reason`` is one line for :class:`PeerRemoved`. Removing a peer
    that is not known does nothing; inputs that still name it afterwards are ignored."""

    peer: str
    reason: str


CoreInput = (
    Gathered
    | RegisterDone
    | RegisterFailed
    | RecordFound
    | LookupFailed
    | SignalReceived
    | SignalFailed
    | SignallingUnsupported
    | WireGuardEvent
    | RemovePeer
)
"""Everything :meth:`ConnectCore.handle` accepts."""


# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitForRecord:
    """Long-poll the rendezvous for ``peer``'s record; answer :class:`RecordFound` or
    :class:`LookupFailed`."""

    peer: str


@dataclass(frozen=True)
class FetchRecord:
    """Look ``peer``'s record up once (it changed, or a re-punch wants fresh candidates)."""

    peer: str


@dataclass(frozen=True)
class ListenForSignals:
    """Receive ``peer``'s messages until told to stop; answer each with :class:`SignalReceived`."""

    peer: str


@dataclass(frozen=True)
class SendSignal:
    """Send ``data`` to ``peer`` through the rendezvous; answer failures with :class:`SignalFailed`."""

    peer: str
    data: str


@dataclass(frozen=True)
class PeerRecordLoaded:
    """A record of ``peer`` was accepted (the first one adds its key to the device and the
    puncher): give it relayed paths, and permit its ``candidates`` at our TURN allocation."""

    peer: str
    public_key: PublicKey
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class PeerSettled:
    """``peer`` is connected or failed: waiters on it may go on; its wait-stage tasks may stop."""

    peer: str


@dataclass(frozen=True)
class PeerRetrying:
    """A failed ``peer`` is being connected again: waiters on it wait for the new attempt."""

    peer: str


@dataclass(frozen=True)
class Regather:
    """Gather our candidates again now (re-STUN) and register them if they changed: a path was
    lost, perhaps because our NAT gave us a new public port."""


@dataclass(frozen=True)
class PeerForgotten:
    """``peer`` was removed: stop every task of it, drop its relayed paths (``public_key``,
    ``None`` if its record never came); waiters on it go on (it is gone)."""

    peer: str
    public_key: bytes | None = None


Action = (
    WaitForRecord
    | FetchRecord
    | ListenForSignals
    | SendSignal
    | PeerRecordLoaded
    | PeerSettled
    | PeerRetrying
    | Regather
    | PeerForgotten
)
"""Everything :meth:`ConnectCore.next_action` returns."""


class CoreError(PunchtrioError):
    """A call to :class:`ConnectCore` was wrong (an unknown peer)."""


# -- the core ----------------------------------------------------------------------------------


@dataclass
class CorePeer:
    """What the core knows about one peer (read it through :meth:`ConnectCore.peer`)."""

    name: str
    stage: Stage | None = None
    key: bytes | None = None
    public_key: PublicKey | None = None
    record: PeerRecord | None = None
    candidates: tuple[Candidate, ...] = ()
    their_nat: bool | None = None
    pending_signal: int | None = None  # the revision a signal named, before its record came
    refetching: bool = False  # a signal named a newer revision: the next record is the one
    sent_signal: bool = False
    no_signalling: bool = False
    deadline: float | None = None
    punch_started: float = 0.0
    repunch_at: float | None = None
    path: PathKind | None = None
    last_path: PathKind | None = None
    endpoint: str | None = None
    relay: str | None = None
    direct_error: str | None = None  # why no direct path answered while relayed
    error: tuple[Stage, str] | None = None
    connected: PeerConnected | None = None
    handshaken: bool = False  # a WireGuard session exists (it may come before our own punch)
    session: str | None = None  # the session word of the peer's last signal
    old_sessions: tuple[str, ...] = ()  # earlier runs of the peer: their signals are stale
    fresh_handshake: bool = False  # the peer restarted: its session is gone, start a new one
    listening: bool = False
    listen_at: float | None = None
    failures: int = 0
    retry_at: float | None = None


class CoreDevice(Protocol):
    """What :class:`ConnectCore` asks of a WireGuard device: punchtrio's own
    :class:`~punchtrio.wireguard.Device`, or :class:`~punchtrio.connect.UapiDevice` for
    wireguard-go. Each method raises :class:`~punchtrio.wireguard.ConfigError` for an unknown or
    invalid peer."""

    def add_peer(self, config: PeerConfig) -> None:
        """Add a peer."""
        ...

    def remove_peer(self, public_key: bytes) -> None:
        """Remove a peer with its sessions and allowed IPs."""
        ...

    def set_endpoint(self, public_key: bytes, endpoint: tuple[str, int]) -> None:
        """Send to ``endpoint`` from now on."""
        ...

    def initiate_handshake(self, public_key: bytes, now: float, *, restarted: bool = False) -> None:
        """Start a new handshake with the peer."""
        ...

    def peer_stats(self) -> Mapping[bytes, PeerStats]:
        """Each peer's statistics, by public key."""
        ...


class ConnectCore:
    """The decisions of a :class:`~punchtrio.connect.Connector`, without I/O (see the module docs).

    - ``public_key``: ours; ``device`` and ``puncher``: the WireGuard and punch cores the shell
      drives on the shared socket (peers are added to both here).
    - ``persistent_keepalive`` (seconds) for every peer; ``wait_timeout`` for a peer's record and
      signal, ``handshake_timeout`` for the first handshake after a path is chosen, and
      ``repunch_delay`` before a tunnel whose every path failed is punched again with a fresh
      record (seconds).
    - ``describe_path(address)`` returns ``(endpoint text, relay name or None)`` for a path (the
      shell knows which addresses are relayed); ``relay_status()`` one line on the relays, for the
      reason of a punch failure.
    - ``retry_backoff``: seconds before a failed peer is tried again, doubling after each
      failure up to ``retry_max`` and reset once it connects; ``None`` leaves failed peers failed.
    - ``session``: a word that names this run in our signals (random by default), so that a
      peer sees when we restarted even if our record did not change.
    - ``start`` is the shell's clock at the start, for ``elapsed_ms``.
    """

    def __init__(
        self,
        *,
        public_key: PublicKey,
        device: CoreDevice,
        puncher: Puncher,
        persistent_keepalive: float,
        wait_timeout: float,
        handshake_timeout: float,
        repunch_delay: float,
        describe_path: Callable[[Address], tuple[str, str | None]],
        relay_status: Callable[[], str],
        start: float,
        retry_backoff: float | None = 2.0,
        retry_max: float = 60.0,
        session: str | None = None,
    ) -> None:
        self.public_key = public_key
        self.device = device
        self.puncher = puncher
        self._keepalive = persistent_keepalive
        self._wait_timeout = wait_timeout
        self._handshake_timeout = handshake_timeout
        self._repunch_delay = repunch_delay
        self._describe = describe_path
        self._relay_status = relay_status
        self._retry_backoff = retry_backoff
        self._retry_max = retry_max
        self.session = session if session is not None else secrets.token_hex(8)
        """The session word of our signals."""
        self._regathered_at = -math.inf
        self.started_at = start
        """The shell's clock when the connector started (``elapsed_ms`` counts from it)."""
        self._peers: dict[str, CorePeer] = {}
        self._removed: set[str] = set()  # inputs naming these are late answers: ignored
        self._by_key: dict[bytes, CorePeer] = {}
        self._actions: deque[Action] = deque()
        self._events: deque[ConnectEvent] = deque()
        self._gathered: Gathered | None = None
        self.record: PeerRecord | None = None
        """Our record as the rendezvous last stored it."""
        self.register_error: str | None = None
        """Why our registration failed, if it did."""

    # -- reading -------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Every peer's name, in the order added."""
        return tuple(self._peers)

    def peer(self, name: str) -> CorePeer:
        """Return what the core knows about ``name``. Raises :class:`CoreError` if unknown."""
        peer = self._peers.get(name)
        if peer is None:
            raise CoreError(f"no peer named {name!r}")
        return peer

    def peer_by_key(self, key: bytes) -> CorePeer | None:
        """Return the peer with this public key, or ``None``."""
        return self._by_key.get(key)

    @property
    def gathered(self) -> Gathered | None:
        """The last :class:`Gathered` input, or ``None`` before the first."""
        return self._gathered

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Our candidates as last gathered."""
        return self._gathered.candidates if self._gathered is not None else ()

    @property
    def mapping_varies(self) -> bool | None:
        """Whether our NAT maps per destination, as STUN last saw it."""
        return self._gathered.mapping_varies if self._gathered is not None else None

    @property
    def stalled(self) -> bool:
        """Whether no peer can connect any more without the caller: our registration failed
        (never retried here), or there are peers and every one failed with no retry to come."""
        if self.register_error is not None:
            return True
        peers = self._peers.values()
        return bool(peers) and all(p.error is not None and p.retry_at is None for p in peers)

    # -- shell interface -----------------------------------------------------------------

    def next_action(self) -> Action | None:
        """Return the oldest action for the shell, or ``None``."""
        return self._actions.popleft() if self._actions else None

    def next_event(self) -> ConnectEvent | None:
        """Return the oldest connector event, or ``None``."""
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Return and forget the probes to send."""
        return self.puncher.datagrams_to_send()

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` should run next, or ``None``."""
        times = [self.puncher.get_timer()]
        for peer in self._peers.values():
            times.extend((peer.deadline, peer.repunch_at, peer.retry_at, peer.listen_at))
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        """Run the puncher's timers and every peer deadline that passed."""
        self.puncher.handle_timer(now)
        for peer in list(self._peers.values()):
            if peer.deadline is not None and peer.deadline <= now:
                peer.deadline = None
                self._timeout(peer, now)
            if peer.repunch_at is not None and peer.repunch_at <= now:
                peer.repunch_at = now + RELAYED_REFRESH if peer.path == "relay" else None
                self._actions.append(FetchRecord(peer.name))
            if peer.retry_at is not None and peer.retry_at <= now:
                peer.retry_at = None
                self._step(peer, "retry", now)
            if peer.listen_at is not None and peer.listen_at <= now:
                peer.listen_at = None
                self._listen(peer)
        self._after_puncher(now)

    def receive_probe(self, data: bytes, addr: Address, now: float) -> None:
        """Process one probe datagram (called inside the tunnel's drain loop)."""
        self.puncher.receive_datagram(data, addr, now)
        self._after_puncher(now)

    def add_peer(self, name: str, now: float) -> None:
        """Connect to ``name`` (nothing happens if it is already known)."""
        if name in self._peers:
            return
        self._removed.discard(name)
        peer = self._peers[name] = CorePeer(name)
        if self.register_error is not None:
            self._fail(peer, "register", self.register_error, now)
        elif self._gathered is not None:
            self._begin_wait(peer, now)

    def handle(self, item: CoreInput, now: float) -> None:
        """Take one input (see :data:`CoreInput`) at ``now``.

        Raises :class:`CoreError` for an input naming a peer that was never added (one that
        was removed is ignored: a rendezvous answer may arrive after the removal).
        """
        if getattr(item, "peer", None) in self._removed:
            return
        if isinstance(item, RemovePeer):
            self._remove(item.peer, item.reason)
        elif isinstance(item, Gathered):
            self._on_gathered(item, now)
        elif isinstance(item, RegisterDone):
            self._on_registered(item.record, now)
        elif isinstance(item, RegisterFailed):
            self._on_register_failed(item.reason, now)
        elif isinstance(item, RecordFound):
            self._on_record(self.peer(item.peer), item.record, now)
        elif isinstance(item, LookupFailed):
            peer = self.peer(item.peer)
            if peer.stage == "established":
                self._repunch(peer, now)  # with the candidates we have
            else:
                self._step(peer, "failed", now, reason=f"looking up {peer.name}: {item.reason}")
        elif isinstance(item, SignalReceived):
            self._on_signal(self.peer(item.peer), item.data, now)
        elif isinstance(item, SignalFailed):
            peer = self.peer(item.peer)
            peer.listening = False  # a failed send ends the listener as well (see the shell)
            if peer.stage == "established" and peer.error is None:
                peer.listen_at = now + LISTEN_RETRY  # keep hearing of the peer's restarts
            self._step(peer, "failed", now, reason=f"signalling {peer.name} failed: {item.reason}")
        elif isinstance(item, SignallingUnsupported):
            peer = self.peer(item.peer)
            peer.listening = False
            peer.no_signalling = True  # punch at once: triggered checks cover the difference
            if peer.record is not None:
                self._step(peer, "no_signalling", now)
        elif isinstance(item, WireGuardEvent):
            self._on_wireguard(item.event, now)
        self._after_puncher(now)

    def _remove(self, name: str, reason: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        self._removed.add(name)
        if peer.key is not None:
            del self._by_key[peer.key]
            with contextlib.suppress(ConfigError):
                self.device.remove_peer(peer.key)  # its sessions and allowed IPs (routes)
            with contextlib.suppress(PunchtrioError):
                self.puncher.remove_peer(peer.key)
        # Actions queued for it would start tasks for a peer that no longer exists.
        self._actions = deque(a for a in self._actions if getattr(a, "peer", None) != name)
        self._events.append(PeerRemoved(name, reason))
        self._actions.append(PeerForgotten(name, peer.key))

    # -- transitions -----------------------------------------------------------------------

    def _step(self, peer: CorePeer, what: Input, now: float, *, reason: str = "") -> bool:
        """Apply one row of :data:`TRANSITIONS`; return whether there was one."""
        if peer.stage is None:
            return False
        state: State = FAILED if peer.error is not None else peer.stage
        target = TRANSITIONS.get((state, what))
        if target is None:
            return False
        if target == FAILED:
            self._fail(peer, peer.stage, reason, now)
            return True
        entering = target != state
        peer.stage = target
        if entering:
            self._enter(peer, target, now)
        return True

    def _enter(self, peer: CorePeer, stage: Stage, now: float) -> None:
        if stage == "wait":  # a retry: the failed attempt is forgotten, the key stays
            peer.error = None
            peer.record = None
            peer.pending_signal, peer.refetching, peer.sent_signal = None, False, False
            peer.path = peer.endpoint = peer.relay = peer.direct_error = None
            peer.connected = None
            peer.handshaken = False
            self._actions.append(PeerRetrying(peer.name))
            self._begin_wait(peer, now)
        elif stage == "punch":
            assert peer.record is not None
            assert peer.public_key is not None
            peer.deadline = None
            self._events.append(PeerFound(peer.name, peer.public_key, peer.record))
            self._events.append(StageStarted("punch", peer.name))
            self._events.append(PunchStarted(peer.name, peer.candidates))
            peer.punch_started = now
            self._start_punch(peer, now)
            # A path chosen while we waited (the peer began first) is classified again now that
            # the record is here (a peer-reflexive address may be its LAN address): that event
            # comes first, then the stage moves on with the path as it now is.
            self._after_puncher(now)
            if peer.stage == "punch" and peer.path is not None:
                self._step(peer, "path", now)
        elif stage == "handshake":
            self._events.append(StageStarted("handshake", peer.name))
            peer.deadline = now + self._handshake_timeout
            self._initiate_again(peer, now)
            if peer.handshaken:
                # The peer chose its path first and its initiation already made a session.
                self._step(peer, "handshake", now)
        elif stage == "established":
            peer.deadline = None
            if peer.path == "relay":
                peer.repunch_at = now + RELAYED_REFRESH
            assert peer.path is not None
            assert peer.endpoint is not None
            elapsed = round((now - self.started_at) * 1000, 3)
            peer.connected = PeerConnected(peer.name, peer.path, peer.endpoint, elapsed, peer.relay)
            peer.failures = 0
            self._events.append(peer.connected)
            self._actions.append(PeerSettled(peer.name))

    def _fail(self, peer: CorePeer, stage: Stage, reason: str, now: float) -> None:
        peer.stage = stage
        peer.error = (stage, reason)
        peer.deadline = None
        retry: float | None = None
        if self._retry_backoff is not None and stage != "register":  # ours is not the peer's
            retry = min(self._retry_backoff * 2**peer.failures, self._retry_max)
            peer.failures += 1
            peer.retry_at = now + retry
        self._events.append(PeerFailed(peer.name, stage, reason, retry))
        self._actions.append(PeerSettled(peer.name))

    def _timeout(self, peer: CorePeer, now: float) -> None:
        if peer.stage == "established":
            reason = (
                f"{peer.name} stopped answering: no path to it for {PEER_DOWN_AFTER:g} s since "
                "the last one was lost"
            )
        elif peer.stage == "wait":
            reason = (
                f"{peer.name} did not appear at the rendezvous within {self._wait_timeout:g} s"
                if peer.record is None
                else f"{peer.name} did not signal within {self._wait_timeout:g} s"
            )
        else:
            reason = (
                f"no WireGuard handshake with {peer.name} at {peer.endpoint} "
                f"within {self._handshake_timeout:g} s"
            )
        self._step(peer, "timeout", now, reason=reason)

    # -- wait ------------------------------------------------------------------------------

    def _on_gathered(self, item: Gathered, now: float) -> None:
        first = self._gathered is None
        self._gathered = item
        if item.announce:
            self._events.append(
                CandidatesGathered(item.candidates, item.mapping_varies, item.stun_error)
            )
        if first:
            self._events.append(StageStarted("register"))  # peers wait for records meanwhile
            for peer in self._peers.values():
                if peer.stage is None and peer.error is None:
                    self._begin_wait(peer, now)

    def _begin_wait(self, peer: CorePeer, now: float) -> None:
        peer.stage = "wait"
        peer.deadline = now + self._wait_timeout
        self._events.append(StageStarted("wait", peer.name))
        self._actions.append(WaitForRecord(peer.name))
        if self.record is not None:  # a hub takes messages only from registered peers
            self._listen(peer)

    def _listen(self, peer: CorePeer) -> None:
        if not peer.listening and not peer.no_signalling:
            peer.listening = True
            self._actions.append(ListenForSignals(peer.name))

    def _on_registered(self, record: PeerRecord, now: float) -> None:
        old = self.record
        self.record = record
        self._events.append(Registered(record))
        if old is None:
            for peer in self._peers.values():
                if peer.error is not None or peer.stage != "wait":
                    continue
                self._listen(peer)
                if peer.record is not None and not peer.sent_signal:
                    self._send_signal(peer)
        elif record.revision != old.revision:
            # Our candidates changed (a new NAT mapping): connected peers learn it now, not at
            # their next lookup, and punch our new addresses.
            for peer in self._peers.values():
                if peer.stage == "established" and peer.error is None:
                    self._send_signal(peer)

    def _on_register_failed(self, reason: str, now: float) -> None:
        if self.record is not None:
            return  # a failed re-registration: the old record still stands
        self.register_error = f"the rendezvous refused or could not be reached: {reason}"
        for peer in self._peers.values():
            if peer.error is None:
                self._fail(peer, "register", self.register_error, now)

    def _on_record(self, peer: CorePeer, record: PeerRecord, now: float) -> None:
        if peer.error is not None:
            return
        key = record.public_key
        if peer.key is not None and key.raw != peer.key:
            if peer.stage == "established":
                self._repunch(peer, now)  # a new key under the name: not followed
                return
            self._step(peer, "failed", now, reason=f"{peer.name}'s record changed its key")
            return
        if peer.key is None:
            if key == self.public_key:
                self._step(peer, "failed", now, reason=f"{peer.name} has our own public key")
                return
            try:
                self.device.add_peer(
                    PeerConfig(
                        key.raw,
                        allowed_ips=record.allowed_ips,
                        persistent_keepalive=self._keepalive,
                    )
                )
                self.puncher.add_peer(key.raw)
            except (ConfigError, PunchtrioError) as exc:
                self._step(peer, "failed", now, reason=f"{peer.name}'s record: {exc}")
                return
            peer.key = key.raw
            peer.public_key = key
            self._by_key[key.raw] = peer
        peer.record = record
        peer.candidates = _candidates(record)
        self._actions.append(PeerRecordLoaded(peer.name, key, peer.candidates))
        if peer.stage == "established":
            self._repunch(peer, now)
            return
        self._step(peer, "record", now)
        if peer.stage != "wait":
            return
        if not peer.sent_signal and self.record is not None:
            self._send_signal(peer)
        if peer.no_signalling:
            self._step(peer, "no_signalling", now)
            return
        pending = peer.pending_signal
        if pending is None:
            return
        if peer.refetching or pending == record.revision:
            peer.pending_signal, peer.refetching = None, False
            self._step(peer, "signal", now)
        elif pending > record.revision:
            peer.refetching = True  # the peer registered again since: fetch the new record
            self._actions.append(FetchRecord(peer.name))
        else:
            peer.pending_signal = None  # left over from an earlier run of the peer

    def _send_signal(self, peer: CorePeer) -> None:
        assert self.record is not None
        peer.sent_signal = True
        self._actions.append(
            SendSignal(
                peer.name, signal_text(self.record.revision, self.mapping_varies, self.session)
            )
        )

    def _on_signal(self, peer: CorePeer, data: str, now: float) -> None:
        words = data.split(" ")
        if (
            len(words) not in (3, 4)
            or words[0] != SIGNAL_PREFIX
            or not words[1].isdigit()
            or not all(w.isascii() and w.isprintable() for w in words[2:])
        ):
            return  # not ours, or malformed: never trusted
        revision = int(words[1])
        nat = {"varies": True, "fixed": False}.get(words[2])
        session = words[3] if len(words) == 4 else None
        if session is not None and session in peer.old_sessions:
            return  # from an earlier run of the peer
        restarted = session is not None and peer.session is not None and session != peer.session
        if restarted and peer.session is not None:
            peer.old_sessions = (*peer.old_sessions[-7:], peer.session)
        if session is not None:
            peer.session = session
        if peer.stage == "established" and peer.error is None:
            peer.their_nat = nat
            if restarted or (peer.record is not None and revision > peer.record.revision):
                self._on_peer_moved(peer, restarted, now)
            return
        if peer.record is not None and revision < peer.record.revision and not restarted:
            return  # left over from an earlier run of the peer
        if restarted:
            peer.fresh_handshake = True  # it lost our session: the next handshake stage starts one
        peer.their_nat = nat
        if peer.record is None:
            peer.pending_signal = revision  # judged when the record arrives
            return
        if revision > peer.record.revision:
            peer.pending_signal = revision
            peer.refetching = True
            self._actions.append(FetchRecord(peer.name))
            return
        self._step(peer, "signal", now)

    def _on_peer_moved(self, peer: CorePeer, restarted: bool, now: float) -> None:
        """A connected peer restarted or registered new candidates: fetch its record (which
        re-punches), and answer a restarted one, which waits for our signal to punch."""
        self._step(peer, "signal", now)
        self._actions.append(FetchRecord(peer.name))
        if restarted:
            peer.fresh_handshake = True
            if self.record is not None:
                self._send_signal(peer)
            # The restarted peer sends its signal only once it holds our key, so it can answer an
            # initiation now. Waiting for the re-punch is not enough: a path that still works is
            # not chosen again, and the peer (if it is the responder) waits for our initiation.
            # The re-punch initiates again if it moves the path; a completed handshake ends it.
            if peer.path is not None and peer.key is not None and self.public_key.raw < peer.key:
                self.device.initiate_handshake(peer.key, now, restarted=True)

    # -- punch and after -------------------------------------------------------------------

    def _start_punch(self, peer: CorePeer, now: float) -> None:
        assert peer.key is not None
        networks = self._gathered.networks if self._gathered is not None else None
        self.puncher.start(
            peer.key,
            peer.candidates,
            now,
            local_networks=networks,
            mapping_varies=self.mapping_varies,
            peer_mapping_varies=peer.their_nat,
        )

    def _repunch(self, peer: CorePeer, now: float) -> None:
        if peer.key is not None:
            self._start_punch(peer, now)

    def _after_puncher(self, now: float) -> None:
        while (event := self.puncher.next_event()) is not None:
            peer = self._by_key.get(event.peer)
            if peer is None or peer.error is not None:
                continue
            if isinstance(event, _PunchPathChosen):
                self._on_path(peer, event, now)
            elif isinstance(event, _PunchPathLost):
                peer.path = None
                if peer.stage == "established" and peer.deadline is None:
                    peer.deadline = now + PEER_DOWN_AFTER  # down unless a path comes back
                self._events.append(PathLost(peer.name, self._describe(event.endpoint)[0]))
                if now - self._regathered_at >= REGATHER_INTERVAL:
                    self._regathered_at = now  # our public port may have changed: look
                    self._actions.append(Regather())
            elif isinstance(event, _PunchFailed):
                if peer.stage == "punch":
                    elapsed = now - peer.punch_started
                    why = _explain(peer.name, self.mapping_varies, peer.their_nat)
                    self._step(
                        peer,
                        "punch_failed",
                        now,
                        reason=f"no path to {peer.name} after {elapsed:.1f} s: {why}; "
                        f"{self._relay_status()}",
                    )
                elif peer.stage == "established":
                    peer.repunch_at = now + self._repunch_delay
            elif isinstance(event, _PunchDirectFailed) and peer.path == "relay":
                why = _explain(peer.name, self.mapping_varies, peer.their_nat)
                if why != peer.direct_error:
                    peer.direct_error = why
                    self._events.append(DirectPathFailed(peer.name, why, event.retry_in))

    def _on_path(self, peer: CorePeer, event: _PunchPathChosen, now: float) -> None:
        assert peer.key is not None
        # Only the side with the lower public key sets the endpoint before the first handshake:
        # the peer's persistent keepalive is then due at once, which starts the handshake, and
        # simultaneous initiations would leave the two sides on different sessions. The other
        # side's device learns the endpoint from the initiation itself. Afterwards, both do.
        if self.public_key.raw < peer.key or peer.stage == "established":
            self.device.set_endpoint(peer.key, event.endpoint)
        if peer.fresh_handshake and peer.stage == "established":
            peer.fresh_handshake = False
            if self.public_key.raw < peer.key:  # the initiator's rule, as for the first one
                self.device.initiate_handshake(peer.key, now, restarted=True)
        upgrade = peer.path is not None
        if peer.stage == "established":
            peer.deadline = None  # a path again: the peer is not down
        endpoint, relay = self._describe(event.endpoint)
        before = peer.last_path
        peer.path, peer.endpoint, peer.relay = event.kind, endpoint, relay
        peer.last_path = event.kind
        if event.kind != "relay":
            peer.direct_error = None
        self._events.append(
            PathChosen(peer.name, event.kind, endpoint, event.rtt * 1000, upgrade, relay)
        )
        if peer.stage == "established" and event.kind == "relay" and peer.repunch_at is None:
            peer.repunch_at = now + RELAYED_REFRESH
        if peer.connected is not None and before is not None and before != event.kind:
            elapsed = round((now - self.started_at) * 1000, 3)
            self._events.append(
                PathChanged(peer.name, before, event.kind, endpoint, elapsed, relay)
            )
        self._step(peer, "path", now)

    def _initiate_again(self, peer: CorePeer, now: float) -> None:
        """On a new attempt after an earlier connection (a retry, a restarted peer), the initiator
        starts the handshake itself: the keepalive that starts a first one would travel in the
        old session, which a restarted peer no longer has and a peer that went down for a while
        may have dropped, and no new handshake would confirm the tunnel."""
        assert peer.key is not None
        if self.public_key.raw >= peer.key or peer.handshaken:
            return
        stats = self.device.peer_stats().get(peer.key)
        if peer.fresh_handshake or (stats is not None and stats.has_session):
            restarted, peer.fresh_handshake = peer.fresh_handshake, False
            self.device.initiate_handshake(peer.key, now, restarted=restarted)

    def _on_wireguard(self, event: object, now: float) -> None:
        if not isinstance(event, _WgHandshakeCompleted):
            return
        peer = self._by_key.get(event.peer)
        if peer is None or peer.error is not None:
            return
        self._events.append(HandshakeCompleted(peer.name, self._describe(event.endpoint)[0]))
        peer.handshaken = True
        peer.fresh_handshake = False  # the restarted peer has its new session
        self._step(peer, "handshake", now)


def _candidates(record: PeerRecord) -> tuple[Candidate, ...]:
    candidates = []
    for endpoint in record.endpoints:
        with contextlib.suppress(CandidateError, ValueError):
            candidates.append(Candidate.from_endpoint(endpoint))
    return tuple(candidates)


def _explain(peer: str, ours: bool | None, theirs: bool | None) -> str:
    if ours and theirs:
        return "both NATs map per destination so not even birthday probing reaches a direct path"
    if ours:
        return f"our NAT maps per destination and {peer}'s NAT filters what it lets in"
    if theirs:
        return f"{peer}'s NAT maps per destination and ours filters what it lets in"
    return "no probe got through the NATs between us"


def signal_text(revision: int, mapping_varies: bool | None, session: str | None = None) -> str:
    """Return the "punch now" signal for our record ``revision``, NAT behaviour and ``session``
    (the word naming our run; left out when ``None``, as the first release sent it)."""
    text = f"{SIGNAL_PREFIX} {revision} {_NAT_WORDS[mapping_varies]}"
    return text if session is None else f"{text} {session}"
