"""mac1, mac2 and cookie replies: WireGuard's defence against handshake floods.

Every handshake message ends in ``mac1 = MAC(HASH(LABEL_MAC1 || receiver's public key), msg[:-32])``,
which anyone who knows the receiver's public key can compute, and ``mac2 = MAC(cookie, msg[:-16])``
(zero without a cookie). A responder under load only processes messages whose mac2 proves that the
sender received a cookie at its source address; otherwise it answers with a cookie reply: the cookie
``MAC(secret, source address)`` encrypted with XChaCha20-Poly1305 under
``HASH(LABEL_COOKIE || responder's public key)``, with the message's mac1 as associated data.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import struct
from collections.abc import Callable

from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
from nacl.exceptions import CryptoError

from ._aead import seal_cookie
from ._config import Address
from ._messages import MESSAGE_COOKIE_REPLY, CookieReply
from ._noise import LABEL_COOKIE, LABEL_MAC1, hash_, mac

MAC_SIZE = 16
"""Bytes in mac1, mac2 and a cookie."""
COOKIE_NONCE_SIZE = 24
"""Bytes in an XChaCha20-Poly1305 nonce."""
_NO_MAC = bytes(MAC_SIZE)
_REPLY_HEADER = struct.Struct("<II")


def address_bytes(addr: Address) -> bytes:
    """Return the bytes a cookie is bound to: the packed IP address then the port (big-endian)."""
    host, port = addr[0], addr[1]
    try:  # IPv4 without building an ipaddress object: under load this runs per message
        packed = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            packed = ipaddress.ip_address(host).packed
        except ValueError:
            packed = host.encode("utf-8", "replace")
    return packed + (port & 0xFFFF).to_bytes(2, "big")


class CookieChecker:
    """The receiving side: checks mac1/mac2 on our incoming handshake messages, makes cookie replies.

    ``local_public`` is this device's static public key; the cookie secret is drawn from ``random``
    and replaced every ``refresh_time`` seconds (120 by default).
    """

    def __init__(
        self, local_public: bytes, random: Callable[[int], bytes], refresh_time: float = 120.0
    ) -> None:
        self._mac1_key = hash_(LABEL_MAC1 + local_public)
        self._cookie_key = hash_(LABEL_COOKIE + local_public)
        self._random = random
        self._refresh_time = refresh_time
        self._secret = b""
        self._secret_born = float("-inf")

    def check_mac1(self, msg: bytes) -> bool:
        """Return whether ``msg`` (a whole handshake message) carries a valid mac1."""
        return hmac.compare_digest(mac(self._mac1_key, msg[:-32]), msg[-32:-16])

    def _cookie(self, addr: Address, now: float) -> bytes:
        if now - self._secret_born >= self._refresh_time:
            self._secret = self._random(32)
            self._secret_born = now
        return mac(self._secret, address_bytes(addr))

    def check_mac2(self, msg: bytes, addr: Address, now: float) -> bool:
        """Return whether ``msg`` carries a mac2 made with the current cookie for ``addr``."""
        if msg[-16:] == _NO_MAC:  # no cookie at all: a flood's usual message, no MAC needed
            return False
        return hmac.compare_digest(mac(self._cookie(addr, now), msg[:-16]), msg[-16:])

    def check_mac2_or_reply(
        self, msg: bytes, receiver: int, addr: Address, now: float
    ) -> bytes | None:
        """Return ``None`` if ``msg`` carries a valid mac2 for ``addr``, else the cookie reply.

        The same as :meth:`check_mac2` then :meth:`create_reply`, computing the cookie once.
        """
        mac2 = msg[-16:]
        cookie = self._cookie(addr, now)
        if mac2 != _NO_MAC and hmac.compare_digest(mac(cookie, msg[:-16]), mac2):
            return None
        return self._reply(cookie, msg, receiver)

    def create_reply(self, msg: bytes, receiver: int, addr: Address, now: float) -> bytes:
        """Return a 64-byte cookie reply to ``msg`` (sent from ``addr`` by sender index ``receiver``)."""
        return self._reply(self._cookie(addr, now), msg, receiver)

    def _reply(self, cookie: bytes, msg: bytes, receiver: int) -> bytes:
        nonce = self._random(COOKIE_NONCE_SIZE)
        sealed = seal_cookie(cookie, msg[-32:-16], nonce, self._cookie_key)
        return _REPLY_HEADER.pack(MESSAGE_COOKIE_REPLY, receiver) + nonce + sealed


class CookieGenerator:
    """The sending side, one per peer: adds mac1/mac2 to our handshake messages, stores cookies.

    A cookie is used for mac2 for ``refresh_time`` seconds after it arrived (120 by default).
    """

    def __init__(self, remote_public: bytes, refresh_time: float = 120.0) -> None:
        self._mac1_key = hash_(LABEL_MAC1 + remote_public)
        self._cookie_key = hash_(LABEL_COOKIE + remote_public)
        self._refresh_time = refresh_time
        self._cookie = b""
        self._cookie_born = float("-inf")
        self._last_mac1 = b""

    def add_macs(self, body: bytes, now: float) -> bytes:
        """Return ``body`` (a handshake message without its last 32 bytes) with mac1 and mac2."""
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if self._cookie and now - self._cookie_born < self._refresh_time:
            return body + mac1 + mac(self._cookie, body + mac1)
        return body + mac1 + _NO_MAC

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Decrypt and store the cookie from ``reply``; return ``False`` if it does not authenticate
        against the mac1 of the last message we sent."""
        if not self._last_mac1:
            return False
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                reply.encrypted_cookie, self._last_mac1, reply.nonce, self._cookie_key
            )
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_born = now
        self._last_mac1 = b""
        return True
