"""``punchtrio up``: a WireGuard tunnel to named peers through the hub, or from a wg-quick file.

``--hub URL --name NAME --key-file F --address CIDR --peer NAME...`` runs the connector
(:mod:`punchtrio.connect`): STUN, registration, punching and the WireGuard handshake, shown as a
progress view on stderr or as JSON lines on stdout. ``--config FILE`` brings up the static peers
of a wg-quick file; both together add the file's peers to the rendezvous tunnel; a TOML
``--config`` holds these options themselves (:mod:`._up_config`). ``--metrics IP:PORT`` serves
Prometheus metrics; ``-v``/``-q``/``--log-format`` set the logging (:mod:`._logs`). Ctrl-C or
SIGTERM tears everything down.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import ipaddress
import logging
import re
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .. import PunchtrioError, format_endpoint
from ..connect import (
    CandidatesGathered,
    ConnectError,
    ConnectEvent,
    Connector,
    PathChanged,
    PeerConnected,
    PeerFailed,
    PeerFound,
    Registered,
    TunnelBackendName,
    TunnelConfig,
    UapiTunnel,
)
from ..keys import InvalidKeyError, PrivateKey, PublicKey
from ..relay import (
    TurnCredentials,
    TurnCredentialsError,
    TurnServer,
    TurnServerURI,
    TurnURIError,
)
from ..rendezvous import (
    HubClient,
    InvalidNetworkSecretError,
    NetworkSecret,
    Rendezvous,
    RendezvousRefusedError,
    ValidationError,
    parse_address,
    validate_name,
)
from ..tunnel import (
    ConfigError,
    Tunnel,
    TunnelBackend,
    TunnelError,
    WgQuickConfig,
    find_wireguard_go,
    load_tunnel_backend,
    load_wgquick,
    open_userspace_tunnel,
    open_wireguard_go_tunnel,
    tunnel_backend_names,
)
from ._control import start_local_sockets
from ._logs import LogReport, add_log_options, configure_logging, secret_texts
from ._main import UsageError
from ._progress import JsonLines, ProgressView
from ._up_config import apply_config_file

_IFNAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}")


Report = Callable[[str, dict[str, Any]], None]
"""Where ``up`` sends what happens: ``report(event_name, fields)``."""

log = logging.getLogger("punchtrio.up")


class UpError(PunchtrioError):
    """``punchtrio up`` could not start, or lost its name at the hub: ``str(error)`` is
    ``"<stage>: <reason>"`` (stage ``tunnel`` for the TUN device or the UDP port, ``register``
    for a record the hub refuses for good). Exits with status 1."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class UpPlan:
    """What ``punchtrio up --hub`` will do, checked before anything is created.

    ``hub``: the hub URL; ``name``/``key``: who we are; ``address``: our tunnel address with its
    prefix (``None``: the one the hub assigns, see :func:`assigned_address`); ``peers``: names
    to connect to; ``stun``: STUN servers (``None``: what the hub
    advertises); ``listen_port``: the one UDP port (0: any); ``interface``: the TUN name
    (``""``: the kernel's ``tunN``); ``network_secret``; ``static``: a wg-quick file whose peers
    are added as static peers; ``turn``: TURN servers of our own (``--turn``); ``relay=False``
    never relays (``--no-relay``); ``metrics``: where to serve Prometheus metrics
    (``--metrics``; ``None``: nowhere); ``all_peers``: connect to every peer of the network as
    it joins, and drop it as it leaves (``--all-peers``; needs ``network_secret``); ``hub_ca``:
    the TLS context that verifies the hub and relays over TLS with our own CA bundle
    (``--hub-ca``; ``None``: the system's CAs); ``hub_key``: the hub's pinned public key (``--hub-key``); ``port_mapping``:
    ask the gateway for a mapping (``--port-mapping``); ``tunnel``: who moves the packets
    (``--tunnel``: ``"userspace"`` or ``"wireguard-go"``).
    """

    hub: str
    name: str
    key: PrivateKey = dataclasses.field(repr=False)
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None
    peers: tuple[str, ...]
    stun: tuple[tuple[str, int], ...] | None = None
    listen_port: int = 51820
    interface: str = ""
    network_secret: NetworkSecret | None = dataclasses.field(default=None, repr=False)
    static: WgQuickConfig | None = dataclasses.field(default=None, repr=False)
    turn: tuple[TurnServer, ...] = dataclasses.field(default=(), repr=False)
    relay: bool = True
    metrics: tuple[str, int] | None = None
    all_peers: bool = False
    hub_ca: ssl.SSLContext | None = dataclasses.field(default=None, repr=False, compare=False)
    hub_key: PublicKey | None = None
    port_mapping: bool = False
    tunnel: TunnelBackendName = "userspace"


def register(subparsers: Any) -> None:
    """Add ``up`` to the ``punchtrio`` parser."""
    up = subparsers.add_parser(
        "up",
        help="bring up a WireGuard tunnel to peers behind NATs (or from a wg-quick file)",
        description=(
            "Connect to named peers through a punchtrio hub (STUN, hole punching, WireGuard), "
            "and/or bring up the static peers of a wg-quick file, over punchtrio's userspace "
            "WireGuard on a TUN device. Runs until Ctrl-C or SIGTERM, which remove everything. "
            "See docs/cli.md."
        ),
    )
    up.add_argument(
        "--config",
        metavar="FILE",
        help="these options as a TOML file, or a wg-quick file (see docs/service.md)",
    )
    up.add_argument("--hub", metavar="URL", help="the rendezvous hub, e.g. http://hub:7777")
    up.add_argument("--name", metavar="NAME", help="our name at the hub")
    up.add_argument("--key-file", metavar="FILE", help="our WireGuard private key file")
    up.add_argument(
        "--address",
        metavar="CIDR",
        help="our tunnel address, e.g. 10.99.0.1/24 (default: the hub assigns one)",
    )
    up.add_argument(
        "--peer", metavar="NAME", action="append", default=[], help="a peer to reach (repeat)"
    )
    up.add_argument(
        "--all-peers",
        action="store_true",
        help=(
            "a mesh: reach every peer of our network as it joins, drop it as it leaves "
            "(needs --network-secret-file)"
        ),
    )
    up.add_argument(
        "--stun",
        metavar="IP:PORT",
        action="append",
        default=[],
        help="STUN server (repeat; default: the one the hub advertises)",
    )
    up.add_argument(
        "--listen-port", type=int, metavar="N", help="UDP port for everything (default 51820)"
    )
    up.add_argument("--network-secret-file", metavar="FILE", help="join the hub's private network")
    up.add_argument(
        "--hub-ca",
        metavar="FILE",
        help=(
            "verify TLS certificates with this CA bundle (PEM) instead of the system's: the "
            "hub's (https://), and those of relays over TLS (the hub's relay, turns: servers)"
        ),
    )
    up.add_argument(
        "--hub-key",
        metavar="KEY",
        help="pin the hub's public key (base64): a hub that answers with another key is refused",
    )
    up.add_argument(
        "--port-mapping",
        action="store_true",
        help=(
            "ask the gateway for a port mapping (PCP, then NAT-PMP; UPnP IGD when that first"
            " attempt fails) and offer it to peers"
        ),
    )
    up.add_argument(
        "--interface",
        metavar="NAME",
        help="interface name (default: the config file's name without .conf, else tunN)",
    )
    up.add_argument(
        "--turn",
        metavar="URI",
        action="append",
        default=[],
        help=(
            "a TURN server of our own, turn:IP:PORT[?transport=tcp] (repeat; TCP is used when "
            "UDP is blocked); default: what the hub mints"
        ),
    )
    up.add_argument("--turn-user", metavar="NAME", help="the user name for --turn")
    up.add_argument(
        "--turn-password-file", metavar="FILE", help="a file holding the password for --turn"
    )
    up.add_argument(
        "--no-relay",
        action="store_true",
        help="never relay (neither the hub's relay nor TURN): direct and LAN paths only",
    )
    up.add_argument(
        "--metrics",
        metavar="IP:PORT",
        help="serve Prometheus metrics at http://IP:PORT/metrics (e.g. 127.0.0.1:9586)",
    )
    up.add_argument(
        "--tunnel",
        metavar="BACKEND",
        default="userspace",
        help=(
            "who moves the packets: userspace (punchtrio's own WireGuard, the default), "
            "wireguard-go (with --hub or a wg-quick --config FILE), or a backend another "
            "package registers (with --config FILE; see docs/tunnel.md)"
        ),
    )
    up.add_argument("--json", action="store_true", help="print events as JSON, one per line")
    add_log_options(up)
    up.set_defaults(run=_up, up_parser=up)


def _up(args: argparse.Namespace) -> int:
    parser = getattr(args, "up_parser", None)
    if parser is not None:
        apply_config_file(args, parser)
    if args.tunnel not in tunnel_backend_names():
        raise UsageError(
            f"--tunnel {args.tunnel[:40]!r} is not a tunnel backend: choose one of "
            f"{', '.join(tunnel_backend_names())}"
        )
    if args.hub is None:
        rendezvous_only = (
            "metrics",
            "name",
            "key_file",
            "address",
            "network_secret_file",
            "hub_ca",
            "hub_key",
            "listen_port",
            "turn_user",
            "turn_password_file",
        )
        given = args.peer or args.stun or args.turn or args.no_relay or args.all_peers
        given = given or args.port_mapping
        if given or any(getattr(args, n) is not None for n in rendezvous_only):
            raise UsageError("--name, --peer, --key-file, --address, --stun ... need --hub URL")
        if not args.config:
            raise UsageError(
                "up needs --hub URL (with --name, --key-file, --address, --peer) or --config FILE"
            )
        return _up_static(args)
    if args.tunnel not in ("userspace", "wireguard-go"):
        raise UsageError(
            f"--tunnel {args.tunnel[:40]} works with a wg-quick --config FILE only, not with "
            "--hub: with the hub, punchtrio steers WireGuard between its own UDP port and the "
            "tunnel, which only the userspace and wireguard-go backends support (see "
            "docs/tunnel.md)"
        )
    if args.tunnel == "wireguard-go" and args.config:
        raise UsageError(
            "--tunnel wireguard-go takes --hub or --config FILE, not both: a wg-quick file's "
            "static peers are added with --hub on the userspace tunnel only"
        )
    plan = build_plan(args)
    configure_logging(args, "up", secrets=_secrets(plan.key, plan.static, plan))
    log.debug(
        "hub %s, name %s, peers %s, UDP port %s, relay %s",
        plan.hub,
        plan.name,
        ", ".join(plan.peers) or "(static only)",
        plan.listen_port,
        "on" if plan.relay else "off",
    )
    report: Report
    if args.json:
        report = JsonLines()
    elif args.quiet or args.log_format == "json":
        report = LogReport(log)
    else:
        report = ProgressView()
    try:
        trio.run(_until_signal, plan, report)
    finally:
        getattr(report, "close", lambda: None)()
    return 0


def build_plan(args: argparse.Namespace) -> UpPlan:
    """Check ``up --hub`` arguments and read the files they name; raise :class:`UsageError` (exit
    2) for anything wrong, before anything is created."""
    static = load_wgquick(args.config) if args.config else None
    if not args.hub.startswith(("http://", "https://")):
        raise UsageError("--hub must be an http:// or https:// URL")
    if args.name is None:
        raise UsageError("--hub needs --name NAME")
    try:
        name = validate_name(args.name, what="--name")
        peers = tuple(validate_name(peer, what="--peer") for peer in args.peer)
    except ValidationError as exc:
        raise UsageError(str(exc)) from None
    if not peers and static is None and not args.all_peers:
        raise UsageError("--hub needs at least one --peer NAME (or --all-peers)")
    if args.all_peers and not args.network_secret_file:
        raise UsageError(
            "--all-peers needs --network-secret-file FILE: the hub lists a network's peers only "
            "to its members"
        )
    if name in peers or len(set(peers)) != len(peers):
        raise UsageError("--peer names must differ from each other and from --name")
    if args.key_file:
        try:
            key = PrivateKey.from_file(args.key_file)
        except InvalidKeyError as exc:
            raise UsageError(str(exc)) from None
    elif static is not None:
        key = PrivateKey(static.interface.private_key)
    else:
        raise UsageError("--hub needs --key-file FILE")
    address = _tunnel_address(args.address, static)
    stun = tuple(parse_stun(text) for text in args.stun) or None
    port = args.listen_port
    if port is None:
        port = static.interface.listen_port if static and static.interface.listen_port else 51820
    if not 0 <= port <= 65535:
        raise UsageError("--listen-port must be 0-65535")
    secret = None
    if args.network_secret_file:
        try:
            secret = NetworkSecret.from_file(args.network_secret_file)
        except InvalidNetworkSecretError as exc:
            raise UsageError(str(exc)) from None
    interface = args.interface or ""
    if interface and not _IFNAME.fullmatch(interface):
        raise UsageError(f"--interface {interface[:40]!r} is not a valid interface name")
    turn = _turn_servers(args.turn, args.turn_user, args.turn_password_file)
    metrics = None
    if args.metrics is not None:
        from ..metrics import parse_listen_address

        try:
            metrics = parse_listen_address(args.metrics)
        except ValueError as exc:
            raise UsageError(f"--metrics: {exc}") from None
    return UpPlan(
        args.hub,
        name,
        key,
        address,
        peers,
        stun,
        port,
        interface,
        secret,
        static,
        turn,
        not args.no_relay,
        metrics,
        args.all_peers,
        _hub_tls(args.hub_ca),
        _hub_key(args.hub_key),
        args.port_mapping,
        "wireguard-go" if args.tunnel == "wireguard-go" else "userspace",
    )


def _hub_tls(ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context of ``--hub-ca FILE`` (``None`` without it): it verifies the hub, and the
    relays over TLS that the connector uses."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise UsageError(f"--hub-ca {ca_file}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--hub-ca {ca_file}: not a PEM CA bundle ({_oneline(exc)})") from None


def _hub_key(text: str | None) -> PublicKey | None:
    if text is None:
        return None
    try:
        return PublicKey.from_base64(text)
    except InvalidKeyError as exc:
        raise UsageError(f"--hub-key: {exc}") from None


def _secrets(key: PrivateKey, static: WgQuickConfig | None, plan: UpPlan | None) -> tuple[str, ...]:
    """The forms of our secrets that a log line must never show (see :mod:`._logs`)."""
    keys = [key.raw]
    if static is not None:
        keys += [static.interface.private_key]
        keys += [p.preshared_key for p in static.peers if p.preshared_key]
    texts: list[str] = []
    if plan is not None:
        if plan.network_secret is not None:
            keys.append(plan.network_secret.raw)
        texts += [server.credentials.password for server in plan.turn]
    return secret_texts(keys=keys, texts=texts)


def _turn_servers(
    uris: list[str], user: str | None, password_file: str | None
) -> tuple[TurnServer, ...]:
    """Parse ``--turn URI --turn-user U --turn-password-file F``; raise :class:`UsageError`."""
    if not uris:
        if user is not None or password_file is not None:
            raise UsageError("--turn-user and --turn-password-file need --turn URI")
        return ()
    if user is None or password_file is None:
        raise UsageError("--turn needs --turn-user NAME and --turn-password-file FILE")
    try:
        with open(password_file, encoding="utf-8") as file:
            password = file.read().strip()
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not readable text"
        raise UsageError(f"--turn-password-file {password_file}: {reason}") from None
    servers = []
    for text in uris:
        try:
            uri = TurnServerURI.parse(text)
            credentials = TurnCredentials(user, password)
        except (TurnURIError, TurnCredentialsError) as exc:
            raise UsageError(f"--turn: {exc}") from None
        servers.append(TurnServer(uri, credentials, 365 * 86400.0))
    return tuple(servers)


def _tunnel_address(
    text: str | None, static: WgQuickConfig | None
) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    if text is None:
        if static is None or not static.interface.addresses:
            return None  # the hub assigns one (or up says to pass --address)
        return static.interface.addresses[0]
    try:
        address = ipaddress.ip_interface(text)
    except ValueError:
        raise UsageError(f"--address {text[:50]!r} is not an address with a prefix") from None
    if address.version != 4 or "/" not in text:
        raise UsageError("--address must be IPv4 with a prefix, e.g. 10.99.0.1/24")
    return address


async def assigned_address(
    plan: UpPlan, rendezvous: Rendezvous | None = None
) -> ipaddress.IPv4Interface:
    """Return the IPv4 overlay address (with the network's prefix length) the hub assigns
    ``plan``'s key, for ``up`` without ``--address``.

    ``rendezvous``: a :class:`~punchtrio.rendezvous.HubClient` to ask instead of ``plan.hub``.
    Raises :class:`UsageError` (one line saying to pass ``--address``) when the hub assigns no
    IPv4 address or the rendezvous is not a hub, and the hub client's errors otherwise.
    """
    hint = "pass --address CIDR (our tunnel address, e.g. 10.99.0.1/24)"
    if rendezvous is not None and not isinstance(rendezvous, HubClient):
        raise UsageError(f"this rendezvous assigns no addresses: {hint}")
    client = rendezvous or HubClient(
        plan.hub,
        plan.key,
        plan.name,
        network_secret=plan.network_secret,
        verify=plan.hub_ca if plan.hub_ca is not None else True,
        hub_public_key=plan.hub_key,
    )
    try:
        interfaces = await client.request_address()
    except RendezvousRefusedError as exc:
        if client.hub_info is None or client.hub_info.network_prefixes:
            raise
        raise UsageError(f"{exc.reason}: {hint}") from None
    finally:
        if rendezvous is None:
            await client.aclose()
    for interface in interfaces:
        if isinstance(interface, ipaddress.IPv4Interface):
            return interface
    raise UsageError(f"the hub assigns only IPv6 addresses and up needs IPv4: {hint}")


def parse_stun(text: str) -> tuple[str, int]:
    """Parse ``--stun IPv4:PORT`` or ``--stun [IPv6]:PORT`` (a literal address; the connector
    asks each server over its own family); raise :class:`UsageError` otherwise."""
    try:
        ip, port = parse_address(text, what="--stun")
    except ValidationError as exc:
        raise UsageError(str(exc)) from None
    return str(ip), port


async def _until_signal(plan: UpPlan, report: Report) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            failure: PunchtrioError | None = None
            try:
                await serve_up(plan, report)
            except PunchtrioError as exc:
                failure = exc
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def serve_up(
    plan: UpPlan,
    report: Report,
    *,
    rendezvous: Rendezvous | None = None,
    **options: Any,
) -> None:
    """Run ``plan`` until cancelled, sending every event to ``report``.

    ``rendezvous`` replaces the hub URL (tests, netsim); ``options`` go to
    :class:`~punchtrio.connect.Connector` (``interface=MemoryInterface()`` avoids the TUN device).
    Emits ``up`` once the socket and tunnel exist, each connector event (snake_case names, see
    :func:`describe`) and ``down`` after teardown. Raises :class:`ConnectError` when a peer fails
    for good (retries turned off; naming the stage; everything is torn down first), :class:`~punchtrio.tunnel.ConfigError`
    (``FILE:LINE: why``, also after teardown) if the device refuses a static peer, and
    :class:`UpError` if the tunnel cannot be created or the hub refuses our record for good
    (another key keeps our name; ``"register: ..."``).
    """
    connector = Connector(
        plan.name,
        plan.key,
        rendezvous if rendezvous is not None else plan.hub,
        TunnelConfig(
            plan.address or await assigned_address(plan, rendezvous),
            listen_port=plan.listen_port,
            interface_name=plan.interface,
        ),
        peers=plan.peers,
        stun_servers=plan.stun,
        network_secret=plan.network_secret,
        hub_verify=plan.hub_ca if plan.hub_ca is not None else True,
        hub_public_key=plan.hub_key,
        port_mapping=plan.port_mapping,
        turn_servers=plan.turn,
        relay=plan.relay,
        all_peers=plan.all_peers,
        backend=plan.tunnel,
        **options,
    )
    failure: PunchtrioError | None = None
    refused: list[PunchtrioError] = []
    down: dict[str, Any] = {"interface": "", "peers": []}
    try:
        async with trio.open_nursery() as nursery:
            if plan.metrics is not None:  # first: a taken port creates nothing
                from ..metrics import connector_registry, serve_metrics

                registry = connector_registry(connector)
                url = await nursery.start(serve_metrics, registry, plan.metrics)
                log.info("metrics on %s", url)
            try:
                await nursery.start(connector.run)
            except (TunnelError, OSError) as exc:
                raise UpError(f"tunnel: {_oneline(exc)}") from None
            tunnel = connector.tunnel
            assert tunnel is not None
            down["interface"] = tunnel.name
            fields = {
                "name": plan.name,
                "interface": tunnel.name,
                "listen_port": connector.listen_port,
            }
            if isinstance(tunnel, UapiTunnel):  # its own port, steered from ours
                fields |= {
                    "tunnel": "wireguard-go",
                    "wireguard_port": tunnel.wireguard_port,
                    "pid": tunnel.process.process.pid,
                }
            report("up", fields)
            if options.get("interface") is None:  # a real TUN: `wg show` and `punchtrio status`
                # wireguard-go serves `wg show` on its own UAPI socket.
                uapi = connector.backend == "userspace"
                device: Any = connector.core.device
                await start_local_sockets(nursery, tunnel, device, connector, report, uapi=uapi)
            if isinstance(connector.rendezvous, HubClient):
                nursery.start_soon(
                    _end_when_refused, connector.rendezvous, refused, nursery.cancel_scope
                )
            if plan.static is not None:
                try:  # raised after teardown: from inside the nursery it would come in a group
                    _add_static(connector, plan.static, options.get("interface") is None)
                except ConfigError as exc:
                    failure = exc
            try:
                if failure is None:
                    async for event in connector.events:
                        report(*describe(event))
                        # A peer that will be tried again is not the end of `up`.
                        if isinstance(event, PeerFailed) and event.retry_in is None:
                            failure = ConnectError(event.peer, event.stage, event.reason)
                            break
                    # The events end when nothing can progress: without peers to fail, say why.
                    why = connector.core.register_error
                    if failure is None and why is not None:
                        failure = UpError(f"register: {why}")
            finally:
                down["peers"] = _relayed_stats(connector, _stats(tunnel))
            nursery.cancel_scope.cancel()
    finally:
        if down["interface"]:  # the tunnel existed: say it is gone (also when cancelled)
            report("down", down)
    if failure is None and refused:
        failure = refused[0]
    if failure is not None:
        raise failure


async def _end_when_refused(
    hub: HubClient, refused: list[PunchtrioError], scope: trio.CancelScope
) -> None:
    """Stop ``up`` (with :class:`UpError`) once the hub refuses our record for good."""
    error = await hub.wait_refused()
    refused.append(UpError(f"register: the hub refused {hub.name}'s record for good: {error}"))
    scope.cancel()


def _add_static(connector: Connector, config: WgQuickConfig, tun: bool) -> None:
    from ..tunnel import add_peers, configure_interface

    assert connector.tunnel is not None
    mux: Any = connector.tunnel.device
    device = getattr(mux, "device", mux)  # the WireGuard device behind the mux
    own: Any = connector.config.interface.network
    add_peers(device, config)
    routes = [
        n
        for section in config.peers
        for n in section.allowed_ips
        if n.version != own.version or not n.subnet_of(own)
    ]
    if tun and routes:
        configure_interface(
            connector.tunnel.name, addresses=(), routes=routes, mtu=connector.config.mtu
        )


def describe(event: ConnectEvent) -> tuple[str, dict[str, Any]]:
    """Return ``(name, fields)`` for a connector event: the class name in snake_case
    (``PeerConnected`` -> ``peer_connected``) and its fields as JSON values; candidates are
    ``"<type> ip:port"`` strings (``"<type> [ip]:port"`` for IPv6), records summarised (name,
    revision, endpoints)."""
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()
    if isinstance(event, CandidatesGathered):
        fields: dict[str, Any] = {
            "candidates": [_candidate(c) for c in event.candidates],
            "mapping_varies": event.mapping_varies,
            "stun_error": event.stun_error,
        }
    elif isinstance(event, Registered):
        fields = _record(event.record)
    elif isinstance(event, PeerFound):
        fields = {"peer": event.peer, "public_key": str(event.public_key), **_record(event.record)}
    elif isinstance(event, PeerConnected):
        fields = {**_fields(event), "elapsed_ms": round(event.elapsed_ms, 1)}
        if event.relay is None:
            del fields["relay"]
    elif isinstance(event, PathChanged):
        fields = {
            "peer": event.peer,
            "from": event.old,
            "to": event.new,
            "endpoint": event.endpoint,
            "elapsed_ms": round(event.elapsed_ms, 1),
        }
        if event.relay is not None:
            fields["relay"] = event.relay
    else:
        fields = _fields(event)
        if "candidates" in fields:
            fields["candidates"] = [_candidate(c) for c in getattr(event, "candidates", ())]
    return name, fields


def _candidate(candidate: Any) -> str:
    kind = getattr(candidate.type, "value", candidate.type)
    return f"{kind} {_endpoint(candidate.address, candidate.port)}"


def _record(record: Any) -> dict[str, Any]:
    return {
        "revision": record.revision,
        "endpoints": [f"{e.type.value} {_endpoint(e.ip, e.port)}" for e in record.endpoints],
    }


def _endpoint(ip: Any, port: int) -> str:
    return format_endpoint((str(ip), port))


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _up_static(args: argparse.Namespace) -> int:
    config = load_wgquick(args.config)
    configure_logging(
        args, "up", secrets=_secrets(PrivateKey(config.interface.private_key), config, None)
    )
    name = args.interface
    if name is None:
        stem = Path(args.config).name.removesuffix(".conf")
        name = stem if _IFNAME.fullmatch(stem) else ""
    elif not _IFNAME.fullmatch(name):
        raise UsageError(f"--interface {name[:40]!r} is not a valid interface name")
    emit = _json_line if args.json else _text_line
    if args.tunnel == "userspace":
        trio.run(_run, config, name, emit)
    elif args.tunnel == "wireguard-go":
        find_wireguard_go()  # missing: one line with the fix, before anything starts
        trio.run(_run_wireguard_go, config, name, emit)
    else:
        trio.run(_run_backend, load_tunnel_backend(args.tunnel), args.tunnel, config, name, emit)
    return 0


async def _run_backend(
    backend: TunnelBackend,
    backend_name: str,
    config: WgQuickConfig,
    name: str,
    emit: Callable[[str, dict[str, Any]], None],
) -> None:
    """Run another package's backend until SIGINT/SIGTERM: ``up``, then ``down`` with its stats."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with backend(config, name=name) as tunnel:
            fields = {"interface": tunnel.name, "listen_port": tunnel.listen_port}
            emit("up", {**fields, "tunnel": backend_name})
            async for _ in signals:
                break
            stats = _stats(tunnel)
    emit("down", {"interface": tunnel.name, "peers": stats})


WIREGUARD_GO_RESTART_DELAY = 1.0
"""Seconds ``up --tunnel wireguard-go`` waits before starting wireguard-go again after it died."""


async def _run_wireguard_go(
    config: WgQuickConfig, name: str, emit: Callable[[str, dict[str, Any]], None]
) -> None:
    """Run wireguard-go until SIGINT/SIGTERM; start it again (same name, same settings) whenever
    it exits by itself, after emitting ``wireguard_go_exited``."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        while True:
            async with open_wireguard_go_tunnel(config, name=name) as tunnel:
                name = tunnel.name
                emit(
                    "up",
                    {
                        "interface": name,
                        "listen_port": tunnel.listen_port,
                        "tunnel": "wireguard-go",
                        "pid": tunnel.process.pid,
                    },
                )
                stopped = False
                async with trio.open_nursery() as nursery:

                    async def on_signal() -> None:
                        nonlocal stopped
                        async for _ in signals:
                            break
                        stopped = True
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(on_signal)
                    await tunnel.process.wait()
                    nursery.cancel_scope.cancel()
                if stopped:
                    stats = _stats(tunnel)
                    break
            emit("wireguard_go_exited", {"interface": name, "status": tunnel.process.returncode})
            await trio.sleep(WIREGUARD_GO_RESTART_DELAY)
    emit("down", {"interface": name, "peers": stats})


async def _run(config: Any, name: str, emit: Callable[[str, dict[str, Any]], None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_userspace_tunnel(
            config, name=name, on_event=lambda event: emit(type(event).__name__, _fields(event))
        ) as tunnel:
            emit("up", {"interface": tunnel.name, "listen_port": tunnel.listen_port})
            async with trio.open_nursery() as nursery:
                device: Any = tunnel.device
                await start_local_sockets(nursery, tunnel, device, None, emit, uapi=False)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
            stats = _stats(tunnel)
    emit("down", {"interface": tunnel.name, "peers": stats, "shell": _fields(tunnel.counters)})


def _relayed_stats(connector: Connector, stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-peer stats with a relayed endpoint (``"ip:port"``) shown as the relay's address and
    name."""
    for entry in stats:
        endpoint = entry.get("endpoint")
        if isinstance(endpoint, str) and ":" in endpoint:
            host, _, port = endpoint.rpartition(":")
            text, relay = connector.describe_path((host.strip("[]"), int(port)))
            if relay is not None:
                entry["endpoint"] = text
                entry["relay"] = relay
    return stats


def _stats(tunnel: Tunnel) -> list[dict[str, Any]]:
    return [_fields(s) for s in tunnel.peer_stats().values()]


def _fields(obj: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return {}


def _plain(value: object) -> Any:
    if _is_address(value):  # endpoints are always "ip:port" ("[addr]:port" for IPv6)
        assert isinstance(value, tuple)
        return _endpoint(value[0], value[1])
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    return str(value)


def _is_address(value: object) -> bool:
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int)):
        return False
    try:
        ipaddress.ip_address(value[0])
    except ValueError:
        return False
    return True


_json_line = JsonLines()


def _text_line(event: str, fields: dict[str, Any]) -> None:
    if event == "up":
        text = f"tunnel {fields['interface']} up, UDP port {fields['listen_port']}; Ctrl-C to stop"
    elif event == "down":
        text = f"tunnel {fields['interface']} down"
    else:
        details = ", ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{event}: {details}" if details else event
    sys.stdout.write(f"punchtrio: {text}\n")
    sys.stdout.flush()
