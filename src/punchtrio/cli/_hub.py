"""``punchtrio hub``: run the rendezvous hub (HTTP API on Hypercorn, optional STUN server)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ..keys import InvalidKeyError, PrivateKey
from ..rendezvous import (
    DEFAULT_WINDOW,
    MemoryStore,
    NetworkSecret,
    Store,
    StoreLimits,
    ValidationError,
    parse_address,
)
from ._hub_state import HubState, HubStateError, default_state_dir, open_state
from ._logs import add_log_options, configure_logging, secret_texts
from ._main import UsageError

# The server (Starlette, Hypercorn) is imported when ``hub`` runs: every other command builds this
# parser too, and should not pay for it.
if TYPE_CHECKING:
    import ssl

    from prometheus_client.registry import CollectorRegistry

    from ..relay import TurnServerURI
    from ..rendezvous import AddressPolicy, HubConfig, HubListeners, HubRelayAddress, Store

log = logging.getLogger("punchtrio.hub")


def register(subparsers: Any) -> None:
    """Add ``hub`` to the ``punchtrio`` parser."""
    hub = subparsers.add_parser(
        "hub",
        help="run the rendezvous hub",
        description=(
            "Serve the rendezvous API (and optionally a STUN server) until interrupted. "
            "See docs/rendezvous.md."
        ),
    )
    hub.add_argument(
        "--listen",
        metavar="IP:PORT",
        action="append",
        default=None,
        help=(
            "HTTP address (default 0.0.0.0:7777; IPv6 as [::]:7777); repeat to listen on several, "
            "e.g. both families: --listen 0.0.0.0:7777 --listen [::]:7777"
        ),
    )
    hub.add_argument(
        "--key-file",
        metavar="FILE",
        help=(
            "the hub's static X25519 private key (default: hub.key in the state directory, made "
            "at the first start; with --store memory or --redis and no --state-dir, a fresh key "
            "at every start)"
        ),
    )
    hub.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        default="sqlite",
        help=(
            "where names, records and ownership live: sqlite (default: a database in the state "
            "directory, kept across restarts) or memory (lost at every restart); --redis wins"
        ),
    )
    hub.add_argument(
        "--state-dir",
        metavar="DIR",
        help=(
            "the hub's state directory (default: /var/lib/punchtrio/hub for root, else "
            "~/.local/state/punchtrio/hub); one hub process per directory"
        ),
    )
    hub.add_argument(
        "--network-secret-file",
        metavar="FILE",
        action="append",
        default=[],
        help="a network secret (16+ bytes); repeat for several networks; none: an open hub",
    )
    hub.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM)")
    hub.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    hub.add_argument(
        "--ttl", type=float, default=300.0, metavar="SECONDS", help="record lifetime (300)"
    )
    hub.add_argument(
        "--max-wait", type=float, default=60.0, metavar="SECONDS", help="longest long poll (60)"
    )
    hub.add_argument(
        "--auth-window",
        type=float,
        default=DEFAULT_WINDOW,
        metavar="SECONDS",
        help="accepted clock difference of signed requests (60)",
    )
    hub.add_argument(
        "--rate",
        type=float,
        default=50.0,
        metavar="PER_SECOND",
        help="requests/s per client IP (50; 0 disables)",
    )
    hub.add_argument(
        "--burst", type=float, default=100.0, metavar="N", help="rate-limit burst (100)"
    )
    limits = StoreLimits()
    hub.add_argument(
        "--max-peers", type=int, metavar="N", default=limits.max_peers, help="records (200000)"
    )
    hub.add_argument(
        "--max-waiters",
        type=int,
        metavar="N",
        default=limits.max_waiters,
        help="long polls (10000)",
    )
    hub.add_argument(
        "--max-queued",
        type=int,
        default=limits.max_queued_per_peer,
        metavar="N",
        help="signalling messages queued per peer (32)",
    )
    hub.add_argument(
        "--max-messages",
        type=int,
        metavar="N",
        default=limits.max_queued,
        help="signalling messages queued in all (100000)",
    )
    hub.add_argument(
        "--redis",
        metavar="URL",
        help="keep state in Redis (redis://host:port/db) so several hubs share it",
    )
    hub.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help=(
            "serve with N processes accepting on one socket (1); needs --redis; see "
            "docs/deploy-hub.md, More than one process"
        ),
    )
    hub.add_argument(
        "--stun",
        metavar="IP:PORT",
        action="append",
        default=None,
        help="also serve STUN on this address; repeat for several (one per family, say)",
    )
    hub.add_argument(
        "--stun-alternate",
        metavar="IP:PORT",
        help="RFC 5780 alternate STUN address (other IP and port than --stun)",
    )
    hub.add_argument(
        "--relay",
        metavar="IP:PORT",
        action="append",
        default=None,
        help=(
            "also relay WireGuard between registered peers of one network, on UDP and TCP at "
            "this address (TLS on TCP with --tls-cert); give it twice for both families (one "
            "IPv4 and one IPv6 address, one port); see docs/relay.md"
        ),
    )
    hub.add_argument(
        "--turn",
        metavar="URI",
        action="append",
        default=[],
        help=(
            "advertise a TURN server (turn:HOST:PORT?transport=udp|tcp, turns:HOST:PORT) and mint "
            "its credentials for registered peers; repeatable; needs --turn-secret-file"
        ),
    )
    hub.add_argument(
        "--turn-secret-file",
        metavar="FILE",
        help="the TURN servers' shared secret (coturn --static-auth-secret), for REST credentials",
    )
    hub.add_argument(
        "--turn-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of the minted TURN credentials (3600)",
    )
    hub.add_argument(
        "--network-prefix",
        metavar="CIDR",
        action="append",
        default=[],
        help=(
            "assign each peer an overlay address from this prefix and refuse addresses outside "
            "it (one IPv4 and/or one IPv6, e.g. 100.64.0.0/10; repeat for both)"
        ),
    )
    hub.add_argument(
        "--max-addresses",
        type=int,
        default=1,
        metavar="N",
        help="single addresses (/32, /128) one peer may claim per IP version (1)",
    )
    hub.add_argument(
        "--allow-routes",
        metavar="PUBLIC_KEY",
        action="append",
        default=[],
        help="a peer key (base64) that may also claim subnet routes (repeat); no other may",
    )
    hub.add_argument(
        "--metrics",
        metavar="IP:PORT",
        help="serve Prometheus metrics at http://IP:PORT/metrics, apart from the API (default: none)",
    )
    add_log_options(hub)
    hub.set_defaults(run=_run)


def _address(text: str, option: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if port == "0":
        text = f"{host}:1"
    try:
        ip, parsed_port = parse_address(text, what=option)
    except ValidationError as exc:
        raise UsageError(str(exc)) from None
    return str(ip), 0 if port == "0" else parsed_port


DEFAULT_LISTEN = "0.0.0.0:7777"
"""Where ``punchtrio hub`` listens without ``--listen``."""

MAX_LISTEN = 8
"""Most ``--listen`` (and ``--stun``) addresses of one hub."""


def _addresses(texts: list[str] | None, option: str, default: str | None) -> list[tuple[str, int]]:
    """Parse a repeatable address option: ``[]`` if absent and no ``default`` (``UsageError``)."""
    texts = texts or ([] if default is None else [default])
    if len(texts) > MAX_LISTEN:
        raise UsageError(f"{option}: at most {MAX_LISTEN} addresses")
    addresses = [_address(text, option) for text in texts]
    for index, address in enumerate(addresses):
        if address in addresses[:index]:
            raise UsageError(f"{option} {texts[index]} is given twice")
    return addresses


def _relay_addresses(texts: list[str] | None) -> list[tuple[str, int]]:
    """Parse ``--relay``: at most one address per family, all on one port (``UsageError``)."""
    addresses = _addresses(texts, "--relay", None)
    families = [":" in ip for ip, _ in addresses]
    if len(set(families)) != len(families):
        raise UsageError("--relay: give at most one IPv4 and one IPv6 address")
    if len({port for _, port in addresses}) > 1:
        raise UsageError("--relay: both addresses need the same port (UDP and TCP on each)")
    return addresses


def _positive(value: float, option: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{option} must be a positive number")
    return value


MAX_TURN_SECRET_BYTES = 4096
"""Largest ``--turn-secret-file`` read, in bytes."""


def _turn_options(args: argparse.Namespace) -> tuple[tuple[TurnServerURI, ...], bytes | None]:
    """Return the parsed ``--turn`` URIs and the ``--turn-secret-file`` secret (``UsageError``)."""
    from ..relay import TurnServerURI, TurnURIError
    from ..rendezvous import MAX_TURN_SERVERS

    uris = []
    for text in args.turn:
        try:
            uris.append(TurnServerURI.parse(text))
        except TurnURIError as exc:
            raise UsageError(f"--turn: {exc}") from None
    if len(uris) > MAX_TURN_SERVERS:
        raise UsageError(f"--turn: at most {MAX_TURN_SERVERS} servers")
    if uris and args.turn_secret_file is None:
        raise UsageError("--turn needs --turn-secret-file (the servers' --static-auth-secret)")
    if args.turn_secret_file is None:
        return (), None
    if not uris:
        raise UsageError("--turn-secret-file needs at least one --turn URI")
    try:
        with open(args.turn_secret_file, "rb") as file:
            secret = file.read(MAX_TURN_SECRET_BYTES + 1)
    except OSError as exc:
        raise UsageError(
            f"cannot read --turn-secret-file {args.turn_secret_file}: {exc.strerror}"
        ) from None
    secret = secret.strip()
    if len(secret) > MAX_TURN_SECRET_BYTES:
        raise UsageError(f"--turn-secret-file holds more than {MAX_TURN_SECRET_BYTES} bytes")
    if not secret or b"\n" in secret or b"\0" in secret:
        raise UsageError("--turn-secret-file must hold one non-empty line (the secret)")
    if not (math.isfinite(args.turn_ttl) and 60 <= args.turn_ttl <= 7 * 86400):
        raise UsageError("--turn-ttl must be from 60 seconds to 7 days")
    return tuple(uris), secret


def _address_policy(args: argparse.Namespace) -> AddressPolicy:
    """Return the ``--network-prefix``/``--max-addresses``/``--allow-routes`` policy (``UsageError``)."""
    from ..keys import PublicKey
    from ..rendezvous import AddressPolicy, check_network_prefixes, parse_allowed_ip

    try:
        prefixes = tuple(
            parse_allowed_ip(text.strip(), what="--network-prefix") for text in args.network_prefix
        )
        check_network_prefixes(prefixes)
    except ValidationError as exc:
        text = str(exc)
        raise UsageError(text if text.startswith("--") else f"--network-prefix: {text}") from None
    if not 1 <= args.max_addresses <= 64:
        raise UsageError("--max-addresses must be from 1 to 64")
    keys = set()
    for text in args.allow_routes:
        try:
            keys.add(PublicKey.from_base64(text.strip()))
        except InvalidKeyError as exc:
            raise UsageError(f"--allow-routes {text[:50]!r}: {exc}") from None
    return AddressPolicy(prefixes, args.max_addresses, frozenset(keys))


def build_config(args: argparse.Namespace) -> tuple[HubConfig, StoreLimits]:
    """Turn parsed ``hub`` arguments into the hub's configuration and store limits.

    Raises :class:`~punchtrio.cli._main.UsageError` for bad values, and the key or secret file's
    error if one cannot be read.
    """
    from ..rendezvous import HubConfig

    if args.key_file:
        try:
            key = PrivateKey.from_file(args.key_file)
        except InvalidKeyError as exc:
            raise UsageError(str(exc)) from None
    else:
        key = PrivateKey.generate()
    networks = tuple(NetworkSecret.from_file(path) for path in args.network_secret_file)
    for number in ("max_peers", "max_waiters", "max_queued", "max_messages"):
        if getattr(args, number) < 1:
            raise UsageError(f"--{number.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.rate) and args.rate >= 0):
        raise UsageError("--rate must be 0 or a positive number")
    turn, turn_secret = _turn_options(args)
    config = HubConfig(
        key,
        networks,
        ttl=_positive(args.ttl, "--ttl"),
        max_wait=_positive(args.max_wait, "--max-wait"),
        auth_window=_positive(args.auth_window, "--auth-window"),
        rate=args.rate,
        burst=max(1.0, _positive(args.burst, "--burst")),
        turn=turn,
        turn_secret=turn_secret,
        turn_ttl=args.turn_ttl,
        addresses=_address_policy(args),
    )
    limits = StoreLimits(
        max_peers=args.max_peers,
        max_waiters=args.max_waiters,
        max_queued_per_peer=args.max_queued,
        max_queued=args.max_messages,
    )
    return config, limits


def _open_state(args: argparse.Namespace, config: HubConfig) -> tuple[HubState | None, HubConfig]:
    """Lock the state directory when the hub keeps state there (the SQLite store, or an explicit
    ``--state-dir``), and take the hub key from it unless ``--key-file`` names one.

    Raises :class:`HubStateError` (one line naming the directory).
    """
    if args.state_dir is None and (args.store == "memory" or args.redis):
        return None, config
    state = open_state(args.state_dir or default_state_dir())
    if not args.key_file:
        config = dataclasses.replace(config, key=state.key())
    return state, config


def _run(args: argparse.Namespace) -> int:
    from ..rendezvous import RedisStore, serve_hub

    config, limits = build_config(args)
    metrics_at = None
    if args.metrics is not None:
        from ..metrics import parse_listen_address

        try:
            metrics_at = parse_listen_address(args.metrics)
        except ValueError as exc:
            raise UsageError(f"--metrics: {exc}") from None
    listen = _addresses(args.listen, "--listen", DEFAULT_LISTEN)
    stun = _addresses(args.stun, "--stun", None) or None
    if args.stun_alternate is not None and stun is None:
        raise UsageError("--stun-alternate needs --stun")
    alternate = (
        None if args.stun_alternate is None else _address(args.stun_alternate, "--stun-alternate")
    )

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    _check_workers(args)
    state, config = _open_state(args, config)  # after every check: a refused start locks nothing
    secrets = [s.raw for s in config.networks] + [config.key.raw, config.turn_secret or b""]
    configure_logging(args, "hub", secrets=secret_texts(keys=secrets))
    if state is not None:
        log.info("state in %s (%s store)", state.directory, "redis" if args.redis else args.store)
    store: Store = MemoryStore(limits)
    opened = contextlib.ExitStack()  # closed when the hub stops, however it stops
    if state is not None:
        opened.callback(state.close)
    if state is not None and args.store == "sqlite" and not args.redis:
        from ..rendezvous import SqliteStore, StateOpenError

        try:
            sqlite = SqliteStore(state.database, limits)
        except StateOpenError as exc:
            raise HubStateError(str(exc)) from None
        store = sqlite
        opened.callback(sqlite.close)
    if args.redis:
        if not args.redis.startswith(("redis://", "rediss://", "unix://")):
            raise UsageError("--redis must be a redis://, rediss:// or unix:// URL")
        store = RedisStore(args.redis, limits)
    shared_socket = None
    if args.workers > 1:
        from ..rendezvous import bind_hub_sockets

        shared_socket = bind_hub_sockets(listen)  # once, before the workers fork
        for sock in shared_socket:
            opened.callback(sock.close)
    # Workers refuse requests signed before the hub (their supervisor) started, also after a
    # restart of one of them: its replay cache is in Redis, kept.
    started = time.time() if args.workers > 1 else None
    relay = _relay_addresses(args.relay)
    relay_tls = None
    if relay and args.tls_cert and args.tls_key:
        from ..relay import server_tls_context

        relay_tls = server_tls_context(args.tls_cert, args.tls_key)
    serve = partial(
        serve_hub,
        listen=listen,
        store=store,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        stun=stun,
        stun_alternate=alternate,
        listen_socket=shared_socket,
        started=started,
    )
    registry = None
    if metrics_at is not None:
        from ..metrics import hub_registry
        from ..rendezvous import HubCounters

        counters = HubCounters()
        config = dataclasses.replace(config, counters=counters)
        registry = hub_registry(store, counters)
    if args.workers > 1:
        from ._hub_workers import run_workers
        from ._main import run_reporting

        # The HTTP workers publish the relay; one more process serves it (one peer table).
        config = dataclasses.replace(config, relays=_published_relays(relay, relay_tls))
        relay_alone = partial(_serve_relay_alone, config, relay, relay_tls, store)

        def serve_one(_: argparse.Namespace) -> int:
            trio.run(_until_signal, partial(serve, config), config, metrics_at, registry)
            return 0

        def serve_relay(_: argparse.Namespace) -> int:
            trio.run(_until_signal, relay_alone, config)
            return 0

        def worker(index: int) -> int:
            return run_reporting(serve_relay if index == args.workers else serve_one, args)

        with opened, _server_gc():
            return run_workers(args.workers + (1 if relay else 0), worker)
    hub = (
        partial(serve, config)
        if not relay
        else partial(_serve_with_relay, serve, config, relay, relay_tls, registry=registry)
    )
    with opened, _server_gc():
        trio.run(_until_signal, hub, config, metrics_at, registry)
    return 0


def _check_workers(args: argparse.Namespace) -> None:
    """Refuse ``--workers`` values and combinations that cannot work (``UsageError``)."""
    if not 1 <= args.workers <= 256:
        raise UsageError("--workers must be from 1 to 256")
    if args.workers == 1:
        return
    if not args.redis:
        raise UsageError(
            f"--workers {args.workers} needs --redis URL: the {args.store} store lives in one "
            "process, so workers would not share names, messages or replay protection"
        )
    if any(port == 0 for _, port in _relay_addresses(args.relay)):
        raise UsageError(
            "--relay with --workers needs a port (not 0): every worker publishes the relay's "
            "address before the relay's own process has bound it"
        )
    for option, value, why in (
        ("--stun", args.stun, "its UDP port can be bound by one process"),
        ("--metrics", args.metrics, "each worker would count only its own requests"),
    ):
        if value is not None:
            raise UsageError(
                f"{option} cannot be combined with --workers ({why}); run it in a hub of one "
                "process (docs/deploy-hub.md, More than one process)"
            )


async def _serve_with_relay(
    serve: Callable[..., Awaitable[None]],
    config: HubConfig,
    relay: list[tuple[str, int]],
    tls: ssl.SSLContext | None,
    *,
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[HubListeners] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind the hub's relay first (so a taken port starts nothing), then serve the hub with the
    relay published in ``GET /v1/hub`` and its counters in ``registry`` (the metrics listener's)."""
    from ..relay import HubRelayServeError, HubRelayServer, HubRelayService
    from ..rendezvous import HubServeError, KeyDirectory

    directory = KeyDirectory()
    server = HubRelayServer(config.key, config.networks, registered=directory.is_registered)
    service = HubRelayService(server, *relay, tls=tls)
    if registry is not None:
        from ..metrics import TextCollector

        registry.register(TextCollector(service.metrics_lines))
    failure: HubServeError | HubRelayServeError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(service.serve)
            published = _published_relays(list(service.bound), tls)
            config = dataclasses.replace(config, relays=published, directory=directory)
            listeners = await nursery.start(serve, config)
        except (HubServeError, HubRelayServeError) as exc:
            failure = exc
            nursery.cancel_scope.cancel()
        else:
            transport = "TLS" if tls is not None else "TCP"
            for ip, port in service.bound:
                log.info("relay on %s port %s (UDP, %s)", ip, port, transport)
            task_status.started(listeners)
    if failure is not None:
        raise failure


def _published_relays(
    relay: list[tuple[str, int]], tls: ssl.SSLContext | None
) -> tuple[HubRelayAddress, ...]:
    """How ``GET /v1/hub`` publishes a relay on ``relay`` (see ``published_addresses``)."""
    from ..rendezvous import HubRelayAddress, published_addresses

    return tuple(
        HubRelayAddress(ip, port, tls is not None, family)
        for ip, port, family in published_addresses(relay)
    )


async def _serve_relay_alone(
    config: HubConfig,
    relay: list[tuple[str, int]],
    tls: ssl.SSLContext | None,
    store: Store,
    *,
    task_status: trio.TaskStatus[HubListeners] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The relay's own process beside ``--workers``: it binds the relay, and learns who may bind
    from the shared store (``follow_registrations``), where the workers register peers."""
    from ..relay import HubRelayServer, HubRelayService
    from ..rendezvous import HubListeners, KeyDirectory, follow_registrations

    directory = KeyDirectory()
    server = HubRelayServer(config.key, config.networks, registered=directory.is_registered)
    service = HubRelayService(server, *relay, tls=tls)
    networks = [network.network_id for network in config.networks] or [""]
    async with trio.open_nursery() as nursery:
        listener = getattr(store, "run", None)  # a shared store's wake-ups
        if listener is not None:
            await nursery.start(listener)
        await nursery.start(follow_registrations, store, directory, networks)
        await nursery.start(service.serve)
        transport = "TLS" if tls is not None else "TCP"
        for ip, port in service.bound:
            log.info("relay on %s port %s (UDP, %s)", ip, port, transport)
        task_status.started(HubListeners((), ()))


# Allocations between young-generation collections while the hub serves (Python's default: 700).
_GC_THRESHOLD = 7000


@contextlib.contextmanager
def _server_gc() -> Iterator[None]:
    """Tune the cyclic garbage collector for serving, and restore it afterwards.

    Every request allocates hundreds of short-lived objects, so with the default threshold the
    collector runs several times per request; the objects of startup (modules, the app) are frozen
    out of full collections. ``benchmarks/hub.py`` measures the effect.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _until_signal(
    serve: Callable[..., Awaitable[None]],
    config: HubConfig,
    metrics_at: tuple[str, int] | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (exit status 0); the metrics listener
    (``registry`` on ``metrics_at``) is bound first, so a taken port starts nothing."""
    from ..metrics import MetricsServeError, serve_metrics
    from ..relay import HubRelayServeError
    from ..rendezvous import HubServeError

    failure: HubServeError | HubRelayServeError | MetricsServeError | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                if metrics_at is not None and registry is not None:
                    url = await nursery.start(serve_metrics, registry, metrics_at)
                    log.info("metrics on %s", url)
                listeners: HubListeners = await nursery.start(serve)
            except (HubServeError, HubRelayServeError, MetricsServeError) as exc:
                failure = exc
                nursery.cancel_scope.cancel()
            else:
                _announce(config, listeners)
                async for _ in signals:
                    log.info("stopping")
                    nursery.cancel_scope.cancel()
                    break
    if failure is not None:
        raise failure


def _announce(config: HubConfig, listeners: HubListeners) -> None:
    log.info("key %s", config.key.public_key())
    for url in listeners.http:
        log.info("serving %s", url)
    for ip, port in listeners.stun:
        log.info("STUN on %s port %s", ip, port)
    for uri in config.turn:
        log.info("TURN credentials for %s", uri)
