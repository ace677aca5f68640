"""Hole punching: candidates, authenticated probes (a Scapy layer), the puncher and its Trio shell.

- :class:`Candidate` (host, server-reflexive, peer-reflexive, relay) and how to gather them:
  :func:`host_candidates`, :class:`ReflexiveGatherer` / :func:`gather_reflexive`;
- :class:`Probe`, the Scapy layer of a ping or pong, with :func:`build_probe`, :func:`parse_probe`
  (raises only :class:`ProbeError`) and :class:`ProbeGuard` (MAC, timestamp window, replay cache);
- :class:`Puncher`, the sans-IO state machine, and :class:`PunchSession`, its Trio shell.

See ``docs/punch.md``.
"""

from ._candidates import (
    TYPE_PREFERENCE,
    Candidate,
    CandidateError,
    CandidateType,
    ReflexiveGatherer,
    ReflexiveResult,
    candidate_priority,
    check_candidate_address,
    host_candidates,
    local_addresses,
    local_networks,
    sort_candidates,
)
from ._probe import (
    KEY_ID_SIZE,
    PING,
    PONG,
    PROBE_KEY_LABEL,
    PROBE_SIZE,
    PROBE_VERSION,
    PROBE_WINDOW,
    REPLAY_CACHE_SIZE,
    Probe,
    ProbeError,
    ProbeGuard,
    ProbeKeyError,
    ProbeRejected,
    build_probe,
    derive_probe_key,
    encode_probe,
    key_id,
    parse_probe,
    verify_mac,
)
from ._puncher import (
    DROP_REASONS,
    PathChosen,
    PathKind,
    PathLost,
    Puncher,
    PunchError,
    PunchEvent,
    PunchFailed,
    PunchSettings,
)
from ._session import PunchSession, gather_reflexive, send_datagram

__all__ = [
    "DROP_REASONS",
    "KEY_ID_SIZE",
    "PING",
    "PONG",
    "PROBE_KEY_LABEL",
    "PROBE_SIZE",
    "PROBE_VERSION",
    "PROBE_WINDOW",
    "REPLAY_CACHE_SIZE",
    "TYPE_PREFERENCE",
    "Candidate",
    "CandidateError",
    "CandidateType",
    "PathChosen",
    "PathKind",
    "PathLost",
    "Probe",
    "ProbeError",
    "ProbeGuard",
    "ProbeKeyError",
    "ProbeRejected",
    "PunchError",
    "PunchEvent",
    "PunchFailed",
    "PunchSession",
    "PunchSettings",
    "Puncher",
    "ReflexiveGatherer",
    "ReflexiveResult",
    "build_probe",
    "candidate_priority",
    "check_candidate_address",
    "derive_probe_key",
    "encode_probe",
    "gather_reflexive",
    "host_candidates",
    "key_id",
    "local_addresses",
    "local_networks",
    "parse_probe",
    "send_datagram",
    "sort_candidates",
    "verify_mac",
]
