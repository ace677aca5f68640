"""TURN credentials and server URIs: static long-term credentials, coturn's REST scheme, RFC 7065.

- :class:`TurnCredentials` is a user name and password for RFC 8489 long-term credentials; its
  ``repr`` never shows the password.
- :func:`rest_credentials` mints the time-limited credentials of coturn's "TURN REST API" scheme
  (``turnserver --use-auth-secret --static-auth-secret S``): the user name is
  ``"<expiry unix time>:<name>"`` and the password ``base64(HMAC-SHA1(S, username))``, so a server
  that knows ``S`` checks them without any per-user state, and refuses them after the expiry.
- :class:`TurnServerURI` parses ``turn:`` / ``turns:`` URIs (RFC 7065).
- :class:`TurnServer` is one entry of the hub's ``GET /v1/peers/{name}/turn`` answer: a URI with
  the credentials minted for it and their lifetime.

This module imports nothing from the rest of punchtrio but its exception base, so the hub's wire
models can use it without pulling in the TURN client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from .._exceptions import PunchtrioError

__all__ = [
    "DEFAULT_TURNS_PORT",
    "DEFAULT_TURN_PORT",
    "TurnCredentials",
    "TurnCredentialsError",
    "TurnServer",
    "TurnServerURI",
    "TurnURIError",
    "rest_credentials",
]

DEFAULT_TURN_PORT = 3478
"""The port of ``turn:`` URIs without one (RFC 8656: TURN over UDP and TCP)."""

DEFAULT_TURNS_PORT = 5349
"""The port of ``turns:`` URIs without one (RFC 8656: TURN over TLS)."""

MAX_USERNAME_BYTES = 513
"""RFC 8489 section 14.3: a USERNAME is less than 513 bytes of UTF-8."""

MAX_URI_LENGTH = 300
"""Longest TURN URI text accepted, in characters."""

Transport = Literal["udp", "tcp", "tls"]


class TurnURIError(PunchtrioError, ValueError):
    """A text is not a TURN URI punchtrio can use; the message names the part that is wrong."""


class TurnCredentialsError(PunchtrioError, ValueError):
    """TURN credentials (or the hub's description of them) are malformed.

    The message never contains a password or a secret.
    """


def _check_text(value: object, what: str, *, limit: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TurnCredentialsError(f"{what} must be a string")
    if not value and not allow_empty:
        raise TurnCredentialsError(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise TurnCredentialsError(f"{what} must be valid Unicode text") from None
    if size > limit:
        raise TurnCredentialsError(f"{what} must be at most {limit} bytes of UTF-8")
    if any(not ch.isprintable() for ch in value):
        raise TurnCredentialsError(f"{what} must not contain control characters")
    return value


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    """A user name and password for TURN's long-term credential mechanism (RFC 8489 9.2).

    ``username``: 1 to 512 bytes of printable UTF-8. ``password``: printable UTF-8 (up to 1024
    bytes), used as it is (no SASLprep: coturn does not apply it either). The ``repr`` hides the
    password, so a credentials object can be logged. Raises :class:`TurnCredentialsError`.
    """

    username: str
    password: str

    def __post_init__(self) -> None:
        _check_text(self.username, "TURN username", limit=MAX_USERNAME_BYTES - 1)
        _check_text(self.password, "TURN password", limit=1024, allow_empty=True)

    def __repr__(self) -> str:
        return f"TurnCredentials(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__


def rest_credentials(secret: bytes, name: str, *, ttl: float, now: float) -> TurnCredentials:
    """Mint coturn "TURN REST API" credentials for ``name``, valid ``ttl`` seconds from ``now``.

    ``now`` is Unix time in seconds (the TURN server's clock must agree within the lifetime);
    the user name is ``f"{int(now + ttl)}:{name}"`` and the password the standard base64 of
    HMAC-SHA1 keyed by ``secret`` (the bytes of coturn's ``--static-auth-secret``) over the user
    name. ``name`` may be empty. Raises :class:`TurnCredentialsError` for an empty secret, a
    non-finite or non-positive ``ttl``, a negative ``now`` or a name that is not printable text.
    """
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise TurnCredentialsError("the TURN REST secret must be non-empty bytes")
    if not (math.isfinite(ttl) and ttl > 0):
        raise TurnCredentialsError("the TURN credential ttl must be a positive number of seconds")
    if not (math.isfinite(now) and now >= 0):
        raise TurnCredentialsError("now must be a non-negative Unix time")
    _check_text(name, "TURN credential name", limit=400, allow_empty=True)
    username = f"{int(now + ttl)}:{name}"
    digest = hmac.new(bytes(secret), username.encode("utf-8"), hashlib.sha1).digest()
    return TurnCredentials(username, base64.b64encode(digest).decode("ascii"))


# --- URIs ------------------------------------------------------------------------------------------

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_IPV4 = re.compile(
    r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"
)
_PORT = re.compile(r"[0-9]{1,5}")
_IPV6_CHARS = re.compile(r"[0-9a-f:.]{2,45}")


def _check_host(host: str) -> str:
    """Return ``host`` normalised (lowercase; IPv6 compressed), or raise :class:`TurnURIError`."""
    if not host:
        raise TurnURIError("a TURN URI needs a host")
    lowered = host.lower()
    if ":" in lowered:
        if not _IPV6_CHARS.fullmatch(lowered):
            raise TurnURIError(f"TURN URI host {host!r} is not an IPv6 address")
        try:
            return str(ipaddress.IPv6Address(lowered))
        except ValueError:
            raise TurnURIError(f"TURN URI host {host!r} is not an IPv6 address") from None
    if _IPV4.fullmatch(lowered):
        return str(ipaddress.IPv4Address(lowered))
    if len(lowered) > 253:
        raise TurnURIError("TURN URI host name is longer than 253 characters")
    labels = lowered[:-1].split(".") if lowered.endswith(".") else lowered.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise TurnURIError(f"TURN URI host {host!r} is neither an IP address nor a host name")
    if labels[-1].isdigit():
        raise TurnURIError(f"TURN URI host {host!r} is not a valid IPv4 address")
    return ".".join(labels)


@dataclass(frozen=True, slots=True)
class TurnServerURI:
    """A TURN server's address as an RFC 7065 URI: scheme, host, port and transport.

    ``scheme`` is ``"turn"`` (``transport`` ``"udp"`` or ``"tcp"``) or ``"turns"`` (``transport``
    ``"tls"``: TLS over TCP; DTLS is not supported). ``host`` is a literal IPv4 or IPv6 address or a
    DNS host name, lowercase (resolving names is the caller's job: see :attr:`address`). Build one
    with :meth:`parse`; ``str()`` gives the canonical text, with port and transport explicit.
    Construction checks every field and raises :class:`TurnURIError`.
    """

    scheme: Literal["turn", "turns"]
    host: str
    port: int
    transport: Transport

    def __post_init__(self) -> None:
        if self.scheme not in ("turn", "turns"):
            raise TurnURIError("a TURN URI starts with turn: or turns:")
        if not isinstance(self.host, str) or _check_host(self.host) != self.host:
            raise TurnURIError(f"TURN URI host {self.host!r} is not in normal form")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TurnURIError("TURN URI port must be an integer")
        if not 0 < self.port < 65536:
            raise TurnURIError("TURN URI port must be from 1 to 65535")
        allowed = ("udp", "tcp") if self.scheme == "turn" else ("tls",)
        if self.transport not in allowed:
            raise TurnURIError(f"{self.scheme}: URIs use transport {' or '.join(allowed)}")

    @classmethod
    def parse(cls, text: str) -> TurnServerURI:
        """Parse ``turn:HOST[:PORT][?transport=udp|tcp]`` or ``turns:HOST[:PORT][?transport=tcp]``.

        The scheme and the ``transport`` value are case-insensitive; IPv6 hosts are bracketed
        (``turn:[2001:db8::1]:3478``). Defaults: port 3478 (``turn:``) or 5349 (``turns:``),
        transport UDP (``turn:``) or TLS over TCP (``turns:``). Refused with
        :class:`TurnURIError`: other schemes, user information, paths, fragments, other query
        parameters, ``turns:`` over UDP (DTLS), malformed hosts and ports.
        """
        if not isinstance(text, str):
            raise TurnURIError("a TURN URI must be a string")
        if len(text) > MAX_URI_LENGTH:
            raise TurnURIError(f"a TURN URI is at most {MAX_URI_LENGTH} characters")
        if any(not ch.isprintable() or ch.isspace() for ch in text):
            raise TurnURIError("a TURN URI must not contain spaces or control characters")
        scheme_text, colon, rest = text.partition(":")
        scheme = scheme_text.lower()
        if not colon or scheme not in ("turn", "turns"):
            raise TurnURIError(f"{text!r} is not a TURN URI (expected turn: or turns:)")
        if rest.startswith("//"):
            raise TurnURIError("a TURN URI has no '//' (write turn:HOST:PORT)")
        for bad, what in (("@", "user information"), ("/", "a path"), ("#", "a fragment")):
            if bad in rest:
                raise TurnURIError(f"a TURN URI must not contain {what}")
        authority, question, query = rest.partition("?")
        transport: Transport = "udp" if scheme == "turn" else "tls"
        if question:
            key, equals, value = query.partition("=")
            if key.lower() != "transport" or not equals or "&" in value or "?" in value:
                raise TurnURIError("the only query a TURN URI takes is ?transport=udp or tcp")
            value = value.lower()
            if value not in ("udp", "tcp"):
                raise TurnURIError(f"TURN transport must be udp or tcp, not {value!r}")
            if scheme == "turns" and value == "udp":
                raise TurnURIError("turns: over UDP (DTLS) is not supported")
            if scheme == "turn":
                transport = "udp" if value == "udp" else "tcp"
        if authority.startswith("["):
            host, bracket, after = authority[1:].partition("]")
            if not bracket or ":" not in host:
                raise TurnURIError("a bracketed TURN URI host must be an IPv6 address")
            if after and not after.startswith(":"):
                raise TurnURIError("unexpected text after the IPv6 address in a TURN URI")
            port_text = after[1:] if after else None
        else:
            host, sep, port_text_raw = authority.partition(":")
            if ":" in port_text_raw:
                raise TurnURIError("an IPv6 host in a TURN URI must be in brackets")
            port_text = port_text_raw if sep else None
        if port_text is None:
            port = DEFAULT_TURN_PORT if scheme == "turn" else DEFAULT_TURNS_PORT
        else:
            if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
                raise TurnURIError("TURN URI port must be from 1 to 65535")
            port = int(port_text)
        return cls(scheme, _check_host(host), port, transport)  # type: ignore[arg-type]

    @property
    def secure(self) -> bool:
        """Whether the server is reached over TLS (a ``turns:`` URI)."""
        return self.scheme == "turns"

    @property
    def address(self) -> tuple[str, int] | None:
        """``(ip, port)`` when the host is a literal IP address, else ``None`` (a name to resolve)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return None
        return self.host, self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "tcp" if self.transport == "tls" else self.transport
        return f"{self.scheme}:{host}:{self.port}?transport={query}"


# --- what the hub hands out --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnServer:
    """One TURN server the hub grants a peer: its URI, credentials minted for it, their lifetime.

    ``ttl`` is the number of seconds (from the hub's answer) the credentials stay valid; fetch new
    ones before then. JSON (``GET /v1/peers/{name}/turn``): ``{"uri": "turn:203.0.113.1:3478?
    transport=udp", "username": "1764003600:alice", "password": "<base64>", "ttl": 3600}``.
    The ``repr`` hides the password. Raises :class:`TurnCredentialsError`.
    """

    uri: TurnServerURI
    credentials: TurnCredentials
    ttl: float

    def __post_init__(self) -> None:
        if not isinstance(self.uri, TurnServerURI):
            raise TurnCredentialsError("uri must be a TurnServerURI")
        if not isinstance(self.credentials, TurnCredentials):
            raise TurnCredentialsError("credentials must be TurnCredentials")
        ttl = self.ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < 1e9:
            raise TurnCredentialsError("ttl must be a positive number of seconds")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this grant (it contains the password: never log it)."""
        return {
            "uri": str(self.uri),
            "username": self.credentials.username,
            "password": self.credentials.password,
            "ttl": self.ttl,
        }

    @classmethod
    def from_json(cls, obj: object) -> TurnServer:
        """Parse one JSON grant. Raises :class:`TurnCredentialsError` (also for a bad URI)."""
        keys = {"uri", "username", "password", "ttl"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise TurnCredentialsError(f"a TURN server entry is an object with keys {sorted(keys)}")
        uri = obj["uri"]
        if not isinstance(uri, str):
            raise TurnCredentialsError("uri must be a string")
        try:
            parsed = TurnServerURI.parse(uri)
        except TurnURIError as exc:
            raise TurnCredentialsError(str(exc)) from None
        credentials = TurnCredentials(obj["username"], obj["password"])
        return cls(parsed, credentials, obj["ttl"])

    def __repr__(self) -> str:
        return (
            f"TurnServer(uri={str(self.uri)!r}, credentials={self.credentials!r}, ttl={self.ttl!r})"
        )
