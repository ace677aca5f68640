"""Tunnels: a WireGuard device on a network interface, and the wg-quick files that describe one.

:func:`open_userspace_tunnel` runs punchtrio's own WireGuard (:mod:`punchtrio.wireguard`) over a UDP
socket and a TUN device; :func:`load_wgquick` reads a wg-quick configuration file. The userspace tunnel serves WireGuard's
cross-platform userspace API (:func:`serve_uapi`, the sans-IO core in :class:`UapiConnection`,
:func:`plan_set` and :func:`format_get`), so ``wg show`` and ``wg set`` work on it.
:func:`open_wireguard_go_tunnel` runs the same configuration on the wireguard-go program instead,
and :func:`load_tunnel_backend` finds a backend by name (built-in or registered by a package).
"""

from ._backends import (
    ENTRY_POINT_GROUP,
    TunnelBackend,
    load_tunnel_backend,
    tunnel_backend_names,
)
from ._datapath import HandsOffToTrio
from ._interface import Tunnel
from ._netlink import configure_interface
from ._steering import steer_wireguard, steering_ruleset, steering_table_name
from ._tun import TunDevice, TunnelError
from ._uapi import (
    MAX_REQUEST_BYTES,
    DeviceInfo,
    GetRequest,
    PeerChange,
    PeerInfo,
    ProtocolViolation,
    RefusedRequest,
    SetPlan,
    SetRequest,
    UapiConnection,
    UapiError,
    apply_plan,
    device_info,
    format_endpoint,
    format_errno,
    format_get,
    parse_endpoint,
    parse_set,
    plan_set,
)
from ._uapi_client import format_uapi_set, parse_uapi_get
from ._uapi_server import (
    SocketInUseError,
    UapiServer,
    UapiUnavailable,
    bind_unix_listener,
    serve_uapi,
    serve_unix_connections,
    start_uapi,
    uapi_path,
)
from ._userspace import TunnelCounters, UserspaceTunnel, add_peers, open_userspace_tunnel
from ._wgquick import (
    DEFAULT_MTU,
    ConfigError,
    InterfaceConfig,
    PeerSection,
    WgQuickConfig,
    load_wgquick,
    parse_wgquick,
)
from ._wireguard_go import (
    WireGuardGoError,
    WireGuardGoTunnel,
    find_wireguard_go,
    open_wireguard_go_tunnel,
)

__all__ = [
    "DEFAULT_MTU",
    "ENTRY_POINT_GROUP",
    "MAX_REQUEST_BYTES",
    "ConfigError",
    "DeviceInfo",
    "GetRequest",
    "HandsOffToTrio",
    "InterfaceConfig",
    "PeerChange",
    "PeerInfo",
    "PeerSection",
    "ProtocolViolation",
    "RefusedRequest",
    "SetPlan",
    "SetRequest",
    "SocketInUseError",
    "TunDevice",
    "Tunnel",
    "TunnelBackend",
    "TunnelCounters",
    "TunnelError",
    "UapiConnection",
    "UapiError",
    "UapiServer",
    "UapiUnavailable",
    "UserspaceTunnel",
    "WgQuickConfig",
    "WireGuardGoError",
    "WireGuardGoTunnel",
    "add_peers",
    "apply_plan",
    "bind_unix_listener",
    "configure_interface",
    "device_info",
    "find_wireguard_go",
    "format_endpoint",
    "format_errno",
    "format_get",
    "format_uapi_set",
    "load_tunnel_backend",
    "load_wgquick",
    "open_userspace_tunnel",
    "open_wireguard_go_tunnel",
    "parse_endpoint",
    "parse_set",
    "parse_uapi_get",
    "parse_wgquick",
    "plan_set",
    "serve_uapi",
    "serve_unix_connections",
    "start_uapi",
    "steer_wireguard",
    "steering_ruleset",
    "steering_table_name",
    "tunnel_backend_names",
    "uapi_path",
]
