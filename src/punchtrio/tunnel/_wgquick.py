"""wg-quick configuration files: ``[Interface]`` and ``[Peer]`` sections, checked line by line.

The parser accepts the subset of wg-quick that a userspace tunnel can honour and rejects everything
else with one :class:`ConfigError` naming the file and line, so a file that parses is fully applied.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from .._exceptions import PunchtrioError
from ..keys import InvalidKeyError, decode_key

DEFAULT_MTU = 1420
"""MTU of a tunnel whose config has no ``MTU`` line, as wg-quick picks for IPv4 and IPv6 underlays."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (1 MiB); anything bigger is rejected."""

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(PunchtrioError):
    """A wg-quick file is unreadable, malformed or uses an unsupported key; exit status 2.

    The message starts with ``FILE:LINE:`` when a line is to blame.
    """

    exit_code = 2


@dataclass(frozen=True)
class InterfaceConfig:
    """The ``[Interface]`` section: our key, the tunnel's addresses, UDP port and MTU.

    ``listen_port`` ``None`` lets the kernel pick a free port; ``mtu`` is in bytes (default 1420).
    ``private_key`` never appears in ``repr``.
    """

    private_key: bytes = field(repr=False)
    addresses: tuple[IPInterface, ...] = ()
    listen_port: int | None = None
    mtu: int = DEFAULT_MTU


@dataclass(frozen=True)
class PeerSection:
    """One ``[Peer]`` section, as read; ``line`` is where it starts in the file.

    ``endpoint`` is a literal ``(ip, port)``; ``persistent_keepalive`` is in seconds (``None`` = off).
    ``preshared_key`` never appears in ``repr``.
    """

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int | None = None
    line: int = 0


@dataclass(frozen=True)
class WgQuickConfig:
    """A whole wg-quick file: one interface and its peers; ``source`` names it in error messages."""

    interface: InterfaceConfig
    peers: tuple[PeerSection, ...] = ()
    source: str = "<config>"


_INTERFACE_KEYS = {"privatekey", "address", "listenport", "mtu"}
_PEER_KEYS = {"publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive"}
# Keys wg-quick knows that this tunnel cannot honour: named as unsupported rather than unknown.
_UNSUPPORTED = {
    "dns",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
}
_CANONICAL = {
    k.lower(): k
    for k in [
        "PrivateKey",
        "Address",
        "ListenPort",
        "MTU",
        "PublicKey",
        "PresharedKey",
        "AllowedIPs",
        "Endpoint",
        "PersistentKeepalive",
        "DNS",
        "Table",
        "PreUp",
        "PostUp",
        "PreDown",
        "PostDown",
        "SaveConfig",
        "FwMark",
    ]
}
_INTEGER = re.compile(r"[0-9]{1,6}")


class _LineError(Exception):
    """A value is wrong; the caller adds the file and the line (``line`` if given)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


def load_wgquick(path: str | os.PathLike[str]) -> WgQuickConfig:
    """Read and parse the wg-quick file at ``path``.

    Raises :class:`ConfigError` if the file cannot be read, is larger than 1 MiB, is not UTF-8, or
    does not parse (see :func:`parse_wgquick`).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
    return parse_wgquick(text, source=str(path))


def parse_wgquick(text: str, *, source: str = "<config>") -> WgQuickConfig:
    """Parse the text of a wg-quick file.

    Sections and keys are case-insensitive, ``#`` starts a comment, ``Address`` and ``AllowedIPs``
    may repeat and hold comma-separated lists. Raises :class:`ConfigError` (``source:LINE: why``) for
    an unknown or unsupported key, a key outside a section, a repeated key, a malformed value, a
    missing ``PrivateKey`` or ``PublicKey``, or a peer listed twice.
    """
    iface: dict[str, object] | None = None
    iface_line = 0
    peers: list[dict[str, object]] = []
    section: dict[str, object] | None = None
    lineno = 0
    try:
        for lineno, raw_line in enumerate(text.splitlines(), start=1):
            line = raw_line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                name = line.lower()
                if name == "[interface]":
                    if iface is not None:
                        raise _LineError(f"second [Interface] section (first at line {iface_line})")
                    iface, iface_line = {}, lineno
                    section = iface
                elif name == "[peer]":
                    section = {"line": lineno}
                    peers.append(section)
                else:
                    raise _LineError(f"unknown section {line[:40]!r}")
                continue
            key, sep, value = line.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep or not key:
                raise _LineError("expected 'Key = Value' or a [Section]")
            if section is None:
                raise _LineError(f"{_name(key)} outside a section")
            _apply(section, key, value, in_interface=section is iface)
        lineno = 0
        return _build(iface, iface_line, peers, source)
    except _LineError as exc:
        lineno = exc.line or lineno
        where = f"{source}:{lineno}" if lineno else source
        raise ConfigError(f"{where}: {exc}") from None


def _name(key: str) -> str:
    return _CANONICAL.get(key, repr(key[:40]))


def _apply(section: dict[str, object], key: str, value: str, *, in_interface: bool) -> None:
    allowed = _INTERFACE_KEYS if in_interface else _PEER_KEYS
    if key not in allowed:
        if key in _UNSUPPORTED:
            raise _LineError(f"{_name(key)} is not supported by punchtrio")
        where = "[Interface]" if in_interface else "[Peer]"
        raise _LineError(f"unknown key {_name(key)} in {where}")
    if key in ("address", "allowedips"):
        previous = section.get(key, ())
        assert isinstance(previous, tuple)
        section[key] = previous + _parse_list(key, value)
        return
    if key in section:
        raise _LineError(f"{_name(key)} given twice in one section")
    section[key] = _parse_value(key, value)


def _parse_list(key: str, value: str) -> tuple[object, ...]:
    items = [item.strip() for item in value.split(",")]
    if items == [""]:
        return ()
    if "" in items:
        raise _LineError(f"{_name(key)} has an empty item")
    if key == "address":
        return tuple(_parse_address(item) for item in items)
    return tuple(_parse_network(item) for item in items)


def _parse_value(key: str, value: str) -> object:
    if key in ("privatekey", "publickey", "presharedkey"):
        try:
            return decode_key(value, what=_name(key))
        except InvalidKeyError as exc:
            raise _LineError(str(exc)) from None
    if key == "listenport":
        return _parse_int(key, value, 0, 65535)
    if key == "mtu":
        return _parse_int(key, value, 576, 65535)
    if key == "persistentkeepalive":
        if value.lower() == "off":
            return None
        return _parse_int(key, value, 0, 65535) or None
    assert key == "endpoint"
    return parse_endpoint(value)


def _parse_int(key: str, value: str, low: int, high: int) -> int:
    if not _INTEGER.fullmatch(value):
        raise _LineError(f"{_name(key)} must be an integer from {low} to {high}")
    number = int(value)
    if not low <= number <= high:
        raise _LineError(f"{_name(key)} must be an integer from {low} to {high}")
    return number


def _parse_address(item: str) -> IPInterface:
    if "/" in item and not _INTEGER.fullmatch(item.rpartition("/")[2]):
        raise _LineError(f"Address {item[:60]!r} has a malformed prefix length")
    try:
        address = ipaddress.ip_interface(item)
    except ValueError:
        raise _LineError(f"Address {item[:60]!r} is not an IP address with a prefix") from None
    if address.ip.is_multicast or address.ip.is_unspecified:
        raise _LineError(f"Address {item[:60]!r} is not a unicast address")
    return address


def _parse_network(item: str) -> IPNetwork:
    if "/" in item and not _INTEGER.fullmatch(item.rpartition("/")[2]):
        raise _LineError(f"AllowedIPs {item[:60]!r} has a malformed prefix length")
    try:
        # Host bits are masked off, as `wg` does.
        return ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise _LineError(f"AllowedIPs {item[:60]!r} is not an IP network") from None


def parse_endpoint(value: str) -> tuple[str, int]:
    """Parse a literal endpoint ``IPv4:port`` or ``[IPv6]:port`` into ``(ip, port)``.

    Host names are refused (no DNS), as are multicast, unspecified and broadcast addresses and port 0.
    Raises :class:`ValueError` subclass ``_LineError`` internally; callers outside this module get a
    :class:`ConfigError` from :func:`parse_wgquick`.
    """
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise _LineError(f"Endpoint {value[:60]!r} must be [IPv6]:port")
    else:
        host, sep, port = value.rpartition(":")
        if not sep or ":" in host:
            raise _LineError(f"Endpoint {value[:60]!r} must be IPv4:port or [IPv6]:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _LineError(
            f"Endpoint host {host[:60]!r} is not a literal IP address (names are not resolved)"
        ) from None
    if value.startswith("[") != (ip.version == 6):
        raise _LineError(f"Endpoint {value[:60]!r}: IPv6 addresses go in brackets, IPv4 do not")
    if ip.is_multicast or ip.is_unspecified or str(ip) == "255.255.255.255":
        raise _LineError(f"Endpoint {value[:60]!r} is not a unicast address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise _LineError(f"Endpoint {value[:60]!r}: write IPv4-mapped addresses as plain IPv4")
    if not _INTEGER.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _LineError(f"Endpoint {value[:60]!r}: the port must be an integer from 1 to 65535")
    port_number = int(port)
    return str(ip), port_number


def _build(
    iface: dict[str, object] | None, iface_line: int, peers: list[dict[str, object]], source: str
) -> WgQuickConfig:
    if iface is None:
        raise _LineError("no [Interface] section")
    if "privatekey" not in iface:
        raise _LineError("[Interface] has no PrivateKey", iface_line)
    addresses = iface.get("address", ())
    mtu = iface.get("mtu", DEFAULT_MTU)
    assert isinstance(addresses, tuple)
    assert isinstance(mtu, int)
    if mtu < 1280 and any(a.version == 6 for a in addresses):
        raise _LineError(f"MTU {mtu} is below 1280, the minimum for an IPv6 Address", iface_line)
    interface = InterfaceConfig(
        private_key=iface["privatekey"],  # type: ignore[arg-type]
        addresses=addresses,
        listen_port=iface.get("listenport"),  # type: ignore[arg-type]
        mtu=mtu,
    )
    sections: list[PeerSection] = []
    seen: dict[bytes, int] = {}
    for peer in peers:
        line = peer.pop("line")
        assert isinstance(line, int)
        if "publickey" not in peer:
            raise _LineError("[Peer] has no PublicKey", line)
        key = peer["publickey"]
        assert isinstance(key, bytes)
        if key in seen:
            raise _LineError(f"[Peer] repeats the peer at line {seen[key]}", line)
        seen[key] = line
        sections.append(
            PeerSection(
                public_key=key,
                preshared_key=peer.get("presharedkey"),  # type: ignore[arg-type]
                allowed_ips=peer.get("allowedips", ()),  # type: ignore[arg-type]
                endpoint=peer.get("endpoint"),  # type: ignore[arg-type]
                persistent_keepalive=peer.get("persistentkeepalive"),  # type: ignore[arg-type]
                line=line,
            )
        )
    return WgQuickConfig(interface=interface, peers=tuple(sections), source=source)
