"""Request signing between peers and the hub: proof of a WireGuard key, and of a network secret.

A peer signs every API request with a key both sides derive from X25519: the peer computes
``X25519(peer_private, hub_public)``, the hub ``X25519(hub_private, peer_public)``. Only the holder of
the private key of the public key in ``X-Punchtrio-Key`` can produce the MAC, so a record can only
be registered, refreshed or deleted by its key's owner. With a network secret, the MAC key is also
keyed by a key derived from the secret, so only its holders can use that network.

The MAC (keyed BLAKE2s-256) covers the method, the request target (path and query exactly as sent),
a BLAKE2s hash of the body, a timestamp, a random nonce, the network id and the peer's key. The hub
refuses timestamps outside its window and nonces it has already seen (the replay cache lives in
the hub's store), timestamps ahead of its clock, and timestamps from before it started (so no
request survives a restart of the hub). Wire format and derivations are specified in
``docs/rendezvous.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from nacl.bindings import crypto_scalarmult

from .._exceptions import PunchtrioError
from ..keys import PrivateKey, PublicKey

SCHEME = "punchtrio-hub-v1"
"""Name of the signing scheme; the first line of every signed string."""

HEADER_KEY = "X-Punchtrio-Key"
"""Header carrying the peer's base64 WireGuard public key."""
HEADER_TIME = "X-Punchtrio-Time"
"""Header carrying the signing time: integer Unix seconds."""
HEADER_NONCE = "X-Punchtrio-Nonce"
"""Header carrying 16 random bytes, unpadded URL-safe base64 (22 characters)."""
HEADER_NETWORK = "X-Punchtrio-Network"
"""Header carrying the network id (32 lowercase hex digits); absent without a network secret."""
HEADER_MAC = "X-Punchtrio-Mac"
"""Header carrying the MAC: 32 bytes, standard base64 (44 characters)."""

DEFAULT_WINDOW = 60.0
"""Default tolerance of the hub, in seconds, between a request's timestamp and its own clock."""

NONCE_LEN = 16
MIN_SECRET_LEN = 16
MAX_SECRET_LEN = 1024

_TIME = re.compile(r"[0-9]{1,12}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{22}")
_NETWORK = re.compile(r"[0-9a-f]{32}")
_MAC = re.compile(r"[A-Za-z0-9+/]{43}=")


class AuthenticationError(PunchtrioError):
    """A request's signature is missing, malformed, stale or wrong (the hub answers 401)."""


class InvalidNetworkSecretError(PunchtrioError):
    """A network secret is too short, too long, or its file cannot be read."""


@dataclass(frozen=True, repr=False)
class NetworkSecret:
    """A shared secret that defines a private network of peers on a hub.

    The secret is any byte string of 16 to 1024 bytes (a file's content with surrounding whitespace
    stripped; ``punchtrio keygen`` output is a good one). Peers and hub derive from it a public
    :attr:`network_id` and a private :attr:`auth_key` that keys every request MAC. ``repr`` hides it.
    Raises :class:`InvalidNetworkSecretError`.
    """

    raw: bytes
    network_id: str = field(init=False)
    auth_key: bytes = field(init=False)

    def __post_init__(self) -> None:
        if not MIN_SECRET_LEN <= len(self.raw) <= MAX_SECRET_LEN:
            raise InvalidNetworkSecretError(
                f"a network secret is {MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes, got {len(self.raw)}"
            )
        ident = hashlib.blake2s(self.raw, digest_size=16, person=b"ptnet-id").hexdigest()
        key = hashlib.blake2s(self.raw, digest_size=32, person=b"ptnetkey").digest()
        object.__setattr__(self, "network_id", ident)
        object.__setattr__(self, "auth_key", key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> NetworkSecret:
        """Read a secret file (content stripped of surrounding whitespace).

        Raises :class:`InvalidNetworkSecretError` naming the file.
        """
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_SECRET_LEN * 2)
        except OSError as exc:
            raise InvalidNetworkSecretError(
                f"cannot read network secret file {path}: {exc.strerror}"
            ) from None
        try:
            return cls(raw.strip())
        except InvalidNetworkSecretError as exc:
            raise InvalidNetworkSecretError(f"{Path(path)}: {exc}") from None

    def __repr__(self) -> str:
        return f"NetworkSecret(network_id={self.network_id!r})"


def body_digest(body: bytes) -> str:
    """Return the hex BLAKE2s-256 of a request body, as signed."""
    return hashlib.blake2s(body, digest_size=32).hexdigest()


def string_to_sign(
    method: str,
    target: str,
    body: bytes,
    timestamp: int,
    nonce: str,
    network_id: str,
    public_key: PublicKey,
) -> bytes:
    """Return the exact bytes the MAC covers: newline-separated fields.

    The lines are the :data:`SCHEME`, the upper-case ``method``, the request ``target`` (raw path
    plus ``?query`` if any, exactly as on the wire), :func:`body_digest` of ``body``, the decimal
    ``timestamp``, the ``nonce`` text, the ``network_id`` (empty without a network) and the base64
    ``public_key``.
    """
    lines = (
        SCHEME,
        method.upper(),
        target,
        body_digest(body),
        str(timestamp),
        nonce,
        network_id,
        public_key.to_base64(),
    )
    return "\n".join(lines).encode("utf-8")


def _mac_key(
    shared: bytes, peer: PublicKey, hub: PublicKey, network: NetworkSecret | None
) -> bytes:
    if shared == bytes(32):
        raise AuthenticationError("authentication failed")
    key = b"" if network is None else network.auth_key
    material = SCHEME.encode() + shared + peer.raw + hub.raw
    return hashlib.blake2s(material, key=key, digest_size=32, person=b"ptmackey").digest()


def _mac(mac_key: bytes, message: bytes) -> bytes:
    return hashlib.blake2s(message, key=mac_key, digest_size=32).digest()


def _shared_secret(private: bytes, public: bytes) -> bytes:
    try:
        return crypto_scalarmult(private, public)
    except RuntimeError:
        # libsodium refuses low-order points (an all-zero result).
        raise AuthenticationError("authentication failed") from None


def peer_mac_key(
    private_key: PrivateKey, hub_public_key: PublicKey, network: NetworkSecret | None = None
) -> bytes:
    """Return the 32-byte MAC key a peer signs with towards a hub (the request signing key).

    ``X25519(private_key, hub_public_key)`` mixed with both public keys and, with a ``network``,
    its auth key (see ``docs/rendezvous.md``). The hub derives the same key with
    :func:`hub_mac_key`. Other protocols of the hub (its relay) reuse it with their own message
    prefix, so a MAC of one can never pass as a MAC of another. Raises
    :class:`AuthenticationError` for a low-order hub key.
    """
    shared = _shared_secret(private_key.raw, hub_public_key.raw)
    return _mac_key(shared, private_key.public_key(), hub_public_key, network)


def hub_mac_key(
    hub_key: PrivateKey, peer_public_key: PublicKey, network: NetworkSecret | None = None
) -> bytes:
    """Return the MAC key of ``peer_public_key`` as the hub derives it (equal to
    :func:`peer_mac_key` on the peer's side). Raises :class:`AuthenticationError` for a
    low-order peer key."""
    shared = _shared_secret(hub_key.raw, peer_public_key.raw)
    return _mac_key(shared, peer_public_key, hub_key.public_key(), network)


def keyed_mac(mac_key: bytes, message: bytes) -> bytes:
    """Return the 32-byte keyed BLAKE2s-256 of ``message`` under ``mac_key`` (the scheme's MAC)."""
    return _mac(mac_key, message)


@dataclass(frozen=True)
class RequestSigner:
    """Signs API requests for one peer key towards one hub (the client half of the scheme).

    ``private_key`` is the peer's WireGuard key, ``hub_public_key`` the key from ``GET /v1/hub``,
    ``network`` the network secret or ``None``. ``clock_offset`` (seconds) is added to
    ``time.time()``: set it to ``hub_info.time - time.time()`` to sign with the hub's clock.
    """

    private_key: PrivateKey
    hub_public_key: PublicKey
    network: NetworkSecret | None = None
    clock_offset: float = 0.0
    public_key: PublicKey = field(init=False, compare=False)
    """The peer's public key, sent in :data:`HEADER_KEY`."""
    _mac_key: bytes = field(init=False, repr=False, compare=False)
    _key_text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        public_key = self.private_key.public_key()
        shared = _shared_secret(self.private_key.raw, self.hub_public_key.raw)
        key = _mac_key(shared, public_key, self.hub_public_key, self.network)
        object.__setattr__(self, "public_key", public_key)
        object.__setattr__(self, "_mac_key", key)
        object.__setattr__(self, "_key_text", public_key.to_base64())

    def sign(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        *,
        now: float | None = None,
        nonce: bytes | None = None,
    ) -> dict[str, str]:
        """Return the headers that authenticate one request.

        ``target`` is the path and query exactly as sent (httpx: ``request.url.raw_path``),
        ``body`` the exact body bytes. ``now`` (Unix seconds) defaults to the corrected clock,
        ``nonce`` (16 bytes) to fresh random bytes; pass them only in tests. Never reuse the headers:
        the hub refuses a nonce it has seen.
        """
        timestamp = int(time.time() + self.clock_offset if now is None else now)
        raw_nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
        if len(raw_nonce) != NONCE_LEN:
            raise ValueError(f"a nonce is {NONCE_LEN} bytes")
        nonce_text = base64.urlsafe_b64encode(raw_nonce).rstrip(b"=").decode("ascii")
        network_id = "" if self.network is None else self.network.network_id
        message = string_to_sign(
            method, target, body, timestamp, nonce_text, network_id, self.public_key
        )
        headers = {
            HEADER_KEY: self._key_text,
            HEADER_TIME: str(timestamp),
            HEADER_NONCE: nonce_text,
            HEADER_MAC: base64.b64encode(_mac(self._mac_key, message)).decode("ascii"),
        }
        if network_id:
            headers[HEADER_NETWORK] = network_id
        return headers


class HubAuth(httpx.Auth):
    """An ``httpx.Auth`` that signs every request with a :class:`RequestSigner`.

    Use it as ``httpx.AsyncClient(auth=HubAuth(signer))`` or per request (``auth=...``); it signs the
    request exactly as it goes on the wire (method, ``url.raw_path``, body bytes). Each retry of a
    request must go through the auth again so it gets a fresh nonce.
    """

    requires_request_body = True

    def __init__(self, signer: RequestSigner) -> None:
        self.signer = signer

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add the signature headers to ``request`` and send it."""
        target = request.url.raw_path.decode("ascii")
        request.headers.update(self.signer.sign(request.method, target, request.content))
        yield request


@dataclass(frozen=True)
class VerifiedRequest:
    """What a valid signature proves: who signed, in which network, with which nonce and time.

    ``network_id`` is ``""`` on a hub without network secrets. ``timestamp`` is Unix seconds.
    """

    public_key: PublicKey
    network_id: str
    nonce: bytes
    timestamp: int


class RequestVerifier:
    """Checks signed requests (the hub half of the scheme); replay detection is the caller's job.

    ``hub_key`` is the hub's static X25519 private key; ``networks`` the configured network secrets
    (none: an open hub, and a request naming a network is refused); ``window`` (seconds) how far a
    request's timestamp may lag the hub's clock. A timestamp ahead of the hub's clock is refused,
    and so is one below ``not_before`` (Unix seconds; 0 by default): a hub sets it to the second
    after it started, so that no request an earlier process of the hub accepted (every one signed
    before that process ended) is accepted again, whatever its store kept. Derived MAC keys of
    recent peers are cached (at most ``cache_size``) to spare an X25519 per request.
    """

    def __init__(
        self,
        hub_key: PrivateKey,
        networks: tuple[NetworkSecret, ...] = (),
        *,
        window: float = DEFAULT_WINDOW,
        not_before: float = 0.0,
        cache_size: int = 4096,
    ) -> None:
        self.hub_key = hub_key
        self.hub_public_key = hub_key.public_key()
        self.window = window
        self.not_before = not_before
        self._networks = {n.network_id: n for n in networks}
        self._cache: dict[tuple[bytes, str], bytes] = {}
        self._cache_size = cache_size

    @property
    def network_required(self) -> bool:
        """Whether every request must name one of the configured networks."""
        return bool(self._networks)

    def verify(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
        now: float,
    ) -> VerifiedRequest:
        """Check one request's signature headers; ``now`` is the hub's Unix time in seconds.

        ``headers`` must be case-insensitive (Starlette's and httpx's are). Raises
        :class:`AuthenticationError` with a one-line reason: missing or malformed headers, a timestamp
        outside the window (older than ``window`` or ahead of ``now``) or below ``not_before``, an
        unknown network, or a wrong MAC.
        """
        key_text = headers.get(HEADER_KEY)
        time_text = headers.get(HEADER_TIME)
        nonce_text = headers.get(HEADER_NONCE)
        mac_text = headers.get(HEADER_MAC)
        network_id = headers.get(HEADER_NETWORK, "")
        if key_text is None or time_text is None or nonce_text is None or mac_text is None:
            raise AuthenticationError("missing authentication headers")
        if not (
            _TIME.fullmatch(time_text)
            and _NONCE.fullmatch(nonce_text)
            and _MAC.fullmatch(mac_text)
            and (network_id == "" or _NETWORK.fullmatch(network_id))
            and len(key_text) == 44
        ):
            raise AuthenticationError("malformed authentication headers")
        try:
            public_key = PublicKey.from_base64(key_text)
            nonce = base64.urlsafe_b64decode(nonce_text + "==")
            mac = base64.b64decode(mac_text, validate=True)
        except (PunchtrioError, binascii.Error, ValueError):
            raise AuthenticationError("malformed authentication headers") from None
        timestamp = int(time_text)
        if timestamp > now:
            # Never ahead: then every request a hub process accepted is signed before it ended.
            raise AuthenticationError(
                "request timestamp is outside the hub's window (ahead of the hub's clock)"
            )
        if now - timestamp > self.window:
            raise AuthenticationError("request timestamp is outside the hub's window")
        if timestamp < self.not_before:
            raise AuthenticationError("request was signed before the hub started")
        if network_id:
            network = self._networks.get(network_id)
            if network is None:
                raise AuthenticationError("authentication failed")
        elif self._networks:
            raise AuthenticationError("authentication failed")
        else:
            network = None
        mac_key = self._peer_mac_key(public_key, network_id, network)
        message = string_to_sign(
            method, target, body, timestamp, nonce_text, network_id, public_key
        )
        if not hmac.compare_digest(_mac(mac_key, message), mac):
            raise AuthenticationError("authentication failed")
        return VerifiedRequest(public_key, network_id, nonce, timestamp)

    def _peer_mac_key(
        self, public_key: PublicKey, network_id: str, network: NetworkSecret | None
    ) -> bytes:
        cache_key = (public_key.raw, network_id)
        key = self._cache.get(cache_key)
        if key is None:
            shared = _shared_secret(self.hub_key.raw, public_key.raw)
            key = _mac_key(shared, public_key, self.hub_public_key, network)
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[cache_key] = key
        return key
