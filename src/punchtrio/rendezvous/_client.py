"""``HubClient``: the :class:`~punchtrio.rendezvous.Rendezvous` backend for punchtrio's own hub.

It signs every request with the peer's WireGuard key (``_auth.py``), long-polls the hub for peers
and messages, retries lost connections with exponential backoff and jitter, and re-registers by
itself when the hub may have lost its record (a restart: the connection broke, the hub key changed,
or the hub no longer knows our name). The HTTP API is specified in ``docs/rendezvous.md``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import random
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import httpx
import trio

from ..keys import PrivateKey, PublicKey
from ._addressing import assigned_in
from ._auth import NetworkSecret, RequestSigner
from ._listing import PeerListing
from ._models import (
    Endpoint,
    HubInfo,
    PeerRecord,
    RegisterRequest,
    SignalMessage,
    ValidationError,
    error_reason,
    messages_from_json,
    parse_allowed_ip,
    validate_name,
)
from ._protocol import (
    AllowedIP,
    NotRegisteredError,
    PeerNotFoundError,
    RendezvousError,
    RendezvousProtocolError,
    RendezvousRefusedError,
    RendezvousUnavailableError,
    checked_name,
)

if TYPE_CHECKING:
    from ..relay import TurnServer

log = logging.getLogger("punchtrio.rendezvous")

MAX_RESPONSE_BYTES = 1 << 20
"""Largest hub answer the client reads, in bytes; a larger one is a :class:`RendezvousProtocolError`."""

WAIT_MARGIN = 10.0
"""Seconds added to a long poll's ``wait`` for the HTTP read timeout."""

MAX_INBOX = 256
"""Most received signalling messages kept for later :meth:`HubClient.receive_signal` calls."""

_RETRY_AFTER = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter", for retries after a failure.

    The ``n``-th retry (``attempt`` from 0) waits a uniformly random time between half and all of
    ``min(maximum, initial * factor ** attempt)`` seconds: never longer than ``maximum`` and never
    shorter than half of ``initial``, while the randomness spreads clients that failed together (a
    hub restart) so they do not come back in lockstep. Defaults: 0.5 s, doubling, at most 30 s.
    Raises :class:`ValueError` on non-positive or non-finite values, ``maximum < initial`` or
    ``factor < 1``.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        values = (self.initial, self.maximum, self.factor)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("backoff values must be positive and finite")
        if self.maximum < self.initial or self.factor < 1:
            raise ValueError("backoff needs maximum >= initial and factor >= 1")

    def ceiling(self, attempt: int) -> float:
        """Return the longest delay of retry number ``attempt`` (from 0), in seconds."""
        return min(self.maximum, self.initial * self.factor ** min(max(attempt, 0), 256))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return a jittered delay for retry number ``attempt`` (from 0), in seconds."""
        ceiling = self.ceiling(attempt)
        fraction = (rng or random).random()
        return ceiling / 2 + fraction * ceiling / 2


class _Retry(Exception):
    """A failure worth retrying: an unreachable or busy hub."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class HubClient:
    """A :class:`~punchtrio.rendezvous.Rendezvous` backend speaking to a punchtrio hub over HTTP(S).

    ``url`` is the hub's base URL (``http://`` or ``https://``; no DNS checks here, the hub's own
    answers are what is checked). ``private_key`` is this peer's WireGuard key and signs every
    request; ``name`` is this peer's name. ``network_secret``: the network to join, if the hub
    has private networks. ``hub_public_key`` pins the hub's key (default: trust what
    ``GET /v1/hub`` says, and follow it when the hub restarts with a new key).

    Timing (seconds): ``timeout`` per ordinary request (10); ``wait`` the long poll asked from the
    hub (30, capped by the hub's ``max_wait``); ``backoff`` between retries; ``attempts`` tries of
    an ordinary request before :class:`RendezvousUnavailableError` (4; waits retry forever).
    ``transport`` replaces the network (tests pass ``httpx.ASGITransport(app)``); ``verify`` is the
    TLS verification (an ``ssl.SSLContext`` or a bool); ``clock`` gives Unix seconds for signing.

    Use it as an async context manager to keep the record alive: a background task refreshes it
    before it expires and re-registers it as soon as the hub may have lost it; on exit the record is
    deleted (``unregister_on_exit``) and the connections closed. With ``watch`` (the default) it
    also keeps one long poll open on its own record, so a hub restart (the poll drops) makes it
    register again at once rather than at the next refresh; this costs one open wait at the hub.
    A refused refresh is logged and retried for ``reclaim`` seconds (default: the hub's TTL plus a
    third) and then reported by :meth:`wait_refused`. Without the context manager,
    call :meth:`aclose`; the record then lives until the hub's TTL (waits still re-register).
    Raises :class:`ValueError` for a URL that is not http(s), and
    :class:`~punchtrio.rendezvous.ValidationError` for an invalid ``name``.
    """

    def __init__(
        self,
        url: str,
        private_key: PrivateKey,
        name: str,
        *,
        network_secret: NetworkSecret | None = None,
        hub_public_key: PublicKey | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 10.0,
        wait: float = 30.0,
        attempts: int = 4,
        backoff: Backoff | None = None,
        unregister_on_exit: bool = True,
        watch: bool = True,
        reclaim: float | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        try:
            base = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"invalid hub URL {url!r}: {exc}") from None
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"hub URL must be http:// or https:// with a host, got {url!r}")
        if attempts < 1 or not (timeout > 0 and wait >= 1):
            raise ValueError("attempts must be >= 1, timeout > 0 and wait >= 1 second")
        if reclaim is not None and not (math.isfinite(reclaim) and reclaim >= 0):
            raise ValueError("reclaim must be a finite number of seconds >= 0")
        self._name = validate_name(name)
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self._network = network_secret
        self._pinned = hub_public_key
        self._timeout = timeout
        self._wait = wait
        self._attempts = attempts
        self._backoff = backoff or Backoff()
        self._unregister_on_exit = unregister_on_exit
        self._watch_enabled = watch
        self._reclaim = reclaim
        self._clock = clock
        self._rng = rng or random.Random()
        self._http = httpx.AsyncClient(
            base_url=base,
            transport=transport,
            verify=verify,
            timeout=timeout,
            follow_redirects=False,
            headers={"Accept-Encoding": "identity", "User-Agent": "punchtrio-hub-client/1"},
        )
        self._info: HubInfo | None = None
        self._signer: RequestSigner | None = None
        self._clock_offset = 0.0
        self._registration: RegisterRequest | None = None
        self._record: PeerRecord | None = None
        self._lost = False
        self._broken: RendezvousError | None = None
        self._refused = trio.Event()
        self._record_changed = trio.Event()
        self._register_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._refresh_at = math.inf
        self._wake = trio.Event()
        self._inbox: deque[SignalMessage] = deque(maxlen=MAX_INBOX)
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None

    # -- properties --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This peer's name."""
        return self._name

    @property
    def public_key(self) -> PublicKey:
        """This peer's WireGuard public key (it signs every request)."""
        return self._public_key

    @property
    def record(self) -> PeerRecord | None:
        """This peer's record as the hub last stored it, or ``None`` when not registered."""
        return self._record

    @property
    def hub_info(self) -> HubInfo | None:
        """What ``GET /v1/hub`` last said (key, STUN servers, limits), or ``None`` before contact."""
        return self._info

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> HubClient:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._keep_registered)
        if self._watch_enabled:
            self._nursery.start_soon(self._watch)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            # The body's own exception is not handed to the nursery, so it propagates as it is
            # rather than wrapped in an exception group; only the refresh task is reaped here.
            await self._nursery_manager.__aexit__(None, None, None)
        finally:
            self._nursery = None
            if self._unregister_on_exit and self._registration is not None:
                with trio.move_on_after(self._timeout, shield=True):
                    try:
                        await self.unregister()
                    except RendezvousError as error:
                        log.debug("could not delete %s on exit: %s", self._name, error)
            await self.aclose()
        return False

    async def aclose(self) -> None:
        """Close the HTTP connections. The record stays on the hub until it expires."""
        with trio.CancelScope(shield=True):
            await self._http.aclose()

    # -- the Rendezvous interface ------------------------------------------------------------

    async def register(
        self, endpoints: Iterable[Endpoint] = (), allowed_ips: Iterable[AllowedIP] = ()
    ) -> PeerRecord:
        """Register or refresh this peer's record and return it as the hub stored it.

        Raises :class:`RendezvousRefusedError` with the hub's reason (invalid input, name held by
        another key, overlapping allowed IPs: nothing changed), :class:`RendezvousUnavailableError`,
        :class:`RendezvousProtocolError`.
        """
        try:
            request = RegisterRequest(
                self._public_key,
                tuple(endpoints),
                tuple(parse_allowed_ip(str(n)) for n in allowed_ips),
            )
        except ValidationError as exc:
            raise RendezvousRefusedError(str(exc)) from None
        async with self._register_lock:
            return await self._put(request, self._attempts)

    async def lookup(self, name: str) -> PeerRecord:
        """Return peer ``name``'s record. Raises :class:`PeerNotFoundError` (also for peers of other
        networks), :class:`RendezvousRefusedError`, :class:`RendezvousUnavailableError`."""
        name = checked_name(name)
        status, payload = await self._call("GET", _peer_path(name), attempts=self._attempts)
        if status == 200:
            return self._parse_record(payload, name)
        if status == 404:
            raise PeerNotFoundError(f"no such peer: {name}")
        raise _refusal(status, payload)

    async def wait_for_peer(self, name: str, *, newer_than: int = 0) -> PeerRecord:
        """Long-poll until peer ``name`` has a record with a revision above ``newer_than``.

        Each poll asks the hub to hold the request up to ``wait`` seconds, and the hub answers the
        moment the peer registers. Lost connections are retried with backoff and, once the hub
        answers again, this peer's record is registered again first. Cancel the wait to stop it.
        Raises :class:`RendezvousRefusedError`, :class:`RendezvousProtocolError`.
        """
        name = checked_name(name)
        quick_answers = 0
        while True:
            wait = self._wait_seconds()
            started = trio.current_time()
            params = {"wait": f"{wait:.3f}", "since": str(max(0, newer_than))}
            status, payload = await self._call(
                "GET", _peer_path(name), params=params, read_timeout=wait + WAIT_MARGIN
            )
            if status == 200:
                record = self._parse_record(payload, name)
                if record.revision <= newer_than:
                    raise RendezvousProtocolError("the hub answered a wait with an old revision")
                return record
            if status != 404:
                raise _refusal(status, payload)
            # A hub that ends long polls early must not turn this loop into a busy one.
            if trio.current_time() - started < min(1.0, wait / 2):
                await trio.sleep(self._backoff.delay(quick_answers, self._rng))
                quick_answers += 1
            else:
                quick_answers = 0

    async def list_peers(self) -> PeerListing:
        """Return the peers of our network (``GET /v1/peers``), ourselves included.

        Needs ``network_secret``: the hub refuses to list an open hub's names. Raises
        :class:`RendezvousRefusedError` (no network secret, or the hub refused),
        :class:`RendezvousUnavailableError`, :class:`RendezvousProtocolError`.
        """
        self._require_network()
        status, payload = await self._call("GET", "/v1/peers", attempts=self._attempts)
        if status != 200:
            raise _refusal(status, payload)
        return self._parse_listing(payload)

    async def watch_peers(self, since: str = "") -> PeerListing:
        """Long-poll until the peers of our network differ from the listing whose tag is
        ``since`` (``""``: return the current listing at once), and return the new listing.

        A peer joining, changing its record, or leaving (deleted, or expired) ends the wait.
        Lost connections are retried with backoff for as long as the caller waits. Raises
        :class:`RendezvousRefusedError`, :class:`RendezvousProtocolError`.
        """
        self._require_network()
        quick_answers = 0
        while True:
            wait = self._wait_seconds()
            started = trio.current_time()
            params = {"wait": f"{wait:.3f}", "since": since} if since else None
            status, payload = await self._call(
                "GET", "/v1/peers", params=params, read_timeout=wait + WAIT_MARGIN
            )
            if status != 200:
                raise _refusal(status, payload)
            listing = self._parse_listing(payload)
            if listing.tag != since:
                return listing
            # A hub that ends long polls early must not turn this loop into a busy one.
            if trio.current_time() - started < min(1.0, wait / 2):
                await trio.sleep(self._backoff.delay(quick_answers, self._rng))
                quick_answers += 1
            else:
                quick_answers = 0

    def _require_network(self) -> None:
        if self._network is None:
            raise RendezvousRefusedError(
                "listing peers needs the network secret (pass network_secret=, or "
                "--network-secret-file)"
            )

    def _parse_listing(self, payload: bytes) -> PeerListing:
        try:
            return PeerListing.from_json(_load(payload))
        except ValidationError as exc:
            raise RendezvousProtocolError(f"the hub sent an invalid listing: {exc}") from None

    async def send_signal(self, recipient: str, data: str) -> None:
        """Send ``data`` to ``recipient`` through the hub.

        Raises :class:`NotRegisteredError` before :meth:`register`, :class:`PeerNotFoundError`,
        :class:`RendezvousRefusedError` (invalid data, a name conflict),
        :class:`RendezvousUnavailableError` (also when the recipient's queue stays full).
        """
        recipient = checked_name(recipient)
        if self._registration is None:
            raise NotRegisteredError(f"{self._name} must register before sending messages")
        try:
            body = _dump(SignalMessage(self._name, data).to_json())
        except ValidationError as exc:
            raise RendezvousRefusedError(str(exc)) from None
        path = _peer_path(recipient) + "/messages"
        for retry in (True, False):
            status, payload = await self._call("POST", path, body=body, attempts=self._attempts)
            if status == 202:
                return
            if status == 404:
                raise PeerNotFoundError(f"no such peer: {recipient}")
            if status == 409 and retry:
                # The hub no longer ties our name to our key: it restarted. Register, then resend.
                self._mark_lost()
                continue
            raise _refusal(status, payload)

    async def receive_signal(self, sender: str | None = None) -> SignalMessage:
        """Wait for the next message to this peer (from ``sender`` only, if given).

        One long poll fetches every queued message; those another caller waits for are kept
        (at most :data:`MAX_INBOX`, oldest dropped first). Raises :class:`NotRegisteredError`
        before :meth:`register`, :class:`RendezvousRefusedError`, :class:`RendezvousProtocolError`.
        """
        if sender is not None:
            sender = checked_name(sender)
        misses = 0
        while True:
            message = self._take(sender)
            if message is not None:
                return message
            async with self._receive_lock:
                message = self._take(sender)
                if message is not None:
                    return message
                if self._registration is None:
                    raise NotRegisteredError(f"{self._name} must register before receiving")
                wait = self._wait_seconds()
                status, payload = await self._call(
                    "GET",
                    _peer_path(self._name) + "/messages",
                    params={"wait": f"{wait:.3f}"},
                    read_timeout=wait + WAIT_MARGIN,
                )
                if status == 200:
                    try:
                        self._inbox.extend(messages_from_json(_load(payload)))
                    except ValidationError as exc:
                        raise RendezvousProtocolError(
                            f"the hub sent invalid messages: {exc}"
                        ) from None
                    misses = 0
                    continue
                if status not in (404, 409):
                    raise _refusal(status, payload)
                # Our record is gone from the hub: register again before the next poll.
                self._mark_lost()
                if misses:
                    await trio.sleep(self._backoff.delay(misses - 1, self._rng))
                misses += 1

    async def turn_servers(self) -> tuple[TurnServer, ...]:
        """Return the hub's TURN servers, each with credentials just minted for this peer.

        The credentials are coturn REST credentials (``TurnServer.ttl`` seconds valid): fetch new
        ones before they expire. ``()`` when the hub advertises no TURN server. The peer must be
        registered: the hub mints credentials only for the key that holds the name. Raises
        :class:`NotRegisteredError` before :meth:`register`, :class:`RendezvousRefusedError`,
        :class:`RendezvousUnavailableError`, :class:`RendezvousProtocolError` (a malformed
        answer). Never logs the credentials.
        """
        from ..relay import TurnCredentialsError, TurnServer

        if self._registration is None:
            raise NotRegisteredError(f"{self._name} must register before asking for TURN servers")
        path = _peer_path(self._name) + "/turn"
        for retry in (True, False):
            if self._info is not None and not self._info.turn:
                return ()
            status, payload = await self._call("GET", path, attempts=self._attempts)
            if status == 200:
                break
            if status == 404 and self._info is not None and not self._info.turn:
                return ()
            if status == 404 and retry:
                # The hub forgot our record (a restart): register again, then ask again.
                self._mark_lost()
                continue
            raise _refusal(status, payload)
        body = _load(payload)
        if not isinstance(body, dict) or set(body) != {"servers"}:
            raise RendezvousProtocolError("the hub's TURN answer is not a list of servers")
        servers = body["servers"]
        if not isinstance(servers, list) or len(servers) > 8:
            raise RendezvousProtocolError("the hub sent more than 8 TURN servers")
        try:
            return tuple(TurnServer.from_json(item) for item in servers)
        except TurnCredentialsError as exc:
            raise RendezvousProtocolError(f"the hub sent an invalid TURN server: {exc}") from None

    async def request_address(
        self,
    ) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
        """Have the hub assign this peer its overlay addresses; return them with the prefix length
        of the hub's network prefix (``100.64.7.9/10``), IPv4 first.

        The hub derives them from our key (the same ones every time they are free) and holds them
        in a record of our name with no endpoints, which lives until :meth:`register` replaces it
        (register the returned addresses, as /32 and /128) or the hub's TTL ends; this call does
        not keep that record alive. Raises :class:`RendezvousRefusedError` when the hub has no
        network prefix or refuses (the name held by another key, no free address),
        :class:`RendezvousUnavailableError`, :class:`RendezvousProtocolError`.
        """
        await self._ensure_signer()
        assert self._info is not None
        prefixes = self._info.network_prefixes
        if not prefixes:
            raise RendezvousRefusedError(
                f"the hub at {self._http.base_url} assigns no addresses (it has no network prefix)"
            )
        request = RegisterRequest(self._public_key, (), (), assign=True)
        async with self._register_lock:
            status, payload = await self._call(
                "PUT",
                _peer_path(self._name),
                body=_dump(request.to_json()),
                attempts=self._attempts,
                reregister=False,
            )
        if status not in (200, 201):
            raise _refusal(status, payload)
        record = self._parse_record(payload, self._name)
        assigned = []
        for prefix in sorted(prefixes, key=lambda p: p.version):
            network = assigned_in(record.allowed_ips, prefix)
            if network is not None:
                address = f"{network.network_address}/{prefix.prefixlen}"
                assigned.append(ipaddress.ip_interface(address))
        if record.public_key != self._public_key or len(assigned) != len(prefixes):
            raise RendezvousProtocolError("the hub did not assign an address from its prefixes")
        return tuple(assigned)

    async def unregister(self) -> None:
        """Delete this peer's record from the hub and stop refreshing it.

        Raises :class:`RendezvousRefusedError` (the name is held by another key: the hub changed
        nothing), :class:`RendezvousUnavailableError`; the client forgets the registration anyway.
        """
        async with self._register_lock:
            registered = self._registration is not None
            self._registration = None
            self._record = None
            self._refresh_at = math.inf
            if not registered:
                return
            status, payload = await self._call(
                "DELETE", _peer_path(self._name), attempts=self._attempts, reregister=False
            )
        if status not in (204, 404):
            raise _refusal(status, payload)

    # -- registration and refresh --------------------------------------------------------------

    async def _put(self, request: RegisterRequest, attempts: int) -> PeerRecord:
        """PUT ``request``; the caller holds the registration lock."""
        status, payload = await self._call(
            "PUT",
            _peer_path(self._name),
            body=_dump(request.to_json()),
            attempts=attempts,
            reregister=False,
        )
        if status not in (200, 201):
            raise _refusal(status, payload)
        record = self._parse_record(payload, self._name)
        if (record.public_key, record.endpoints, record.allowed_ips) != (
            request.public_key,
            request.endpoints,
            request.allowed_ips,
        ):
            raise RendezvousProtocolError("the hub stored another record than the one sent")
        self._registration = request
        self._record = record
        self._lost = False
        self._refresh_at = trio.current_time() + max(1.0, record.expires_in / 3)
        self._wake.set()
        self._record_changed.set()
        self._record_changed = trio.Event()
        return record

    async def _reregister(self) -> None:
        """Register the current record again if the hub may have lost it (one attempt)."""
        async with self._register_lock:
            if self._lost and self._registration is not None:
                log.debug("registering %s again", self._name)
                await self._put(self._registration, 1)

    def _mark_lost(self) -> None:
        if self._registration is not None:
            self._lost = True
            self._wake.set()

    async def _keep_registered(self) -> None:
        """Background task: refresh before expiry; re-register as soon as the hub lost us.

        A refusal of our record (409: another key holds the name, or our allowed IPs) is logged
        and retried for :meth:`reclaim_seconds`, long enough for a record nobody refreshes to
        expire; any other refusal, or one that outlasts that, ends the registration for good
        (:meth:`wait_refused` returns it, every later call raises it).
        """
        failures = 0
        deadline: float | None = None  # while the hub refuses our record: when to give up
        while True:
            if failures == 0:
                with trio.move_on_at(self._refresh_at):
                    await self._wake.wait()
                self._wake = trio.Event()
            if self._registration is None:
                failures, deadline = 0, None
                continue
            if not (failures or self._lost or trio.current_time() >= self._refresh_at):
                continue
            try:
                async with self._register_lock:
                    if self._registration is not None:
                        await self._put(self._registration, 1)
                if deadline is not None:
                    log.warning("the hub accepts the record of %s again", self._name)
                failures, deadline = 0, None
            except RendezvousUnavailableError as error:
                log.debug("refreshing %s failed: %s", self._name, error)
                await trio.sleep(self._backoff.delay(failures, self._rng))
                failures += 1
            except RendezvousRefusedError as error:
                now = trio.current_time()
                if deadline is None:
                    deadline = now + self.reclaim_seconds()
                    if error.status == 409 and now < deadline:
                        log.warning(
                            "the hub refuses the record of %s: %s; trying to get it back for %.0f s",
                            self._name,
                            error,
                            deadline - now,
                        )
                if error.status != 409 or now >= deadline:
                    self._give_up(error)
                    return
                await trio.sleep(min(self._backoff.delay(failures, self._rng), deadline - now))
                failures += 1
            except RendezvousError as error:
                self._give_up(error)
                return

    def _give_up(self, error: RendezvousError) -> None:
        log.error("the hub refused the record of %s for good: %s", self._name, error)
        self._broken = error
        self._refused.set()

    def reclaim_seconds(self) -> float:
        """Return how long a refused record is retried before giving up, in seconds: the
        ``reclaim`` given, else the hub's record TTL plus a third (400 before contact)."""
        if self._reclaim is not None:
            return self._reclaim
        ttl = self._info.ttl if self._info is not None else 300.0
        return ttl * 4 / 3

    async def wait_refused(self) -> RendezvousError:
        """Wait until the hub refuses this peer's record for good, and return the refusal.

        That happens when a refresh or re-registration is refused other than by a name or
        address conflict (say, the hub's network prefix changed), or by a conflict that outlasts
        :meth:`reclaim_seconds` (another key keeps refreshing our name). It is logged (ERROR on
        the ``punchtrio.rendezvous`` logger) and every later call raises it. Runs only inside
        ``async with``, where the refresh task runs.
        """
        await self._refused.wait()
        assert self._broken is not None
        return self._broken

    async def _watch(self) -> None:
        """Background task: one long poll on our own record while registered, so that a hub
        restart (the poll drops) or another key holding our name is noticed at once."""
        quick = 0
        while self._broken is None:
            record = self._record
            if record is None or self._lost:
                await self._record_changed.wait()
                continue
            wait = self._wait_seconds()
            started = trio.current_time()
            params = {"wait": f"{wait:.3f}", "since": str(record.revision)}
            try:
                status, payload = await self._call(
                    "GET",
                    _peer_path(self._name),
                    params=params,
                    attempts=1,
                    read_timeout=wait + WAIT_MARGIN,
                    reregister=False,
                )
            except RendezvousUnavailableError:
                # A dropped poll has marked the record lost: the refresh task registers again.
                status, payload = 0, b""
            except RendezvousError:
                return
            if status == 200:
                try:
                    found = self._parse_record(payload, self._name)
                except RendezvousProtocolError:
                    found = None
                if found is not None and found.public_key != self._public_key:
                    log.warning("another key holds %s at the hub; registering again", self._name)
                    self._mark_lost()
            if trio.current_time() - started < min(1.0, wait / 2):
                await trio.sleep(self._backoff.delay(quick, self._rng))
                quick += 1
            else:
                quick = 0

    # -- HTTP plumbing -------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        attempts: int | None = None,
        read_timeout: float | None = None,
        reregister: bool = True,
    ) -> tuple[int, bytes]:
        """Send one signed request until it gets a final answer; return ``(status, body)``.

        Retried: connection failures, 429 and 5xx (after a jittered backoff, or ``Retry-After``),
        and once a 401 (with fresh hub info: new key or clock). ``attempts=None`` retries forever.
        """
        failures = 0
        refreshed_auth = False
        while True:
            if self._broken is not None:
                raise self._broken
            retry_after: float | None = None
            try:
                if reregister:
                    await self._reregister()
                status, payload, headers = await self._send(
                    method, path, params, body, read_timeout
                )
                if status == 401 and not refreshed_auth:
                    refreshed_auth = True
                    self._signer = None
                    continue
                if status == 429 or status >= 500:
                    raise _Retry(error_reason(payload, status), _retry_after(headers))
                return status, payload
            except _Retry as exc:
                reason, retry_after = exc.reason, exc.retry_after
            except RendezvousUnavailableError as exc:
                reason = str(exc)
            except httpx.TransportError as exc:
                self._mark_lost()
                reason = f"cannot reach the hub at {self._http.base_url}: {_describe(exc)}"
            failures += 1
            if attempts is not None and failures >= attempts:
                raise RendezvousUnavailableError(reason)
            delay = self._backoff.delay(failures - 1, self._rng)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self._backoff.maximum))
            log.debug("%s %s failed (%s); retrying in %.2f s", method, path, reason, delay)
            await trio.sleep(delay)

    async def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        read_timeout: float | None,
    ) -> tuple[int, bytes, httpx.Headers]:
        signer = await self._ensure_signer()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        timeout = httpx.Timeout(self._timeout, read=read_timeout or self._timeout)
        request = self._http.build_request(
            method, path, params=params, content=body, headers=headers, timeout=timeout
        )
        target = request.url.raw_path.decode("ascii")
        now = self._clock() + self._clock_offset
        request.headers.update(signer.sign(method, target, body or b"", now=now))
        return await self._exchange(request)

    async def _exchange(self, request: httpx.Request) -> tuple[int, bytes, httpx.Headers]:
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError:
            raise
        except httpx.HTTPError as exc:
            raise RendezvousProtocolError(
                f"invalid answer from the hub: {_describe(exc)}"
            ) from None
        try:
            payload = await read_capped(response, MAX_RESPONSE_BYTES, "the hub's answer")
        except httpx.TransportError:
            raise
        except httpx.HTTPError as exc:
            raise RendezvousProtocolError(
                f"invalid answer from the hub: {_describe(exc)}"
            ) from None
        finally:
            await response.aclose()
        return response.status_code, payload, response.headers

    async def _ensure_signer(self) -> RequestSigner:
        if self._signer is not None:
            return self._signer
        status, payload, headers = await self._exchange(self._http.build_request("GET", "/v1/hub"))
        if status == 429 or status >= 500:
            raise _Retry(error_reason(payload, status), _retry_after(headers))
        if status != 200:
            raise RendezvousProtocolError(
                f"GET /v1/hub answered {status}: {error_reason(payload, status)}"
            )
        try:
            info = HubInfo.from_json(_load(payload))
        except ValidationError as exc:
            raise RendezvousProtocolError(f"the hub sent invalid hub info: {exc}") from None
        if self._pinned is not None and info.public_key != self._pinned:
            raise RendezvousProtocolError("the hub's public key is not the pinned one")
        if info.network_required and self._network is None:
            raise RendezvousRefusedError("the hub requires a network secret")
        if self._info is not None and self._info.public_key != info.public_key:
            # A new hub key means a restarted hub, with none of our state.
            self._mark_lost()
        self._info = info
        # 1 ms under the hub's clock: ``info.time`` is rounded to the millisecond, and the hub
        # refuses timestamps ahead of its clock.
        self._clock_offset = info.time - self._clock() - 0.001
        self._signer = RequestSigner(self._private_key, info.public_key, self._network)
        return self._signer

    # -- helpers -------------------------------------------------------------------------------

    def _wait_seconds(self) -> float:
        limit = self._info.max_wait if self._info is not None else self._wait
        return max(1.0, min(self._wait, limit))

    def _parse_record(self, payload: bytes, name: str) -> PeerRecord:
        try:
            record = PeerRecord.from_json(_load(payload))
        except ValidationError as exc:
            raise RendezvousProtocolError(f"the hub sent an invalid record: {exc}") from None
        if record.name != name:
            raise RendezvousProtocolError(f"the hub answered with {record.name!r} for {name!r}")
        return record

    def _take(self, sender: str | None) -> SignalMessage | None:
        for index, message in enumerate(self._inbox):
            if sender is None or message.sender == sender:
                del self._inbox[index]
                return message
        return None


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """Read the body of a streamed ``response``, at most ``limit`` bytes.

    Raises :class:`RendezvousProtocolError` ("``what`` is larger than ``limit`` bytes") for a
    longer body, and lets httpx's errors through.
    """
    chunks: list[bytes] = []
    size = 0
    async with aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes())) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise RendezvousProtocolError(f"{what} is larger than {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def _peer_path(name: str) -> str:
    return f"/v1/peers/{name}"


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _load(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        raise RendezvousProtocolError("the hub's answer is not valid JSON") from None


def _refusal(status: int, payload: bytes) -> RendezvousRefusedError:
    return RendezvousRefusedError(error_reason(payload, status), status)


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after", "").strip()
    return float(value) if _RETRY_AFTER.fullmatch(value) else None


def _describe(exc: Exception) -> str:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or "the certificate was refused"
        return (
            f"TLS certificate verification failed ({why}); if the hub's certificate comes from "
            "your own CA, pass its bundle (--hub-ca FILE, or hub_verify= in the library)"
        )
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200] or type(exc).__name__
