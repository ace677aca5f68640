"""Tunnels: a WireGuard device on a network interface, and the wg-quick files that describe one.

:func:`open_userspace_tunnel` runs punchtrio's own WireGuard (:mod:`punchtrio.wireguard`) over a UDP
socket and a TUN device; :func:`load_wgquick` reads a wg-quick configuration file.
"""

from ._interface import Tunnel
from ._tun import TunDevice, TunnelError
from ._userspace import TunnelCounters, UserspaceTunnel, open_userspace_tunnel
from ._wgquick import (
    DEFAULT_MTU,
    ConfigError,
    InterfaceConfig,
    PeerSection,
    WgQuickConfig,
    load_wgquick,
    parse_wgquick,
)

__all__ = [
    "DEFAULT_MTU",
    "ConfigError",
    "InterfaceConfig",
    "PeerSection",
    "TunDevice",
    "Tunnel",
    "TunnelCounters",
    "TunnelError",
    "UserspaceTunnel",
    "WgQuickConfig",
    "load_wgquick",
    "open_userspace_tunnel",
    "parse_wgquick",
]
