"""ChaCha20-Poly1305 for transport messages (and XChaCha20-Poly1305 for cookie replies), with as
little Python around libsodium as possible.

``nacl.bindings`` validates every argument in Python and formats its error messages eagerly, which
costs about as much as encrypting a small packet. Transport messages have fixed shapes that the
device has already checked, so when PyNaCl's compiled libsodium module (``nacl._sodium``) is
importable and passes a known-answer test at import, the same libsodium functions are called on it
directly, writing the ciphertext straight after the message header. Otherwise the
``nacl.bindings`` functions are used. :data:`BACKEND` names the one in use. Cookie replies, which
a responder under a handshake flood sends by the ten thousand per second, get the same treatment
(:func:`seal_cookie`, :data:`COOKIE_BACKEND`).

Tested with PyNaCl 1.5.0 and 1.6.2 (docs/wireguard.md); a test fails when the direct path stops
being chosen on the installed PyNaCl, so a silent fallback does not go unnoticed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

_NONCE_PAD = b"\x00\x00\x00\x00"


def _seal_bindings(prefix: bytes, counter: bytes, plaintext: bytes, key: bytes) -> bytes:
    return (
        prefix
        + counter
        + crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, None, _NONCE_PAD + counter, key)
    )


def _open_bindings(data: bytes, key: bytes) -> bytearray | None:
    try:
        return bytearray(
            crypto_aead_chacha20poly1305_ietf_decrypt(
                bytes(data[16:]), None, _NONCE_PAD + data[8:16], key
            )
        )
    except CryptoError:
        return None


def _sodium_functions(module: Any, *names: str) -> tuple[Any, list[Any]] | None:
    """Return ``(ffi, [lib.name, ...])`` of ``module`` (default PyNaCl's private compiled module
    ``nacl._sodium``), or None when it cannot be imported or lacks any of ``names``."""
    try:
        if module is None:
            module = importlib.import_module("nacl._sodium")
        return module.ffi, [getattr(module.lib, name) for name in names]
    except (ImportError, AttributeError):
        return None


def _load_sodium(
    module: Any = None,
) -> tuple[Callable[..., bytes], Callable[..., bytearray | None]] | None:
    """Return ``(seal, open_)`` calling libsodium through ``module`` (default ``nacl._sodium``).

    Returns None, so that the caller falls back to ``nacl.bindings``, when the module cannot be
    imported, lacks the two functions, or its functions fail the known-answer test below (tests
    pass a stand-in ``module`` to check each case).
    """
    found = _sodium_functions(
        module,
        "crypto_aead_chacha20poly1305_ietf_encrypt",
        "crypto_aead_chacha20poly1305_ietf_decrypt",
    )
    if found is None:
        return None
    ffi, (encrypt, decrypt) = found
    from_buffer = ffi.from_buffer
    null = ffi.NULL

    def seal(prefix: bytes, counter: bytes, plaintext: bytes, key: bytes) -> bytes:
        n = len(plaintext)
        out = bytearray(n + 32)
        out[:8] = prefix
        out[8:16] = counter
        encrypt(from_buffer(out) + 16, null, plaintext, n, null, 0, null, _NONCE_PAD + counter, key)
        return bytes(out)

    def open_(data: bytes, key: bytes) -> bytearray | None:
        n = len(data) - 16
        out = bytearray(n - 16 or 1)
        if decrypt(
            from_buffer(out),
            null,
            null,
            from_buffer(data) + 16,
            n,
            null,
            0,
            _NONCE_PAD + data[8:16],
            key,
        ):
            return None
        return out if n > 16 else bytearray()

    # Known-answer test against the bindings before trusting the direct calls.
    key = bytes(range(32))
    counter = b"\x07\x00\x00\x00\x00\x00\x00\x01"
    for plaintext in (b"", b"x" * 1500):
        try:
            sealed = seal(b"\x04\x00\x00\x00\x01\x02\x03\x04", counter, plaintext, key)
            opened = open_(sealed, key)
            tampered = open_(sealed[:-1] + bytes([sealed[-1] ^ 1]), key)
        except Exception:
            return None
        reference = _seal_bindings(b"\x04\x00\x00\x00\x01\x02\x03\x04", counter, plaintext, key)
        if sealed != reference or opened is None or bytes(opened) != plaintext:
            return None
        if tampered is not None:
            return None
    return seal, open_


_sodium = _load_sodium()

BACKEND = "libsodium (direct)" if _sodium is not None else "nacl.bindings"
"""Which implementation :func:`seal` and :func:`open_` use."""

seal: Callable[[bytes, bytes, bytes, bytes], bytes]
"""``seal(prefix8, counter8, plaintext, key)``: a transport message: ``prefix8`` (type and receiver
index), the little-endian counter, then ChaCha20-Poly1305 of ``plaintext`` under the nonce
``0000 || counter``."""
open_: Callable[[bytes, bytes], bytearray | None]
"""``open_(message, key)``: the plaintext of a whole transport message (a new bytearray the caller
owns), or ``None`` if it does not authenticate. The message must be at least 32 bytes."""

if _sodium is not None:
    seal, open_ = _sodium
else:
    seal, open_ = _seal_bindings, _open_bindings


def _seal_cookie_bindings(cookie: bytes, mac1: bytes, nonce: bytes, key: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(cookie, mac1, nonce, key)


def _load_sodium_cookie(module: Any = None) -> Callable[[bytes, bytes, bytes, bytes], bytes] | None:
    """Return ``seal_cookie`` calling libsodium through ``module`` (default ``nacl._sodium``).

    Returns None (the caller falls back to ``nacl.bindings``) when the module cannot be imported,
    lacks the function, or the function fails a known-answer test against the bindings.
    """
    found = _sodium_functions(module, "crypto_aead_xchacha20poly1305_ietf_encrypt")
    if found is None:
        return None
    ffi, (encrypt,) = found
    from_buffer = ffi.from_buffer
    null = ffi.NULL

    def seal_cookie(cookie: bytes, mac1: bytes, nonce: bytes, key: bytes) -> bytes:
        out = bytearray(len(cookie) + 16)
        encrypt(from_buffer(out), null, cookie, len(cookie), mac1, len(mac1), null, nonce, key)
        return bytes(out)

    key, nonce = bytes(range(32)), bytes(range(100, 124))
    for cookie, mac1 in ((bytes(16), bytes(16)), (bytes(range(16)), bytes(range(50, 66)))):
        try:
            sealed = seal_cookie(cookie, mac1, nonce, key)
        except Exception:
            return None
        if sealed != _seal_cookie_bindings(cookie, mac1, nonce, key):
            return None
    return seal_cookie


_sodium_cookie = _load_sodium_cookie()

COOKIE_BACKEND = "libsodium (direct)" if _sodium_cookie is not None else "nacl.bindings"
"""Which implementation :func:`seal_cookie` uses."""

seal_cookie: Callable[[bytes, bytes, bytes, bytes], bytes] = (
    _sodium_cookie if _sodium_cookie is not None else _seal_cookie_bindings
)
"""``seal_cookie(cookie16, mac1, nonce24, key32)``: XChaCha20-Poly1305 of a 16-byte cookie with
the message's mac1 as associated data (32 bytes: ciphertext and tag), as a cookie reply carries."""
