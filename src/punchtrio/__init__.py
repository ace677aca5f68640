"""punchtrio: connect machines behind NATs and firewalls with Trio, STUN, hole punching and WireGuard.

The public API is re-exported here explicitly (the connector's events among it: the puncher's own
events of the same names stay in ``punchtrio.punch``); everything else lives in private modules or in the
documented subpackages (``punchtrio.wireguard``, ``punchtrio.stun``, ``punchtrio.rendezvous``...).
"""

from ._endpoint import EndpointError, check_endpoint_address, format_endpoint, parse_endpoint
from ._exceptions import PunchtrioError
from .connect import (
    ConnectError,
    Connector,
    MemoryInterface,
    PathChanged,
    PathChosen,
    PathLost,
    PeerConnected,
    PeerFailed,
    TunnelConfig,
    open_connector,
)
from .keys import InvalidKeyError, PrivateKey, PublicKey
from .mux import Mux
from .punch import (
    Candidate,
    CandidateType,
    Puncher,
    PunchSession,
)
from .stun import NatReport, StunError, StunServer, discover_nat

__version__ = "0.1.0.dev0"

__all__ = [
    "Candidate",
    "CandidateType",
    "ConnectError",
    "Connector",
    "EndpointError",
    "InvalidKeyError",
    "MemoryInterface",
    "Mux",
    "NatReport",
    "PathChanged",
    "PathChosen",
    "PathLost",
    "PeerConnected",
    "PeerFailed",
    "PrivateKey",
    "PublicKey",
    "PunchSession",
    "Puncher",
    "PunchtrioError",
    "StunError",
    "StunServer",
    "TunnelConfig",
    "__version__",
    "check_endpoint_address",
    "discover_nat",
    "format_endpoint",
    "open_connector",
    "parse_endpoint",
]
