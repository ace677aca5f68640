"""``punchtrio up``'s local control socket: ``/run/punchtrio/IFACE.ctl``, JSON lines, root only.

A running ``up`` answers two requests, one JSON object per line, each with one JSON line:

- ``{"op": "status"}`` -> ``{"ok": true, "status": {...}}`` (see :func:`status_snapshot`);
- ``{"op": "ping", "peer": NAME, "timeout": S}`` -> ``{"ok": true, "ping": {...}}``: an ICMP echo
  to the peer's tunnel address through the tunnel, and the path its reply came back on.

A bad request gets ``{"ok": false, "error": "..."}`` and the connection stays open. The socket is
never on the network: it is a unix socket, mode 0600, in a root-owned directory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import trio

from ..connect import Connector, UapiDevice
from ..keys import PublicKey
from ..punch import PunchError
from ..tunnel import (
    SocketInUseError,
    Tunnel,
    UserspaceTunnel,
    bind_unix_listener,
    format_endpoint,
    serve_unix_connections,
    start_uapi,
)
from ..wireguard import ConfigError as WireGuardConfigError
from ..wireguard import Device

CONTROL_DIRECTORY = "/run/punchtrio"
"""Where ``punchtrio up`` puts its control sockets (``IFACE.ctl``)."""

MAX_LINE = 4096
"""Longest request line (bytes) the control socket accepts."""

PING_TIMEOUT = 2.0
"""Seconds ``ping`` waits for an echo reply by default."""

Report = Callable[[str, dict[str, Any]], None]


def control_path(interface: str, directory: str = CONTROL_DIRECTORY) -> str:
    """Return the control socket path of ``interface`` (``/run/punchtrio/IFACE.ctl``)."""
    return os.path.join(directory, f"{interface}.ctl")


# -- what status reports ------------------------------------------------------------------------


def status_snapshot(
    tunnel: Tunnel, device: Device | UapiDevice, connector: Connector | None, *, now: float
) -> dict[str, Any]:
    """Return the status of a running ``up`` as JSON values.

    ``{"interface", "name", "public_key", "listen_port", "address", "peers": [...]}``; each peer
    has ``name`` (``None`` for a static wg-quick peer), ``public_key``, ``stage`` (``None`` for a
    static peer), ``connected``, ``path`` (``lan``/``direct``/``relay`` or ``None``), ``relay``
    (its name on a relayed path), ``endpoint`` (``"ip:port"``; the relay server's on a relayed
    path), ``rtt_ms`` (the path's probe round trip), ``last_handshake`` (Unix seconds) and
    ``handshake_age_s`` (seconds before ``now``, Unix time), ``rx_bytes``/``tx_bytes``,
    ``error`` (why it failed, if it did) and ``direct_error`` (on a relayed path: why no direct
    path answered, once a round of direct probes has failed; else ``None``).
    """
    stats = device.peer_stats()
    named: dict[bytes, dict[str, Any]] = {}
    peers: list[dict[str, Any]] = []
    if connector is not None:
        for name, state in connector.peers.items():
            entry: dict[str, Any] = {
                "name": name,
                "public_key": str(state.public_key) if state.public_key else None,
                "stage": state.stage,
                "connected": state.connected,
                "path": state.path,
                "relay": state.relay,
                "endpoint": state.endpoint,
                "rtt_ms": None,
                "error": state.error.reason if state.error else None,
                "direct_error": state.direct_error,
            }
            if state.error is not None:
                entry["stage"] = state.error.stage
            if state.public_key is not None:
                named[state.public_key.raw] = entry
                with contextlib.suppress(PunchError):
                    chosen = connector.core.puncher.path(state.public_key.raw)
                    if chosen is not None:
                        entry["rtt_ms"] = round(chosen.rtt * 1000, 2)
            peers.append(entry)
    for key in device.peers():
        found = named.get(key)
        if found is None:
            entry = {
                "name": None,
                "public_key": str(PublicKey(key)),
                "stage": None,
                "connected": False,
                "path": None,
                "relay": None,
                "endpoint": None,
                "rtt_ms": None,
                "error": None,
                "direct_error": None,
            }
            peers.append(entry)
        else:
            entry = found
        stat = stats[key]
        if stat.endpoint is not None:
            address = (str(stat.endpoint[0]), int(stat.endpoint[1]))
            if connector is not None:
                entry["endpoint"], relay = connector.describe_path(address)
                if entry["name"] is None:
                    entry["relay"] = relay
            else:
                entry["endpoint"] = format_endpoint(address)
        if entry["name"] is None:
            entry["connected"] = stat.has_session
        entry["last_handshake"] = stat.last_handshake
        entry["handshake_age_s"] = (
            round(max(0.0, now - stat.last_handshake), 1) if stat.last_handshake else None
        )
        entry["rx_bytes"] = stat.rx_bytes
        entry["tx_bytes"] = stat.tx_bytes
        entry["tunnel_ip"] = _tunnel_ip(device, key)
    for entry in peers:
        for field in ("last_handshake", "handshake_age_s", "tunnel_ip"):
            entry.setdefault(field, None)
        entry.setdefault("rx_bytes", 0)
        entry.setdefault("tx_bytes", 0)
    config = connector.config if connector is not None else None
    return {
        "interface": tunnel.name,
        "name": connector.name if connector is not None else None,
        "public_key": str(PublicKey(device.public_key)),
        "listen_port": tunnel.listen_port,
        "address": str(config.interface) if config is not None else None,
        "peers": peers,
    }


def _tunnel_ip(device: Device | UapiDevice, key: bytes) -> str | None:
    """The peer's own tunnel address: its first single-address allowed IP."""
    try:
        config = device.peer_config(key)
    except WireGuardConfigError:
        return None
    for net in config.allowed_ips:
        if net.prefixlen == net.max_prefixlen:
            return str(net.network_address)
    return None


# -- ping ---------------------------------------------------------------------------------------


def echo_request(ident: int, sequence: int, payload: bytes) -> bytes:
    """Return an ICMPv4 echo request (type 8) with its checksum."""
    header = struct.pack("!BBHHH", 8, 0, 0, ident, sequence)
    checksum = _checksum(header + payload)
    return struct.pack("!BBHHH", 8, 0, checksum, ident, sequence) + payload


def parse_echo_reply(packet: bytes) -> tuple[str, int, int] | None:
    """Return ``(source, ident, sequence)`` of an IPv4 packet holding an ICMP echo reply, or
    ``None`` for anything else (never raises)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 8 or packet[9] != socket.IPPROTO_ICMP:
        return None
    kind, code, _, ident, sequence = struct.unpack_from("!BBHHH", packet, ihl)
    if kind != 0 or code != 0:
        return None
    return str(ipaddress.IPv4Address(packet[12:16])), ident, sequence


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


async def icmp_ping(address: str, *, interface: str, wait: float) -> float | None:
    """Send one ICMP echo to ``address`` out of ``interface``; return the round trip in seconds,
    or ``None`` if no reply came within ``wait`` seconds. Raises :class:`OSError` without
    CAP_NET_RAW."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        ident = int.from_bytes(os.urandom(2), "big")
        sequence = 1
        sent = trio.current_time()
        await sock.sendto(echo_request(ident, sequence, b"punchtrio ping"), (address, 0))
        with trio.move_on_after(wait):
            while True:
                data = await sock.recv(65535)
                reply = parse_echo_reply(data)
                if reply == (address, ident, sequence):
                    return trio.current_time() - sent
    return None


# -- the server ---------------------------------------------------------------------------------


class ControlServer:
    """Answers control requests for a running ``up`` (its tunnel, device and connector)."""

    def __init__(
        self, tunnel: Tunnel, device: Device | UapiDevice, connector: Connector | None
    ) -> None:
        self.tunnel = tunnel
        self.device = device
        self.connector = connector

    async def answer(self, line: bytes) -> dict[str, Any]:
        """Return the reply object for one request line (never raises for bad input)."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "a request is one JSON object per line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is one JSON object per line"}
        op = request.get("op")
        if op == "status":
            snapshot = status_snapshot(self.tunnel, self.device, self.connector, now=time.time())
            return {"ok": True, "status": snapshot}
        if op == "ping":
            peer, timeout = request.get("peer"), request.get("timeout", PING_TIMEOUT)
            if not isinstance(peer, str) or not isinstance(timeout, (int, float)):
                return {"ok": False, "error": "ping needs a peer name and a timeout in seconds"}
            return await self.ping(peer, min(max(float(timeout), 0.01), 30.0))
        return {"ok": False, "error": f"unknown op {str(op)[:30]!r}: use status or ping"}

    async def ping(self, peer: str, wait: float) -> dict[str, Any]:
        """Ping ``peer`` (a name, or a static peer's public key) through the tunnel."""
        status = status_snapshot(self.tunnel, self.device, self.connector, now=time.time())
        entry = next((p for p in status["peers"] if peer in (p["name"], p["public_key"])), None)
        if entry is None:
            known = ", ".join(str(p["name"] or p["public_key"]) for p in status["peers"])
            return {"ok": False, "error": f"no peer {peer[:40]!r} here (peers: {known or 'none'})"}
        if entry["name"] is not None and not entry["connected"]:
            stage = entry["stage"] or "starting"
            why = f": {entry['error']}" if entry["error"] else ""
            return {"ok": False, "error": f"{peer} is not connected (stage {stage}{why})"}
        address = entry["tunnel_ip"]
        if address is None or ipaddress.ip_address(address).version != 4:
            return {"ok": False, "error": f"{peer} has no IPv4 tunnel address to ping"}
        try:
            rtt = await icmp_ping(address, interface=self.tunnel.name, wait=wait)
        except OSError as exc:
            return {"ok": False, "error": f"cannot send ICMP: {exc.strerror or exc}"}
        after = status_snapshot(self.tunnel, self.device, self.connector, now=time.time())
        now_entry = next(p for p in after["peers"] if p["public_key"] == entry["public_key"])
        path = {k: now_entry[k] for k in ("path", "relay", "endpoint")}
        if rtt is None:
            via = f"{path['path'] or 'current'} path {path['endpoint'] or ''}".strip()
            return {
                "ok": False,
                "error": f"no reply from {peer} ({address}) within {wait:g} s over the {via}",
            }
        result = {"peer": peer, "address": address, "rtt_ms": round(rtt * 1000, 3), **path}
        return {"ok": True, "ping": result}

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Answer request lines until the client closes the connection."""
        buffer = b""
        async with stream:
            try:
                while True:
                    data = await stream.receive_some(MAX_LINE)
                    if not data:
                        return
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        reply = await self.answer(line)
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
                    if len(buffer) > MAX_LINE:
                        error = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
                        await stream.send_all(json.dumps(error).encode() + b"\n")
                        return
            except trio.BrokenResourceError:
                return


async def serve_control(
    tunnel: Tunnel,
    device: Device | UapiDevice,
    connector: Connector | None,
    *,
    directory: str = CONTROL_DIRECTORY,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket ``directory/IFACE.ctl`` until cancelled (removed after).

    Reports started with the path. Raises :class:`~punchtrio.tunnel.SocketInUseError` if another
    live process serves it and :class:`OSError` if it cannot be made (before starting).
    """
    path = control_path(tunnel.name, directory)
    server = ControlServer(tunnel, device, connector)
    with bind_unix_listener(path) as sock:
        await serve_unix_connections(sock, server.serve_connection, path, task_status=task_status)


async def start_local_sockets(
    nursery: trio.Nursery,
    tunnel: Tunnel,
    device: Device | UapiDevice,
    connector: Connector | None,
    report: Report,
    *,
    control_directory: str = CONTROL_DIRECTORY,
    uapi: bool = True,
) -> None:
    """Start the UAPI socket (``uapi``: the connector's tunnel; a wg-quick tunnel serves its own)
    and the control socket in ``nursery``. One that cannot be served is reported
    (``uapi_unavailable`` / ``control_unavailable`` with ``path`` and ``reason``) and ``up`` goes
    on without it: the tunnel matters more."""
    if uapi:
        assert isinstance(tunnel, UserspaceTunnel)
        assert isinstance(device, Device)
        await start_uapi(
            nursery,
            tunnel,
            device,
            on_unavailable=lambda u: report(
                "uapi_unavailable", {"path": u.path, "reason": u.reason}
            ),
        )
    serve = functools.partial(serve_control, directory=control_directory)
    try:
        await nursery.start(serve, tunnel, device, connector)
    except (SocketInUseError, OSError) as exc:
        reason = str(exc) if isinstance(exc, SocketInUseError) else (exc.strerror or str(exc))
        path = control_path(tunnel.name, control_directory)
        report("control_unavailable", {"path": path, "reason": reason})


# -- the client ---------------------------------------------------------------------------------


class ControlError(Exception):
    """The control socket could not be used; ``str()`` is the one line to print."""


def request(path: str, message: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the control socket at ``path`` and return the reply object.

    Raises :class:`ControlError` with a one-line reason: no ``up`` running (missing or stale
    socket), root needed (permission denied), or a broken reply.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(
                f"no running `punchtrio up` here: {path} does not exist; start `punchtrio up` first"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: the control socket is root-only; run as root"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                raise ControlError(
                    f"no running `punchtrio up` answers on {path} (a stale socket); "
                    "start `punchtrio up` again"
                ) from None
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"{path} gave no readable reply (is it a punchtrio up?)") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path} gave no readable reply (is it a punchtrio up?)")
    return reply
