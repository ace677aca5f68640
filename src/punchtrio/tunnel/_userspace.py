"""The userspace tunnel from a wg-quick file: punchtrio's WireGuard over a UDP socket and a TUN.

This module is the glue: it turns a :class:`WgQuickConfig` into a device, sockets, a TUN device
with addresses and routes, and a running :class:`UserspaceTunnel` (its data path is in
``_datapath``, the TUN writer in ``_tunwriter``, the socket set-up in ``_udp``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import trio

from ..wireguard import ConfigError as WireGuardConfigError
from ..wireguard import Device, PeerConfig, Timers
from ._datapath import TunnelCounters, UserspaceTunnel
from ._netlink import configure_interface
from ._tun import TunDevice
from ._uapi_server import UAPI_DIRECTORY, start_uapi
from ._udp import bind_udp, split_handshakes
from ._wgquick import ConfigError, PeerSection, WgQuickConfig

# TunnelCounters and UserspaceTunnel are re-exported for the package __init__.
__all__ = [
    "TunnelCounters",
    "UserspaceTunnel",
    "add_peers",
    "open_userspace_tunnel",
    "peer_config",
]


def peer_config(section: PeerSection) -> PeerConfig:
    """Return the device's :class:`~punchtrio.wireguard.PeerConfig` for one ``[Peer]`` section."""
    return PeerConfig(
        public_key=section.public_key,
        preshared_key=section.preshared_key,
        allowed_ips=section.allowed_ips,
        endpoint=section.endpoint,
        persistent_keepalive=(
            float(section.persistent_keepalive) if section.persistent_keepalive else None
        ),
    )


def add_peers(device: Device, config: WgQuickConfig) -> None:
    """Add every ``[Peer]`` of ``config`` to ``device``, in file order.

    Raises :class:`ConfigError` (``FILE:LINE: why``, naming the ``[Peer]`` line) if the device
    refuses a peer (our own key, a low-order key, an allowed IP another peer has); the peers
    before it stay added.
    """
    for section in config.peers:
        try:
            device.add_peer(peer_config(section))
        except WireGuardConfigError as exc:
            raise ConfigError(f"{config.source}:{section.line}: {exc}") from None


@contextlib.asynccontextmanager
async def open_userspace_tunnel(
    config: WgQuickConfig,
    *,
    name: str = "",
    timers: Timers | None = None,
    on_event: Callable[[object], None] | None = None,
    uapi_directory: str | None = UAPI_DIRECTORY,
) -> AsyncIterator[UserspaceTunnel]:
    """Bring up the tunnel ``config`` describes and yield it while it runs.

    Creates the TUN device ``name`` (``""``: the kernel picks ``tunN``) with the config's addresses,
    MTU and one route per allowed IP, binds the listen port and starts the data path. ``timers``
    overrides the protocol's timers (tests shorten them). The WireGuard UAPI socket
    ``uapi_directory/NAME.sock`` (default ``/var/run/wireguard``, where ``wg`` looks; ``None``:
    none) is served while the tunnel runs; if it cannot be (another process serves that path),
    ``on_event`` gets a :class:`UapiUnavailable` and the tunnel runs without. On exit, including cancellation, the
    tasks stop and the device (with its addresses and routes) and the sockets are gone. Raises
    :class:`ConfigError` (naming the ``[Peer]`` line) if the device refuses a peer (our own key, a
    low-order key, an allowed IP another peer has), and :class:`TunnelError` if any part cannot be
    set up; nothing is left behind in either case.
    """
    interface = config.interface
    device = Device(
        interface.private_key,
        timers=timers if timers is not None else Timers(),
        mtu=interface.mtu,
        defer_handshakes=True,
    )
    add_peers(device, config)
    with contextlib.ExitStack() as stack:
        sockets = bind_udp(interface.listen_port, reuse_port=True)
        for sock in sockets:
            stack.enter_context(sock)
        handshake_sockets = split_handshakes(sockets)
        for sock in handshake_sockets:
            stack.enter_context(sock)
        tun = stack.enter_context(TunDevice(name))
        configure_interface(
            tun.name,
            addresses=interface.addresses,
            routes=[net for section in config.peers for net in section.allowed_ips],
            mtu=interface.mtu,
        )
        tunnel = UserspaceTunnel(
            device, tun, sockets, on_event=on_event, handshake_sockets=handshake_sockets
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            if uapi_directory is not None:
                await start_uapi(
                    nursery, tunnel, device, directory=uapi_directory, on_unavailable=on_event
                )
            try:
                yield tunnel
            finally:
                nursery.cancel_scope.cancel()
