"""Socket buffer sizes: one rule for every UDP socket that carries a tunnel's datagrams."""

from __future__ import annotations

import contextlib
import socket

SOCKET_BUFFER = 4 << 20
"""Send and receive buffer asked for on the UDP sockets (4 MiB); bursts of a fast flow fit."""


_BUFFER_OPTIONS = (
    (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
    (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
)


def grow_socket_buffers(sock: socket.socket) -> None:
    """Ask for :data:`SOCKET_BUFFER` bytes of send and receive buffer on ``sock``.

    With CAP_NET_ADMIN past ``net.core.rmem_max``/``wmem_max`` (``SO_RCVBUFFORCE``), else up to
    them; a refusal leaves the kernel's default. A burst from a fast flow (a GRO batch of a few
    hundred kilobytes) overflowed the default 208 KiB receive buffer: the kernel dropped about
    one datagram in eleven of a single TCP stream through the tunnel.
    """
    for forced, plain in _BUFFER_OPTIONS:
        try:  # the FORCE variants pass net.core.*mem_max but need CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
