"""The wireguard-go backend: WireGuard moved by the wireguard-go program, configured over UAPI.

:func:`open_wireguard_go_tunnel` starts ``wireguard-go -f IFACE`` (foreground, so the process is
ours to stop), configures it only through its UAPI socket (``/var/run/wireguard/IFACE.sock``:
key, listen port, peers, endpoints, keepalives, allowed IPs), sets addresses, MTU and routes with
:func:`~punchtrio.tunnel.configure_interface`, and on exit stops the process and removes whatever
it left (the socket file after a kill, the interface if it outlived the process).

The UAPI text is built and read by two pure functions in :mod:`._uapi_client`,
:func:`format_uapi_set` and :func:`parse_uapi_get`; :class:`WireGuardGoTunnel` is the thin shell
that talks to the socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import trio

from ..wireguard import PeerStats
from ._netlink import configure_interface
from ._tun import TunnelError
from ._uapi import DeviceInfo, UapiError
from ._uapi_client import format_uapi_set, parse_uapi_get, stats_from_info
from ._wgquick import PeerSection, WgQuickConfig

UAPI_DIRECTORY = Path("/var/run/wireguard")
"""Where wireguard-go (and ``wg``) keep the UAPI sockets, one ``IFACE.sock`` per interface."""

START_TIMEOUT = 5.0
"""Seconds :func:`open_wireguard_go_tunnel` waits for wireguard-go's UAPI socket to answer."""

STOP_TIMEOUT = 3.0
"""Seconds teardown waits after SIGTERM before it kills wireguard-go."""

UAPI_TIMEOUT = 2.0
"""Seconds one UAPI request may take before :class:`WireGuardGoError` is raised."""

_IFNAME_MAX = 15


class WireGuardGoError(TunnelError):
    """wireguard-go is missing, did not start, exited, or refused a UAPI request."""


class WireGuardGoTunnel:
    """A running wireguard-go process for interface :attr:`name`, driven through its UAPI socket.

    Implements :class:`~punchtrio.tunnel.Tunnel`. Made by :func:`open_wireguard_go_tunnel`, which
    owns the process's lifetime.
    """

    def __init__(
        self, name: str, process: trio.Process, *, socket_path: Path, log: IO[bytes]
    ) -> None:
        self._name = name
        self._log = log
        self.process = process
        """The wireguard-go process (``trio.Process``)."""
        self.socket_path = socket_path
        """Its UAPI socket."""
        self._listen_port = 0

    @property
    def name(self) -> str:
        """The network interface's name."""
        return self._name

    @property
    def listen_port(self) -> int:
        """The UDP port wireguard-go listens on (as last read or set through UAPI)."""
        return self._listen_port

    async def request(self, text: str) -> str:
        """Send one UAPI request (``get=1`` or ``set=1`` text ending with the empty line) and
        return the reply up to its empty line. Raises :class:`WireGuardGoError` if the socket
        cannot be reached or does not answer within :data:`UAPI_TIMEOUT` seconds."""
        return await trio.to_thread.run_sync(self._request_sync, text)

    def _request_sync(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(UAPI_TIMEOUT)
            try:
                sock.connect(str(self.socket_path))
                sock.sendall(text.encode())
                reply = b""
                while not reply.endswith(b"\n\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            except OSError as exc:
                raise WireGuardGoError(
                    f"wireguard-go's UAPI socket {self.socket_path} did not answer: "
                    f"{exc.strerror or exc}"
                ) from None
        return reply.decode("utf-8", "replace")

    async def configure(
        self,
        *,
        private_key: bytes | None = None,
        listen_port: int | None = None,
        peers: Sequence[PeerSection] = (),
        replace_peers: bool = False,
    ) -> None:
        """Apply these settings in one ``set=1`` (see :func:`format_uapi_set`), then read the
        listen port back. Raises :class:`WireGuardGoError` naming wireguard-go's errno (e.g. a
        port in use: ``EADDRINUSE``)."""
        text = format_uapi_set(
            private_key=private_key,
            listen_port=listen_port,
            peers=peers,
            replace_peers=replace_peers,
        )
        reply = await self.request(text)
        try:
            parse_uapi_get(reply)
        except UapiError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            what = f" listen port {listen_port}:" if listen_port else ""
            raise WireGuardGoError(
                f"wireguard-go refused the configuration:{what} {reason}"
            ) from None
        await self.info()

    async def apply(self, text: str) -> None:
        """Send one complete ``set=1`` request ``text`` as it is. Raises
        :class:`WireGuardGoError` if wireguard-go does not answer or refuses it (naming its
        errno)."""
        reply = await self.request(text)
        try:
            parse_uapi_get(reply)
        except UapiError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise WireGuardGoError(f"wireguard-go refused a request: {reason}") from None

    async def info(self) -> DeviceInfo:
        """Read the device through ``get=1``. Raises :class:`WireGuardGoError`."""
        reply = await self.request("get=1\n\n")
        try:
            info = parse_uapi_get(reply)
        except UapiError as exc:
            raise WireGuardGoError(f"wireguard-go's get reply: {exc}") from None
        self._listen_port = info.listen_port
        return info

    def peer_stats(self) -> Mapping[bytes, PeerStats]:
        """Return each peer's endpoint, bytes and last handshake, read now through ``get=1``.

        Blocks for one local UAPI round trip (well under a millisecond; at most
        :data:`UAPI_TIMEOUT`). See :func:`stats_from_info` for what UAPI cannot report. Raises
        :class:`WireGuardGoError` if wireguard-go does not answer.
        """
        try:
            info = parse_uapi_get(self._request_sync("get=1\n\n"))
        except UapiError as exc:
            raise WireGuardGoError(f"wireguard-go's get reply: {exc}") from None
        return stats_from_info(info)


def find_wireguard_go(binary: str = "wireguard-go") -> str:
    """Return the path of the wireguard-go program, ``binary`` as a path or looked up on PATH.

    Raises :class:`WireGuardGoError` with the fix (install Debian's ``wireguard-go``) if absent.
    """
    found = shutil.which(binary)
    if found is None:
        raise WireGuardGoError(
            f"{binary} not found: install it (Debian: apt-get install wireguard-go) or use "
            "--tunnel userspace"
        )
    return found


def free_interface_name(prefix: str = "wg") -> str:
    """Return the first ``prefixN`` (N = 0, 1, ...) that no interface of this namespace uses."""
    taken = {n for _, n in socket.if_nameindex()}
    number = 0
    while f"{prefix}{number}" in taken or (UAPI_DIRECTORY / f"{prefix}{number}.sock").exists():
        number += 1
    return f"{prefix}{number}"


@contextlib.asynccontextmanager
async def open_wireguard_go_tunnel(
    config: WgQuickConfig,
    *,
    name: str = "",
    binary: str = "wireguard-go",
    start_timeout: float = START_TIMEOUT,
) -> AsyncIterator[WireGuardGoTunnel]:
    """Run wireguard-go for interface ``name`` with ``config``'s key, port, peers and addresses.

    ``name`` ``""`` picks the first free ``wgN``. Starts ``binary -f name`` (found on PATH),
    waits up to ``start_timeout`` seconds for its UAPI socket, sends the key, listen port and
    peers in one ``set=1``, then sets MTU, addresses and one route per allowed prefix by
    netlink. Leaving the block (normally, by an exception or cancellation) stops the process
    (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT` seconds) and removes the socket file and
    the interface if they remain; so does a failure half-way through start-up. Raises
    :class:`WireGuardGoError` (a :class:`TunnelError`) naming the cause: the program missing,
    the name taken, wireguard-go exiting, or a refused setting such as a port in use.
    """
    program = find_wireguard_go(binary)
    if not name:
        name = free_interface_name()
    if len(name) > _IFNAME_MAX or "/" in name or not name.isprintable() or " " in name:
        raise WireGuardGoError(f"{name[:40]!r} is not a valid interface name")
    if name in {n for _, n in socket.if_nameindex()}:
        raise WireGuardGoError(f"interface {name} exists already: choose another --interface")
    socket_path = UAPI_DIRECTORY / f"{name}.sock"
    if _answers(socket_path):
        raise WireGuardGoError(
            f"{socket_path} is in use (a tunnel of that name, perhaps in another network "
            "namespace): choose another --interface"
        )
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    # Its output goes to a file, read for the error line: a file never blocks the process.
    with tempfile.TemporaryFile() as log:
        process = await trio.lowlevel.open_process(
            [program, "-f", name], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        tunnel = WireGuardGoTunnel(name, process, socket_path=socket_path, log=log)
        try:
            try:
                with trio.fail_after(start_timeout):
                    await _wait_started(tunnel)
            except trio.TooSlowError:
                raise WireGuardGoError(
                    f"wireguard-go did not open {socket_path} within {start_timeout:g} s"
                ) from None
            await tunnel.configure(
                private_key=config.interface.private_key,
                listen_port=config.interface.listen_port or 0,
                peers=config.peers,
                replace_peers=True,
            )
            configure_interface(
                name,
                addresses=config.interface.addresses,
                routes=[network for peer in config.peers for network in peer.allowed_ips],
                mtu=config.interface.mtu,
            )
            yield tunnel
        finally:
            with trio.CancelScope(shield=True):
                await _stop(tunnel)


async def _wait_started(tunnel: WireGuardGoTunnel) -> None:
    while True:
        if tunnel.process.returncode is not None:
            raise WireGuardGoError(
                f"wireguard-go exited at start-up (status {tunnel.process.returncode}): "
                f"{_error_line(tunnel)}"
            )
        if tunnel.socket_path.exists():
            with contextlib.suppress(WireGuardGoError):
                await tunnel.info()
                return
        await trio.sleep(0.02)


def _error_line(tunnel: WireGuardGoTunnel) -> str:
    tunnel._log.seek(0)
    text = tunnel._log.read(1 << 20).decode("utf-8", "replace")
    lines = [line for line in text.splitlines() if "ERROR" in line]
    return " ".join((lines[-1] if lines else "no error output").split())


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(UAPI_TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


async def _stop(tunnel: WireGuardGoTunnel) -> None:
    process = tunnel.process
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    with contextlib.suppress(FileNotFoundError):
        tunnel.socket_path.unlink()  # left behind when the process was killed
    _delete_link(tunnel.name)


def _delete_link(name: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])
