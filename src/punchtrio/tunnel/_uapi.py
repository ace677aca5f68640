"""WireGuard's cross-platform userspace API (UAPI), sans-IO: requests, replies, and ``set`` plans.

The protocol (https://www.wireguard.com/xplatform/) is text over a stream socket: a request is
``get=1`` or ``set=1`` on its own line, then (for ``set``) ``key=value`` lines, then an empty line.
A ``get`` is answered with the device's ``key=value`` lines; every request ends with
``errno=N`` and an empty line (``0`` on success, a negative errno otherwise, which the ``wg`` tool
turns into its message). Keys are hex-encoded here, not base64.

:class:`UapiConnection` frames one connection's bytes into :class:`GetRequest` and
:class:`SetRequest` values; :func:`format_get` writes a :class:`DeviceInfo`; :func:`plan_set`
checks a whole ``set`` against the device's current state and returns a :class:`SetPlan` that
:func:`apply_plan` applies to a :class:`~punchtrio.wireguard.Device` without any step that can
fail: a ``set`` is applied whole or refused with an errno, never half applied.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import RuntimeError as NaclRuntimeError

from .._endpoint import format_endpoint as _format_endpoint
from .._exceptions import PunchtrioError
from ..wireguard import ConfigError as WireGuardConfigError
from ..wireguard import Device, PeerConfig

Address = tuple[str, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REQUEST_BYTES = 4 << 20
"""Longest request (bytes) a connection may send before it is answered ``errno=-EPROTO`` and
closed (4 MiB: some ten thousand peers with a few allowed IPs each)."""


class UapiError(PunchtrioError):
    """A UAPI request is malformed or cannot be applied.

    ``errno`` is the positive error number (``errno.EINVAL`` for a bad value, ``errno.EPROTO`` for
    a line that is not ``key=value``, ``errno.EOPNOTSUPP`` for a change this device cannot make
    while running); the reply carries it negated, as wireguard-go's does.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True)
class GetRequest:
    """``get=1``: the client wants the device's configuration and statistics."""


@dataclass(frozen=True)
class PeerChange:
    """One ``public_key=`` section of a ``set=1`` request, as sent (nothing applied yet).

    ``preshared_key``: ``None`` when not given, ``b""`` to remove it (all-zero hex), else 32
    bytes; ``persistent_keepalive``: seconds (0 turns it off), ``None`` when not given;
    ``allowed_ips``: added in order, after all were dropped if ``replace_allowed_ips``.
    """

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: Address | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class SetRequest:
    """``set=1``: device settings (``None`` when not given), ``replace_peers``, then peer sections.

    ``private_key`` is 32 bytes, or ``b""`` for the all-zero key (no key).
    """

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: tuple[PeerChange, ...] = ()


@dataclass(frozen=True)
class RefusedRequest:
    """A complete ``set=1`` whose lines did not parse: answer ``error.errno``, keep reading."""

    error: UapiError


@dataclass(frozen=True)
class ProtocolViolation:
    """The connection sent something that is not a UAPI request; answer ``errno`` and close."""

    errno: int
    reason: str


UapiRequest = GetRequest | SetRequest
"""A complete, well-formed request."""


@dataclass(frozen=True)
class PeerInfo:
    """One peer as ``get=1`` reports it.

    ``last_handshake`` is Unix time in seconds (``None``: never); ``rx_bytes``/``tx_bytes``
    count authenticated WireGuard datagram bytes; ``persistent_keepalive`` is seconds (0: off).
    """

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: Address | None = None
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0
    allowed_ips: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class DeviceInfo:
    """The device as ``get=1`` reports it: its private key, UDP port, fwmark (0: none) and peers."""

    private_key: bytes = field(repr=False)
    listen_port: int
    fwmark: int = 0
    peers: tuple[PeerInfo, ...] = ()


# -- framing -----------------------------------------------------------------------------------


class UapiConnection:
    """One UAPI connection's incoming bytes, cut into requests (sans-IO).

    Feed what the socket read to :meth:`receive_data` (``b""`` at end of stream), then take
    requests from :meth:`next_request` until it returns ``None``. A :class:`ProtocolViolation`
    (an unknown operation, a ``get`` with trailing data, an over-long request) is the last thing a
    connection yields: the shell answers it and closes.
    """

    def __init__(self, *, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_request_bytes
        self._closed = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the socket; ``b""`` means the peer closed its side."""
        if not data:
            self._closed = True
        elif not self._closed:
            self._buffer += data

    def next_request(self) -> UapiRequest | RefusedRequest | ProtocolViolation | None:
        """Return the next complete request, a refused or violating one, or ``None`` for now."""
        buffer = self._buffer
        if not buffer:
            return None
        newline = buffer.find(b"\n")
        if newline < 0:
            if len(buffer) > 16:
                return self._violation(errno.EPROTO, "no operation line")
            return None
        operation = bytes(buffer[:newline])
        if operation == b"get=1":
            if len(buffer) < newline + 2:
                return None
            if buffer[newline + 1] != 0x0A:
                return self._violation(errno.EINVAL, "trailing data after get=1")
            del buffer[: newline + 2]
            return GetRequest()
        if operation != b"set=1":
            return self._violation(errno.EPROTO, "unknown operation")
        end = buffer.find(b"\n\n", newline)
        if end < 0:
            if len(buffer) > self._max:
                return self._violation(errno.EPROTO, "request too long")
            return None
        body = bytes(buffer[newline + 1 : end + 1])
        del buffer[: end + 2]
        try:
            return parse_set(body.decode("utf-8"))
        except UnicodeDecodeError:
            return RefusedRequest(UapiError(errno.EPROTO, "request is not UTF-8 text"))
        except UapiError as exc:
            return RefusedRequest(exc)

    def _violation(self, code: int, reason: str) -> ProtocolViolation:
        self._buffer.clear()
        self._closed = True
        return ProtocolViolation(code, reason)


# -- parsing -----------------------------------------------------------------------------------


def parse_set(body: str) -> SetRequest:
    """Parse the ``key=value`` lines of a ``set=1`` request (without ``set=1`` and the final
    empty line). Raises :class:`UapiError` (``EPROTO`` for a line without ``=``, ``EINVAL`` for an
    unknown key or a bad value)."""
    device: dict[str, object] = {}
    peers: list[PeerChange] = []
    peer: dict[str, object] | None = None
    allowed: list[IPNetwork] = []

    def close_peer() -> None:
        if peer is not None:
            peers.append(PeerChange(allowed_ips=tuple(allowed), **peer))  # type: ignore[arg-type]

    for line in body.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(errno.EPROTO, f"line {line[:40]!r} is not key=value")
        if key == "public_key":
            close_peer()
            peer = {"public_key": _key(value, key)}
            allowed = []
        elif peer is None:
            if key == "private_key":
                device[key] = _key(value, key, zero_is_none=True)
            elif key == "listen_port":
                device[key] = _number(value, key, 0xFFFF)
            elif key == "fwmark":
                device[key] = _number(value, key, 0xFFFFFFFF)
            elif key == "replace_peers":
                device[key] = _true(value, key)
            else:
                raise UapiError(errno.EINVAL, f"invalid UAPI device key {key[:40]!r}")
        elif key in ("remove", "update_only", "replace_allowed_ips"):
            peer[key] = _true(value, key)
        elif key == "preshared_key":
            peer[key] = _key(value, key, zero_is_none=True)
        elif key == "endpoint":
            peer[key] = parse_endpoint(value)
        elif key == "persistent_keepalive_interval":
            peer["persistent_keepalive"] = _number(value, key, 0xFFFF)
        elif key == "allowed_ip":
            allowed.append(_prefix(value))
        elif key == "protocol_version":
            if value != "1":
                raise UapiError(errno.EINVAL, f"protocol_version {value[:20]!r} is not 1")
        else:
            raise UapiError(errno.EINVAL, f"invalid UAPI peer key {key[:40]!r}")
    close_peer()
    return SetRequest(peers=tuple(peers), **device)  # type: ignore[arg-type]


def _key(value: str, what: str, *, zero_is_none: bool = False) -> bytes:
    if len(value) != 64:
        raise UapiError(errno.EINVAL, f"{what} is not 64 hex digits")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise UapiError(errno.EINVAL, f"{what} is not 64 hex digits") from None
    if zero_is_none and raw == bytes(32):
        return b""
    return raw


def _number(value: str, what: str, limit: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 10 or int(value) > limit:
        raise UapiError(errno.EINVAL, f"{what} {value[:20]!r} is not a number 0-{limit}")
    return int(value)


def _true(value: str, what: str) -> bool:
    if value != "true":
        raise UapiError(errno.EINVAL, f"{what} may only be true, not {value[:20]!r}")
    return True


def _prefix(value: str) -> IPNetwork:
    address, sep, length = value.partition("/")
    try:
        ip = ipaddress.ip_address(address)
        bits = int(length) if sep and length.isascii() and length.isdigit() else -1
        if not 0 <= bits <= ip.max_prefixlen or len(length) > 3:
            raise ValueError
        return ipaddress.ip_network((ip, bits), strict=False)
    except ValueError:
        raise UapiError(errno.EINVAL, f"allowed_ip {value[:50]!r} is not address/prefix") from None


def parse_endpoint(value: str) -> Address:
    """Parse ``IPv4:port`` or ``[IPv6]:port`` (an IP literal and a port 1-65535); raise
    :class:`UapiError` (``EINVAL``) otherwise."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family = 6
    else:
        family = 4
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if not sep or ip.version != family or not port.isascii() or not port.isdigit():
            raise ValueError
        number = int(port)
        if not 0 < number < 65536 or len(port) > 5:
            raise ValueError
    except ValueError:
        raise UapiError(errno.EINVAL, f"endpoint {value[:60]!r} is not IP:port") from None
    return (host if "%" in host else str(ip), number)


# -- replies -----------------------------------------------------------------------------------


def format_endpoint(endpoint: Address) -> str:
    """Return ``endpoint`` as UAPI writes it: ``1.2.3.4:51820`` or ``[2001:db8::1]:51820``.

    UAPI's form is :func:`punchtrio.format_endpoint`'s, which this calls.
    """
    return _format_endpoint(endpoint)


def format_get(info: DeviceInfo) -> bytes:
    """Return the reply to ``get=1`` for ``info``, ending with ``errno=0`` and the empty line.

    Written as wireguard-go writes it: the private key (hex; the socket is root-only), the listen
    port and fwmark when not 0, then per peer its public and preshared key (zeros when none),
    ``protocol_version=1``, the endpoint if known, the last handshake as seconds and nanoseconds
    (0 when never), bytes each way, the keepalive interval and every allowed IP.
    """
    lines = []
    if info.private_key:
        lines.append(f"private_key={info.private_key.hex()}")
    if info.listen_port:
        lines.append(f"listen_port={info.listen_port}")
    if info.fwmark:
        lines.append(f"fwmark={info.fwmark}")
    for peer in info.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={(peer.preshared_key or bytes(32)).hex()}")
        lines.append("protocol_version=1")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        seconds = int(peer.last_handshake) if peer.last_handshake else 0
        fraction = (peer.last_handshake or 0.0) - seconds
        lines.append(f"last_handshake_time_sec={seconds}")
        lines.append(f"last_handshake_time_nsec={min(999_999_999, round(fraction * 1e9))}")
        lines.append(f"tx_bytes={peer.tx_bytes}")
        lines.append(f"rx_bytes={peer.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    lines.append("errno=0")
    return ("\n".join(lines) + "\n\n").encode()


def format_errno(code: int) -> bytes:
    """Return the status reply ``errno=-code`` (``errno=0`` for 0) and the empty line."""
    return f"errno={-abs(code)}\n\n".encode()


def device_info(device: Device, *, listen_port: int, fwmark: int = 0) -> DeviceInfo:
    """Return what ``get=1`` reports for a running :class:`~punchtrio.wireguard.Device`."""
    stats = device.peer_stats()
    peers = []
    for key in device.peers():
        config = device.peer_config(key)
        stat = stats[key]
        peers.append(
            PeerInfo(
                public_key=key,
                preshared_key=config.preshared_key,
                endpoint=(config.endpoint[0], config.endpoint[1]) if config.endpoint else None,
                last_handshake=stat.last_handshake,
                rx_bytes=stat.rx_bytes,
                tx_bytes=stat.tx_bytes,
                persistent_keepalive=int(config.persistent_keepalive or 0),
                allowed_ips=config.allowed_ips,
            )
        )
    return DeviceInfo(device.private_key, listen_port, fwmark, tuple(peers))


# -- set: check everything, then apply what cannot fail ----------------------------------------


@dataclass(frozen=True)
class SetPlan:
    """What a checked ``set=1`` changes, in the order :func:`apply_plan` applies it.

    ``fwmark`` is the new socket mark (``None``: unchanged; the shell sets it first, the only
    step that can fail); ``remove`` the peers that go; ``shrink`` the kept peers first reduced to
    the allowed IPs they keep (so prefixes moving between peers are free); ``update`` the kept
    peers' final configurations; ``add`` the new peers.
    """

    fwmark: int | None = None
    remove: tuple[bytes, ...] = ()
    shrink: tuple[PeerConfig, ...] = ()
    update: tuple[PeerConfig, ...] = ()
    add: tuple[PeerConfig, ...] = ()

    @property
    def empty(self) -> bool:
        """Whether the plan changes nothing."""
        return not (
            self.fwmark is not None or self.remove or self.shrink or self.update or self.add
        )


def plan_set(request: SetRequest, current: DeviceInfo) -> SetPlan:
    """Check ``request`` against the device as ``current`` describes it; return the plan.

    The lines are taken in order, as wireguard-go takes them: ``replace_peers`` drops every peer,
    a ``public_key`` equal to the device's own is ignored, ``update_only`` does not create,
    ``remove`` drops the peer, an ``allowed_ip`` another peer has moves to this one. The result
    is compared with ``current``: a peer present before and after keeps its sessions (even when
    the request removed and re-added it). Raises :class:`UapiError` when the request asks for
    what the running device cannot do: a different private key or listen port (``EOPNOTSUPP``;
    the same values, as ``wg setconf`` sends them, are accepted), a new peer whose key is a
    low-order point (``EINVAL``).
    """
    private = current.private_key
    if request.private_key is not None and request.private_key != private:
        raise UapiError(errno.EOPNOTSUPP, "the private key of a running tunnel cannot change")
    if request.listen_port is not None and request.listen_port != current.listen_port:
        raise UapiError(errno.EOPNOTSUPP, "the listen port of a running tunnel cannot change")
    own = _public(private)
    before = {peer.public_key: peer for peer in current.peers}
    state: dict[bytes, _Draft] = {key: _Draft.of(peer) for key, peer in before.items()}
    if request.replace_peers:
        state.clear()
    for change in request.peers:
        key = change.public_key
        if key == own:
            continue
        draft = state.get(key)
        if draft is None:
            if change.update_only or change.remove:
                continue
            if key not in before and not _usable(private, key):
                raise UapiError(errno.EINVAL, "peer public key is a low-order point")
            draft = state[key] = _Draft.of(PeerInfo(key), fresh=True)
        if change.remove:
            del state[key]
            continue
        if change.preshared_key is not None:
            draft.preshared_key = change.preshared_key or None
        if change.endpoint is not None:
            draft.endpoint = change.endpoint
        if change.persistent_keepalive is not None:
            draft.persistent_keepalive = change.persistent_keepalive
        if change.replace_allowed_ips:
            draft.allowed_ips.clear()
        for net in change.allowed_ips:
            for other in state.values():
                if net in other.allowed_ips:
                    other.allowed_ips.remove(net)
            draft.allowed_ips.append(net)
    remove = tuple(key for key in before if key not in state)
    shrink, update, add = [], [], []
    for key, draft in state.items():
        final = draft.config()
        old = before.get(key)
        if old is None:
            add.append(final)
            continue
        if draft.same_as(old):
            continue
        kept = tuple(net for net in old.allowed_ips if net in final.allowed_ips)
        if kept != old.allowed_ips:
            shrink.append(_config(old, allowed_ips=kept))
        update.append(final)
    fwmark = request.fwmark if request.fwmark != current.fwmark else None
    return SetPlan(fwmark, remove, tuple(shrink), tuple(update), tuple(add))


def apply_plan(device: Device, plan: SetPlan) -> None:
    """Apply a plan from :func:`plan_set` (made against this device's current state).

    Removals first, then the kept peers reduced to the allowed IPs they keep, then their final
    settings, then the new peers: at every step each prefix has at most one owner, so no step
    fails. ``plan.fwmark`` is the shell's (it belongs to the sockets). Raises
    :class:`UapiError` (``EIO``) only if the device changed since the plan was made.
    """
    try:
        for key in plan.remove:
            device.remove_peer(key)
        for config in (*plan.shrink, *plan.update):
            device.update_peer(config)
        for config in plan.add:
            device.add_peer(config)
    except WireGuardConfigError as exc:
        raise UapiError(
            errno.EIO, f"the device changed while the request was applied: {exc}"
        ) from None


@dataclass
class _Draft:
    preshared_key: bytes | None
    endpoint: Address | None
    persistent_keepalive: int
    allowed_ips: list[IPNetwork]
    public_key: bytes

    @classmethod
    def of(cls, peer: PeerInfo, *, fresh: bool = False) -> _Draft:
        if fresh:  # a peer created by this request (or re-created after a removal)
            return cls(None, None, 0, [], peer.public_key)
        return cls(
            peer.preshared_key,
            peer.endpoint,
            peer.persistent_keepalive,
            list(peer.allowed_ips),
            peer.public_key,
        )

    def config(self) -> PeerConfig:
        return PeerConfig(
            public_key=self.public_key,
            preshared_key=self.preshared_key,
            allowed_ips=tuple(self.allowed_ips),
            endpoint=self.endpoint,
            persistent_keepalive=float(self.persistent_keepalive) or None,
        )

    def same_as(self, peer: PeerInfo) -> bool:
        return (
            self.preshared_key == peer.preshared_key
            and (self.endpoint is None or self.endpoint == peer.endpoint)
            and self.persistent_keepalive == peer.persistent_keepalive
            and tuple(self.allowed_ips) == peer.allowed_ips
        )


def _config(peer: PeerInfo, *, allowed_ips: Sequence[IPNetwork]) -> PeerConfig:
    return PeerConfig(
        public_key=peer.public_key,
        preshared_key=peer.preshared_key,
        allowed_ips=tuple(allowed_ips),
        endpoint=None,
        persistent_keepalive=float(peer.persistent_keepalive) or None,
    )


def _public(private: bytes) -> bytes:
    from nacl.bindings import crypto_scalarmult_base

    return bytes(crypto_scalarmult_base(private))


def _usable(private: bytes, public: bytes) -> bool:
    """Whether ``public`` gives a non-zero shared secret with ``private`` (not a low-order point)."""
    try:
        return crypto_scalarmult(private, public) != bytes(32)
    except NaclRuntimeError:
        return False
