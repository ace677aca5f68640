"""The connector: reach named peers behind NATs through WireGuard, the whole pipeline in one nursery.

:func:`open_connector` / :class:`Connector` bind one UDP socket, gather candidates (host and STUN
through the shared socket), register at the rendezvous, wait for each peer and its "punch now"
signal, punch, hand the chosen endpoint to WireGuard and report the handshake, as typed events
(:data:`ConnectEvent`). :class:`MemoryInterface` replaces the TUN device in :mod:`punchtrio.netsim`
and tests. See ``docs/connect.md``.
"""

from ._connector import (
    SIGNAL_PREFIX,
    UNREGISTER_TIMEOUT,
    ConnectError,
    Connector,
    PeerState,
    TunnelConfig,
    open_connector,
)
from ._events import (
    STAGES,
    CandidatesGathered,
    ConnectEvent,
    HandshakeCompleted,
    PathChosen,
    PathKind,
    PathLost,
    PeerConnected,
    PeerFailed,
    PeerFound,
    PunchStarted,
    Registered,
    Stage,
    StageStarted,
)
from ._memif import MemoryInterface

__all__ = [
    "SIGNAL_PREFIX",
    "STAGES",
    "UNREGISTER_TIMEOUT",
    "CandidatesGathered",
    "ConnectError",
    "ConnectEvent",
    "Connector",
    "HandshakeCompleted",
    "MemoryInterface",
    "PathChosen",
    "PathKind",
    "PathLost",
    "PeerConnected",
    "PeerFailed",
    "PeerFound",
    "PeerState",
    "PunchStarted",
    "Registered",
    "Stage",
    "StageStarted",
    "TunnelConfig",
    "open_connector",
]
