"""X25519 keys in WireGuard's text form: base64 of 32 bytes, exactly as ``wg genkey`` prints them."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base

from ._exceptions import PunchtrioError

KEY_LEN = 32
"""Length in bytes of a private, public or preshared key."""


class InvalidKeyError(PunchtrioError):
    """A key is malformed: not base64, not 32 bytes, or all zero."""


def clamp(secret: bytes) -> bytes:
    """Return ``secret`` clamped as RFC 7748 and ``wg genkey`` do (bits 0-2 and 255 cleared, 254 set)."""
    if len(secret) != KEY_LEN:
        raise InvalidKeyError(f"a key is {KEY_LEN} bytes, got {len(secret)}")
    b = bytearray(secret)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def decode_key(text: str | bytes, *, what: str = "key") -> bytes:
    """Decode one base64 key to 32 bytes.

    Surrounding whitespace is ignored. Raises :class:`InvalidKeyError` if ``text`` is not strict
    base64 of exactly 32 bytes, or if all 32 bytes are zero. ``what`` names the key in the message.
    """
    raw = text.strip() if isinstance(text, bytes) else text.strip().encode("ascii", "replace")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError(f"{what} is not valid base64") from None
    if len(decoded) != KEY_LEN:
        raise InvalidKeyError(f"{what} must be {KEY_LEN} bytes of base64, got {len(decoded)} bytes")
    if decoded == bytes(KEY_LEN):
        raise InvalidKeyError(f"{what} is all zero")
    return decoded


def encode_key(key: bytes) -> str:
    """Encode a 32-byte key as base64 text (44 characters, ending in ``=``)."""
    if len(key) != KEY_LEN:
        raise InvalidKeyError(f"a key is {KEY_LEN} bytes, got {len(key)}")
    return base64.b64encode(key).decode("ascii")


@dataclass(frozen=True, repr=False)
class PrivateKey:
    """A clamped X25519 private key. Its ``repr`` never shows the key material."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise InvalidKeyError(f"a private key is {KEY_LEN} bytes, got {len(self.raw)}")
        if self.raw == bytes(KEY_LEN):
            raise InvalidKeyError("private key is all zero")

    @classmethod
    def generate(cls) -> PrivateKey:
        """Return a fresh key from ``os.urandom``, clamped like ``wg genkey``."""
        return cls(clamp(os.urandom(KEY_LEN)))

    @classmethod
    def from_base64(cls, text: str | bytes) -> PrivateKey:
        """Parse ``wg genkey`` output. Raises :class:`InvalidKeyError`; the key is used as given,
        as ``wg pubkey`` does (X25519 clamps it again when it is used)."""
        return cls(decode_key(text, what="private key"))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PrivateKey:
        """Read a private key file. Raises :class:`InvalidKeyError` naming the file if it cannot be
        read or does not hold one key."""
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise InvalidKeyError(f"cannot read key file {path}: {exc.strerror}") from None
        try:
            return cls.from_base64(text)
        except InvalidKeyError as exc:
            raise InvalidKeyError(f"{path}: {exc}") from None

    def to_base64(self) -> str:
        """Return the key as ``wg genkey`` prints it."""
        return encode_key(self.raw)

    def public_key(self) -> PublicKey:
        """Return the matching public key (X25519 of the base point)."""
        return PublicKey(crypto_scalarmult_base(self.raw))

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the key and a newline to ``path``; the file is 0600 before the key is in it.

        Raises :class:`OSError` if the file cannot be written.
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (self.to_base64() + "\n").encode("ascii"))
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return "PrivateKey(<hidden>)"


@dataclass(frozen=True)
class PublicKey:
    """An X25519 public key, printed in base64 as ``wg pubkey`` does."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise InvalidKeyError(f"a public key is {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def from_base64(cls, text: str | bytes) -> PublicKey:
        """Parse a base64 public key. Raises :class:`InvalidKeyError`."""
        return cls(decode_key(text, what="public key"))

    def to_base64(self) -> str:
        """Return the key as base64 text."""
        return encode_key(self.raw)

    def __str__(self) -> str:
        return self.to_base64()
