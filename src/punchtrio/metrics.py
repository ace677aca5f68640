"""Prometheus metrics of ``punchtrio up`` and ``punchtrio hub``, on a listener of their own.

The collectors here read the counters that the tunnel, the WireGuard device, the puncher, the mux
and the hub already keep, at scrape time: serving metrics adds nothing to the data path. They are
exposed with the maintained ``prometheus-client`` library (its registry and text format), served
by :func:`serve_metrics` over HTTP (Hypercorn, the server the hub already uses) at ``/metrics``.

- :class:`ConnectorCollector`: per peer of a :class:`~punchtrio.connect.Connector` (bytes,
  packets, handshakes, path kind, probes) and the drops of its interface by layer and reason;
- :class:`HubCollector`: the hub's records, waits, queued messages and requests;
- :class:`TextCollector`: metrics that a component reports as Prometheus text lines (the hub's
  relay), re-read through the library's parser so that one registry serves them all.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from ._endpoint import format_endpoint
from ._exceptions import PunchtrioError
from .keys import encode_key

if TYPE_CHECKING:
    from .connect import Connector
    from .rendezvous import HubCounters, Store

__all__ = [
    "CONTENT_TYPE",
    "PATH_KINDS",
    "ConnectorCollector",
    "HubCollector",
    "MetricsServeError",
    "TextCollector",
    "connector_registry",
    "hub_registry",
    "parse_listen_address",
    "render",
    "serve_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of :func:`render`'s output, which every Prometheus server reads."""

PATH_KINDS = ("lan", "direct", "relay")
"""The values of the ``path`` label of ``punchtrio_peer_path``."""


class MetricsServeError(PunchtrioError):
    """The metrics listener cannot be bound (address in use, not ours); exits with status 3."""

    exit_code = 3


class ConnectorCollector(Collector):
    """Per-peer metrics of a running :class:`~punchtrio.connect.Connector`, read at each scrape.

    Per peer (label ``peer``: its name; static peers of a wg-quick file are labelled with their
    base64 public key): ``punchtrio_peer_connected`` (0/1), ``punchtrio_peer_path`` (1 for the
    current path kind, label ``path``: lan, direct, relay), ``punchtrio_peer_receive_bytes_total``
    / ``..._transmit_bytes_total`` (whole authenticated WireGuard datagrams, UDP payload bytes),
    ``..._receive_packets_total`` / ``..._transmit_packets_total`` (transport messages),
    ``punchtrio_peer_handshakes_total``, ``punchtrio_peer_last_handshake_seconds`` (Unix time)
    and ``punchtrio_peer_probes_sent`` (probes of the current punch attempt). For the interface:
    ``punchtrio_probes_sent_total`` and ``punchtrio_dropped_total`` by ``layer`` (``wireguard``,
    ``probe``, ``mux``, ``tunnel``) and ``reason``: a dropped datagram belongs to no peer until it
    is authenticated, so drops are counted per interface. Before the connector runs, only the
    peers' states are reported.
    """

    def __init__(self, connector: Connector) -> None:
        self._connector = connector

    def collect(self) -> Iterator[Metric]:
        """Yield the current values (called by the registry at each scrape)."""
        connector = self._connector
        tunnel = connector.tunnel
        stats: dict[bytes, Any] = dict(tunnel.peer_stats()) if tunnel is not None else {}
        puncher = connector.core.puncher
        connected = GaugeMetricFamily(
            "punchtrio_peer_connected", "Whether the tunnel to the peer is up.", labels=["peer"]
        )
        path = GaugeMetricFamily(
            "punchtrio_peer_path",
            "The peer's current path kind (1) or not (0).",
            labels=["peer", "path"],
        )
        probes = GaugeMetricFamily(
            "punchtrio_peer_probes_sent",
            "Probes sent to the peer in its current punch attempt.",
            labels=["peer"],
        )
        rows: list[tuple[str, Any]] = []
        named: set[bytes] = set()
        for name, state in connector.peers.items():
            connected.add_metric([name], 1.0 if state.connected else 0.0)
            for kind in PATH_KINDS:
                path.add_metric([name, kind], 1.0 if state.path == kind else 0.0)
            key = state.public_key.raw if state.public_key is not None else None
            probes.add_metric([name], float(puncher.probes_sent_to(key) if key else 0))
            if key is not None:
                named.add(key)
                if key in stats:
                    rows.append((name, stats[key]))
        rows += [(encode_key(key), s) for key, s in stats.items() if key not in named]
        yield connected
        yield path
        yield probes
        yield from _traffic(rows)
        yield CounterMetricFamily(
            "punchtrio_probes_sent",
            "Probes (pings and pongs) sent to all peers.",
            value=float(puncher.probes_sent),
        )
        drops = CounterMetricFamily(
            "punchtrio_dropped",
            "Datagrams and packets dropped, by layer and reason.",
            labels=["layer", "reason"],
        )
        wireguard = getattr(connector.core.device, "counters", None)  # none with wireguard-go
        for reason, count in (wireguard or {}).items():
            drops.add_metric(["wireguard", reason], float(count))
        for reason, count in puncher.counters.items():
            drops.add_metric(["probe", reason], float(count))
        for reason in ("unknown", "unrouted", "queue_full"):
            drops.add_metric(["mux", reason], float(getattr(connector.mux.counters, reason)))
        counters = getattr(tunnel, "counters", None)
        for reason in ("receive_errors", "send_errors", "tun_write_errors", "dropped"):
            if hasattr(counters, reason):  # the userspace tunnel's, or the proxies' (wireguard-go)
                layer = "proxy" if reason == "dropped" else "tunnel"
                drops.add_metric([layer, reason], float(getattr(counters, reason)))
        yield drops


def _traffic(rows: list[tuple[str, Any]]) -> Iterator[Metric]:
    """The per-peer WireGuard counters of ``(label, PeerStats)`` rows."""
    families = [
        ("punchtrio_peer_receive_bytes", "WireGuard bytes received from the peer.", "rx_bytes"),
        ("punchtrio_peer_transmit_bytes", "WireGuard bytes sent to the peer.", "tx_bytes"),
        ("punchtrio_peer_receive_packets", "Transport messages from the peer.", "rx_packets"),
        ("punchtrio_peer_transmit_packets", "Transport messages to the peer.", "tx_packets"),
        ("punchtrio_peer_handshakes", "Completed WireGuard handshakes.", "handshakes"),
    ]
    for name, text, field in families:
        family = CounterMetricFamily(name, text, labels=["peer"])
        for label, stats in rows:
            family.add_metric([label], float(getattr(stats, field, 0)))
        yield family
    last = GaugeMetricFamily(
        "punchtrio_peer_last_handshake_seconds",
        "Unix time of the last completed handshake (absent before the first).",
        labels=["peer"],
    )
    for label, stats in rows:
        if stats.last_handshake is not None:
            last.add_metric([label], float(stats.last_handshake))
    yield last


class HubCollector(Collector):
    """The hub's gauges and request counters, read at each scrape.

    ``punchtrio_hub_peers`` (records), ``punchtrio_hub_open_waits`` (long polls),
    ``punchtrio_hub_queued_messages`` from ``store``'s :meth:`~punchtrio.rendezvous.Store.stats`,
    and ``punchtrio_hub_requests_total`` by ``route``, ``method`` and ``status`` from
    ``counters`` (the :class:`~punchtrio.rendezvous.HubCounters` the hub app counts into).
    """

    def __init__(self, store: Store, counters: HubCounters) -> None:
        self._store = store
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        """Yield the current values (called by the registry at each scrape)."""
        stats = self._store.stats()
        yield GaugeMetricFamily("punchtrio_hub_peers", "Registered peer records.", stats.peers)
        yield GaugeMetricFamily("punchtrio_hub_open_waits", "Open long polls.", stats.waiters)
        yield GaugeMetricFamily(
            "punchtrio_hub_queued_messages", "Queued signalling messages.", stats.queued
        )
        requests = CounterMetricFamily(
            "punchtrio_hub_requests",
            "HTTP requests by route, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in sorted(self._counters.requests.items()):
            requests.add_metric([route, method, str(status)], float(count))
        yield requests


class TextCollector(Collector):
    """Metrics that ``lines()`` returns as Prometheus text lines (``# HELP``, ``# TYPE`` and
    samples), parsed with the library's parser at each scrape. Raises ``ValueError`` at scrape
    time if the lines are not valid Prometheus text."""

    def __init__(self, lines: Callable[[], Iterable[str]]) -> None:
        self._lines = lines

    def collect(self) -> Iterator[Metric]:
        """Yield the parsed families (called by the registry at each scrape)."""
        yield from text_string_to_metric_families("\n".join(self._lines()) + "\n")


def connector_registry(connector: Connector) -> CollectorRegistry:
    """Return a registry holding a :class:`ConnectorCollector` for ``connector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConnectorCollector(connector))
    return registry


def hub_registry(store: Store, counters: HubCounters) -> CollectorRegistry:
    """Return a registry holding a :class:`HubCollector`; register a :class:`TextCollector` for
    the relay's lines on it when the hub runs one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(store, counters))
    return registry


def parse_listen_address(text: str) -> tuple[str, int]:
    """Parse a metrics listener ``IP:PORT`` (IPv6 as ``[addr]:port``; port 0-65535, 0: any).

    Only literal addresses: a name would be resolved once and could mean anything later. Raises
    :class:`ValueError` saying what is wrong.
    """
    host, colon, port = text.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"{text[:60]!r} is not IP:PORT (IPv6 as [addr]:port)")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"{host[:50]!r} is not a literal IP address") from None
    if (ip.version == 6) != bracketed:
        raise ValueError(f"{text[:60]!r}: write an IPv6 address in brackets, [addr]:port")
    if ip.is_multicast:
        raise ValueError(f"{ip} is a multicast address")
    return str(ip), int(port)


def render(registry: CollectorRegistry) -> bytes:
    """Return ``registry``'s metrics in the Prometheus text format 0.0.4 (UTF-8)."""
    return generate_latest(registry)


async def serve_metrics(
    registry: CollectorRegistry,
    listen: tuple[str, int],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` at ``GET /metrics`` on ``listen`` ``(ip, port)`` until cancelled.

    Port 0 lets the kernel choose; the URL bound (``http://127.0.0.1:9100/metrics``) is reported
    through ``task_status``. Every other path is 404. No access log is written. Raises
    :class:`MetricsServeError` if the address cannot be bound.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    app: Any = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    ip = ipaddress.ip_address(listen[0])
    where = format_endpoint((ip, listen[1]))
    # Bound here rather than by Hypercorn, which leaves its socket open when bind fails.
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ip.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(ip), listen[1]))
    except OSError as exc:
        sock.close()
        raise MetricsServeError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = None
    config.include_server_header = False
    config.keep_alive_timeout = 30.0
    config.graceful_timeout = 1.0
    failure: MetricsServeError | None = None
    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(partial(serve, app, config))
        except Exception as exc:
            os_error = _find_os_error(exc)
            if os_error is None:
                raise
            reason = os_error.strerror or str(os_error)
            failure = MetricsServeError(f"cannot serve metrics on {where}: {reason}")
            nursery.cancel_scope.cancel()
        else:
            task_status.started(f"{binds[0]}/metrics")
    if failure is not None:
        raise failure


def _find_os_error(exc: BaseException) -> OSError | None:
    """The OSError in ``exc`` or in the exception groups that nurseries wrap it in."""
    if isinstance(exc, OSError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find_os_error(inner)
        if found is not None:
            return found
    return None
