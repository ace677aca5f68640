"""Rendezvous: the hub's wire models and request signing, the hub itself, and its clients.

Names are re-exported here explicitly; the implementation lives in private modules. The hub server
(``HubConfig``, ``KeyDirectory``, ``create_app``) loads Starlette, so it is imported on first use: clients stay light.
"""

from typing import TYPE_CHECKING

from ._addressing import (
    ASSIGN_ATTEMPTS,
    DEFAULT_MAX_ADDRESSES,
    AddressPolicy,
    ClaimRefusedError,
    assignment_candidates,
)
from ._auth import (
    DEFAULT_WINDOW,
    HEADER_KEY,
    HEADER_MAC,
    HEADER_NETWORK,
    HEADER_NONCE,
    HEADER_TIME,
    AuthenticationError,
    HubAuth,
    InvalidNetworkSecretError,
    NetworkSecret,
    RequestSigner,
    RequestVerifier,
    VerifiedRequest,
    hub_mac_key,
    keyed_mac,
    peer_mac_key,
)
from ._client import MAX_RESPONSE_BYTES, Backoff, HubClient
from ._listing import MAX_LISTED_PEERS, ListedPeer, PeerListing, listing_tag
from ._memory import MemoryHub, MemoryRendezvous
from ._models import (
    API_VERSION,
    MAX_ALLOWED_IPS,
    MAX_BODY_BYTES,
    MAX_ENDPOINTS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_NETWORK_PREFIXES,
    MAX_SIGNAL_BYTES,
    MAX_TURN_SERVERS,
    Endpoint,
    EndpointType,
    HubInfo,
    HubRelayAddress,
    PeerRecord,
    RegisterRequest,
    SignalMessage,
    StunAddress,
    ValidationError,
    check_network_prefixes,
    error_reason,
    messages_from_json,
    parse_address,
    parse_allowed_ip,
    validate_name,
)
from ._peerhub import PeerHubClient
from ._protocol import (
    NotRegisteredError,
    PeerDirectory,
    PeerNotFoundError,
    Rendezvous,
    RendezvousError,
    RendezvousProtocolError,
    RendezvousRefusedError,
    RendezvousUnavailableError,
    SignallingNotSupportedError,
)
from ._redis_store import RedisStore
from ._sqlite_store import SqliteStore, StateOpenError
from ._store import (
    AllowedIPsConflictError,
    MemoryStore,
    NameTakenError,
    QueueFullError,
    Store,
    StoredPeer,
    StoreError,
    StoreFullError,
    StoreLimits,
    StoreStats,
)

if TYPE_CHECKING:
    from ._follow import follow_registrations
    from ._hub import HubConfig, HubCounters, KeyDirectory, create_app
    from ._serve import (
        HubListeners,
        HubServeError,
        bind_hub_socket,
        bind_hub_sockets,
        published_addresses,
        serve_hub,
    )

__all__ = [
    "API_VERSION",
    "ASSIGN_ATTEMPTS",
    "DEFAULT_MAX_ADDRESSES",
    "DEFAULT_WINDOW",
    "HEADER_KEY",
    "HEADER_MAC",
    "HEADER_NETWORK",
    "HEADER_NONCE",
    "HEADER_TIME",
    "MAX_ALLOWED_IPS",
    "MAX_BODY_BYTES",
    "MAX_ENDPOINTS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_LISTED_PEERS",
    "MAX_NETWORK_PREFIXES",
    "MAX_RESPONSE_BYTES",
    "MAX_SIGNAL_BYTES",
    "MAX_TURN_SERVERS",
    "AddressPolicy",
    "AllowedIPsConflictError",
    "AuthenticationError",
    "Backoff",
    "ClaimRefusedError",
    "Endpoint",
    "EndpointType",
    "HubAuth",
    "HubClient",
    "HubConfig",
    "HubCounters",
    "HubInfo",
    "HubListeners",
    "HubRelayAddress",
    "HubServeError",
    "InvalidNetworkSecretError",
    "KeyDirectory",
    "ListedPeer",
    "MemoryHub",
    "MemoryRendezvous",
    "MemoryStore",
    "NameTakenError",
    "NetworkSecret",
    "NotRegisteredError",
    "PeerDirectory",
    "PeerHubClient",
    "PeerListing",
    "PeerNotFoundError",
    "PeerRecord",
    "QueueFullError",
    "RedisStore",
    "RegisterRequest",
    "Rendezvous",
    "RendezvousError",
    "RendezvousProtocolError",
    "RendezvousRefusedError",
    "RendezvousUnavailableError",
    "RequestSigner",
    "RequestVerifier",
    "SignalMessage",
    "SignallingNotSupportedError",
    "SqliteStore",
    "StateOpenError",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreLimits",
    "StoreStats",
    "StoredPeer",
    "StunAddress",
    "ValidationError",
    "VerifiedRequest",
    "assignment_candidates",
    "bind_hub_socket",
    "bind_hub_sockets",
    "check_network_prefixes",
    "create_app",
    "error_reason",
    "follow_registrations",
    "hub_mac_key",
    "keyed_mac",
    "listing_tag",
    "messages_from_json",
    "parse_address",
    "parse_allowed_ip",
    "peer_mac_key",
    "published_addresses",
    "serve_hub",
    "validate_name",
]


def __getattr__(name: str) -> object:
    if name == "follow_registrations":
        from . import _follow

        return _follow.follow_registrations
    if name in ("HubConfig", "HubCounters", "KeyDirectory", "create_app"):
        from . import _hub

        return getattr(_hub, name)
    if name in (
        "HubListeners",
        "HubServeError",
        "bind_hub_socket",
        "bind_hub_sockets",
        "published_addresses",
        "serve_hub",
    ):
        from . import _serve

        return getattr(_serve, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
