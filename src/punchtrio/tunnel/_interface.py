"""The interface every tunnel backend offers, whichever program moves its packets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ..wireguard import PeerStats


class Tunnel(Protocol):
    """A running WireGuard tunnel: a network interface, a UDP port, and per-peer statistics.

    :class:`UserspaceTunnel` (punchtrio's own WireGuard over a TUN device) and
    :class:`WireGuardGoTunnel` (the wireguard-go program) implement it, as does any backend
    another package registers (:class:`TunnelBackend`), so callers need not care which one runs.
    """

    @property
    def name(self) -> str:
        """The network interface's name."""
        ...

    @property
    def listen_port(self) -> int:
        """The local UDP port the tunnel receives on."""
        ...

    def peer_stats(self) -> Mapping[bytes, PeerStats]:
        """Return each peer's endpoint, received/sent bytes and last handshake, by public key."""
        ...
