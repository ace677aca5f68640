"""UDP socket set-up for the userspace tunnel: binding, buffers, UDP GSO/GRO, handshake steering.

The data path (``_datapath``) only reads and writes the sockets made here; everything the kernel
is asked once per socket lives in this module.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import sys
from collections.abc import Sequence

from .._socket_buffers import grow_socket_buffers
from ._tun import TunnelError

GSO_MAX_SEGMENTS = 64
"""Most datagrams sent in one UDP GSO ``sendmsg`` (the kernel's UDP_MAX_SEGMENTS on older kernels)."""

GSO_MAX_BYTES = 65000
"""Most payload bytes in one UDP GSO ``sendmsg`` (below the 65507-byte UDP limit)."""

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
"""Ancillary buffer size for one UDP GRO control message (the segment size)."""
GSO_SIZE = struct.Struct("=H")
"""How the segment size of a UDP GSO send is packed into its control message."""
NO_GSO = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
"""Errors with which a kernel or route refuses UDP GSO (the data path then sends one by one)."""


def enable_gro(sock: socket.socket) -> bool:
    """Turn on UDP GRO for ``sock``; return whether the kernel accepted it."""
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """Return the segment size a UDP GRO control message gives, or 0 when there is none."""
    for level, kind, value in ancdata:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


def bind_udp(port: int | None, *, reuse_port: bool = False) -> list[socket.socket]:
    """Return non-blocking UDP sockets bound to ``port`` on every IPv4 and IPv6 address.

    ``None`` or 0 lets the kernel pick a port (the IPv6 socket takes the same one). IPv6 is skipped
    when the host has it disabled. ``reuse_port`` sets ``SO_REUSEPORT`` first, so that
    :func:`split_handshakes` can bind siblings. Raises :class:`TunnelError` if the port is taken.
    """
    sockets: list[socket.socket] = []
    try:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(v4)
        if reuse_port:
            v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        v4.bind(("0.0.0.0", port or 0))
        port = v4.getsockname()[1]
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            v6 = None
        if v6 is not None:
            sockets.append(v6)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if reuse_port:
                v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                v6.bind(("::", port))
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:  # IPv6 disabled on this host
                    raise
                sockets.remove(v6)
                v6.close()
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise TunnelError(f"cannot bind UDP port {port or 0}: {exc.strerror}") from None
    for sock in sockets:
        sock.setblocking(False)
        grow_socket_buffers(sock)
    return sockets


SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)

# Classic BPF run by the kernel on each datagram for the port's reuseport group, with the UDP
# payload at offset 0: WireGuard transport (first byte 4) -> socket 0 of the group (the transport
# socket), anything else -> socket 1 (the handshake socket). Empty datagrams abort to socket 0.
_STEER_PROGRAM = b"".join(
    struct.pack("=HBBI", *insn)
    for insn in (
        (0x30, 0, 0, 0),  # ldb [0]
        (0x15, 0, 1, 4),  # jeq #4, next, skip one
        (0x06, 0, 0, 0),  # ret #0
        (0x06, 0, 0, 1),  # ret #1
    )
)


def split_handshakes(sockets: Sequence[socket.socket]) -> list[socket.socket]:
    """Bind a handshake socket beside each of ``sockets`` and steer non-transport datagrams to it.

    Each of ``sockets`` must have been bound with ``reuse_port`` (:func:`bind_udp`) and be the only
    member of its port's reuseport group. A sibling is bound to the same address and port, and a
    classic BPF program attached to the group sends WireGuard transport datagrams to the original
    socket and everything else (handshake messages, cookie replies, probes, STUN) to the sibling,
    whose small buffer the kernel simply drops from when a flood overruns it. Returns the
    non-blocking siblings, in order; on a kernel that refuses any step, closes what it made and
    returns ``[]`` (everything then arrives on ``sockets``, as without the split).
    """
    made: list[socket.socket] = []
    program = ctypes.create_string_buffer(_STEER_PROGRAM)
    fprog = struct.pack("@HP", len(_STEER_PROGRAM) // 8, ctypes.addressof(program))
    try:
        for sock in sockets:
            sibling = socket.socket(sock.family, socket.SOCK_DGRAM)
            made.append(sibling)
            if sock.family == socket.AF_INET6:
                sibling.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sibling.bind(sock.getsockname()[:2])
            sibling.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError:
        for sibling in made:
            sibling.close()
        return []
    return made
