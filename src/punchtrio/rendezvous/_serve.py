"""Serving the hub: Hypercorn's Trio worker for HTTP and, in the same nursery, the STUN server."""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .._exceptions import PunchtrioError
from ..stun import StunServer, StunServerError
from ._hub import HubConfig, create_app
from ._models import MAX_HEADER_BYTES, StunAddress, format_address
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


def bind_hub_socket(listen: tuple[str, int]) -> socket.socket:
    """Bind and listen on the hub's TCP address ``listen`` ``(ip, port)`` (port 0: the kernel
    chooses), for :func:`serve_hub` ``listen_socket``.

    ``punchtrio hub --workers`` binds it once in the supervising process and every forked worker
    accepts on it (docs/deploy-hub.md, "More than one process"). Raises :class:`HubServeError`.
    """
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(listen)
        sock.listen(HypercornConfig.backlog)
    except OSError as exc:
        sock.close()
        raise HubServeError(f"cannot listen on {_text(listen)}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def hypercorn_config(
    listen: tuple[str, int],
    *,
    max_wait: float,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    listen_socket: socket.socket | None = None,
) -> HypercornConfig:
    """Return the Hypercorn configuration of a hub listening on ``listen`` ``(ip, port)``.

    Request heads must arrive within :data:`HEADER_TIMEOUT`; Hypercorn refuses (400) a head still
    incomplete past :data:`~punchtrio.rendezvous.MAX_HEADER_BYTES`, and the app checks every
    complete head against that and :data:`~punchtrio.rendezvous.MAX_HEADERS` (431). A
    connection that sends nothing for ``max_wait`` plus 30 seconds is closed (long polls stay
    silent for up to ``max_wait``). Access logs are off: they would record client addresses and
    peer names of every poll. With ``listen_socket`` (from :func:`bind_hub_socket`), Hypercorn
    accepts on that socket instead of binding ``listen``.
    """
    config = HypercornConfig()
    config.bind = [format_address(ipaddress.ip_address(listen[0]), listen[1])]
    if listen_socket is not None:
        config.bind = [f"fd://{listen_socket.fileno()}"]
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
    listen: tuple[str, int],
    *,
    store: Store | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    stun: tuple[str, int] | None = None,
    stun_alternate: tuple[str, int] | None = None,
    listen_socket: socket.socket | None = None,
    started: float | None = None,
    clock: Clock = time.time,
    task_status: trio.TaskStatus[HubListeners] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub until cancelled: HTTP on ``listen``, and a STUN server on ``stun`` if given.

    ``listen``, ``stun`` and ``stun_alternate`` are ``(ip, port)``; port 0 lets the kernel choose.
    The bound STUN addresses are published in ``GET /v1/hub`` (an unspecified IP as ``null``: "the
    hub's own host"). Reports a :class:`HubListeners` through ``task_status`` once both listen.
    Requests signed before the hub started are refused (``HubConfig.not_before``), so the hub
    begins to listen when the next second of ``clock`` (Unix seconds) begins, at most 1 s later.
    ``started`` (Unix seconds, default: now) is when "the hub" started: a supervisor of workers on
    a shared store passes its own start, so a restarted worker keeps the hub's fence (its replay
    cache, in the store, survived the worker). ``listen_socket``: accept on this listening socket
    (:func:`bind_hub_socket`, shared by ``--workers``) rather than binding ``listen``, which then
    only names it. Raises :class:`HubServeError` if a socket cannot be bound or TLS files cannot
    be loaded.
    """
    if (tls_cert is None) != (tls_key is None):
        raise HubServeError("give both --tls-cert and --tls-key, or neither")
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
            if stun is not None:
                what = f"serve STUN on {_text(stun)}"
                stun_bound = list(await nursery.start(StunServer(stun, stun_alternate).serve))
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
            what = f"listen on {_text(listen)}"
            asgi: Any = app  # Starlette is an ASGI app; Hypercorn's stubs want its own types
            binds = await nursery.start(partial(hypercorn_serve, asgi, hyper))
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


def _published(bound: list[tuple[str, int]]) -> tuple[StunAddress, ...]:
    addresses = []
    for ip_text, port in bound[:8]:
        ip = ipaddress.ip_address(ip_text)
        unreachable = ip.is_unspecified or ip.is_loopback or ip.is_link_local
        address = StunAddress(None if unreachable else ip, port)
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)
