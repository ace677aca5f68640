"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it: primitives and the two handshake messages.

The functions here are pure: keys, randomness and the timestamp come in as arguments and the caller
(the device) keeps the state. mac1/mac2 are added and checked by ``_cookie``; this module produces and
consumes the message bodies before the macs.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from .._exceptions import PunchtrioError
from ._messages import Initiation, Response

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
"""The Noise protocol name, hashed into the initial chaining key."""
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
"""WireGuard's Noise prologue."""
LABEL_MAC1 = b"mac1----"
"""Prefix hashed with a public key to make the mac1 key."""
LABEL_COOKIE = b"cookie--"
"""Prefix hashed with a public key to make the cookie encryption key."""

KEY_SIZE = 32
"""Bytes in every key, hash and chaining key."""
TIMESTAMP_SIZE = 12
"""Bytes in a TAI64N timestamp."""
ZERO_KEY = bytes(KEY_SIZE)


class HandshakeError(PunchtrioError):
    """A handshake message failed authentication or names an unknown peer.

    ``reason`` is a short drop-counter name (``"decrypt"``, ``"unknown_peer"``, ``"low_order"``).
    The device catches it and counts the drop; it never reaches the shell.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"handshake rejected: {reason}")
        self.reason = reason


def hash_(data: bytes) -> bytes:
    """Return BLAKE2s-256 of ``data`` (Noise's ``HASH``)."""
    return hashlib.blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Return keyed BLAKE2s-128 of ``data`` (WireGuard's ``MAC``, used for mac1, mac2 and cookies)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """Return HMAC-BLAKE2s-256 of ``data`` under ``key``."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(n: int, key: bytes, data: bytes) -> tuple[bytes, ...]:
    """Return the first ``n`` (1-3) outputs of HKDF with HMAC-BLAKE2s, as WireGuard's ``KDFn``."""
    prk = hmac_blake2s(key, data)
    out = [hmac_blake2s(prk, b"\x01")]
    for i in range(2, n + 1):
        out.append(hmac_blake2s(prk, out[-1] + bytes([i])))
    return tuple(out)


def kdf1(key: bytes, data: bytes) -> bytes:
    """Return ``KDF1(key, data)``."""
    return kdf(1, key, data)[0]


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """Return ``KDF2(key, data)``."""
    a, b = kdf(2, key, data)
    return a, b


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """Return ``KDF3(key, data)``."""
    a, b, c = kdf(3, key, data)
    return a, b, c


def dh(private: bytes, public: bytes) -> bytes:
    """Return X25519(private, public).

    Raises :class:`HandshakeError` (reason ``"low_order"``) when the result is all zero, i.e. the
    public key is a low-order point, as RFC 7748 section 6.1 recommends.
    """
    try:
        shared = crypto_scalarmult(private, public)
    except CryptoError:  # libsodium refuses an all-zero result
        raise HandshakeError("low_order") from None
    if hmac.compare_digest(shared, ZERO_KEY):
        raise HandshakeError("low_order")
    return shared


def public_key(private: bytes) -> bytes:
    """Return the X25519 public key of ``private``."""
    return crypto_scalarmult_base(private)


_COUNTER_NONCE = struct.Struct("<4xQ")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 (IETF) with the nonce 32 zero bits || little-endian 64-bit ``counter``."""
    return crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, aad, _COUNTER_NONCE.pack(counter), key
    )


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises :class:`HandshakeError` (``"decrypt"``) on a bad tag."""
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(
            ciphertext, aad, _COUNTER_NONCE.pack(counter), key
        )
    except CryptoError:
        raise HandshakeError("decrypt") from None


INITIAL_CHAINING_KEY = hash_(CONSTRUCTION)
"""``Ci`` before any message: HASH(CONSTRUCTION)."""
INITIAL_HASH = hash_(INITIAL_CHAINING_KEY + IDENTIFIER)
"""``Hi`` before the responder's static key is mixed in: HASH(Ci || IDENTIFIER)."""


def initial_hash_for(responder_static: bytes) -> bytes:
    """Return HASH(INITIAL_HASH || responder_static), the hash both sides start a handshake from."""
    return hash_(INITIAL_HASH + responder_static)


@dataclass
class InitiatorState:
    """What an initiator keeps between sending an initiation and consuming the response."""

    local_index: int
    ephemeral_private: bytes = field(repr=False)
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)

    def wipe(self) -> None:
        """Drop the secrets (Python cannot overwrite bytes in place; this releases the references)."""
        self.ephemeral_private = ZERO_KEY
        self.chaining_key = ZERO_KEY
        self.hash = ZERO_KEY


@dataclass(frozen=True)
class ConsumedInitiation:
    """A verified initiation: who sent it, its timestamp, and the state to answer it from."""

    initiator_static: bytes
    timestamp: bytes
    sender: int
    ephemeral: bytes
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)


@dataclass(frozen=True)
class TransportKeys:
    """The two transport keys a completed handshake derives, from this side's point of view."""

    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)


def create_initiation(
    *,
    local_static_public: bytes,
    remote_static: bytes,
    static_static: bytes,
    local_index: int,
    timestamp: bytes,
    random: Callable[[int], bytes],
) -> tuple[InitiatorState, Initiation]:
    """Build a handshake initiation (macs zero) and the state needed to consume its response.

    ``static_static`` is the precomputed DH(local static private, remote static).
    """
    ck = INITIAL_CHAINING_KEY
    h = initial_hash_for(remote_static)
    e_priv = random(KEY_SIZE)
    e_pub = crypto_scalarmult_base(e_priv)
    ck = kdf1(ck, e_pub)
    h = hash_(h + e_pub)
    ck, k = kdf2(ck, dh(e_priv, remote_static))
    enc_static = aead_encrypt(k, 0, local_static_public, h)
    h = hash_(h + enc_static)
    ck, k = kdf2(ck, static_static)
    enc_ts = aead_encrypt(k, 0, timestamp, h)
    h = hash_(h + enc_ts)
    msg = Initiation(local_index, e_pub, enc_static, enc_ts, bytes(16), bytes(16))
    return InitiatorState(local_index, e_priv, ck, h), msg


def consume_initiation(
    msg: Initiation,
    *,
    local_static_private: bytes,
    local_static_public: bytes,
    static_static: Callable[[bytes], bytes | None],
) -> ConsumedInitiation:
    """Verify an initiation addressed to us and decrypt the sender's static key and timestamp.

    ``static_static(initiator_static)`` returns the precomputed DH with a known peer or ``None``.
    Raises :class:`HandshakeError` (``decrypt``, ``unknown_peer``, ``low_order``).
    """
    ck = INITIAL_CHAINING_KEY
    h = initial_hash_for(local_static_public)
    ck = kdf1(ck, msg.ephemeral)
    h = hash_(h + msg.ephemeral)
    ck, k = kdf2(ck, dh(local_static_private, msg.ephemeral))
    initiator_static = aead_decrypt(k, 0, msg.encrypted_static, h)
    h = hash_(h + msg.encrypted_static)
    ss = static_static(initiator_static)
    if ss is None:
        raise HandshakeError("unknown_peer")
    ck, k = kdf2(ck, ss)
    timestamp = aead_decrypt(k, 0, msg.encrypted_timestamp, h)
    h = hash_(h + msg.encrypted_timestamp)
    return ConsumedInitiation(initiator_static, timestamp, msg.sender, msg.ephemeral, ck, h)


def create_response(
    initiation: ConsumedInitiation,
    *,
    preshared_key: bytes | None,
    local_index: int,
    random: Callable[[int], bytes],
) -> tuple[Response, TransportKeys]:
    """Answer a consumed initiation (macs zero) and derive the responder's transport keys."""
    ck, h = initiation.chaining_key, initiation.hash
    e_priv = random(KEY_SIZE)
    e_pub = crypto_scalarmult_base(e_priv)
    ck = kdf1(ck, e_pub)
    h = hash_(h + e_pub)
    ck = kdf1(ck, dh(e_priv, initiation.ephemeral))
    ck = kdf1(ck, dh(e_priv, initiation.initiator_static))
    ck, tau, k = kdf3(ck, preshared_key or ZERO_KEY)
    h = hash_(h + tau)
    empty = aead_encrypt(k, 0, b"", h)
    receive, send = kdf2(ck, b"")
    msg = Response(local_index, initiation.sender, e_pub, empty, bytes(16), bytes(16))
    return msg, TransportKeys(send=send, receive=receive)


def consume_response(
    msg: Response,
    state: InitiatorState,
    *,
    local_static_private: bytes,
    preshared_key: bytes | None,
) -> TransportKeys:
    """Verify a response to our initiation and derive the initiator's transport keys.

    Raises :class:`HandshakeError` (``decrypt``, ``low_order``).
    """
    ck, h = state.chaining_key, state.hash
    ck = kdf1(ck, msg.ephemeral)
    h = hash_(h + msg.ephemeral)
    ck = kdf1(ck, dh(state.ephemeral_private, msg.ephemeral))
    ck = kdf1(ck, dh(local_static_private, msg.ephemeral))
    ck, tau, k = kdf3(ck, preshared_key or ZERO_KEY)
    h = hash_(h + tau)
    aead_decrypt(k, 0, msg.encrypted_nothing, h)
    send, receive = kdf2(ck, b"")
    return TransportKeys(send=send, receive=receive)
