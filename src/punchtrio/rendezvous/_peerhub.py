"""``PeerHubClient``: a :class:`~punchtrio.rendezvous.Rendezvous` backend for legacy peer-hub servers.

peer-hub (the Go rendezvous server of wg-punch) has two routes: ``POST /register`` with
``{"peer_id", "public_key", "endpoint", "allowed_ips"}`` answering 200 ``ok``, and
``GET /peer/{peer_id}`` answering the same four fields or 404. It has no authentication (anyone may
overwrite any peer: use it only where every client is trusted), one endpoint per peer, no expiry,
no deletion, no long poll and no messages. This client validates everything peer-hub answers as
strictly as our own hub's answers, and maps the gaps as documented on each method.
"""

from __future__ import annotations

import json
import random
import ssl
from collections.abc import Iterable
from typing import Any

import httpx
import trio

from ..keys import PublicKey
from ._client import Backoff, read_capped
from ._models import (
    MAX_ALLOWED_IPS,
    Endpoint,
    EndpointType,
    PeerRecord,
    SignalMessage,
    ValidationError,
    check_disjoint,
    parse_allowed_ip,
    parse_public_key,
    validate_name,
)
from ._protocol import (
    AllowedIP,
    PeerNotFoundError,
    RendezvousProtocolError,
    RendezvousRefusedError,
    RendezvousUnavailableError,
    SignallingNotSupportedError,
    checked_name,
)

PEERHUB_EXPIRES_IN = 0.0
"""``expires_in`` of records from peer-hub: it keeps records until it restarts and says nothing of
their lifetime, so the client reports 0 ("unknown") rather than invent one."""

MAX_PEERHUB_RESPONSE = 64 * 1024
"""Largest peer-hub answer read, in bytes."""


class PeerHubClient:
    """A :class:`~punchtrio.rendezvous.Rendezvous` backend for a peer-hub server at ``url``.

    ``name`` and ``public_key`` identify this peer (names follow our hub's rule, which also keeps
    them safe inside peer-hub's URL path). ``poll`` is the backoff of :meth:`wait_for_peer`
    (default from 0.25 s, doubling, to 2 s: peer-hub cannot notify, so this backend polls);
    ``timeout`` seconds per request (5, as peer-hub's own client); ``attempts`` tries per request
    before :class:`RendezvousUnavailableError`. ``transport`` replaces the network in tests.
    Raises :class:`ValueError` for a URL that is not http(s), ``ValidationError`` for a bad name.
    """

    def __init__(
        self,
        url: str,
        name: str,
        public_key: PublicKey,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 5.0,
        attempts: int = 3,
        poll: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        try:
            base = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"invalid peer-hub URL {url!r}: {exc}") from None
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"peer-hub URL must be http:// or https:// with a host, got {url!r}")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self._name = validate_name(name)
        self._public_key = public_key
        self._attempts = attempts
        self._poll = poll or Backoff(0.25, 2.0)
        self._rng = rng or random.Random()
        self._http = httpx.AsyncClient(
            base_url=base,
            transport=transport,
            verify=verify,
            timeout=timeout,
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
        )
        # peer-hub has no revisions: count content changes seen per name, so that waits with
        # ``newer_than`` work within this client.
        self._seen: dict[str, tuple[tuple[Any, ...], int]] = {}

    @property
    def name(self) -> str:
        """This peer's name (its peer-hub ``peer_id``)."""
        return self._name

    @property
    def public_key(self) -> PublicKey:
        """This peer's WireGuard public key."""
        return self._public_key

    async def register(
        self, endpoints: Iterable[Endpoint] = (), allowed_ips: Iterable[AllowedIP] = ()
    ) -> PeerRecord:
        """Register this peer on peer-hub and return the record as peer-hub now returns it.

        peer-hub stores exactly one endpoint: the first server-reflexive one if any, else the first
        one given; at least one is required. Raises :class:`RendezvousRefusedError` (no endpoint,
        invalid input, or peer-hub's refusal), :class:`RendezvousUnavailableError`,
        :class:`RendezvousProtocolError`.
        """
        endpoints = tuple(endpoints)
        try:
            networks = tuple(parse_allowed_ip(str(n)) for n in allowed_ips)
            if len(networks) > MAX_ALLOWED_IPS:
                raise ValidationError(f"allowed_ips: at most {MAX_ALLOWED_IPS} entries")
            check_disjoint(networks)
        except ValidationError as exc:
            raise RendezvousRefusedError(str(exc)) from None
        if not endpoints:
            raise RendezvousRefusedError("peer-hub needs one endpoint to register")
        chosen = next((e for e in endpoints if e.type is EndpointType.SRFLX), endpoints[0])
        body = {
            "peer_id": self._name,
            "public_key": self._public_key.to_base64(),
            "endpoint": chosen.address,
            "allowed_ips": [str(n) for n in networks],
        }
        status, payload = await self._request("POST", "/register", json.dumps(body).encode())
        if status != 200:
            raise RendezvousRefusedError(_reason(payload, status), status)
        record = await self.lookup(self._name)
        if record.public_key != self._public_key:
            raise RendezvousProtocolError("peer-hub stored another key than the one sent")
        return record

    async def lookup(self, name: str) -> PeerRecord:
        """Return peer ``name``'s record (``GET /peer/{name}``); the endpoint's type is reported
        as server-reflexive. Raises :class:`PeerNotFoundError`, :class:`RendezvousRefusedError`,
        :class:`RendezvousUnavailableError`, :class:`RendezvousProtocolError`."""
        name = checked_name(name)
        status, payload = await self._request("GET", f"/peer/{name}", None)
        if status == 404:
            raise PeerNotFoundError(f"no such peer: {name}")
        if status != 200:
            raise RendezvousRefusedError(_reason(payload, status), status)
        return self._parse(payload, name)

    async def wait_for_peer(self, name: str, *, newer_than: int = 0) -> PeerRecord:
        """Poll until peer ``name`` exists with a revision above ``newer_than``.

        peer-hub cannot notify, so this is the one backend that polls: after each miss it sleeps
        ``poll`` (a jittered backoff). Revisions count the content changes this client has seen.
        Connection failures are retried for as long as the caller waits.
        """
        misses = 0
        while True:
            try:
                record = await self.lookup(name)
                if record.revision > newer_than:
                    return record
            except (PeerNotFoundError, RendezvousUnavailableError):
                pass
            await trio.sleep(self._poll.delay(misses, self._rng))
            misses += 1

    async def send_signal(self, recipient: str, data: str) -> None:
        """Always raises :class:`SignallingNotSupportedError`: peer-hub carries no messages."""
        await trio.lowlevel.checkpoint()
        raise SignallingNotSupportedError("peer-hub cannot carry signalling messages")

    async def receive_signal(self, sender: str | None = None) -> SignalMessage:
        """Always raises :class:`SignallingNotSupportedError`: peer-hub carries no messages."""
        await trio.lowlevel.checkpoint()
        raise SignallingNotSupportedError("peer-hub cannot carry signalling messages")

    async def unregister(self) -> None:
        """Does nothing on the server: peer-hub has no deletion (records live until it restarts)."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        with trio.CancelScope(shield=True):
            await self._http.aclose()

    async def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        failures = 0
        while True:
            try:
                request = self._http.build_request(method, path, content=body, headers=headers)
                response = await self._http.send(request, stream=True)
                try:
                    payload = await read_capped(response, MAX_PEERHUB_RESPONSE, "peer-hub's answer")
                finally:
                    await response.aclose()
                if response.status_code < 500:
                    return response.status_code, payload
                reason = _reason(payload, response.status_code)
            except httpx.TransportError as exc:
                reason = (
                    f"cannot reach peer-hub at {self._http.base_url}: {exc or type(exc).__name__}"
                )
            except httpx.HTTPError as exc:
                raise RendezvousProtocolError(f"invalid answer from peer-hub: {exc}") from None
            failures += 1
            if failures >= self._attempts:
                raise RendezvousUnavailableError(reason)
            await trio.sleep(self._poll.delay(failures - 1, self._rng))

    def _parse(self, payload: bytes, name: str) -> PeerRecord:
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            raise RendezvousProtocolError("peer-hub's answer is not valid JSON") from None
        try:
            if not isinstance(obj, dict):
                raise ValidationError("peer must be a JSON object")
            if obj.get("peer_id") != name:
                raise ValidationError("peer_id is not the name asked for")
            key = parse_public_key(obj.get("public_key"))
            endpoint = Endpoint.parse(obj.get("endpoint"), EndpointType.SRFLX)  # type: ignore[arg-type]
            allowed = obj.get("allowed_ips")
            if allowed is None:
                allowed = []  # Go encodes an empty slice from a nil one as null
            if not isinstance(allowed, list) or len(allowed) > MAX_ALLOWED_IPS:
                raise ValidationError(f"allowed_ips must be a list of at most {MAX_ALLOWED_IPS}")
            networks = tuple(parse_allowed_ip(item) for item in allowed)
            check_disjoint(networks)
            content = (key, endpoint, networks)
            previous = self._seen.get(name)
            if previous is None:
                revision = 1
            elif previous[0] == content:
                revision = previous[1]
            else:
                revision = previous[1] + 1
            self._seen[name] = (content, revision)
            return PeerRecord(name, key, (endpoint,), networks, revision, PEERHUB_EXPIRES_IN)
        except ValidationError as exc:
            raise RendezvousProtocolError(f"peer-hub sent an invalid record: {exc}") from None


def _reason(payload: bytes, status: int) -> str:
    """peer-hub answers errors as plain text (``invalid endpoint``); keep one printable line."""
    text = payload[:200].decode("utf-8", "replace").splitlines()
    line = "".join(ch for ch in (text[0] if text else "") if ch.isprintable()).strip()
    return f"peer-hub: {line or f'HTTP {status}'}"
