"""Relays: WireGuard through a third party when no direct path exists yet.

Two kinds share one shape (sans-IO cores driven by ``(data, addr, now)``, short Trio shells):

- the hub's own relay (``punchtrio hub --relay IP:PORT``), on UDP and TCP (TLS) on one port,
  forwarding only between authenticated peers of one network;
- TURN (RFC 8656) clients, tested against coturn, over UDP, TCP and TLS.

See ``docs/relay.md``.
"""

# -- the hub's own relay (punchtrio.relay._hub*) ---------------------------------------------
from ._hub_client import HubRelayClient, RelayBound, RelayRefused
from ._hub_frames import (
    MAX_FRAME,
    MAX_PAYLOAD,
    FrameType,
    HubRelayFrameError,
    HubStreamDecoder,
    RefusalCode,
    encode_hub_stream_frame,
)
from ._hub_serve import HubRelayServeError, HubRelayService, server_tls_context
from ._hub_server import DROP_REASONS, HubRelayLimits, HubRelayServer
from ._stream import (
    DEFAULT_MAX_BUFFER,
    STREAM_MAX_BUFFER,
    BoundedWriter,
    RelayStream,
    RelayStreamError,
    StreamDecoder,
)

# -- end of the hub's own relay --
# -- TURN (punchtrio.relay._turn*) ------------------------------------------------------------
from ._turn import (
    CHANNEL_LIFETIME,
    CHANNEL_MAX,
    CHANNEL_MIN,
    PERMISSION_LIFETIME,
    ChannelBound,
    ChannelFailed,
    PermissionCreated,
    PermissionFailed,
    TurnAllocated,
    TurnClient,
    TurnClosed,
    TurnError,
    TurnEvent,
    TurnFailed,
    TurnReallocating,
    TurnRefreshed,
    TurnState,
)
from ._turn_credentials import (
    DEFAULT_TURN_PORT,
    DEFAULT_TURNS_PORT,
    TurnCredentials,
    TurnCredentialsError,
    TurnServer,
    TurnServerURI,
    TurnURIError,
    rest_credentials,
)
from ._turn_stream import TurnStreamDecoder, TurnStreamError, pad_channel_data

# -- end of TURN --

__all__: list[str] = [
    "CHANNEL_LIFETIME",
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_TURNS_PORT",
    "DEFAULT_TURN_PORT",
    "DROP_REASONS",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "PERMISSION_LIFETIME",
    "STREAM_MAX_BUFFER",
    "BoundedWriter",
    "ChannelBound",
    "ChannelFailed",
    "FrameType",
    "HubRelayClient",
    "HubRelayFrameError",
    "HubRelayLimits",
    "HubRelayServeError",
    "HubRelayServer",
    "HubRelayService",
    "HubStreamDecoder",
    "PermissionCreated",
    "PermissionFailed",
    "RefusalCode",
    "RelayBound",
    "RelayRefused",
    "RelayStream",
    "RelayStreamError",
    "StreamDecoder",
    "TurnAllocated",
    "TurnClient",
    "TurnClosed",
    "TurnCredentials",
    "TurnCredentialsError",
    "TurnError",
    "TurnEvent",
    "TurnFailed",
    "TurnReallocating",
    "TurnRefreshed",
    "TurnServer",
    "TurnServerURI",
    "TurnState",
    "TurnStreamDecoder",
    "TurnStreamError",
    "TurnURIError",
    "encode_hub_stream_frame",
    "pad_channel_data",
    "rest_credentials",
    "server_tls_context",
]
