"""A layer-3 TUN device (no packet-information header) with a non-blocking file descriptor."""

from __future__ import annotations

import errno
import os

import pytun

from .._exceptions import PunchtrioError

IFNAMSIZ = 16
"""Linux interface names are at most ``IFNAMSIZ - 1`` (15) bytes."""


class TunnelError(PunchtrioError):
    """The tunnel's TUN device, addresses, routes or UDP socket could not be set up."""


class TunDevice:
    """A TUN interface opened with ``IFF_TUN | IFF_NO_PI``: each read or write is one IP packet.

    ``name`` ``""`` lets the kernel choose (``tun0``, ``tun1``...). The device is not persistent, so
    closing it removes the interface together with its addresses and routes. The descriptor is
    non-blocking: reads raise :class:`BlockingIOError` when no packet is waiting. Raises
    :class:`TunnelError` if the device cannot be created (no ``/dev/net/tun``, no CAP_NET_ADMIN, a
    name in use or too long).
    """

    def __init__(self, name: str = "") -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise TunnelError(f"interface name {name[:40]!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as exc:
            denied = exc.errno in (errno.EPERM, errno.EACCES)
            hint = " (needs root or CAP_NET_ADMIN)" if denied else ""
            raise TunnelError(f"cannot create TUN device {name or '(any)'}: {exc}{hint}") from None
        self.name: str = self._dev.name
        """The interface name the kernel gave the device."""
        self._fd: int = self._dev.fileno()
        os.set_blocking(self._fd, False)

    def fileno(self) -> int:
        """Return the non-blocking file descriptor; ``-1`` once closed."""
        return self._fd

    def close(self) -> None:
        """Close the descriptor, which deletes the interface; closing twice does nothing."""
        if self._fd >= 0:
            self._fd = -1
            self._dev.close()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
