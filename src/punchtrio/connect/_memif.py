"""An in-memory packet interface: what a TUN device is to the tunnel, without root or a kernel device."""

from __future__ import annotations

import socket
from types import TracebackType

import trio

MAX_PACKET = 65535


class MemoryInterface:
    """A layer-3 interface in the process's memory, used in place of a TUN device (netsim, tests).

    The tunnel reads and writes IP packets on the inside end (:meth:`fileno`, exactly as on a TUN
    descriptor); the program uses the other end: :meth:`send` an IP packet "into the interface"
    (WireGuard encrypts it to the peer that routes its destination) and :meth:`receive` the packets
    WireGuard decrypted. It is a Unix datagram socket pair, so each packet keeps its boundaries and
    no root is needed. ``name`` is only a label. Close it (or use ``with``) when done.
    """

    def __init__(self, name: str = "mem0") -> None:
        self.name = name
        inside, outside = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inside.setblocking(False)
        self._inside = inside
        self._outside = trio.socket.from_stdlib_socket(outside)

    def fileno(self) -> int:
        """The tunnel's end: a non-blocking descriptor where each read or write is one IP packet."""
        return self._inside.fileno()

    async def send(self, packet: bytes) -> None:
        """Hand one IP packet to the tunnel, as an application writing to a TUN device would."""
        await self._outside.send(packet)

    async def receive(self) -> bytes:
        """Return the next IP packet the tunnel delivered (decrypted from a peer)."""
        return await self._outside.recv(MAX_PACKET)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._inside.fileno() == -1

    def close(self) -> None:
        """Close both ends (idempotent)."""
        self._inside.close()
        self._outside.close()

    def __enter__(self) -> MemoryInterface:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
