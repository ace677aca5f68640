"""Wire models of the rendezvous hub's HTTP API, shared by the hub and its clients.

Every model is a frozen dataclass with ``from_json`` (strict: exact keys, exact JSON types, every rule
checked, :class:`ValidationError` on the first problem) and ``to_json`` (the canonical JSON object).
Nothing here resolves names: endpoints and STUN servers are literal IP addresses.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .._endpoint import EndpointError, check_endpoint_address, format_endpoint, parse_endpoint
from .._exceptions import PunchtrioError
from ..keys import InvalidKeyError, PublicKey

if TYPE_CHECKING:
    from ..relay import TurnServerURI

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

API_VERSION = 1
"""The version in the API's paths (``/v1/...``)."""

MAX_BODY_BYTES = 64 * 1024
"""Largest request body the hub reads, in bytes; a larger one gets 413."""

MAX_ENDPOINTS = 16
"""Most candidate endpoints in one record."""

MAX_ALLOWED_IPS = 64
"""Most allowed-IP prefixes in one record."""

MAX_SIGNAL_BYTES = 2048
"""Largest ``data`` of one signalling message, in UTF-8 bytes."""

MAX_HEADER_BYTES = 8 * 1024
"""Largest request head the hub accepts, in bytes: the request line and every header line, counted
as HTTP/1.1 sends them (``Name: value`` plus CRLF); a larger one gets 431."""

MAX_HEADERS = 100
"""Most header fields in one request; more get 431."""

MAX_NETWORK_PREFIXES = 2
"""Most network prefixes of one hub (``GET /v1/hub``): one IPv4 and one IPv6."""

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
"""Peer names: 1-63 characters of lowercase ASCII letters, digits, ``.``, ``_`` and ``-``, starting
with a letter or a digit (matched with ``fullmatch``)."""

_IPV4_TEXT = re.compile(r"[0-9.]{7,15}")
_IPV6_TEXT = re.compile(r"[0-9a-fA-F:.]{2,45}")

# Prefixes no peer may claim as allowed IPs: routing them into a tunnel hijacks local or
# special-purpose traffic. Any prefix that overlaps one of these is refused, which also refuses
# default routes split in halves (0.0.0.0/1 overlaps 0.0.0.0/8, 128.0.0.0/1 overlaps 224.0.0.0/4).
_FORBIDDEN_ALLOWED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("224.0.0.0/4"),
    ipaddress.ip_network("255.255.255.255/32"),
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("::ffff:0:0/96"),
    ipaddress.ip_network("ff00::/8"),
)


class ValidationError(PunchtrioError):
    """A request or response body, or one of its fields, breaks the API's rules.

    The message is one line naming the field, suitable for the hub's ``{"error": ...}`` body.
    """


class EndpointType(str, enum.Enum):
    """Kind of a candidate endpoint, as in ICE: where the address was learnt."""

    HOST = "host"
    """An address of one of the peer's own interfaces (private addresses are fine)."""
    SRFLX = "srflx"
    """Server-reflexive: the peer's public mapping as a STUN server saw it."""
    RELAY = "relay"
    """An address allocated on a TURN relay."""


def validate_name(name: object, *, what: str = "name") -> str:
    """Return ``name`` if it is a valid peer name (see :data:`NAME_PATTERN`).

    Raises :class:`ValidationError` otherwise.
    """
    if not isinstance(name, str):
        raise ValidationError(f"{what} must be a string")
    if not NAME_PATTERN.fullmatch(name):
        raise ValidationError(f"{what} must match [a-z0-9][a-z0-9._-]{{0,62}}")
    return name


def parse_public_key(text: object, *, what: str = "public_key") -> PublicKey:
    """Parse a base64 WireGuard public key (32 bytes, not all zero).

    Raises :class:`ValidationError`.
    """
    if not isinstance(text, str) or len(text) != 44:
        raise ValidationError(f"{what} must be 32 bytes of base64 (44 characters)")
    try:
        return PublicKey.from_base64(text)
    except InvalidKeyError as exc:
        raise ValidationError(f"{what}: {exc}") from None


def parse_ip(text: str, *, what: str = "address") -> IPAddress:
    """Parse a literal IPv4 or IPv6 address (no names, no zone index, no surrounding spaces).

    Raises :class:`ValidationError`.
    """
    pattern = _IPV6_TEXT if ":" in text else _IPV4_TEXT
    if not pattern.fullmatch(text):
        raise ValidationError(f"{what} must be a literal IP address")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValidationError(f"{what} must be a literal IP address") from None


def check_unicast(ip: IPAddress, *, what: str = "address") -> IPAddress:
    """Return ``ip`` if a peer can be reached at it.

    The rule is :func:`punchtrio.check_endpoint_address`, shared with the connector's candidates
    (unspecified, loopback, multicast, link-local, broadcast and reserved IPv4, IPv4-mapped and
    IPv4-compatible IPv6, local-use NAT64, discard-only ``100::/64``, and any IPv6 address that
    embeds a refused IPv4 address are refused). Raises :class:`ValidationError` naming ``what`` and
    the reason (``endpoint: fe80::1 is link-local without a scope id``).
    """
    try:
        return check_endpoint_address(ip)
    except EndpointError as exc:
        raise ValidationError(f"{what}: {exc}") from None


def parse_address(text: object, *, what: str = "address") -> tuple[IPAddress, int]:
    """Parse ``IPv4:port`` or ``[IPv6]:port`` into ``(ip, port)``; the port is 1-65535.

    The syntax of :func:`punchtrio.parse_endpoint`; see :func:`check_unicast` for which addresses
    a peer may use. Raises :class:`ValidationError`.
    """
    try:
        return parse_endpoint(text, what=what)
    except EndpointError as exc:
        raise ValidationError(str(exc)) from None


def format_address(ip: IPAddress, port: int) -> str:
    """Format ``(ip, port)`` as ``IPv4:port`` or ``[IPv6]:port`` (:func:`punchtrio.format_endpoint`)."""
    return format_endpoint((ip, port))


def parse_allowed_ip(text: object, *, what: str = "allowed_ips") -> IPNetwork:
    """Parse one allowed-IP prefix in canonical CIDR form (``10.1.2.0/24``, ``fd00::1/128``).

    The text must equal Python's canonical form of the network (explicit prefix length, no host bits
    set, compressed lowercase IPv6). Refused: prefix length 0 (a default route) and any prefix that
    overlaps 0.0.0.0/8, 127.0.0.0/8, 224.0.0.0/4, 255.255.255.255, ::, ::1, ::ffff:0:0/96 or ff00::/8.
    Raises :class:`ValidationError`.
    """
    if not isinstance(text, str) or len(text) > 64 or "/" not in text:
        raise ValidationError(f"{what} entries must be CIDR strings like 10.0.0.1/32")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValidationError(f"{what}: {text!r} is not a canonical CIDR") from None
    if str(network) != text:
        raise ValidationError(f"{what}: {text!r} is not a canonical CIDR (expected {network})")
    if network.prefixlen == 0:
        raise ValidationError(f"{what} must not include a default route")
    first, last = address_span(network)
    for version, low, high, forbidden in _FORBIDDEN_SPANS:
        if network.version == version and first <= high and low <= last:
            raise ValidationError(f"{what}: {text} overlaps reserved range {forbidden}")
    return network


def address_span(network: IPNetwork) -> tuple[int, int]:
    """Return the first and last address of ``network`` as integers.

    Computed arithmetically: ``network.broadcast_address`` would cache a property on every stored
    network, which costs a few hundred bytes each.
    """
    first = int(network.network_address)
    return first, first + (1 << (network.max_prefixlen - network.prefixlen)) - 1


_FORBIDDEN_SPANS = tuple((n.version, *address_span(n), n) for n in _FORBIDDEN_ALLOWED)


def check_disjoint(networks: Iterable[IPNetwork], *, what: str = "allowed_ips") -> None:
    """Raise :class:`ValidationError` if two of ``networks`` are equal or overlap."""
    ordered = sorted(networks, key=lambda n: (n.version, int(n.network_address)))
    for before, after in itertools.pairwise(ordered):
        if before.version == after.version and address_span(before)[1] >= address_span(after)[0]:
            raise ValidationError(f"{what}: {before} and {after} overlap")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One candidate endpoint of a peer: a literal unicast IP address, a UDP port and its kind.

    JSON: ``{"type": "srflx", "address": "203.0.113.7:51820"}`` (IPv6 as ``[2001:db8::7]:51820``).
    Construction checks the address like :func:`check_unicast` and the port (1-65535) and raises
    :class:`ValidationError`.
    """

    type: EndpointType
    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.type, EndpointType):
            raise ValidationError("endpoint type must be host, srflx or relay")
        check_unicast(self.ip, what="endpoint address")
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 < self.port < 65536
        ):
            raise ValidationError("endpoint port must be from 1 to 65535")

    @classmethod
    def parse(cls, text: str, type: EndpointType = EndpointType.HOST) -> Endpoint:
        """Parse ``IP:port`` / ``[IPv6]:port`` text into an endpoint of kind ``type``.

        Raises :class:`ValidationError`.
        """
        ip, port = parse_address(text, what="endpoint address")
        return cls(type, ip, port)

    @property
    def address(self) -> str:
        """The endpoint as ``IP:port`` text."""
        return format_address(self.ip, self.port)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this endpoint."""
        return {"type": self.type.value, "address": self.address}

    @classmethod
    def from_json(cls, obj: object) -> Endpoint:
        """Parse a JSON endpoint object. Raises :class:`ValidationError`."""
        fields = _exact_keys(obj, "endpoint", required=("type", "address"))
        kind = _ENDPOINT_TYPES.get(fields["type"]) if isinstance(fields["type"], str) else None
        if kind is None:
            raise ValidationError("endpoint type must be host, srflx or relay")
        return cls.parse(fields["address"], kind)  # type: ignore[arg-type]


_ENDPOINT_TYPES = {kind.value: kind for kind in EndpointType}


def _endpoints_from_json(value: object) -> tuple[Endpoint, ...]:
    if not isinstance(value, list):
        raise ValidationError("endpoints must be a list")
    if len(value) > MAX_ENDPOINTS:
        raise ValidationError(f"endpoints: at most {MAX_ENDPOINTS} entries")
    endpoints = tuple(Endpoint.from_json(item) for item in value)
    if len(set(endpoints)) != len(endpoints):
        raise ValidationError("endpoints must not repeat")
    return endpoints


def _allowed_ips_from_json(value: object) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValidationError("allowed_ips must be a list")
    if len(value) > MAX_ALLOWED_IPS:
        raise ValidationError(f"allowed_ips: at most {MAX_ALLOWED_IPS} entries")
    networks = tuple(parse_allowed_ip(item) for item in value)
    check_disjoint(networks)
    return networks


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """Body of ``PUT /v1/peers/{name}``: what a peer registers (or refreshes) under its name.

    JSON: ``{"public_key": "<base64>", "endpoints": [Endpoint...], "allowed_ips": ["10.0.0.1/32"]}``
    and optionally ``"assign": true``. ``public_key`` must be the key that signs the request. At
    most :data:`MAX_ENDPOINTS` distinct endpoints and :data:`MAX_ALLOWED_IPS` disjoint canonical
    prefixes (see :func:`parse_allowed_ip`). ``assign`` (default ``False``, then left out of the
    JSON) asks a hub with network prefixes to add this peer's overlay address from each prefix
    whose IP version ``allowed_ips`` has no single address of. Construction validates everything
    and raises :class:`ValidationError`.
    """

    public_key: PublicKey
    endpoints: tuple[Endpoint, ...] = ()
    allowed_ips: tuple[IPNetwork, ...] = ()
    assign: bool = False

    def __post_init__(self) -> None:
        _check_record_fields(self.public_key, self.endpoints, self.allowed_ips)
        if not isinstance(self.assign, bool):
            raise ValidationError("assign must be a boolean")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this request."""
        return {
            "public_key": self.public_key.to_base64(),
            "endpoints": [e.to_json() for e in self.endpoints],
            "allowed_ips": [str(n) for n in self.allowed_ips],
            **({"assign": True} if self.assign else {}),
        }

    @classmethod
    def from_json(cls, obj: object) -> RegisterRequest:
        """Parse the JSON object of a registration. Raises :class:`ValidationError`."""
        items = _exact_keys(
            obj, "body", required=("public_key", "endpoints", "allowed_ips"), optional=("assign",)
        )
        assign = items.get("assign", False)
        if not isinstance(assign, bool):
            raise ValidationError("assign must be a boolean")
        # Parsing checks everything __post_init__ would check again.
        return trusted(
            cls,
            parse_public_key(items["public_key"]),
            _endpoints_from_json(items["endpoints"]),
            _allowed_ips_from_json(items["allowed_ips"]),
            assign,
        )


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A peer as the hub stores and returns it (responses of register and lookup).

    JSON: ``{"name", "public_key", "endpoints", "allowed_ips", "revision", "expires_in"}``.
    ``revision`` (an int >= 1) grows every time the record's content changes, also across hub
    restarts; ``expires_in`` is the number of seconds (float) the record lives from the moment the
    response was sent unless refreshed. Construction validates and raises :class:`ValidationError`.
    """

    name: str
    public_key: PublicKey
    endpoints: tuple[Endpoint, ...]
    allowed_ips: tuple[IPNetwork, ...]
    revision: int
    expires_in: float

    def __post_init__(self) -> None:
        validate_name(self.name)
        _check_record_fields(self.public_key, self.endpoints, self.allowed_ips)
        if (
            isinstance(self.revision, bool)
            or not isinstance(self.revision, int)
            or self.revision < 1
        ):
            raise ValidationError("revision must be a positive integer")
        _check_seconds(self.expires_in, "expires_in")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this record (``expires_in`` rounded to milliseconds)."""
        return {
            "name": self.name,
            "public_key": self.public_key.to_base64(),
            "endpoints": [e.to_json() for e in self.endpoints],
            "allowed_ips": [str(n) for n in self.allowed_ips],
            "revision": self.revision,
            "expires_in": round(self.expires_in, 3),
        }

    @classmethod
    def from_json(cls, obj: object) -> PeerRecord:
        """Parse a record as the hub returns it. Raises :class:`ValidationError`."""
        fields = _exact_keys(
            obj,
            "record",
            required=("name", "public_key", "endpoints", "allowed_ips", "revision", "expires_in"),
        )
        return cls(
            validate_name(fields["name"]),
            parse_public_key(fields["public_key"]),
            _endpoints_from_json(fields["endpoints"]),
            _allowed_ips_from_json(fields["allowed_ips"]),
            fields["revision"],  # type: ignore[arg-type]
            fields["expires_in"],  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """A short signalling message between two peers of the same network.

    Sent as the body of ``POST /v1/peers/{recipient}/messages`` and received in
    ``GET /v1/peers/{name}/messages``. JSON: ``{"from": "<sender name>", "data": "<text>"}``; the
    sender name must be registered to the key that signs the POST. ``data`` is opaque text of at most
    :data:`MAX_SIGNAL_BYTES` UTF-8 bytes. Raises :class:`ValidationError`.
    """

    sender: str
    data: str

    def __post_init__(self) -> None:
        validate_name(self.sender, what="from")
        if not isinstance(self.data, str):
            raise ValidationError("data must be a string")
        if len(self.data.encode("utf-8", "surrogatepass")) > MAX_SIGNAL_BYTES:
            raise ValidationError(f"data must be at most {MAX_SIGNAL_BYTES} bytes")
        try:
            self.data.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("data must be valid Unicode text") from None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this message."""
        return {"from": self.sender, "data": self.data}

    @classmethod
    def from_json(cls, obj: object) -> SignalMessage:
        """Parse a JSON message. Raises :class:`ValidationError`."""
        fields = _exact_keys(obj, "message", required=("from", "data"))
        return cls(fields["from"], fields["data"])  # type: ignore[arg-type]


def messages_to_json(messages: Iterable[SignalMessage]) -> dict[str, Any]:
    """Return the body of ``GET /v1/peers/{name}/messages``: ``{"messages": [...]}``."""
    return {"messages": [m.to_json() for m in messages]}


def messages_from_json(obj: object) -> tuple[SignalMessage, ...]:
    """Parse the body of ``GET /v1/peers/{name}/messages``. Raises :class:`ValidationError`."""
    fields = _exact_keys(obj, "body", required=("messages",))
    items = fields["messages"]
    if not isinstance(items, list):
        raise ValidationError("messages must be a list")
    return tuple(SignalMessage.from_json(item) for item in items)


@dataclass(frozen=True, slots=True)
class StunAddress:
    """A STUN server the hub runs, as published in ``GET /v1/hub``.

    JSON: ``{"ip": "203.0.113.1", "port": 3478}``; ``ip`` is ``null`` when the STUN server listens on
    every address of the hub: then use the hub's own host. ``family`` (4 or 6; optional, only with
    a ``null`` ip, omitted when ``None``) says which of the hub host's addresses: a hub serving STUN
    on both families publishes ``{"ip": null, "port": 3478, "family": 4}`` and one with
    ``"family": 6``. Raises :class:`ValidationError`.
    """

    ip: IPAddress | None
    port: int
    family: int | None = None

    def __post_init__(self) -> None:
        if self.ip is not None:
            check_unicast(self.ip, what="stun ip")
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 < self.port < 65536
        ):
            raise ValidationError("stun port must be from 1 to 65535")
        _check_family(self.family, self.ip, "stun")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this server."""
        family = {} if self.family is None else {"family": self.family}
        return {"ip": None if self.ip is None else str(self.ip), "port": self.port, **family}

    @classmethod
    def from_json(cls, obj: object) -> StunAddress:
        """Parse a JSON STUN server. Raises :class:`ValidationError`."""
        fields = _exact_keys(obj, "stun", required=("ip", "port"), optional=("family",))
        ip = fields["ip"]
        if ip is not None and not isinstance(ip, str):
            raise ValidationError("stun ip must be a string or null")
        parsed = None if ip is None else parse_ip(ip, what="stun ip")
        return cls(parsed, fields["port"], fields.get("family"))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class HubRelayAddress:
    """The hub's own relay, as published in ``GET /v1/hub`` (see ``docs/relay.md``).

    JSON: ``{"ip": "203.0.113.1", "port": 7778, "tls": false}``: the relay listens on UDP and on
    TCP at the same ``ip`` and ``port``; ``tls`` says whether its TCP side speaks TLS. ``ip`` is
    ``null`` when the relay listens on every address of the hub (or on loopback): then use the
    hub's own host. ``family`` (4 or 6; optional, only with a ``null`` ip, omitted when ``None``)
    says which of the hub host's addresses, as for :class:`StunAddress`: a relay on both
    families publishes one entry per family. Raises :class:`ValidationError`.
    """

    ip: IPAddress | None
    port: int
    tls: bool = False
    family: int | None = None

    def __post_init__(self) -> None:
        if self.ip is not None:
            check_unicast(self.ip, what="relay ip")
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 < self.port < 65536
        ):
            raise ValidationError("relay port must be from 1 to 65535")
        if not isinstance(self.tls, bool):
            raise ValidationError("relay tls must be a boolean")
        _check_family(self.family, self.ip, "relay")

    @property
    def version(self) -> int | None:
        """The IP version this address is reached over: its ``ip``'s, else its ``family``
        (``None``: the hub host's, whichever the client reaches it over)."""
        return self.ip.version if self.ip is not None else self.family

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this relay."""
        ip = None if self.ip is None else str(self.ip)
        family = {} if self.family is None else {"family": self.family}
        return {"ip": ip, "port": self.port, "tls": self.tls, **family}

    @classmethod
    def from_json(cls, obj: object) -> HubRelayAddress:
        """Parse a JSON relay address. Raises :class:`ValidationError`."""
        fields = _exact_keys(obj, "relay", required=("ip", "port", "tls"), optional=("family",))
        ip = fields["ip"]
        if ip is not None and not isinstance(ip, str):
            raise ValidationError("relay ip must be a string or null")
        parsed = None if ip is None else parse_ip(ip, what="relay ip")
        return cls(parsed, fields["port"], fields["tls"], fields.get("family"))  # type: ignore[arg-type]


def _check_family(family: object, ip: IPAddress | None, what: str) -> None:
    """Refuse a ``family`` tag other than 4 or 6, or one beside an ``ip`` (which has its own)."""
    if family is not None and (isinstance(family, bool) or family not in (4, 6)):
        raise ValidationError(f"{what} family must be 4 or 6")
    if family is not None and ip is not None:
        raise ValidationError(f"{what} family is only given with a null ip")


@dataclass(frozen=True, slots=True)
class HubInfo:
    """Body of ``GET /v1/hub``: what a client needs before its first signed request.

    JSON: ``{"api": 1, "public_key": "<hub X25519 key>", "stun": [StunAddress...], "ttl": 300,
    "max_wait": 60, "auth_window": 60, "time": 1764000000.0, "network_required": false}``.
    ``ttl``, ``max_wait`` and ``auth_window`` are seconds; ``time`` is the hub's clock (Unix
    seconds) so clients can sign with a corrected timestamp. ``turn`` (optional, omitted when
    empty; at most :data:`MAX_TURN_SERVERS`) lists the TURN servers whose credentials the hub
    mints, as ``turn:``/``turns:`` URI texts. ``relays`` are the hub's own relay's addresses
    (:class:`HubRelayAddress`; none: the hub runs no relay of its own; at most one per IP version):
    one is published as ``"relay": {...}``, two as ``"relays": [{...}, {...}]``, so a hub with one
    relay address answers as before. ``network_prefixes`` (optional,
    omitted when empty; at most one IPv4 and one IPv6 prefix) are the overlay prefixes the hub
    assigns addresses from and confines address claims to (``punchtrio hub --network-prefix``).
    Raises :class:`ValidationError`.
    """

    public_key: PublicKey
    stun: tuple[StunAddress, ...]
    ttl: float
    max_wait: float
    auth_window: float
    time: float
    network_required: bool
    api: int = API_VERSION
    turn: tuple[TurnServerURI, ...] = ()
    relays: tuple[HubRelayAddress, ...] = ()
    network_prefixes: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        check_network_prefixes(self.network_prefixes)
        for name in ("ttl", "max_wait", "auth_window", "time"):
            _check_seconds(getattr(self, name), name)
        if not isinstance(self.network_required, bool):
            raise ValidationError("network_required must be a boolean")
        _check_turn_uris(self.turn)
        check_relay_addresses(self.relays)

    @property
    def relay(self) -> HubRelayAddress | None:
        """The first of :attr:`relays`, or ``None`` when the hub runs no relay."""
        return self.relays[0] if self.relays else None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this hub description."""
        return {
            "api": self.api,
            "public_key": self.public_key.to_base64(),
            "stun": [s.to_json() for s in self.stun],
            "ttl": self.ttl,
            "max_wait": self.max_wait,
            "auth_window": self.auth_window,
            "time": self.time,
            "network_required": self.network_required,
            **({"turn": [str(uri) for uri in self.turn]} if self.turn else {}),
            **({"relay": self.relays[0].to_json()} if len(self.relays) == 1 else {}),
            **({"relays": [r.to_json() for r in self.relays]} if len(self.relays) > 1 else {}),
            **(
                {"network_prefixes": [str(n) for n in self.network_prefixes]}
                if self.network_prefixes
                else {}
            ),
        }

    @classmethod
    def from_json(cls, obj: object) -> HubInfo:
        """Parse a hub description. Raises :class:`ValidationError` (also for another API version)."""
        keys = ("api", "public_key", "stun", "ttl", "max_wait", "auth_window", "time")
        fields = _exact_keys(
            obj,
            "hub",
            required=(*keys, "network_required"),
            optional=("turn", "relay", "relays", "network_prefixes"),
        )
        if fields["api"] != API_VERSION or isinstance(fields["api"], bool):
            raise ValidationError(f"hub speaks API {fields['api']!r}, expected {API_VERSION}")
        stun = fields["stun"]
        if not isinstance(stun, list) or len(stun) > 8:
            raise ValidationError("stun must be a list of at most 8 servers")
        if "relay" in fields and "relays" in fields:
            raise ValidationError("hub: give relay or relays, not both")
        relays = (
            fields["relays"]
            if "relays" in fields
            else [fields["relay"]]
            if "relay" in fields
            else []
        )
        if not isinstance(relays, list) or ("relays" in fields and not 0 < len(relays) <= 2):
            raise ValidationError("relays must be a list of one or two relay addresses")
        return cls(
            parse_public_key(fields["public_key"]),
            tuple(StunAddress.from_json(s) for s in stun),
            fields["ttl"],  # type: ignore[arg-type]
            fields["max_wait"],  # type: ignore[arg-type]
            fields["auth_window"],  # type: ignore[arg-type]
            fields["time"],  # type: ignore[arg-type]
            fields["network_required"],  # type: ignore[arg-type]
            turn=_turn_uris_from_json(fields.get("turn", [])),
            relays=tuple(HubRelayAddress.from_json(r) for r in relays),
            network_prefixes=_network_prefixes_from_json(fields.get("network_prefixes", [])),
        )


def check_relay_addresses(relays: object) -> tuple[HubRelayAddress, ...]:
    """Return ``relays`` if they are a hub relay's addresses: a tuple of at most two
    :class:`HubRelayAddress`, one per IP version (an address with neither an ``ip`` nor a
    ``family`` counts as either, so it stands alone). Raises :class:`ValidationError`."""
    if not isinstance(relays, tuple) or not all(isinstance(r, HubRelayAddress) for r in relays):
        raise ValidationError("relays must be a tuple of HubRelayAddress")
    versions = [r.version for r in relays]
    if (
        len(relays) > 2
        or len(set(versions)) != len(versions)
        or (len(relays) > 1 and None in versions)
    ):
        raise ValidationError("relays: at most one address per IP version")
    return relays


def check_network_prefixes(prefixes: object) -> tuple[IPNetwork, ...]:
    """Return ``prefixes`` if they are valid network prefixes of a hub.

    A tuple of at most one IPv4 and one IPv6 network, each a valid allowed-IP prefix (see
    :func:`parse_allowed_ip`) with room for addresses: IPv4 /30 or shorter, IPv6 /126 or shorter.
    Raises :class:`ValidationError`.
    """
    if not isinstance(prefixes, tuple) or len(prefixes) > MAX_NETWORK_PREFIXES:
        raise ValidationError("network_prefixes: at most one IPv4 and one IPv6 prefix")
    for prefix in prefixes:
        if not isinstance(prefix, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise ValidationError("network_prefixes must hold IP networks")
        parse_allowed_ip(str(prefix), what="network prefix")
        if prefix.prefixlen > prefix.max_prefixlen - 2:
            longest = prefix.max_prefixlen - 2
            raise ValidationError(f"network prefix {prefix} is too small (at most /{longest})")
    if len({prefix.version for prefix in prefixes}) != len(prefixes):
        raise ValidationError("network_prefixes: at most one IPv4 and one IPv6 prefix")
    return prefixes


def _network_prefixes_from_json(value: object) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValidationError("network_prefixes must be a list")
    if len(value) > MAX_NETWORK_PREFIXES:
        raise ValidationError("network_prefixes: at most one IPv4 and one IPv6 prefix")
    return check_network_prefixes(
        tuple(parse_allowed_ip(item, what="network prefix") for item in value)
    )


MAX_TURN_SERVERS = 8
"""Most TURN server URIs a hub advertises in ``GET /v1/hub``."""


def _turn_uris_from_json(value: object) -> tuple[TurnServerURI, ...]:
    # Imported here: punchtrio.relay's package imports the TURN client, which these models do not
    # need, and importing it at module level could make an import cycle with the hub relay.
    from ..relay import TurnServerURI, TurnURIError

    if not isinstance(value, list) or len(value) > MAX_TURN_SERVERS:
        raise ValidationError(f"turn must be a list of at most {MAX_TURN_SERVERS} URIs")
    try:
        return tuple(TurnServerURI.parse(item) for item in value)
    except TurnURIError as exc:
        raise ValidationError(f"turn: {exc}") from None


def _check_turn_uris(value: object) -> None:
    from ..relay import TurnServerURI

    if not isinstance(value, tuple) or len(value) > MAX_TURN_SERVERS:
        raise ValidationError(f"turn must be a tuple of at most {MAX_TURN_SERVERS} URIs")
    if not all(isinstance(uri, TurnServerURI) for uri in value):
        raise ValidationError("turn must hold TurnServerURI values")


_M = TypeVar("_M")


def trusted(cls: type[_M], *values: object) -> _M:
    """Build the frozen model ``cls`` from field values that are already checked.

    Skips ``__post_init__``: the hub uses it where a model's rules were enforced on the way in
    (parsing, or a record its store holds). Never use it on untrusted values.
    """
    model = object.__new__(cls)
    for name, value in zip(_field_names(cls), values, strict=True):
        object.__setattr__(model, name, value)
    return model


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(item.name for item in dataclasses.fields(cls))
    return names


def error_reason(body: bytes, status: int) -> str:
    """Return the one-line reason of a hub error response, or a generic one naming ``status``.

    Never raises: a body that is not ``{"error": "<text>"}`` gives ``"HTTP <status>"``. The reason
    is cut to 200 characters and stripped of control characters.
    """
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return f"HTTP {status}"
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), str):
        return f"HTTP {status}"
    text = "".join(ch for ch in obj["error"] if ch.isprintable())[:200]
    return text or f"HTTP {status}"


def error_body(reason: str) -> bytes:
    """Return the JSON body ``{"error": reason}`` the hub sends with every 4xx and 5xx."""
    return json.dumps({"error": reason}).encode()


def parse_json(body: bytes) -> object:
    """Decode a request body as strict JSON.

    Refuses (:class:`ValidationError`) bodies over :data:`MAX_BODY_BYTES`, invalid UTF-8, ``NaN``
    and ``Infinity``, duplicate object keys and nesting too deep to parse.
    """
    if len(body) > MAX_BODY_BYTES:
        raise ValidationError(f"body is larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("a byte order mark")
        return _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise ValidationError("body is not valid JSON") from None


def dump_json(obj: object) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON, as the hub sends it."""
    return _ENCODER.encode(obj).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValidationError(f"duplicate key {key[:40]!r} in JSON object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValidationError(f"{name} is not allowed in JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _exact_keys(
    obj: object, what: str, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, object]:
    if not isinstance(obj, dict):
        raise ValidationError(f"{what} must be a JSON object")
    for key in obj:
        if key not in required and key not in optional:
            raise ValidationError(f"{what}: unknown field {str(key)[:40]!r}")
    for key in required:
        if key not in obj:
            raise ValidationError(f"{what}: missing field {key!r}")
    return obj


def _check_seconds(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number")
    if not 0 <= value < 1e12:
        raise ValidationError(f"{what} must be a non-negative number of seconds")


def _check_record_fields(public_key: object, endpoints: object, allowed_ips: object) -> None:
    if not isinstance(public_key, PublicKey) or public_key.raw == bytes(32):
        raise ValidationError("public_key must be a non-zero public key")
    if not isinstance(endpoints, tuple) or not all(isinstance(e, Endpoint) for e in endpoints):
        raise ValidationError("endpoints must be a tuple of Endpoint")
    if len(endpoints) > MAX_ENDPOINTS:
        raise ValidationError(f"endpoints: at most {MAX_ENDPOINTS} entries")
    if len(set(endpoints)) != len(endpoints):
        raise ValidationError("endpoints must not repeat")
    if not isinstance(allowed_ips, tuple) or len(allowed_ips) > MAX_ALLOWED_IPS:
        raise ValidationError(f"allowed_ips: a tuple of at most {MAX_ALLOWED_IPS} prefixes")
    for network in allowed_ips:
        if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise ValidationError("allowed_ips must hold IP networks")
        parse_allowed_ip(str(network))
    check_disjoint(allowed_ips)
