"""What a :class:`~punchtrio.connect.Connector` reports: one frozen dataclass per fact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .._exceptions import PunchtrioError
from ..keys import PublicKey
from ..punch import Candidate
from ..rendezvous import PeerRecord

Stage = Literal["stun", "register", "wait", "punch", "handshake", "established"]
"""The pipeline's stages, in order. ``PeerFailed.stage`` and ``ConnectError.stage`` name one."""

STAGES: tuple[Stage, ...] = ("stun", "register", "wait", "punch", "handshake", "established")

PathKind = Literal["lan", "direct", "relay"]


@dataclass(frozen=True)
class StageStarted:
    """A stage began; ``peer`` is ``None`` for the connector-wide stages (stun, register)."""

    stage: Stage
    peer: str | None = None


@dataclass(frozen=True)
class CandidatesGathered:
    """Our candidates are known. ``mapping_varies`` is ``True`` when our NAT maps per destination
    (None: fewer than two STUN answers); ``stun_error`` says why no server-reflexive candidate
    was found, if none was."""

    candidates: tuple[Candidate, ...]
    mapping_varies: bool | None
    stun_error: str | None = None


@dataclass(frozen=True)
class Registered:
    """The rendezvous stored our record (candidates, public key, allowed IPs)."""

    record: PeerRecord


@dataclass(frozen=True)
class PeerFound:
    """The rendezvous gave us ``peer``'s record, and the peer signalled it is ready to punch."""

    peer: str
    public_key: PublicKey
    record: PeerRecord


@dataclass(frozen=True)
class PunchStarted:
    """Probing every candidate of ``peer`` began."""

    peer: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class PathChosen:
    """WireGuard now sends to ``endpoint`` (``"ip:port"``) for ``peer``; ``rtt_ms`` is the probe
    round trip. ``upgrade`` is ``True`` when it replaced an earlier working path. On a relayed
    path, ``endpoint`` is the relay server's address and ``relay`` names the relay and its
    transport (``"hub/udp"``, ``"hub/tcp"``, ``"hub/tls"``); ``None`` otherwise."""

    peer: str
    path: PathKind
    endpoint: str
    rtt_ms: float
    upgrade: bool = False
    relay: str | None = None


@dataclass(frozen=True)
class PathChanged:
    """An established tunnel to ``peer`` moved from one kind of path to another, for example
    ``"relay"`` to ``"direct"`` once a punch succeeded, or back when the direct path died.

    ``old`` and ``new`` are path kinds (``--json`` writes them as ``"from"`` and ``"to"``),
    ``endpoint`` and ``relay`` describe the new path as in :class:`PathChosen`, ``elapsed_ms``
    counts from the connector's start."""

    peer: str
    old: PathKind
    new: PathKind
    endpoint: str
    elapsed_ms: float
    relay: str | None = None


@dataclass(frozen=True)
class PathLost:
    """The chosen path to ``peer`` stopped answering heartbeats; probing starts again."""

    peer: str
    endpoint: str


@dataclass(frozen=True)
class HandshakeCompleted:
    """A WireGuard session with ``peer`` is up (also after each rekey)."""

    peer: str
    endpoint: str


@dataclass(frozen=True)
class PeerConnected:
    """``peer`` is reachable through the tunnel: ``path`` is ``"lan"``, ``"direct"`` or ``"relay"``,
    ``endpoint`` is ``"ip:port"`` (the relay's address when relayed, and ``relay`` names it as in
    :class:`PathChosen`), ``elapsed_ms`` counts from the connector's start."""

    peer: str
    path: PathKind
    endpoint: str
    elapsed_ms: float
    relay: str | None = None


@dataclass(frozen=True)
class PeerFailed:
    """Connecting to ``peer`` failed at ``stage``; ``reason`` is one line for a human.

    ``retry_in`` is the number of seconds before the connector tries the peer again (from the
    wait stage), or ``None`` when it will not (retries turned off, or our own registration
    failed)."""

    peer: str
    stage: Stage
    reason: str
    retry_in: float | None = None


@dataclass(frozen=True)
class DirectPathFailed:
    """A relay carries the tunnel to ``peer`` and no direct or LAN path answered; ``reason``
    says why, as far as our NAT checks tell (one line, e.g. ``"both NATs map per destination so
    not even birthday probing reaches a direct path"``).

    The direct paths are probed again in ``retry_in`` seconds, then at growing intervals for as
    long as the relay carries the tunnel; a direct path found then replaces the relay
    (:class:`PathChanged`). Emitted once while the tunnel stays on the relay (again only if the
    reason changes, or after the peer failed and is tried again); :attr:`PeerState.direct_error`
    keeps the reason."""

    peer: str
    reason: str
    retry_in: float


@dataclass(frozen=True)
class PeerRemoved:
    """``peer`` was forgotten: its WireGuard peer, allowed IPs (the routes to it), path and
    timers are gone (``reason``: one line, e.g. its record left the network)."""

    peer: str
    reason: str


ConnectEvent = (
    StageStarted
    | CandidatesGathered
    | Registered
    | PeerFound
    | PunchStarted
    | PathChosen
    | PathChanged
    | PathLost
    | HandshakeCompleted
    | PeerConnected
    | PeerFailed
    | DirectPathFailed
    | PeerRemoved
)
"""Every event type a connector emits."""


class ConnectError(PunchtrioError):
    """Connecting to ``peer`` failed at ``stage`` (one of :data:`~punchtrio.connect.STAGES`).

    ``str(error)`` is one line, ``"<stage>: <reason>"``, e.g. ``"punch: no path to bob after
    8.5 s: both NATs map per destination; the hub's relay did not carry the probes either"``. The CLI exits
    with :attr:`exit_code` 8.
    """

    exit_code = 8

    def __init__(self, peer: str, stage: Stage, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.peer = peer
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class PeerState:
    """A snapshot of one peer: the ``stage`` it is in (or reached), its WireGuard ``public_key``
    once found, the chosen ``path`` and ``endpoint`` (the relay server's address on a relayed
    path, whose ``relay`` names it), and the ``error`` if it failed. ``direct_error`` is why no
    direct path answered while the relay carries the tunnel (see :class:`DirectPathFailed`),
    ``None`` otherwise."""

    name: str
    stage: Stage | None = None
    public_key: PublicKey | None = None
    path: PathKind | None = None
    endpoint: str | None = None
    error: ConnectError | None = None
    relay: str | None = None
    direct_error: str | None = None

    @property
    def connected(self) -> bool:
        """Whether the tunnel to this peer is up."""
        return self.stage == "established" and self.error is None
