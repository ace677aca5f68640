"""The client half of WireGuard's cross-platform userspace API: ``set=1`` written, ``get=1`` read.

:mod:`._uapi` is the server half (what ``wg`` sends to punchtrio's own tunnel, and what that
tunnel answers); this module speaks to a WireGuard that serves UAPI itself, such as wireguard-go,
with two pure functions, :func:`format_uapi_set` and :func:`parse_uapi_get`.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Mapping, Sequence
from ipaddress import ip_network

from ..wireguard import PeerStats
from ._uapi import DeviceInfo, PeerInfo, UapiError, format_endpoint, parse_endpoint
from ._wgquick import PeerSection

_PEER_NUMBERS = frozenset(
    {
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "rx_bytes",
        "tx_bytes",
        "persistent_keepalive_interval",
    }
)


def format_uapi_set(
    *,
    private_key: bytes | None = None,
    listen_port: int | None = None,
    peers: Sequence[PeerSection] = (),
    replace_peers: bool = False,
) -> str:
    """Return a complete ``set=1`` request (ending with the empty line) for these settings.

    ``private_key`` (32 bytes) and ``listen_port`` (0 lets the kernel pick; ``None`` leaves
    either unchanged), then each peer with its preshared key, endpoint, persistent keepalive
    (seconds; ``None`` sends 0, off) and allowed IPs; each peer's allowed IPs replace its old
    ones. ``replace_peers`` removes peers not named. Raises :class:`ValueError` for a key that is
    not 32 bytes or a port outside 0-65535.
    """
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={_hex_key(private_key)}")
    if listen_port is not None:
        if not 0 <= listen_port <= 65535:
            raise ValueError(f"listen port {listen_port} is not 0-65535")
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for peer in peers:
        lines.append(f"public_key={_hex_key(peer.public_key)}")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={_hex_key(peer.preshared_key)}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive or 0}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network}" for network in peer.allowed_ips)
    return "\n".join(lines) + "\n\n"


def _hex_key(key: bytes) -> str:
    if len(key) != 32:
        raise ValueError(f"a WireGuard key is 32 bytes, not {len(key)}")
    return key.hex()


def parse_uapi_get(text: str) -> DeviceInfo:
    """Parse the reply to ``get=1`` (as wireguard-go writes it) into a :class:`DeviceInfo`.

    Unknown keys are ignored (newer wireguard-go versions may add some). Raises
    :class:`UapiError` for a reply whose ``errno`` is not 0, a reply without ``errno``, a
    malformed line or value.
    """
    private_key = b""
    listen_port = 0
    fwmark = 0
    peers: list[PeerInfo] = []
    peer: dict[str, object] | None = None
    status: int | None = None

    def close_peer() -> None:
        if peer is not None:
            peers.append(_peer(peer))

    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(errno.EPROTO, f"UAPI reply line {line[:60]!r} has no '='")
        if status is not None:
            raise UapiError(errno.EPROTO, "UAPI reply continues after errno")
        if key == "errno":
            status = _int(value, key)
        elif key == "public_key":
            close_peer()
            peer = {"public_key": _key(value, key), "allowed_ips": []}
        elif peer is None:
            if key == "private_key":
                private_key = _key(value, key)
            elif key == "listen_port":
                listen_port = _int(value, key)
            elif key == "fwmark":
                fwmark = _int(value, key)
        elif key == "preshared_key":
            psk = _key(value, key)
            peer[key] = psk if any(psk) else None
        elif key == "endpoint":
            peer[key] = parse_endpoint(value)
        elif key in _PEER_NUMBERS:
            peer[key] = _int(value, key)
        elif key == "allowed_ip":
            try:
                network = ip_network(value, strict=False)
            except ValueError:
                raise UapiError(
                    errno.EPROTO, f"allowed_ip {value[:60]!r} is not a prefix"
                ) from None
            allowed = peer["allowed_ips"]
            assert isinstance(allowed, list)
            allowed.append(network)
    close_peer()
    if status is None:
        raise UapiError(errno.EPROTO, "UAPI reply has no errno line")
    if status != 0:
        raise UapiError(abs(status), f"wireguard-go answered errno={status}")
    return DeviceInfo(private_key, listen_port, fwmark, tuple(peers))


def _peer(fields: Mapping[str, object]) -> PeerInfo:
    seconds = int(fields.get("last_handshake_time_sec", 0))  # type: ignore[call-overload]
    nanoseconds = int(fields.get("last_handshake_time_nsec", 0))  # type: ignore[call-overload]
    allowed = fields["allowed_ips"]
    assert isinstance(allowed, list)
    return PeerInfo(
        public_key=fields["public_key"],  # type: ignore[arg-type]
        preshared_key=fields.get("preshared_key"),  # type: ignore[arg-type]
        endpoint=fields.get("endpoint"),  # type: ignore[arg-type]
        last_handshake=seconds + nanoseconds / 1e9 if seconds or nanoseconds else None,
        rx_bytes=int(fields.get("rx_bytes", 0)),  # type: ignore[call-overload]
        tx_bytes=int(fields.get("tx_bytes", 0)),  # type: ignore[call-overload]
        persistent_keepalive=int(fields.get("persistent_keepalive_interval", 0)),  # type: ignore[call-overload]
        allowed_ips=tuple(allowed),
    )


def _key(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 32 or len(value) != 64:
        raise UapiError(errno.EPROTO, f"{what} {value[:70]!r} is not 64 hex digits")
    return raw


def _int(value: str, what: str) -> int:
    text = value[1:] if value.startswith("-") else value
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise UapiError(errno.EPROTO, f"{what} {value[:30]!r} is not a number")
    return int(value)


def stats_from_info(info: DeviceInfo) -> dict[bytes, PeerStats]:
    """Return :class:`~punchtrio.wireguard.PeerStats` per public key from a ``get=1`` reply.

    UAPI reports the last handshake but not how many there were, nor packet counts: ``handshakes``
    is 1 once a handshake completed (0 before), ``has_session`` is whether one completed within
    the last 180 s (WireGuard's ``REJECT_AFTER_TIME``), packet counts are 0.
    """
    now = time.time()
    return {
        peer.public_key: PeerStats(
            public_key=peer.public_key,
            endpoint=peer.endpoint,
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
            last_handshake=peer.last_handshake,
            handshakes=1 if peer.last_handshake is not None else 0,
            has_session=peer.last_handshake is not None and now - peer.last_handshake < 180.0,
        )
        for peer in info.peers
    }


# -- the shell ---------------------------------------------------------------------------------
