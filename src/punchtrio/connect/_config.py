"""The tunnel's own settings: :class:`TunnelConfig`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..tunnel import DEFAULT_MTU
from ..wireguard import Timers

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class TunnelConfig:
    """The tunnel's own settings (wg-punch's "Tunnel with its config").

    ``address``: our address inside the tunnel with its prefix (``"10.99.0.1/24"``); we register
    its single address (/32 or /128) as our allowed IPs, and on a TUN device the prefix is routed
    to the tunnel. ``listen_port``: the one UDP port for WireGuard, STUN and probes (0: any).
    ``mtu`` of the TUN device; ``interface_name`` (``""``: the kernel picks ``tunN``);
    ``persistent_keepalive`` seconds between WireGuard keepalives that hold the NAT mapping (also
    what starts the handshake the moment a path is chosen); ``timers`` the WireGuard timers.
    Raises :class:`ValueError` for a bad address or port.
    """

    address: IPInterface | str
    listen_port: int = 51820
    mtu: int = DEFAULT_MTU
    interface_name: str = ""
    persistent_keepalive: float = 25.0
    timers: Timers = field(default_factory=Timers)

    def __post_init__(self) -> None:
        address = ipaddress.ip_interface(self.address)
        object.__setattr__(self, "address", address)
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"listen port {self.listen_port} is not 0-65535")
        if not 1 <= self.persistent_keepalive <= 65535:
            raise ValueError("persistent_keepalive must be 1-65535 seconds")

    @property
    def interface(self) -> IPInterface:
        """``address`` as an :class:`ipaddress.IPv4Interface` / ``IPv6Interface``."""
        assert not isinstance(self.address, str)
        return self.address

    @property
    def allowed_ip(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The single-address network we register as our allowed IPs."""
        ip = self.interface.ip
        return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
