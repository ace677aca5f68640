"""The connector's Trio shell: one port (a socket per IP family), one nursery, the whole pipeline.

:class:`~punchtrio.connect.ConnectCore` decides (stages, signals, who initiates, timeouts, path
changes); this module does its I/O. The UDP sockets (IPv4 and IPv6 on one port, see
``_sockets``) are drained by
:class:`~punchtrio.tunnel.UserspaceTunnel` through a :class:`~punchtrio.mux.MuxedDevice`:
WireGuard goes to the device, STUN to a queue, relay frames to the relay shell, and probes to the
core *synchronously*, inside the tunnel's drain loop. So when a pong makes the puncher choose a
path, WireGuard's endpoint is set before the tunnel flushes that batch, and the handshake
initiation leaves at once: nothing polls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import trio

if sys.version_info < (3, 11):
    pass

from .._endpoint import format_endpoint
from .._exceptions import PunchtrioError
from ..keys import PrivateKey, PublicKey
from ..mux import Datagram, Kind, Mux, MuxedDevice, serve_mux
from ..punch import (
    BirthdaySockets,
    Candidate,
    CandidateError,
    CandidateType,
    MappingFailed,
    MappingObtained,
    PortMapEvent,
    PortMapper,
    PortMapSettings,
    Puncher,
    PunchSettings,
    default_gateway,
    gather_reflexive,
    host_candidates,
    keep_port_mapped,
    local_addresses,
    local_networks,
)
from ..relay import TurnServer
from ..rendezvous import (
    HubClient,
    NetworkSecret,
    PeerDirectory,
    PeerRecord,
    Rendezvous,
    RendezvousError,
    SignallingNotSupportedError,
    ValidationError,
    validate_name,
)
from ..tunnel import TunDevice, UserspaceTunnel
from ..wireguard import Device
from ._config import TunnelConfig
from ._core import (
    Action,
    ConnectCore,
    CoreInput,
    CorePeer,
    FetchRecord,
    Gathered,
    ListenForSignals,
    LookupFailed,
    PeerForgotten,
    PeerRecordLoaded,
    PeerRetrying,
    PeerSettled,
    RecordFound,
    Regather,
    RegisterDone,
    RegisterFailed,
    RemovePeer,
    SendSignal,
    SignalFailed,
    SignallingUnsupported,
    SignalReceived,
    WaitForRecord,
    WireGuardEvent,
)
from ._events import ConnectError, ConnectEvent, PeerConnected, PeerState, StageStarted
from ._memif import MemoryInterface
from ._mesh import MeshPolicy, follow_directory
from ._relay_choice import HubRelay, client_tls_context, relay_server, turn_server
from ._relay_shell import RelayShell, RelayTarget
from ._relays import RelayLinks
from ._sockets import (
    SocketSet,
    family_of,
    open_sockets,
    reachable_families,
    stun_servers,
    turn_addresses,
    url_addresses,
)
from ._turn_shell import TurnShell
from ._uapi_device import UapiDevice
from ._uapi_shell import UapiTunnel, open_uapi_tunnel

Address = tuple[str, int]

TunnelBackendName = Literal["userspace", "wireguard-go"]
"""Which program moves the connector's packets: punchtrio's own WireGuard, or wireguard-go."""

UNREGISTER_TIMEOUT = 5.0
"""Seconds teardown spends on deleting our record at the rendezvous before giving up."""

TURN_ALLOCATE_WAIT = 2.0
"""Seconds the first registration waits for a TURN allocation before it goes without one."""
FIRST_STUN_WAIT = 0.75
"""Seconds the first registration waits for any STUN answer before it goes without (UDP may be
blocked: the relay over TCP then starts at once); the full STUN exchange goes on after it."""


def _checked_peer_name(name: str) -> str:
    try:
        return validate_name(name, what="peer name")
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def _check_directory(rendezvous: Rendezvous, secret: NetworkSecret | None) -> None:
    """Refuse ``all_peers`` where no listing can come (one line, naming the fix)."""
    if not isinstance(rendezvous, PeerDirectory):
        raise ValueError(
            f"all_peers needs a rendezvous that lists peers (a punchtrio hub), not "
            f"{type(rendezvous).__name__}"
        )
    if isinstance(rendezvous, HubClient) and secret is None:
        raise ValueError(
            "all_peers needs the network secret: the hub lists peers only to members of a "
            "private network (network_secret=, --network-secret-file)"
        )


class Connector:
    """Connect this machine to named peers behind NATs: the whole pipeline, on one UDP port.

    - ``name``: our name at the rendezvous; ``private_key``: our WireGuard key.
    - ``rendezvous``: any :class:`~punchtrio.rendezvous.Rendezvous` (``MemoryRendezvous`` in tests
      and netsim), or a hub URL (a :class:`~punchtrio.rendezvous.HubClient` is made and kept
      alive; ``network_secret`` joins a private network). With a URL, ``hub_verify`` is its TLS
      verification (default ``True``: the system's CA store; an :class:`ssl.SSLContext` loaded
      with your own CA bundle) and ``hub_public_key`` pins the hub's key (default: trust what the
      hub says, and follow it when it changes).
    - ``tunnel``: a :class:`TunnelConfig` or just our tunnel address (``"10.99.0.1/24"``).
    - ``interface``: where decrypted packets go. ``None`` (default) creates a TUN device (root);
      a :class:`MemoryInterface` keeps them in memory (netsim, tests; the caller closes it).
    - ``stun_servers``: literal ``(ip, port)`` pairs; ``None`` (default) uses the ones the hub
      advertises in ``GET /v1/hub`` (none with other backends: then only host candidates).
    - ``peers``: names to connect to from the start; :meth:`connect` adds more.
    - ``punch``: the puncher's pace (:class:`~punchtrio.punch.PunchSettings`).
    - ``wait_timeout`` (120 s) for the peer to appear and signal; ``handshake_timeout`` (15 s) for
      the first WireGuard handshake after a path is chosen; ``stun_rto`` / ``stun_attempts``
      (0.5 s, 3) per STUN server; ``restun_interval`` (300 s) between STUN refreshes, after which
      the record is registered again if our mapping changed (a tunnel whose every path failed is
      punched again a tenth of it later, with the peer's fresh record; a lost path re-STUNs at
      once). ``retry_backoff`` (2 s): a failed peer is tried again after this, doubling up to
      60 s (:attr:`PeerFailed.retry_in <punchtrio.connect.PeerFailed.retry_in>`); ``None``
      leaves it failed.
    - ``hub_relay``: where the hub's own relay listens and the hub's public key
      (:class:`HubRelay`); ``None`` (default) uses what a hub URL advertises in ``GET /v1/hub``.
      ``relay=False`` never relays. ``relay_stream_after`` (3 s): how long a UDP binding may take
      before the relay is also tried over TCP (at once when no STUN server answered over UDP).
    - ``turn_servers``: TURN servers (:class:`~punchtrio.relay.TurnServer`: a ``turn:IP:PORT``
      URI over UDP or TCP and its credentials) to allocate a relayed candidate on, over UDP, or
      over TCP when UDP seems blocked; ``()`` (default) uses the ones a hub URL mints
      credentials for (``punchtrio hub --turn``).
    - ``socket_factory(family, type)``: makes the UDP sockets (default: the simulated host's
      ``nonblocking_socket`` inside :mod:`punchtrio.netsim`, else :class:`socket.socket`). One
      per family is bound to ``listen_port`` (AF_INET, and AF_INET6 with ``IPV6_V6ONLY``); a
      family the host lacks (the factory raises ``EAFNOSUPPORT``, or binding ``EADDRNOTAVAIL``)
      is left out, and IPv4 and IPv6 are gathered and probed only where the host has an address
      of that family, so an IPv6-only host runs on IPv6 alone.
    - ``wall_clock``: Unix time for probe timestamps and WireGuard's TAI64N.
    - ``all_peers``: a mesh: connect to every peer the rendezvous lists in our network (ourselves
      excepted), add peers as they join and remove them (their WireGuard peer and routes) as
      their records are deleted or expire (:class:`~punchtrio.connect.MeshPolicy`). Needs a
      rendezvous that lists peers (a hub, with ``network_secret``; ``MemoryRendezvous``).
      ``peers`` given as well stay, whatever the listing says.
    - ``port_mapping``: ask the gateway for a port mapping (PCP, then NAT-PMP) and publish the
      mapped endpoint as a server-reflexive candidate, refreshed while the connector runs and
      deleted when it stops (:class:`~punchtrio.punch.PortMapper`): ``True`` asks the IPv4
      default route's gateway, a string the gateway at that literal address; ``False``
      (default) never asks. ``port_mapping_settings`` tunes it
      (:class:`~punchtrio.punch.PortMapSettings`).
    - ``backend``: ``"userspace"`` (default) runs punchtrio's own WireGuard on the shared port;
      ``"wireguard-go"`` starts the wireguard-go program on a port of its own, steers WireGuard
      between the two ports with nftables, and relays through loopback proxies (root, real
      sockets: not with ``interface`` or ``socket_factory``; see ``docs/tunnel.md``).

    Run it with :func:`open_connector` (or ``await nursery.start(connector.run)``). Events arrive
    on :attr:`events`. The decisions are :class:`ConnectCore`'s; this class does the I/O. Raises
    :class:`ValueError` for invalid arguments.
    """

    def __init__(
        self,
        name: str,
        private_key: PrivateKey,
        rendezvous: Rendezvous | str,
        tunnel: TunnelConfig | str,
        *,
        peers: Iterable[str] = (),
        interface: MemoryInterface | None = None,
        stun_servers: Sequence[Address] | None = None,
        punch: PunchSettings | None = None,
        wait_timeout: float = 120.0,
        handshake_timeout: float = 15.0,
        stun_rto: float = 0.5,
        stun_attempts: int = 3,
        restun_interval: float = 300.0,
        retry_backoff: float | None = 2.0,
        network_secret: NetworkSecret | None = None,
        hub_verify: ssl.SSLContext | bool = True,
        hub_public_key: PublicKey | None = None,
        hub_relay: HubRelay | None = None,
        relay: bool = True,
        relay_stream_after: float = 3.0,
        turn_servers: Sequence[TurnServer] = (),
        socket_factory: Callable[[int, int], Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        all_peers: bool = False,
        port_mapping: bool | str = False,
        port_mapping_settings: PortMapSettings | None = None,
        backend: TunnelBackendName = "userspace",
    ) -> None:
        if backend not in ("userspace", "wireguard-go"):
            raise ValueError(f"backend {backend!r} is not 'userspace' or 'wireguard-go'")
        if backend == "wireguard-go" and (interface is not None or socket_factory is not None):
            raise ValueError(
                "the wireguard-go backend needs a real TUN device and sockets: not with "
                "interface= or socket_factory="
            )
        self.backend: TunnelBackendName = backend
        """Which program moves the packets (``"userspace"`` or ``"wireguard-go"``)."""
        self.name = name
        self.config = tunnel if isinstance(tunnel, TunnelConfig) else TunnelConfig(tunnel)
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self._own_hub = isinstance(rendezvous, str)
        self._tls_verify = hub_verify  # also for relays over TLS (the hub's, turns: servers)
        if isinstance(rendezvous, str):
            self.rendezvous: Rendezvous = HubClient(
                rendezvous,
                private_key,
                name,
                network_secret=network_secret,
                verify=hub_verify,
                hub_public_key=hub_public_key,
            )
        else:
            self.rendezvous = rendezvous
        self._hub_url = rendezvous if isinstance(rendezvous, str) else None
        self._mesh: MeshPolicy | None = None
        if all_peers:
            self._mesh = MeshPolicy(name)
            _check_directory(self.rendezvous, network_secret)
        if stun_servers is not None:
            for host, port in stun_servers:
                ipaddress.ip_address(host)  # ValueError for names: literals only
                if not 0 < port < 65536:
                    raise ValueError(f"STUN port {port} is not 1-65535")
        self._stun_servers = None if stun_servers is None else list(stun_servers)
        self._interface = interface
        self._stun_rto = stun_rto
        self._stun_attempts = stun_attempts
        self._restun_interval = restun_interval
        self._regather = trio.Event()
        self._network_secret = network_secret
        self._hub_relay = hub_relay
        self._use_relay = relay
        self._relay_stream_after = relay_stream_after
        for server in turn_servers:
            if server.uri.address is None or server.uri.secure:
                raise ValueError(
                    f"TURN server {server.uri}: the connector needs a literal IP address, over "
                    "UDP or TCP (TURN over TLS is not supported yet)"
                )
        self._turn_servers = tuple(turn_servers)
        self._turn: TurnShell | None = None
        self._turn_changed = trio.Event()
        self._turn_note: str | None = None  # why TURN is not used, when it should have been
        self._socket_factory = socket_factory
        self._wall_clock = wall_clock
        if isinstance(port_mapping, str):
            ipaddress.ip_address(port_mapping)  # ValueError for names: literals only
        self._port_mapping = port_mapping
        self._port_mapping_settings = port_mapping_settings
        self._mapped: Candidate | None = None  # the gateway's mapping of our port
        self._mapping_published: Candidate | None = None  # the one our candidates hold
        self._mapped_changed = trio.Event()
        self._first_registered = trio.Event()
        self._send_events, self.events = trio.open_memory_channel[ConnectEvent](math.inf)
        """Every :data:`~punchtrio.connect.ConnectEvent`, in order; closed when the run ends."""
        puncher = Puncher(private_key.raw, settings=punch, families=(4,), wall_clock=wall_clock)
        self._mux = Mux()
        device: Device | UapiDevice
        self._routes: MuxedDevice | UapiDevice  # where relayed paths are registered
        self._muxed: MuxedDevice | None = None  # punchtrio's WireGuard behind the mux
        if backend == "wireguard-go":
            device = self._routes = UapiDevice(
                public_key=self.public_key.raw, wall_clock=wall_clock
            )
        else:
            device = Device(
                private_key.raw,
                timers=self.config.timers,
                mtu=self.config.mtu,
                wall_clock=wall_clock,
                defer_handshakes=True,
            )
            self._muxed = self._routes = MuxedDevice(device, self._mux)
        self._links = RelayLinks(self._routes, puncher)
        self._birthday = BirthdaySockets(
            puncher,
            route=self._routes.set_route,
            deliver=self._deliver_relayed,
            base_port=lambda: self.listen_port,
            socket_factory=socket_factory,
        )
        self.core = ConnectCore(
            public_key=self.public_key,
            device=device,
            puncher=puncher,
            persistent_keepalive=self.config.persistent_keepalive,
            wait_timeout=wait_timeout,
            handshake_timeout=handshake_timeout,
            repunch_delay=restun_interval / 10,
            describe_path=self.describe_path,
            relay_status=self._relay_status,
            start=0.0,
            retry_backoff=retry_backoff,
        )
        """The decisions (:class:`ConnectCore`): stages, paths, timeouts."""
        self._relay_shell: RelayShell | None = None
        self._done: dict[str, trio.Event] = {}
        self._scopes: dict[str, list[trio.CancelScope]] = {}
        self._peer_tasks: dict[str, set[trio.CancelScope]] = {}  # every task of a peer
        self._reasons: dict[str, str] = {}  # why a peer was removed, for connect()
        self._nursery: trio.Nursery | None = None
        self.tunnel: UserspaceTunnel | UapiTunnel | None = None
        """The running tunnel (``None`` before :meth:`run` starts it)."""
        self._sock: SocketSet | None = None
        self._families: tuple[int, ...] = (4, 6)  # the IP versions we gather and probe in
        self._timer_scope: trio.CancelScope | None = None
        self._started = False
        for peer in peers:
            self._add(_checked_peer_name(peer))
        if self._mesh is not None:  # peers given by name stay, whatever the listing says
            self._mesh.pinned = frozenset(self.core.names)

    # -- public surface ----------------------------------------------------------------------

    @property
    def peers(self) -> dict[str, PeerState]:
        """A snapshot of every peer's state, by name."""
        return {name: self._state(self.core.peer(name)) for name in self.core.names}

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Our candidates as last gathered."""
        return self.core.candidates

    @property
    def mapping_varies(self) -> bool | None:
        """Whether our NAT maps per destination, as STUN last saw it."""
        return self.core.mapping_varies

    @property
    def record(self) -> PeerRecord | None:
        """Our record as the rendezvous last stored it."""
        return self.core.record

    @property
    def mux(self) -> Mux:
        """The demultiplexer of the shared port (its :attr:`~punchtrio.mux.Mux.counters` count
        what it dropped)."""
        return self._mux

    @property
    def listen_port(self) -> int:
        """The bound UDP port (0 before :meth:`run` binds it)."""
        return self._sock.port if self._sock is not None else 0

    async def connect(self, peer: str) -> PeerConnected:
        """Connect to ``peer`` (starting it if it is not one of ``peers``) and wait for the tunnel.

        Returns the :class:`PeerConnected` event. Raises :class:`ConnectError` naming the stage
        that failed (``"wait: NAME was removed: ..."`` if :meth:`remove` forgot it meanwhile),
        :class:`ValueError` for an invalid name, and :class:`RuntimeError` if the connector is
        not running.
        """
        if self._nursery is None:
            raise RuntimeError("the connector is not running: use open_connector()")
        name = _checked_peer_name(peer)
        self._add(name)
        await self._done[name].wait()
        if name not in self.core.names:
            raise ConnectError(name, "wait", f"{name} was removed: {self._removed_why(name)}")
        state = self._state(self.core.peer(name))
        if state.error is not None:
            raise state.error
        connected = self.core.peer(name).connected
        assert connected is not None
        return connected

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the pipeline until cancelled; reports started once the socket and tunnel are up.

        On exit (cancellation included) the tasks stop, the record is deleted at the rendezvous,
        and the socket and any TUN device are closed. Raises :class:`RuntimeError` if run twice,
        and :class:`~punchtrio.tunnel.TunnelError` / :class:`OSError` if the port or the TUN
        device cannot be had (nothing is left behind then).
        """
        if self._started:
            raise RuntimeError("a connector runs once")
        self._started = True
        self.core.started_at = trio.current_time()
        try:
            async with contextlib.AsyncExitStack() as stack:
                sock = self._sock = self._open_socket()
                stack.callback(sock.close)
                self._mux.route(Kind.PROBE, self._on_probe)
                stun = self._mux.open_queue(Kind.STUN)
                # The puncher probes the families there is a socket for (IPv6-only hosts: 6).
                self.core.puncher.families = frozenset(sock.families)
                if isinstance(self._routes, UapiDevice):
                    self.tunnel = await stack.enter_async_context(
                        open_uapi_tunnel(
                            self._routes,
                            self.config,
                            self._private_key.raw,
                            shared_port=sock.port,
                            on_event=self._on_wireguard,
                        )
                    )
                    # Relay frames and ChannelData on the shared port unwrap into WireGuard.
                    self._mux.route(Kind.WIREGUARD, self.tunnel.receive_datagram)
                else:
                    tun: Any = self._interface
                    if tun is None:
                        tun = stack.enter_context(self._open_tun())
                    real = sock.real
                    assert self._muxed is not None
                    self.tunnel = UserspaceTunnel(
                        self._muxed,
                        tun,
                        sock.sockets,
                        on_event=self._on_wireguard,
                        gso=real,
                        gro=real,
                    )
                try:
                    async with contextlib.AsyncExitStack() as hub:
                        if self._own_hub:
                            await hub.enter_async_context(self.rendezvous)  # type: ignore[arg-type]
                        async with trio.open_nursery() as nursery:
                            await nursery.start(self.tunnel.serve)
                            if isinstance(self.tunnel, UapiTunnel):  # no tunnel drains them
                                for one in sock.sockets:
                                    await nursery.start(serve_mux, one, self._mux)
                            self._nursery = nursery
                            nursery.start_soon(self._timer)
                            await nursery.start(self._birthday.run)
                            self._drain()  # actions queued before the run
                            task_status.started()
                            await self._pipeline(nursery, stun)
                finally:
                    if not self._own_hub:  # an own HubClient unregisters as it exits
                        with (
                            trio.CancelScope(shield=True),
                            trio.move_on_after(UNREGISTER_TIMEOUT),
                            contextlib.suppress(RendezvousError, OSError),
                        ):
                            await self.rendezvous.unregister()
        finally:
            self._nursery = None
            self._sock = None
            self._send_events.close()

    # -- the pipeline ------------------------------------------------------------------------

    async def _pipeline(
        self, nursery: trio.Nursery, stun: trio.MemoryReceiveChannel[Datagram]
    ) -> None:
        if self._port_mapping:
            nursery.start_soon(self._keep_port_mapped, stun)
        await self._gather(stun)
        try:
            record = await self._register()
        except RendezvousError as exc:
            self._feed(RegisterFailed(str(exc)))
            await trio.sleep_forever()
        if self._use_relay and await self._start_turn(nursery, stun):
            await self._gather(stun, announce=True, restun=False)
            with contextlib.suppress(RendezvousError):  # the first record stands
                record = await self._register()
        self._feed(RegisterDone(record))
        self._first_registered.set()
        nursery.start_soon(self._refresh, stun)
        if self._mesh is not None:
            assert isinstance(self.rendezvous, PeerDirectory)
            nursery.start_soon(follow_directory, self, self.rendezvous, self._mesh)
        if self._use_relay:
            await self._run_relays()
        await trio.sleep_forever()

    async def _gather(
        self,
        stun: trio.MemoryReceiveChannel[Datagram],
        *,
        announce: bool = True,
        restun: bool = True,
    ) -> None:
        if not restun:  # only our TURN candidate is new
            gathered = self.core.gathered
            assert gathered is not None
            turned = tuple(self._with_turn(self._with_mapping(self.candidates)))
            self._feed(dataclasses.replace(gathered, candidates=turned))
            return
        if announce:
            self._emit(StageStarted("stun"))
        port = self.listen_port
        exclude = () if self._interface is not None else (str(getattr(self.tunnel, "name", "")),)
        addresses = local_addresses(exclude_interfaces=exclude)
        assert self._sock is not None
        families = self._families = reachable_families(self._sock.families, addresses)
        self.core.puncher.families = frozenset(families)
        own = self.config.interface.ip
        usable = [a for a in addresses if a != own and a.version in families]
        candidates = host_candidates(port, usable)
        networks = tuple(local_networks(exclude))  # the tunnel's own interface excluded
        servers = [s for s in await self._stun_addresses() if family_of(s[0]) in families]
        error: str | None = None
        varies: bool | None = None
        if not servers:
            error = "no STUN server configured"
        else:
            first = self.core.gathered is None
            result = await gather_reflexive(
                self._sock,
                stun,
                servers,
                rto=self._stun_rto,
                rc=self._stun_attempts,
                answer_within=FIRST_STUN_WAIT if first else None,
            )
            candidates += list(result.candidates)
            varies = result.mapping_varies
            if not result.candidates:
                error = "no STUN server answered"
                if first:
                    self._regather.set()  # the full exchange once registered (a late answer re-registers)
        candidates = self._with_mapping(candidates)
        self._feed(Gathered(tuple(self._with_turn(candidates)), varies, error, networks, announce))

    def _with_mapping(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        """Our candidates with the gateway's mapping of our port (if any) first among the
        server-reflexive ones; a mapping that is gone is left out."""
        kept = [c for c in candidates if c != self._mapping_published]
        mapped = self._mapping_published = self._mapped
        if mapped is None or mapped in kept:
            return kept
        at = next((i for i, c in enumerate(kept) if c.type is not CandidateType.HOST), len(kept))
        return [*kept[:at], mapped, *kept[at:]]

    async def _keep_port_mapped(self, stun: trio.MemoryReceiveChannel[Datagram]) -> None:
        """Keep our port mapped on the gateway and publish the mapped endpoint (register again
        when it appears, moves or goes away); the session deletes the mapping when it ends."""
        gateway = self._port_mapping if isinstance(self._port_mapping, str) else None
        if gateway is None:
            with contextlib.suppress(Exception):  # no netlink (a container): no gateway
                # In a thread: importing pyroute2 takes a moment the tunnel should not wait.
                gateway = await trio.to_thread.run_sync(default_gateway)
        if gateway is None:
            return
        mapper = PortMapper(gateway, None, self.listen_port, settings=self._port_mapping_settings)

        def on_event(event: PortMapEvent) -> None:
            if isinstance(event, MappingFailed):
                return
            self._mapped = None
            if isinstance(event, MappingObtained):
                ip, port = event.external
                with contextlib.suppress(CandidateError):  # not an address a peer can use
                    self._mapped = Candidate(CandidateType.SRFLX, ip, port)
            self._mapped_changed.set()

        async def map_port() -> None:
            with contextlib.suppress(OSError):  # no route to the gateway: nothing to map
                await keep_port_mapped(mapper, on_event=on_event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(map_port)
            while True:
                await self._mapped_changed.wait()
                self._mapped_changed = trio.Event()
                await self._first_registered.wait()  # until then, the first gathering
                if self._mapping_published == self._mapped:
                    continue  # the first gathering published it
                await self._gather(stun, restun=False)
                with contextlib.suppress(RendezvousError):
                    self._feed(RegisterDone(await self._register()))

    def _with_turn(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        """Our candidates, with our TURN allocation's relayed address as the last one."""
        kept = [c for c in candidates if c.type is not CandidateType.RELAY]
        relayed = self._turn.candidate if self._turn is not None else None
        return kept if relayed is None else [*kept, relayed]

    async def _stun_addresses(self) -> list[Address]:
        if self._stun_servers is not None:
            return self._stun_servers
        info = getattr(self.rendezvous, "hub_info", None)
        if info is None and isinstance(self.rendezvous, HubClient):
            with contextlib.suppress(RendezvousError):
                await self.rendezvous.lookup(self.name)  # any signed call fetches GET /v1/hub
            info = self.rendezvous.hub_info
        if info is None:
            return []
        entries = [(e.ip, e.port, e.family) for e in info.stun]
        hosts = await self._hub_hosts() if any(ip is None for ip, _, _ in entries) else {}
        return stun_servers(entries, hosts)

    async def _hub_hosts(self) -> dict[int, str]:
        """The hub host's address of each family (a literal, or what the name resolves to)."""
        return await url_addresses(self._hub_url)

    async def _register(self) -> PeerRecord:
        endpoints = []
        for candidate in self.candidates[:16]:
            with contextlib.suppress(ValueError, PunchtrioError):
                endpoints.append(candidate.to_endpoint())
        return await self.rendezvous.register(endpoints, [self.config.allowed_ip])

    async def _refresh(self, stun: trio.MemoryReceiveChannel[Datagram]) -> None:
        """Re-STUN now and then, and when the core asks (a path was lost); register again when
        our mapping changed."""
        while True:
            with trio.move_on_after(self._restun_interval):
                await self._regather.wait()
            self._regather = trio.Event()
            before = {c.endpoint for c in self.candidates}
            await self._gather(stun, announce=False)
            if {c.endpoint for c in self.candidates} != before:
                with contextlib.suppress(RendezvousError):
                    self._feed(RegisterDone(await self._register()))

    # -- driving the core --------------------------------------------------------------------

    def _add(self, name: str) -> None:
        if name not in self._done:
            self._done[name] = trio.Event()
            self._scopes[name] = []
            self.core.add_peer(name, trio.current_time() if self._nursery is not None else 0.0)
            if self._nursery is not None:
                self._drain()

    def _feed(self, item: CoreInput) -> None:
        self.core.handle(item, trio.current_time())
        self._drain()

    def _drain(self) -> None:
        """Send the probes the core queued, start its actions, emit its events, re-arm its timer."""
        core = self.core
        routed = self._routes.routed
        sock = self._sock
        for data, address in core.datagrams_to_send():
            route = routed(address)
            if route is not None:
                route(data)
            elif sock is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(data, address)
        self._birthday.flush()  # birthday probes on extra sockets, and opening or closing them
        if self._nursery is not None:
            while (action := core.next_action()) is not None:
                self._act(action)
        while (event := core.next_event()) is not None:
            self._emit(event)
        if core.stalled and (self._mesh is None or core.register_error is not None):
            self._send_events.close()  # nothing can progress: the events above say why
        if self._timer_scope is not None:
            deadline = core.get_timer()
            self._timer_scope.deadline = math.inf if deadline is None else deadline

    def _act(self, action: Action) -> None:
        assert self._nursery is not None
        if isinstance(action, PeerSettled):
            for scope in self._scopes[action.peer]:
                scope.cancel()
            self._done[action.peer].set()
        elif isinstance(action, PeerForgotten):
            if action.public_key is not None:
                self._links.remove_peer(action.public_key)
            for scope in self._peer_tasks.pop(action.peer, ()):
                scope.cancel()
            self._scopes.pop(action.peer, None)
            done = self._done.pop(action.peer, None)
            if done is not None:
                done.set()  # connect() waiting on it learns that it left
        elif isinstance(action, PeerRetrying):
            if self._done[action.peer].is_set():
                self._done[action.peer] = trio.Event()
        elif isinstance(action, Regather):
            self._regather.set()
        elif isinstance(action, PeerRecordLoaded):
            self._links.add_peer(action.public_key.raw, trio.current_time())
            if self._turn is not None:
                self._turn.add_peer(action.candidates)
        elif isinstance(action, WaitForRecord):
            self._nursery.start_soon(self._lookup, action.peer, True)
        elif isinstance(action, FetchRecord):
            self._nursery.start_soon(self._lookup, action.peer, False)
        elif isinstance(action, ListenForSignals):
            self._nursery.start_soon(self._listen, action.peer)
        elif isinstance(action, SendSignal):
            self._nursery.start_soon(self._send_signal, action.peer, action.data)

    def add(self, peer: str) -> None:
        """Start connecting to ``peer`` without waiting (see :meth:`connect`); nothing happens
        if it is known. Raises :class:`ValueError` for an invalid name."""
        self._add(_checked_peer_name(peer))

    def remove(self, peer: str, *, reason: str = "removed by the caller") -> None:
        """Forget ``peer``: its WireGuard peer and allowed IPs, its path, timers and tasks
        (a :class:`~punchtrio.connect.PeerRemoved` event follows; nothing happens for an unknown
        peer). :meth:`connect` may add it again later. Raises :class:`ValueError` for an invalid
        name."""
        name = _checked_peer_name(peer)
        self._reasons[name] = reason
        self._feed(RemovePeer(name, reason))

    def _removed_why(self, name: str) -> str:
        return self._reasons.get(name, "removed")

    async def _lookup(self, peer: str, wait: bool) -> None:
        with self._peer_scope(peer, wait):
            try:
                if wait:
                    record = await self.rendezvous.wait_for_peer(peer)
                else:
                    record = await self.rendezvous.lookup(peer)
            except RendezvousError as exc:
                self._feed(LookupFailed(peer, str(exc)))
                return
            self._feed(RecordFound(peer, record))

    async def _listen(self, peer: str) -> None:
        with self._peer_scope(peer, False):  # for the peer's whole life: it may restart
            try:
                while True:
                    message = await self.rendezvous.receive_signal(peer)
                    self._feed(SignalReceived(peer, message.data))
            except SignallingNotSupportedError:
                self._feed(SignallingUnsupported(peer))
            except RendezvousError as exc:
                self._feed(SignalFailed(peer, str(exc)))

    async def _send_signal(self, peer: str, data: str) -> None:
        # Not a wait-stage call: a connected peer is signalled too (it restarted, or we moved),
        # so the send must outlive the peer's settling; removing the peer still cancels it.
        with self._peer_scope(peer, False):
            try:
                await self.rendezvous.send_signal(peer, data)
            except SignallingNotSupportedError:
                self._feed(SignallingUnsupported(peer))
            except RendezvousError as exc:
                self._feed(SignalFailed(peer, str(exc)))

    @contextlib.contextmanager
    def _peer_scope(self, peer: str, waiting: bool) -> Iterator[None]:
        """A cancel scope for one of the peer's rendezvous calls: the wait-stage ones end when
        the peer is settled (connected or failed)."""
        with trio.CancelScope() as scope:
            if peer not in self._done:  # removed before this task began
                scope.cancel()
                yield
                return
            tasks = self._peer_tasks.setdefault(peer, set())
            tasks.add(scope)
            if waiting:
                if self._done[peer].is_set():
                    scope.cancel()
                self._scopes[peer].append(scope)
            try:
                yield
            finally:
                tasks.discard(scope)
                if waiting and peer in self._scopes:
                    self._scopes[peer].remove(scope)

    async def _timer(self) -> None:
        while True:
            deadline = self.core.get_timer()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self.core.handle_timer(trio.current_time())
            self._drain()

    # Called synchronously inside the tunnel's drain loop: a pong that chooses a path sets
    # WireGuard's endpoint before the tunnel flushes the batch, so the handshake leaves at once.

    def _on_probe(self, data: bytes, addr: Address, now: float) -> None:
        self.core.receive_probe(data, addr, now)
        self._drain()

    def _on_wireguard(self, event: object) -> None:
        self.core.handle(WireGuardEvent(event), trio.current_time())
        self._drain()

    # -- relays ------------------------------------------------------------------------------

    async def _run_relays(self) -> None:
        """Bind to the hub's relay, if there is one (it carries peers no direct path reaches)."""
        target = await self._relay_target()
        if target is None:
            return
        shell = self._relay_shell = RelayShell(
            self._links,
            self._mux,
            self._sock,
            private_key=self._private_key.raw,
            network_secret=self._network_secret,
            wall_clock=self._wall_clock,
            deliver=self._deliver_relayed,
            changed=self._drain,
        )
        self._mux.route(Kind.RELAY, shell.on_datagram)
        blocked = not any(c.type is CandidateType.SRFLX for c in self.candidates)
        await shell.run(target, stream_after=self._relay_stream_after, udp_blocked=blocked)

    async def _relay_target(self) -> RelayTarget | None:
        """Where to bind at the hub's relay: the address of the first family where STUN was
        answered (UDP gets through), else of the first family we have (:func:`relay_server`)."""
        given = self._hub_relay
        if given is not None:
            relays, key = (given.address, *given.others), given.public_key
            hosts = {family_of(given.host): given.host} if given.host else None
        else:
            info = getattr(self.rendezvous, "hub_info", None)
            if info is None or not info.relays:
                return None
            relays, key, hosts = info.relays, info.public_key, None
        if hosts is None:
            hosts = await self._hub_hosts() if any(r.ip is None for r in relays) else {}
        answered = {family_of(c.address) for c in self.candidates if c.type is CandidateType.SRFLX}
        entries = [(r.ip, r.port, r.family) for r in relays]
        chosen = relay_server(entries, self._families, hosts, answered=answered)
        if chosen is None:
            return None
        index, server = chosen
        name = urlsplit(self._hub_url or "").hostname or server[0]
        tls = client_tls_context(self._tls_verify) if relays[index].tls else None
        return RelayTarget(key.raw, server, server, tls, name)

    async def _start_turn(
        self, nursery: trio.Nursery, stun: trio.MemoryReceiveChannel[Datagram]
    ) -> bool:
        """Allocate on the first usable TURN server (ours, or minted by the hub); return whether
        we got a relayed address (within :data:`TURN_ALLOCATE_WAIT`)."""
        servers = self._turn_servers
        if not servers and isinstance(self.rendezvous, HubClient):
            info = self.rendezvous.hub_info
            if info is not None and info.turn:
                try:
                    servers = await self.rendezvous.turn_servers()
                except RendezvousError as exc:  # no TURN then; the rest goes on
                    self._turn_note = f"the hub gave no TURN credentials: {exc}"
                    return False
        blocked = not any(c.type is CandidateType.SRFLX for c in self.candidates)
        chosen = turn_server(await turn_addresses(servers), self._families, udp_blocked=blocked)
        if chosen is None:
            return False
        server, address = chosen
        turn = self._turn = TurnShell(
            server,
            address,
            tls=client_tls_context(self._tls_verify) if server.uri.secure else None,
            sock=self._sock,
            mux=self._mux,
            device=self._routes,
            puncher=self.core.puncher,
            changed=self._turn_moved,
            deliver=self._deliver_relayed,
        )
        if turn.transport == "udp":
            self._mux.route(Kind.STUN, turn.on_datagram, source=address)
            self._mux.route(Kind.CHANNEL_DATA, turn.on_datagram, source=address)
        nursery.start_soon(turn.run)
        for name in self.core.names:  # records that arrived before the allocation began
            turn.add_peer(self.core.peer(name).candidates)
        with trio.move_on_after(TURN_ALLOCATE_WAIT):
            await turn.allocated.wait()
        nursery.start_soon(self._follow_turn, turn, stun)
        if not self._turn_servers:  # minted by the hub: fetch fresh ones before they expire
            nursery.start_soon(self._renew_turn, turn)
        return turn.relayed is not None

    def _turn_moved(self) -> None:
        """Our relayed address appeared, changed or went away: publish what we have now."""
        self._drain()
        self._turn_changed.set()

    async def _follow_turn(
        self, turn: TurnShell, stun: trio.MemoryReceiveChannel[Datagram]
    ) -> None:
        published = turn.relayed
        while True:
            await self._turn_changed.wait()
            self._turn_changed = trio.Event()
            if turn.relayed == published or self.core.record is None:
                continue
            published = turn.relayed
            await self._gather(stun, restun=False)
            with contextlib.suppress(RendezvousError):
                self._feed(RegisterDone(await self._register()))

    async def _renew_turn(self, turn: TurnShell) -> None:
        """Hub-minted TURN credentials expire (``ttl``): fetch new ones half-way through."""
        assert isinstance(self.rendezvous, HubClient)
        ttl = turn.server.ttl
        while True:
            await trio.sleep(max(60.0, ttl / 2))
            with contextlib.suppress(RendezvousError):
                for server in await self.rendezvous.turn_servers():
                    if server.uri == turn.server.uri:
                        turn.update_credentials(server.credentials)
                        ttl = server.ttl

    def _deliver_relayed(self, data: bytes, source: Address) -> None:
        if isinstance(self.tunnel, UapiTunnel):  # probes to the core, WireGuard to wireguard-go
            self._mux.receive_datagram(data, source, trio.current_time())
        elif self.tunnel is not None:
            self.tunnel.receive_relayed(data, source)

    def describe_path(self, address: Address) -> tuple[str, str | None]:
        """Return ``(endpoint text, relay name or None)`` for an address WireGuard sends to.

        A relayed path is named internally by a virtual address (240.0.0.0/4) or a TURN
        relayed address; this gives what a person should see: the relay server's ``"ip:port"``
        and the relay's name (``"hub/udp"``, ``"hub/tcp"``, a TURN URI). Any other address is
        returned as ``"ip:port"`` with ``None``.
        """
        link = self._links.link_of(address)
        if link is not None:
            return format_endpoint(link.server), f"{link.name}/{link.transport}"
        turn = self._turn
        if turn is not None and turn.owns(address):
            return format_endpoint(turn.address), turn.name
        return format_endpoint(address), None

    def _relay_status(self) -> str:
        """Why no relay carried the path either, in one line (for a punch failure)."""
        if not self._use_relay:
            return "relaying is turned off"
        links = self._links.links
        turn = self._turn
        if not links and turn is None and self._turn_note is None:
            return "no relay is available (the hub runs none; start it with --relay)"
        errors = [link.error for link in links if link.error]
        if turn is not None and turn.error:
            errors.append(turn.error)
        if self._turn_note is not None:
            errors.append(self._turn_note)
        return errors[0] if errors else "the hub's relay did not carry the probes either"

    # -- plumbing ----------------------------------------------------------------------------

    def _state(self, peer: CorePeer) -> PeerState:
        error = None if peer.error is None else ConnectError(peer.name, *peer.error)
        return PeerState(
            peer.name,
            peer.stage,
            peer.public_key,
            peer.path,
            peer.endpoint,
            error,
            peer.relay,
            peer.direct_error if peer.path == "relay" else None,
        )

    def _emit(self, event: ConnectEvent) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send_events.send_nowait(event)

    def _open_socket(self) -> SocketSet:
        factory = self._socket_factory
        if factory is None:
            # No simulation runs unless punchtrio.netsim was imported: don't import it here.
            netsim = sys.modules.get("punchtrio.netsim")
            host = netsim.current_host() if netsim is not None else None
            factory = host.nonblocking_socket if host is not None else socket.socket
        return open_sockets(factory, self.config.listen_port)

    def _open_tun(self) -> TunDevice:
        from ..tunnel import configure_interface

        tun = TunDevice(self.config.interface_name)
        try:
            configure_interface(
                tun.name, addresses=[self.config.interface], routes=[], mtu=self.config.mtu
            )
        except BaseException:
            tun.close()
            raise
        return tun
