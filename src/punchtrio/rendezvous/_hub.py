"""The rendezvous hub as an ASGI application (Starlette), independent of the server that runs it.

:func:`create_app` builds the app from a :class:`HubConfig` and a :class:`Store`. The API, its
status codes and its limits are specified in ``docs/rendezvous.md``.
"""

from __future__ import annotations

import collections
import itertools
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._token_bucket import TokenBuckets, address_key
from ..keys import PrivateKey
from ..relay import TurnServer, TurnServerURI, rest_credentials
from ._addressing import (
    ASSIGN_ATTEMPTS,
    AddressPolicy,
    ClaimRefusedError,
    assigned_in,
    assignment_candidates,
    prefix_hosts,
)
from ._auth import (
    DEFAULT_WINDOW,
    HEADER_KEY,
    HEADER_MAC,
    HEADER_NETWORK,
    HEADER_NONCE,
    HEADER_TIME,
    AuthenticationError,
    NetworkSecret,
    RequestVerifier,
    VerifiedRequest,
)
from ._listing import MAX_LISTED_PEERS, TAG_PATTERN, PeerListing
from ._models import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    HubInfo,
    HubRelayAddress,
    IPNetwork,
    RegisterRequest,
    SignalMessage,
    StunAddress,
    ValidationError,
    check_relay_addresses,
    dump_json,
    error_body,
    messages_to_json,
    parse_json,
    trusted,
    validate_name,
)
from ._store import (
    AllowedIPsConflictError,
    Clock,
    MemoryStore,
    NameTakenError,
    QueueFullError,
    Store,
    StoredPeer,
    StoreError,
    StoreFullError,
)

NO_SUCH_PEER = "no such peer"
_T = TypeVar("_T")
_RETRY_AFTER = {"Retry-After": "1"}
_NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
_INTEGER = re.compile(r"[0-9]{1,18}")
# The request headers a signed request is read with: ASGI's lower-case name -> the name the
# verifier looks up. Only the first of repeated headers counts, as with Starlette's ``Headers``.
_AUTH_HEADERS = {
    name.lower().encode("ascii"): name
    for name in (HEADER_KEY, HEADER_TIME, HEADER_NONCE, HEADER_NETWORK, HEADER_MAC)
}
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_READ_HEADERS = frozenset({*_AUTH_HEADERS, _CONTENT_LENGTH, _TRANSFER_ENCODING})
_HTTP1 = frozenset({"1.0", "1.1"})


@dataclass(frozen=True)
class HubConfig:
    """Everything that shapes a hub's behaviour (all durations in seconds).

    ``key``: the hub's static X25519 key, published in ``GET /v1/hub``. ``networks``: network secrets;
    none makes an open hub. ``ttl``: record lifetime (300). ``max_wait``: longest long poll (60).
    ``auth_window``: how far a signed request's timestamp may lag the hub's clock (60; one ahead
    of it is refused). ``not_before``: Unix seconds; requests signed earlier are refused (0:
    none; the hub's server sets the second after it started, so no
    request survives a restart). ``rate``/``burst``: token
    bucket per client IP, IPv6 per /64 (50 requests/s, 100; ``rate`` 0 disables).
    ``max_sources``: size of the bucket table (65536; a refilled bucket is forgotten, and while
    every tracked source is still limited a new one gets 429).
    ``body_timeout``: time to receive a whole body (10). ``stun``: STUN servers to publish.
    ``turn``: TURN servers to publish, whose coturn REST credentials the hub mints with
    ``turn_secret`` (their ``--static-auth-secret``; never shown in the repr) for ``turn_ttl``
    seconds (3600) to registered peers (``GET /v1/peers/{name}/turn``).
    ``relays``: the addresses of the hub's own relay to publish (at most one per IP version;
    none: no relay); ``directory``: a
    :class:`KeyDirectory` the app keeps up to date with every registration and deletion, so the
    relay can check that a key is registered; ``counters``: the :class:`HubCounters` the app
    counts its requests into (``None``: its own; ``punchtrio.metrics.HubCollector`` serves them
    on the metrics listener, never on the API). ``addresses``: the :class:`AddressPolicy`
    (network prefixes to assign from, how many addresses a record may claim, which keys may
    claim routes; default: no prefixes, one /32 and one /128 per record, no routes).
    """

    key: PrivateKey
    networks: tuple[NetworkSecret, ...] = ()
    ttl: float = 300.0
    max_wait: float = 60.0
    auth_window: float = DEFAULT_WINDOW
    not_before: float = 0.0
    rate: float = 50.0
    burst: float = 100.0
    max_sources: int = 65536
    body_timeout: float = 10.0
    stun: tuple[StunAddress, ...] = field(default=())
    turn: tuple[TurnServerURI, ...] = field(default=())
    turn_secret: bytes | None = field(default=None, repr=False)
    turn_ttl: float = 3600.0
    relays: tuple[HubRelayAddress, ...] = ()
    directory: KeyDirectory | None = field(default=None, compare=False)
    counters: HubCounters | None = field(default=None, compare=False, repr=False)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)

    def __post_init__(self) -> None:
        check_relay_addresses(self.relays)  # a bad one is refused here, not on every GET /v1/hub


class KeyDirectory:
    """Which public keys have a live record at this hub, and in which networks.

    The hub app notes every successful registration (with the record's expiry, Unix seconds) and
    deletion; the hub's relay asks :meth:`is_registered` before binding a key. It is this hub
    process's view: with several replicas on one shared store, a relay in another process follows
    the store instead (:func:`follow_registrations`). Expired entries are swept every ``sweep_every`` notes, by ``clock``
    (Unix seconds, the hub's clock).
    """

    def __init__(self, *, clock: Clock = time.time, sweep_every: int = 4096) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, bytes], dict[str, float]] = {}
        self._sweep_every = sweep_every
        self._notes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, network_id: str, name: str, public_key: bytes, expires_at: float) -> None:
        """Record that ``name`` in ``network_id`` is registered to ``public_key`` until
        ``expires_at``."""
        self._entries.setdefault((network_id, public_key), {})[name] = expires_at
        self._notes += 1
        if self._notes >= self._sweep_every:
            self._notes = 0
            self._sweep(self._clock())

    def forget(self, network_id: str, name: str, public_key: bytes) -> None:
        """Record that ``name`` was deleted (no error if unknown)."""
        names = self._entries.get((network_id, public_key))
        if names is not None:
            names.pop(name, None)
            if not names:
                del self._entries[network_id, public_key]

    def replace(self, network_id: str, entries: Iterable[tuple[str, bytes, float]]) -> None:
        """Make ``network_id``'s entries exactly ``entries``, ``(name, public_key, expires_at)``
        (a listing read from a shared store: see :func:`follow_registrations`)."""
        for key in [key for key in self._entries if key[0] == network_id]:
            del self._entries[key]
        for name, public_key, expires_at in entries:
            self._entries.setdefault((network_id, public_key), {})[name] = expires_at

    def is_registered(self, public_key: bytes, network_id: str, now: float) -> bool:
        """Whether ``public_key`` has a record in ``network_id`` (``""``: an open hub) that is
        live at ``now`` (Unix seconds)."""
        names = self._entries.get((network_id, public_key))
        return names is not None and any(expires > now for expires in names.values())

    def _sweep(self, now: float) -> None:
        for key, names in list(self._entries.items()):
            for name, expires in list(names.items()):
                if expires <= now:
                    del names[name]
            if not names:
                del self._entries[key]


class _Refusal(Exception):
    """An HTTP error answer: status, one-line reason, extra headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def _error(status: int, reason: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(reason), status, headers, media_type="application/json")


def _json(obj: object, status: int = 200) -> Response:
    return Response(dump_json(obj), status, media_type="application/json")


def _source_of(scope: Scope) -> bytes:
    """The rate-limit key of a request: its client IP, or the /64 of an IPv6 client."""
    client = scope.get("client")
    return address_key(str(client[0])) if client else b"unknown"


_FIXED_ROUTES = {path: path for path in ("/v1/hub", "/healthz", "/v1/peers")}
_PEERS = "/v1/peers/"
_MESSAGES = "/messages"
_TURN = "/turn"
_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "HEAD"})


def _route_label(path: str) -> str:
    """The route label of ``path`` (names replaced by ``{name}``), or ``"other"``."""
    if not path.startswith(_PEERS):
        return _FIXED_ROUTES.get(path, "other")
    name, slash, rest = path[len(_PEERS) :].partition("/")
    if not name:
        return "other"
    if not slash:
        return "/v1/peers/{name}"
    if slash + rest == _TURN:
        return "/v1/peers/{name}/turn"
    return "/v1/peers/{name}/messages" if slash + rest == _MESSAGES else "other"


class HubCounters:
    """What a hub app counts: :attr:`requests`, answers by ``(route, method, status)``.

    ``route`` is the path with names replaced by ``{name}`` (``/v1/peers/{name}``), or
    ``"other"``; ``method`` one of GET, PUT, POST, DELETE, HEAD or ``"other"``. Read by
    :class:`punchtrio.metrics.HubCollector` at scrape time.
    """

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        """Answers by ``(route, method, status)``."""


def _head_refusal(scope: Scope) -> str | None:
    """Why the request head breaks :data:`MAX_HEADERS` / :data:`MAX_HEADER_BYTES`, or ``None``.

    The size is counted as HTTP/1.1 sends the head: ``METHOD target HTTP/1.1``, one
    ``name: value`` line per header and the blank line, each with CRLF. Hypercorn's own limit
    applies only to a head that arrives in pieces, so this one is checked for every request.
    """
    headers = scope["headers"]
    if len(headers) > MAX_HEADERS:
        return f"too many header fields (at most {MAX_HEADERS})"
    raw_path = scope.get("raw_path") or b""
    query = scope.get("query_string") or b""
    size = len(scope["method"]) + len(raw_path or scope["path"].encode()) + 14
    if query:
        size += 1 + len(query)
    for name, value in headers:
        size += len(name) + len(value) + 4
    if size > MAX_HEADER_BYTES:
        return f"request head is larger than {MAX_HEADER_BYTES} bytes"
    return None


class _Gate:
    """Outer ASGI layer: the head limits and the per-source rate limit (``/healthz`` is exempt),
    then counts every answer in the hub's :class:`HubCounters`."""

    def __init__(self, app: ASGIApp, hub: _Hub) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_label(scope["path"])
        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        buckets = self.hub.buckets
        try:
            refusal = _head_refusal(scope)
            if refusal is not None:
                await _error(431, refusal)(scope, receive, counting_send)
            elif (
                buckets is not None
                and route != "/healthz"
                and not buckets.allow(_source_of(scope), trio.current_time())
            ):
                response = _error(429, "rate limit exceeded", _RETRY_AFTER)
                await response(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.hub.counters.requests[route, method, status] += 1


class _Hub:
    """The handlers and their shared state (one per app)."""

    def __init__(self, config: HubConfig, store: Store, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.verifier = RequestVerifier(
            config.key, config.networks, window=config.auth_window, not_before=config.not_before
        )
        self.buckets = (
            TokenBuckets(rate=config.rate, burst=config.burst, max_keys=config.max_sources)
            if config.rate > 0
            else None
        )
        self.counters = config.counters if config.counters is not None else HubCounters()

    # plumbing

    async def read_body(self, request: Request, headers: Mapping[bytes, bytes]) -> bytes:
        """Return the request body, within the size limit and the body timeout.

        ``headers`` holds at least the request's first Content-Length and Transfer-Encoding.
        """
        length = headers.get(_CONTENT_LENGTH)
        if length is not None:
            text = length.decode("latin-1")
            if not _INTEGER.fullmatch(text):
                raise _Refusal(400, "invalid Content-Length")
            if int(text) > MAX_BODY_BYTES:
                raise _Refusal(413, f"body is larger than {MAX_BODY_BYTES} bytes")
        elif _TRANSFER_ENCODING not in headers and request.scope.get("http_version") in _HTTP1:
            return b""  # HTTP/1 framing: without either header a request has no body
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.config.body_timeout) as scope:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                if message["type"] != "http.request":
                    continue
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _Refusal(413, f"body is larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if scope.cancelled_caught:
            raise _Refusal(408, "request body was not received in time")
        return b"".join(chunks)

    async def authenticate(self, request: Request) -> tuple[bytes, VerifiedRequest]:
        """Read the body and check the signature and nonce; return ``(body, verified)``."""
        scope = request.scope
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _READ_HEADERS and name not in headers:
                headers[name] = value
        body = await self.read_body(request, headers)
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        target = raw_path.decode("latin-1")
        query = scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        signature = {
            _AUTH_HEADERS[name]: value.decode("latin-1")
            for name, value in headers.items()
            if name in _AUTH_HEADERS
        }
        try:
            verified = self.verifier.verify(scope["method"], target, body, signature, self.clock())
        except AuthenticationError as exc:
            raise _Refusal(401, str(exc)) from None
        if not await self.store.remember_nonce(verified.nonce, 2 * self.config.auth_window):
            raise _Refusal(401, "replayed request")
        return body, verified

    def wait_seconds(self, request: Request) -> float:
        if not request.scope.get("query_string"):
            return 0.0
        text = request.query_params.get("wait", "0")
        if not _NUMBER.fullmatch(text) or float(text) > 3600:
            raise _Refusal(400, "wait must be a number of seconds from 0 to 3600")
        return min(float(text), self.config.max_wait)

    # endpoints

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def hub_info(self, request: Request) -> Response:
        config = self.config
        info = HubInfo(
            config.key.public_key(),
            config.stun,
            config.ttl,
            config.max_wait,
            config.auth_window,
            round(self.clock(), 3),
            self.verifier.network_required,
            turn=config.turn,
            relays=config.relays,
            network_prefixes=config.addresses.prefixes,
        )
        return _json(info.to_json())

    async def peer(self, request: Request) -> Response:
        if request.method == "PUT":
            return await self.put_peer(request)
        if request.method == "DELETE":
            return await self.delete_peer(request)
        return await self.get_peer(request)

    async def messages(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.post_message(request)
        return await self.get_messages(request)

    async def put_peer(self, request: Request) -> Response:
        body, verified = await self.authenticate(request)
        name = validate_name(request.path_params["name"])
        registration = RegisterRequest.from_json(parse_json(body))
        if registration.public_key != verified.public_key:
            raise _Refusal(400, "public_key must be the key that signs the request")
        assign = self.config.addresses.check(registration)
        if assign:
            peer, created = await self.put_assigned(verified.network_id, name, registration, assign)
        else:
            peer, created = await self.store.put(
                verified.network_id, name, registration, self.config.ttl
            )
        if self.config.directory is not None:
            self.config.directory.note(
                verified.network_id, name, verified.public_key.raw, peer.expires_at
            )
        return _json(peer.to_record(self.clock()).to_json(), 201 if created else 200)

    async def put_assigned(
        self,
        network_id: str,
        name: str,
        registration: RegisterRequest,
        prefixes: tuple[IPNetwork, ...],
    ) -> tuple[StoredPeer, bool]:
        """Store ``registration`` with an address added from each of ``prefixes``.

        The record's current address in a prefix is kept (a refresh never moves a peer); else the
        key's candidates are tried in order against the store's overlap check.
        """
        old = await self.store.get(network_id, name)
        kept = (
            old.allowed_ips if old is not None and old.public_key == registration.public_key else ()
        )
        offers: list[list[IPNetwork]] = []
        for prefix in prefixes:
            current = assigned_in(kept, prefix)
            candidates = assignment_candidates(registration.public_key, prefix)
            offer = [current] if current is not None else []
            # A small prefix repeats candidates: they cost a try each, never an endless draw.
            offer += itertools.islice(candidates, ASSIGN_ATTEMPTS - len(offer))
            if len(small := prefix_hosts(prefix, ASSIGN_ATTEMPTS)) <= ASSIGN_ATTEMPTS:
                # No more hosts than tries: each once, the key's own choices first, so a free
                # address is found whenever there is one.
                offer = list(dict.fromkeys([*offer, *small]))
            offers.append(offer)
        conflict: AllowedIPsConflictError | None = None
        for attempt in range(max((len(offer) for offer in offers), default=1)):
            allowed = registration.allowed_ips + tuple(
                offer[min(attempt, len(offer) - 1)] for offer in offers
            )
            request = trusted(
                RegisterRequest, registration.public_key, registration.endpoints, allowed, False
            )
            try:
                return await self.store.put(network_id, name, request, self.config.ttl)
            except AllowedIPsConflictError as exc:
                conflict = exc
        if registration.allowed_ips:
            assert conflict is not None
            raise conflict  # the claims of the request itself may be what overlaps
        where = " and ".join(str(prefix) for prefix in prefixes)
        raise AllowedIPsConflictError(f"no free address in {where} for this key; retry later")

    async def get_peer(self, request: Request) -> Response:
        _, verified = await self.authenticate(request)
        name = validate_name(request.path_params["name"])
        wait = self.wait_seconds(request)
        query = request.scope.get("query_string")
        since_text = request.query_params.get("since", "0") if query else "0"
        if not _INTEGER.fullmatch(since_text):
            raise _Refusal(400, "since must be a non-negative integer")
        since = int(since_text)
        if wait <= 0:
            peer = await self.store.get(verified.network_id, name)
            if peer is not None and peer.revision <= since:
                peer = None
        else:
            peer = await _long_poll(
                request, wait, partial(self.store.wait, verified.network_id, name, since)
            )
        if peer is None:
            raise _Refusal(404, NO_SUCH_PEER)
        return _json(peer.to_record(self.clock()).to_json())

    async def list_peers(self, request: Request) -> Response:
        """``GET /v1/peers[?wait=S&since=TAG]``: the signer's network, at once or once it
        differs from the listing ``since`` names (a long poll; the same listing on timeout)."""
        _, verified = await self.authenticate(request)
        if not verified.network_id:
            raise _Refusal(
                403,
                "listing peers needs a network secret: on an open hub anyone could enumerate "
                "every name (start the hub with --network-secret-file)",
            )
        wait = self.wait_seconds(request)
        since = request.query_params.get("since", "") if request.scope.get("query_string") else ""
        if since and not TAG_PATTERN.fullmatch(since):
            raise _Refusal(400, "since must be a listing tag (32 lowercase hex digits)")
        network_id = verified.network_id
        peers: tuple[StoredPeer, ...] | None = None
        if wait > 0 and since:
            peers = await _long_poll(
                request, wait, partial(self.store.wait_listing, network_id, since)
            )
        if peers is None:
            peers = await self.store.list_peers(network_id)
        now = self.clock()
        ordered = sorted(peers, key=lambda p: p.name)
        listing = PeerListing.of(
            (
                (p.name, p.revision, max(0.0, p.expires_at - now))
                for p in ordered[:MAX_LISTED_PEERS]
            ),
            truncated=len(ordered) > MAX_LISTED_PEERS,
        )
        return _json(listing.to_json())

    async def delete_peer(self, request: Request) -> Response:
        _, verified = await self.authenticate(request)
        name = validate_name(request.path_params["name"])
        if not await self.store.delete(verified.network_id, name, verified.public_key):
            raise _Refusal(404, NO_SUCH_PEER)
        if self.config.directory is not None:
            self.config.directory.forget(verified.network_id, name, verified.public_key.raw)
        return Response(status_code=204)

    async def post_message(self, request: Request) -> Response:
        body, verified = await self.authenticate(request)
        name = validate_name(request.path_params["name"])
        message = SignalMessage.from_json(parse_json(body))
        queued = await self.store.push_message(
            verified.network_id, name, message, verified.public_key
        )
        if queued is None:
            raise _Refusal(404, NO_SUCH_PEER)
        return _json({"queued": queued}, 202)

    async def turn(self, request: Request) -> Response:
        """``GET /v1/peers/{name}/turn``: fresh TURN credentials for the signer's own record."""
        _, verified = await self.authenticate(request)
        name = validate_name(request.path_params["name"])
        config = self.config
        if not config.turn or config.turn_secret is None:
            raise _Refusal(404, "this hub offers no TURN servers")
        peer = await self.store.get(verified.network_id, name)
        if peer is None or peer.public_key != verified.public_key:
            raise _Refusal(404, NO_SUCH_PEER)
        ttl = config.turn_ttl
        credentials = rest_credentials(config.turn_secret, name, ttl=ttl, now=self.clock())
        servers = [TurnServer(uri, credentials, ttl).to_json() for uri in config.turn]
        return Response(
            dump_json({"servers": servers}),
            200,
            {"Cache-Control": "no-store"},
            media_type="application/json",
        )

    async def get_messages(self, request: Request) -> Response:
        _, verified = await self.authenticate(request)
        name = validate_name(request.path_params["name"])
        wait = self.wait_seconds(request)
        network_id, owner = verified.network_id, verified.public_key
        messages = await self.store.pop_messages(network_id, name, owner, wait=False)
        if messages is None:
            raise _Refusal(404, NO_SUCH_PEER)
        if not messages and wait > 0:
            # A timeout, or the record vanishing meanwhile, both end the poll with no messages.
            polled = await _long_poll(
                request,
                wait,
                partial(self.store.pop_messages, network_id, name, owner, wait=True),
            )
            messages = polled or ()
        return _json(messages_to_json(messages))


async def _long_poll(
    request: Request, seconds: float, wait: Callable[[], Awaitable[_T]]
) -> _T | None:
    """Return ``await wait()``, or ``None`` after ``seconds`` or once the client disconnects."""
    result: _T | None = None
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, request, nursery.cancel_scope)
        try:
            with trio.move_on_after(seconds):
                result = await wait()
        except Exception as exc:  # re-raised below, outside the nursery, so it stays ungrouped
            failure = exc
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


async def _cancel_on_disconnect(request: Request, scope: trio.CancelScope) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _wrap(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except _Refusal as exc:
            return _error(exc.status, exc.reason, exc.headers)
        except ValidationError as exc:
            return _error(400, str(exc))
        except ClaimRefusedError as exc:
            return _error(403, str(exc))
        except (NameTakenError, AllowedIPsConflictError) as exc:
            return _error(409, str(exc))
        except QueueFullError as exc:
            return _error(429, str(exc), _RETRY_AFTER)
        except StoreFullError as exc:
            return _error(503, str(exc), _RETRY_AFTER)
        except StoreError:
            return _error(503, "the hub's store is unavailable", _RETRY_AFTER)

    return endpoint


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reasons = {404: "not found", 405: "method not allowed"}
    return _error(exc.status_code, reasons.get(exc.status_code, "bad request"), exc.headers)


def create_app(
    config: HubConfig, store: Store | None = None, *, clock: Clock = time.time
) -> Starlette:
    """Return the hub's ASGI application.

    ``store`` defaults to a fresh :class:`MemoryStore` using ``clock`` (Unix seconds; tests pass a
    fake that follows Trio's clock). The app must run under Trio (Hypercorn's Trio worker, or
    ``httpx.ASGITransport`` under pytest-trio).
    """
    if not (math.isfinite(config.ttl) and config.ttl > 0):
        raise ValueError("ttl must be a positive number of seconds")
    if not (math.isfinite(config.turn_ttl) and config.turn_ttl > 0):
        raise ValueError("turn_ttl must be a positive number of seconds")
    if config.turn and not config.turn_secret:
        raise ValueError("turn servers need turn_secret to mint their credentials")
    hub = _Hub(config, store if store is not None else MemoryStore(clock=clock), clock)
    # The busiest route first; one route per path, dispatching on the method (GET includes HEAD).
    routes = [
        Route("/v1/peers/{name}", _wrap(hub.peer), methods=["GET", "PUT", "DELETE"]),
        Route("/v1/peers", _wrap(hub.list_peers), methods=["GET"]),
        Route("/v1/peers/{name}/messages", _wrap(hub.messages), methods=["GET", "POST"]),
        Route("/v1/peers/{name}/turn", _wrap(hub.turn), methods=["GET"]),
        Route("/healthz", _wrap(hub.healthz), methods=["GET"]),
        Route("/v1/hub", _wrap(hub.hub_info), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Gate, hub=hub)],
        exception_handlers={HTTPException: _http_exception},
    )
    # "/v1/peers/" (an empty name) must stay a 404, not a redirect to the listing: clients never
    # follow redirects, and an API path means one thing.
    app.router.redirect_slashes = False
    app.state.hub = hub
    return app
