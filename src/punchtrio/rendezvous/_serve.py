"""Serving the hub: Hypercorn's Trio worker for HTTP and, in the same nursery, the STUN server."""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .._exceptions import PunchtrioError
from ..stun import StunServer, StunServerError
from ._hub import HubConfig, create_app
from ._models import MAX_HEADER_BYTES, IPAddress, StunAddress, format_address
from ._store import Clock, Store

HEADER_TIMEOUT = 5.0
"""Seconds a client has to send a request's complete headers (and to start one on an idle
keep-alive connection)."""


class HubServeError(PunchtrioError):
    """The hub cannot start: an address cannot be bound, or TLS files cannot be loaded."""

    exit_code = 3


@dataclass(frozen=True)
class HubListeners:
    """Where a running hub listens: HTTP URLs (``http://127.0.0.1:7777``) and STUN ``(ip, port)``."""

    http: tuple[str, ...]
    stun: tuple[tuple[str, int], ...]


Address = tuple[str, int]
"""An ``(ip, port)`` pair as sockets take it."""


def _addresses(given: Address | Sequence[Address]) -> list[Address]:
    """One ``(ip, port)`` or a sequence of them, as a list (one address is the common case)."""
    if len(given) == 2 and isinstance(given[0], str):
        return [given]  # type: ignore[list-item]
    return list(given)  # type: ignore[arg-type]


def bind_hub_socket(
    listen: Address, *, v6only: bool = False, start_listening: bool = True
) -> socket.socket:
    """Bind and listen on the hub's TCP address ``listen`` ``(ip, port)`` (port 0: the kernel
    chooses), for :func:`serve_hub` ``listen_socket``.

    ``punchtrio hub --workers`` binds it once in the supervising process and every forked worker
    accepts on it (docs/deploy-hub.md, "More than one process"). ``v6only`` (default off: ``[::]``
    takes IPv4 too, as IPv4-mapped) makes an IPv6 socket IPv6 only, so ``0.0.0.0`` and ``[::]``
    can listen on the same port side by side. ``start_listening=False`` only binds: until
    Hypercorn calls ``listen()`` on it, connections are refused rather than queued. Raises
    :class:`HubServeError`.
    """
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6 and v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(listen)
        if start_listening:
            sock.listen(HypercornConfig.backlog)
    except OSError as exc:
        sock.close()
        raise HubServeError(f"cannot listen on {_text(listen)}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def bind_hub_sockets(
    listen: Address | Sequence[Address], *, start_listening: bool = True
) -> list[socket.socket]:
    """Bind every address of ``listen`` with :func:`bind_hub_socket` (``start_listening`` as
    there), IPv6 ones IPv6-only when there are several (so ``0.0.0.0:7777`` and ``[::]:7777``
    coexist).

    Raises :class:`HubServeError` (and closes what it bound) if one cannot be bound.
    """
    addresses = _addresses(listen)
    bound: list[socket.socket] = []
    try:
        for address in addresses:
            several = len(addresses) > 1
            bound.append(bind_hub_socket(address, v6only=several, start_listening=start_listening))
    except HubServeError:
        for sock in bound:
            sock.close()
        raise
    return bound


def hypercorn_config(
    listen: Address | Sequence[Address],
    *,
    max_wait: float,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    listen_socket: socket.socket | Sequence[socket.socket] | None = None,
) -> HypercornConfig:
    """Return the Hypercorn configuration of a hub listening on ``listen`` (one ``(ip, port)`` or
    several).

    Request heads must arrive within :data:`HEADER_TIMEOUT`; Hypercorn refuses (400) a head still
    incomplete past :data:`~punchtrio.rendezvous.MAX_HEADER_BYTES`, and the app checks every
    complete head against that and :data:`~punchtrio.rendezvous.MAX_HEADERS` (431). A
    connection that sends nothing for ``max_wait`` plus 30 seconds is closed (long polls stay
    silent for up to ``max_wait``). Access logs are off: they would record client addresses and
    peer names of every poll. With ``listen_socket`` (from :func:`bind_hub_socket`, or several),
    Hypercorn accepts on those sockets instead of binding ``listen``.
    """
    config = HypercornConfig()
    config.bind = [_text(address) for address in _addresses(listen)]
    if isinstance(listen_socket, socket.socket):
        listen_socket = [listen_socket]
    if listen_socket is not None:
        config.bind = [f"fd://{sock.fileno()}" for sock in listen_socket]
    config.certfile = tls_cert
    config.keyfile = tls_key
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.h2_max_header_list_size = MAX_HEADER_BYTES
    config.keep_alive_timeout = HEADER_TIMEOUT
    config.read_timeout = int(max_wait + 30)
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.include_server_header = False
    return config


async def serve_hub(
    config: HubConfig,
    listen: Address | Sequence[Address],
    *,
    store: Store | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    stun: Address | Sequence[Address] | None = None,
    stun_alternate: Address | None = None,
    listen_socket: socket.socket | Sequence[socket.socket] | None = None,
    started: float | None = None,
    clock: Clock = time.time,
    task_status: trio.TaskStatus[HubListeners] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub until cancelled: HTTP on ``listen``, and a STUN server on ``stun`` if given.

    ``listen`` and ``stun`` are one ``(ip, port)`` or several (IPv4 and IPv6 side by side: with
    several, IPv6 sockets are IPv6-only); ``stun_alternate`` is ``(ip, port)``, the RFC 5780
    alternate of the ``stun`` address of its family. Port 0 lets the kernel choose. The bound STUN
    addresses are published in ``GET /v1/hub`` (an unspecified or loopback IP as ``null``: "the
    hub's own host"; with STUN on both families, each ``null`` entry names its ``family``).
    Reports a :class:`HubListeners` through ``task_status`` once both listen.
    Requests signed before the hub started are refused (``HubConfig.not_before``), so the hub
    begins to listen when the next second of ``clock`` (Unix seconds) begins, at most 1 s later.
    ``started`` (Unix seconds, default: now) is when "the hub" started: a supervisor of workers on
    a shared store passes its own start, so a restarted worker keeps the hub's fence (its replay
    cache, in the store, survived the worker). ``listen_socket``: accept on this listening socket
    or these (:func:`bind_hub_sockets`, shared by ``--workers``) rather than binding ``listen``,
    which then only names it. Raises :class:`HubServeError` if a socket cannot be bound or TLS
    files cannot be loaded.
    """
    if (tls_cert is None) != (tls_key is None):
        raise HubServeError("give both --tls-cert and --tls-key, or neither")
    stuns = [] if stun is None else _addresses(stun)
    alternates = _alternates(stuns, stun_alternate)
    owned: list[socket.socket] = []
    if listen_socket is None and len(_addresses(listen)) > 1:
        # Hypercorn binds without IPV6_V6ONLY, so [::] would take 0.0.0.0's port: bind here
        # (a taken port fails before anything starts) and let Hypercorn listen when it starts.
        owned = bind_hub_sockets(listen, start_listening=False)
        listen_socket = owned
    try:
        await _serve(
            config,
            listen,
            store=store,
            tls_cert=tls_cert,
            tls_key=tls_key,
            stuns=list(zip(stuns, alternates, strict=True)),
            listen_socket=listen_socket,
            owned=owned,
            started=started,
            clock=clock,
            task_status=task_status,
        )
    finally:
        for sock in owned:
            sock.close()


async def _serve(
    config: HubConfig,
    listen: Address | Sequence[Address],
    *,
    store: Store | None,
    tls_cert: str | None,
    tls_key: str | None,
    stuns: list[tuple[Address, Address | None]],
    listen_socket: socket.socket | Sequence[socket.socket] | None,
    owned: list[socket.socket],
    started: float | None,
    clock: Clock,
    task_status: trio.TaskStatus[HubListeners],
) -> None:
    hyper = hypercorn_config(
        listen,
        max_wait=config.max_wait,
        tls_cert=tls_cert,
        tls_key=tls_key,
        listen_socket=listen_socket,
    )
    if hyper.ssl_enabled:
        try:
            hyper.create_ssl_context()
        except (OSError, ValueError) as exc:
            raise HubServeError(f"cannot load the TLS certificate or key: {exc}") from None
    failure: HubServeError | None = None
    async with trio.open_nursery() as nursery:
        stun_bound: list[tuple[str, int]] = []
        try:
            for address, alternate in stuns:
                what = f"serve STUN on {_text(address)}"
                server = StunServer(address, alternate, v6only=len(stuns) > 1)
                stun_bound.extend(await nursery.start(server.serve))
            if stun_bound:
                config = replace(config, stun=_published(stun_bound))
            listener = getattr(store, "run", None)
            if listener is not None:  # a shared store's wake-up listener (RedisStore)
                what = "start the store"
                await nursery.start(listener)
            # No request signed before this process started is accepted (docs/security.md): the
            # current second is refused, and the hub answers once the next one has begun.
            start = clock() if started is None else started
            config = replace(config, not_before=max(config.not_before, math.floor(start) + 1))
            app = create_app(config, store, clock=clock)
            await trio.sleep(max(0.0, config.not_before - clock()))
            what = f"listen on {', '.join(_text(a) for a in _addresses(listen))}"
            asgi: Any = app  # Starlette is an ASGI app; Hypercorn's stubs want its own types
            binds = await nursery.start(partial(hypercorn_serve, asgi, hyper))
            for sock in owned:  # Hypercorn's own socket objects hold these descriptors now
                sock.detach()
        except Exception as exc:
            os_error = _find_os_error(exc)
            if os_error is None:
                raise
            failure = HubServeError(
                f"cannot {what}: {getattr(os_error, 'strerror', None) or os_error}"
            )
            nursery.cancel_scope.cancel()
        else:
            task_status.started(HubListeners(tuple(binds), tuple(stun_bound)))
    if failure is not None:
        raise failure


def _find_os_error(exc: BaseException) -> OSError | StunServerError | None:
    """The OSError or StunServerError in ``exc`` or in the exception groups nurseries wrap it in."""
    if isinstance(exc, (OSError, StunServerError)):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find_os_error(inner)
        if found is not None:
            return found
    return None


def _text(address: tuple[str, int]) -> str:
    return format_address(ipaddress.ip_address(address[0]), address[1])


def _alternates(stuns: list[Address], alternate: Address | None) -> list[Address | None]:
    """The alternate of each STUN address: ``alternate`` for the first one of its family."""
    chosen: list[Address | None] = [None] * len(stuns)
    if alternate is None:
        return chosen
    family = ":" in alternate[0]
    for index, (ip, _port) in enumerate(stuns):
        if (":" in ip) == family:
            chosen[index] = alternate
            return chosen
    raise HubServeError(f"--stun-alternate {_text(alternate)} has no --stun address of its family")


def _published(bound: list[Address]) -> tuple[StunAddress, ...]:
    addresses = []
    for ip, port, family in published_addresses(bound[:8]):
        address = StunAddress(ip, port, family=family)
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)


def published_addresses(bound: Sequence[Address]) -> list[tuple[IPAddress | None, int, int | None]]:
    """Return how ``GET /v1/hub`` publishes a hub service bound to ``bound`` (its STUN server
    or its relay): ``(ip, port, family)`` for each ``(ip, port)``.

    An address no client can be told (unspecified, loopback, link-local) is published without
    an ip, meaning "the hub's own host"; such an entry names its ``family`` (4 or 6) so that a
    client picks the hub host's address of that family, unless it is the service's only family
    and that is IPv4 (then ``None``: what a hub of one IPv4 address has always published, and
    what a client reads as "the hub host's IPv4 address").
    """
    families = {":" in ip for ip, _port in bound}
    published: list[tuple[IPAddress | None, int, int | None]] = []
    for ip_text, port in bound:
        ip = ipaddress.ip_address(ip_text)
        unreachable = ip.is_unspecified or ip.is_loopback or ip.is_link_local
        tagged = unreachable and (len(families) > 1 or ip.version == 6)
        family = ip.version if tagged else None
        published.append((None if unreachable else ip, port, family))
    return published
