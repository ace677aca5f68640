"""The connector: the whole pipeline (STUN, rendezvous, punch, WireGuard) on one socket, in one nursery.

The pipeline's protocol cores are sans-IO (:class:`~punchtrio.punch.Puncher`,
:class:`~punchtrio.wireguard.Device`, the STUN gatherer); this module is their Trio shell. The one
UDP socket is drained by :class:`~punchtrio.tunnel.UserspaceTunnel` through a
:class:`~punchtrio.mux.MuxedDevice`: WireGuard goes to the device, STUN to a queue, and probes to
the puncher *synchronously*, inside the tunnel's drain loop. So when a pong makes the puncher choose
a path, WireGuard's endpoint is set before the tunnel flushes that batch, and the handshake
initiation leaves at once: nothing polls.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

from .._exceptions import PunchtrioError
from ..keys import PrivateKey, PublicKey
from ..mux import Datagram, Kind, Mux, MuxedDevice
from ..punch import (
    Candidate,
    CandidateError,
    Puncher,
    PunchEvent,
    PunchSettings,
    gather_reflexive,
    host_candidates,
    local_addresses,
    local_networks,
)
from ..punch import PathChosen as _PunchPathChosen
from ..punch import PathLost as _PunchPathLost
from ..punch import PunchFailed as _PunchFailed
from ..rendezvous import (
    HubClient,
    NetworkSecret,
    PeerRecord,
    Rendezvous,
    RendezvousError,
    SignallingNotSupportedError,
    ValidationError,
    validate_name,
)
from ..tunnel import DEFAULT_MTU, TunDevice, UserspaceTunnel
from ..wireguard import ConfigError, Device, PeerConfig, Timers
from ..wireguard import HandshakeCompleted as _WgHandshakeCompleted
from ._events import (
    CandidatesGathered,
    ConnectEvent,
    HandshakeCompleted,
    PathChosen,
    PathKind,
    PathLost,
    PeerConnected,
    PeerFailed,
    PeerFound,
    PunchStarted,
    Registered,
    Stage,
    StageStarted,
)
from ._memif import MemoryInterface

Address = tuple[str, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

SIGNAL_PREFIX = "punchtrio-punch/1"
"""First word of the "punch now" signal: ``punchtrio-punch/1 <sender's revision> <nat>``."""

UNREGISTER_TIMEOUT = 5.0
"""Seconds teardown spends on deleting our record at the rendezvous before giving up."""

_NAT_WORDS = {True: "varies", False: "fixed", None: "unknown"}


class ConnectError(PunchtrioError):
    """Connecting to ``peer`` failed at ``stage`` (one of :data:`~punchtrio.connect.STAGES`).

    ``str(error)`` is one line, ``"<stage>: <reason>"``, e.g. ``"punch: no path to bob after
    8.5 s: both NATs map per destination; relaying arrives in a later release"``. The CLI exits
    with :attr:`exit_code` 8.
    """

    exit_code = 8

    def __init__(self, peer: str, stage: Stage, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.peer = peer
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class TunnelConfig:
    """The tunnel's own settings (wg-punch's "Tunnel with its config").

    ``address``: our address inside the tunnel with its prefix (``"10.99.0.1/24"``); we register
    its single address (/32 or /128) as our allowed IPs, and on a TUN device the prefix is routed
    to the tunnel. ``listen_port``: the one UDP port for WireGuard, STUN and probes (0: any).
    ``mtu`` of the TUN device; ``interface_name`` (``""``: the kernel picks ``tunN``);
    ``persistent_keepalive`` seconds between WireGuard keepalives that hold the NAT mapping (also
    what starts the handshake the moment a path is chosen); ``timers`` the WireGuard timers.
    Raises :class:`ValueError` for a bad address or port.
    """

    address: IPInterface | str
    listen_port: int = 51820
    mtu: int = DEFAULT_MTU
    interface_name: str = ""
    persistent_keepalive: float = 25.0
    timers: Timers = field(default_factory=Timers)

    def __post_init__(self) -> None:
        address = ipaddress.ip_interface(self.address)
        object.__setattr__(self, "address", address)
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"listen port {self.listen_port} is not 0-65535")
        if not 1 <= self.persistent_keepalive <= 65535:
            raise ValueError("persistent_keepalive must be 1-65535 seconds")

    @property
    def interface(self) -> IPInterface:
        """``address`` as an :class:`ipaddress.IPv4Interface` / ``IPv6Interface``."""
        assert not isinstance(self.address, str)
        return self.address

    @property
    def allowed_ip(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The single-address network we register as our allowed IPs."""
        ip = self.interface.ip
        return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


@dataclass(frozen=True)
class PeerState:
    """A snapshot of one peer: the ``stage`` it is in (or reached), its WireGuard ``public_key``
    once found, the chosen ``path`` and ``endpoint``, and the ``error`` if it failed."""

    name: str
    stage: Stage | None = None
    public_key: PublicKey | None = None
    path: PathKind | None = None
    endpoint: str | None = None
    error: ConnectError | None = None

    @property
    def connected(self) -> bool:
        """Whether the tunnel to this peer is up."""
        return self.stage == "established" and self.error is None


@dataclass
class _Peer:
    name: str
    state: PeerState
    done: trio.Event = field(default_factory=trio.Event)
    handshake: trio.Event = field(default_factory=trio.Event)
    outcome: tuple[trio.MemorySendChannel[PunchEvent], trio.MemoryReceiveChannel[PunchEvent]] = (
        field(default_factory=lambda: trio.open_memory_channel[PunchEvent](math.inf))
    )
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    key: bytes | None = None
    candidates: tuple[Candidate, ...] = ()
    their_nat: bool | None = None
    connected: PeerConnected | None = None


def _checked_peer_name(name: str) -> str:
    try:
        return validate_name(name, what="peer name")
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def _candidates(record: PeerRecord) -> tuple[Candidate, ...]:
    candidates = []
    for endpoint in record.endpoints:
        with contextlib.suppress(CandidateError, ValueError):
            candidates.append(Candidate.from_endpoint(endpoint))
    return tuple(candidates)


def _format(endpoint: Address) -> str:
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _explain(peer: str, ours: bool | None, theirs: bool | None) -> str:
    if ours and theirs:
        return "both NATs map per destination"
    if ours:
        return f"our NAT maps per destination and {peer}'s NAT filters what it lets in"
    if theirs:
        return f"{peer}'s NAT maps per destination and ours filters what it lets in"
    return "no probe got through the NATs between us"


class Connector:
    """Connect this machine to named peers behind NATs: the whole pipeline, on one UDP socket.

    - ``name``: our name at the rendezvous; ``private_key``: our WireGuard key.
    - ``rendezvous``: any :class:`~punchtrio.rendezvous.Rendezvous` (``MemoryRendezvous`` in tests
      and netsim), or a hub URL (a :class:`~punchtrio.rendezvous.HubClient` is made and kept
      alive; ``network_secret`` joins a private network).
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
      the record is registered again if our mapping changed.
    - ``socket_factory(family, type)``: makes the UDP socket (default: the simulated host's
      ``nonblocking_socket`` inside :mod:`punchtrio.netsim`, else :class:`socket.socket`).
    - ``wall_clock``: Unix time for probe timestamps and WireGuard's TAI64N.

    Run it with :func:`open_connector` (or ``await nursery.start(connector.run)``). Events arrive
    on :attr:`events`. Raises :class:`ValueError` for invalid arguments.
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
        network_secret: NetworkSecret | None = None,
        socket_factory: Callable[[int, int], Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.config = tunnel if isinstance(tunnel, TunnelConfig) else TunnelConfig(tunnel)
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self._own_hub = isinstance(rendezvous, str)
        if isinstance(rendezvous, str):
            self.rendezvous: Rendezvous = HubClient(
                rendezvous, private_key, name, network_secret=network_secret
            )
        else:
            self.rendezvous = rendezvous
        self._hub_url = rendezvous if isinstance(rendezvous, str) else None
        if stun_servers is not None:
            for host, port in stun_servers:
                ipaddress.ip_address(host)  # ValueError for names: literals only
                if not 0 < port < 65536:
                    raise ValueError(f"STUN port {port} is not 1-65535")
        self._stun_servers = None if stun_servers is None else list(stun_servers)
        self._interface = interface
        self._settings = punch
        self._wait_timeout = wait_timeout
        self._handshake_timeout = handshake_timeout
        self._stun_rto = stun_rto
        self._stun_attempts = stun_attempts
        self._restun_interval = restun_interval
        self._socket_factory = socket_factory
        self._wall_clock = wall_clock
        self._send_events, self.events = trio.open_memory_channel[ConnectEvent](math.inf)
        """Every :data:`~punchtrio.connect.ConnectEvent`, in order; closed when the run ends."""
        self._peers: dict[str, _Peer] = {}
        self._by_key: dict[bytes, _Peer] = {}
        self._nursery: trio.Nursery | None = None
        for peer in peers:
            self._add(_checked_peer_name(peer))
        self.tunnel: UserspaceTunnel | None = None
        """The running tunnel (``None`` before :meth:`run` starts it)."""
        self.candidates: tuple[Candidate, ...] = ()
        """Our candidates as last registered."""
        self.mapping_varies: bool | None = None
        """Whether our NAT maps per destination, as STUN last saw it."""
        self.record: PeerRecord | None = None
        """Our record as the rendezvous last stored it."""
        self._device = Device(
            private_key.raw, timers=self.config.timers, mtu=self.config.mtu, wall_clock=wall_clock
        )
        self._puncher = Puncher(
            private_key.raw, settings=punch, families=(4,), wall_clock=wall_clock
        )
        self._mux = Mux()
        self._sock: Any = None
        self._timer_scope: trio.CancelScope | None = None
        self._networks: list[IPNetwork] = []  # our interfaces' prefixes: what "lan" means
        self._gathered = trio.Event()
        self._registered = trio.Event()
        self._register_error: str | None = None
        self._started = False
        self._t0 = 0.0

    # -- public surface ----------------------------------------------------------------------

    @property
    def peers(self) -> dict[str, PeerState]:
        """A snapshot of every peer's state, by name."""
        return {name: peer.state for name, peer in self._peers.items()}

    @property
    def listen_port(self) -> int:
        """The bound UDP port (0 before :meth:`run` binds it)."""
        return int(self._sock.getsockname()[1]) if self._sock is not None else 0

    async def connect(self, peer: str) -> PeerConnected:
        """Connect to ``peer`` (starting it if it is not one of ``peers``) and wait for the tunnel.

        Returns the :class:`PeerConnected` event. Raises :class:`ConnectError` naming the stage
        that failed, :class:`ValueError` for an invalid name, and :class:`RuntimeError` if the
        connector is not running.
        """
        if self._nursery is None:
            raise RuntimeError("the connector is not running: use open_connector()")
        state = self._add(_checked_peer_name(peer))
        await state.done.wait()
        if state.state.error is not None:
            raise state.state.error
        assert state.connected is not None
        return state.connected

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
        self._t0 = trio.current_time()
        try:
            with contextlib.ExitStack() as stack:
                sock = self._open_socket()
                stack.callback(sock.close)
                self._sock = sock
                tun: Any = self._interface
                if tun is None:
                    tun = stack.enter_context(self._open_tun())
                self._mux.route(Kind.PROBE, self._on_probe)
                stun = self._mux.open_queue(Kind.STUN)
                self.tunnel = UserspaceTunnel(
                    MuxedDevice(self._device, self._mux),
                    tun,
                    [sock],
                    on_event=self._on_wireguard,
                    gso=isinstance(sock, socket.socket),
                    gro=isinstance(sock, socket.socket),
                )
                try:
                    async with contextlib.AsyncExitStack() as hub:
                        if self._own_hub:
                            await hub.enter_async_context(self.rendezvous)  # type: ignore[arg-type]
                        async with trio.open_nursery() as nursery:
                            await nursery.start(self.tunnel.serve)
                            nursery.start_soon(self._punch_timer)
                            self._nursery = nursery
                            for peer in self._peers.values():
                                nursery.start_soon(self._connect_peer, peer)
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
        await self._gather(stun)
        self._emit(StageStarted("register"))
        self._gathered.set()  # peers start waiting for their records while we register
        try:
            await self._register()
        except RendezvousError as exc:
            self._register_error = f"the rendezvous refused or could not be reached: {exc}"
            for peer in self._peers.values():
                peer.scope.cancel()
        self._registered.set()
        if self._register_error is None:
            nursery.start_soon(self._refresh, stun)
        await trio.sleep_forever()

    async def _gather(
        self, stun: trio.MemoryReceiveChannel[Datagram], *, announce: bool = True
    ) -> None:
        if announce:
            self._emit(StageStarted("stun"))
        port = self.listen_port
        exclude = () if self._interface is not None else (str(getattr(self.tunnel, "name", "")),)
        addresses = local_addresses(exclude_interfaces=exclude)
        own = self.config.interface.ip
        candidates = host_candidates(port, [a for a in addresses if a != own])
        self._networks = local_networks(exclude)  # the tunnel's own interface excluded
        servers = await self._stun_addresses()
        error: str | None = None
        varies: bool | None = None
        if not servers:
            error = "no STUN server configured"
        else:
            result = await gather_reflexive(
                self._sock, stun, servers, rto=self._stun_rto, rc=self._stun_attempts
            )
            candidates += list(result.candidates)
            varies = result.mapping_varies
            if not result.candidates:
                error = "no STUN server answered"
        self.candidates = tuple(candidates)
        self.mapping_varies = varies
        self._emit(CandidatesGathered(self.candidates, varies, error))

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
        servers: list[Address] = []
        for entry in info.stun:
            if entry.ip is not None:
                servers.append((str(entry.ip), entry.port))
                continue
            host = await self._hub_host()
            if host is not None:
                servers.append((host, entry.port))
        return servers

    async def _hub_host(self) -> str | None:
        host = urlsplit(self._hub_url or "").hostname or ""
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            if not host:
                return None
            try:  # in a worker thread: a slow resolver must not stall the tunnel
                return await trio.to_thread.run_sync(
                    socket.gethostbyname, host, abandon_on_cancel=True
                )
            except (OSError, UnicodeError):  # unresolvable, or a label too long for IDNA
                return None

    async def _register(self) -> None:
        endpoints = []
        for candidate in self.candidates[:16]:
            with contextlib.suppress(ValueError, PunchtrioError):
                endpoints.append(candidate.to_endpoint())
        self.record = await self.rendezvous.register(endpoints, [self.config.allowed_ip])
        self._emit(Registered(self.record))
        for peer in self._peers.values():
            if peer.state.stage is None:
                self._set(peer, stage="register")

    async def _refresh(self, stun: trio.MemoryReceiveChannel[Datagram]) -> None:
        """Re-STUN now and then; register again when our mapping changed."""
        while True:
            await trio.sleep(self._restun_interval)
            before = {c.endpoint for c in self.candidates}
            await self._gather(stun, announce=False)
            if {c.endpoint for c in self.candidates} != before:
                with contextlib.suppress(RendezvousError):
                    await self._register()

    def _add(self, name: str) -> _Peer:
        peer = self._peers.get(name)
        if peer is None:
            peer = self._peers[name] = _Peer(name, PeerState(name))
            if self._nursery is not None:
                self._nursery.start_soon(self._connect_peer, peer)
        return peer

    async def _connect_peer(self, peer: _Peer) -> None:
        try:
            await self._gathered.wait()
            record = await self._wait(peer)
            await self._punch(peer, record)
            await self._handshake(peer)
        except ConnectError as exc:
            self._set(peer, error=exc)
            self._emit(PeerFailed(peer.name, exc.stage, exc.reason))
            peer.done.set()
            return
        self._set(peer, stage="established")
        assert peer.state.path is not None
        assert peer.state.endpoint is not None
        peer.connected = PeerConnected(
            peer.name,
            peer.state.path,
            peer.state.endpoint,
            round((trio.current_time() - self._t0) * 1000, 3),
        )
        self._emit(peer.connected)
        peer.done.set()
        await self._keep(peer)

    async def _wait(self, peer: _Peer) -> PeerRecord:
        """Stage "wait": the peer's record, then its "punch now" signal."""
        self._set(peer, stage="wait")
        self._emit(StageStarted("wait", peer.name))
        with trio.move_on_after(self._wait_timeout):
            with peer.scope:  # cancelled if our own registration fails
                try:
                    record = await self.rendezvous.wait_for_peer(peer.name)
                except RendezvousError as exc:
                    raise ConnectError(
                        peer.name, "wait", f"looking up {peer.name}: {exc}"
                    ) from None
                await self._registered.wait()
            if self._register_error is not None:
                raise ConnectError(peer.name, "register", self._register_error)
            key = record.public_key
            if key == self.public_key:
                raise ConnectError(peer.name, "wait", f"{peer.name} has our own public key")
            if peer.key is None:
                try:
                    self._device.add_peer(
                        PeerConfig(
                            key.raw,
                            allowed_ips=record.allowed_ips,
                            persistent_keepalive=self.config.persistent_keepalive,
                        )
                    )
                except ConfigError as exc:
                    raise ConnectError(peer.name, "wait", f"{peer.name}'s record: {exc}") from None
                self._puncher.add_peer(key.raw)
                peer.key = key.raw
                self._by_key[key.raw] = peer
            self._set(peer, public_key=key)
            record = await self._synchronise(peer, record)
            self._emit(PeerFound(peer.name, key, record))
            return record
        raise ConnectError(
            peer.name,
            "wait",
            f"{peer.name} did not appear at the rendezvous within {self._wait_timeout:g} s",
        )

    async def _synchronise(self, peer: _Peer, record: PeerRecord) -> PeerRecord:
        """Tell the peer we are ready and wait until it says so too ("punch now")."""
        assert self.record is not None
        mine = f"{SIGNAL_PREFIX} {self.record.revision} {_NAT_WORDS[self.mapping_varies]}"
        failed: list[RendezvousError] = []

        async def send(cancel: trio.CancelScope) -> None:
            try:
                await self.rendezvous.send_signal(peer.name, mine)
            except RendezvousError as exc:
                failed.append(exc)
                cancel.cancel()

        try:
            # Sending and listening at once: the peer's signal may already be on its way.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, nursery.cancel_scope)
                while True:
                    message = await self.rendezvous.receive_signal(peer.name)
                    words = message.data.split(" ")
                    if len(words) != 3 or words[0] != SIGNAL_PREFIX or not words[1].isdigit():
                        continue  # not ours, or malformed: never trusted
                    revision = int(words[1])
                    if revision < record.revision:
                        continue  # left over from an earlier run of the peer
                    peer.their_nat = {"varies": True, "fixed": False}.get(words[2])
                    if revision > record.revision:
                        record = await self.rendezvous.lookup(peer.name)
                    break
        except SignallingNotSupportedError:
            return record  # punch at once; triggered checks make up for the unsynchronised start
        except RendezvousError as exc:
            failed.append(exc)
        if failed and not isinstance(failed[0], SignallingNotSupportedError):
            raise ConnectError(peer.name, "wait", f"signalling {peer.name} failed: {failed[0]}")
        return record

    async def _punch(self, peer: _Peer, record: PeerRecord) -> None:
        peer.candidates = _candidates(record)
        self._set(peer, stage="punch")
        self._emit(StageStarted("punch", peer.name))
        self._emit(PunchStarted(peer.name, peer.candidates))
        assert peer.key is not None
        started = trio.current_time()
        self._start_punch(peer)
        outcome = await peer.outcome[1].receive()
        if isinstance(outcome, _PunchFailed):
            elapsed = trio.current_time() - started
            why = _explain(peer.name, self.mapping_varies, peer.their_nat)
            raise ConnectError(
                peer.name,
                "punch",
                f"no path to {peer.name} after {elapsed:.1f} s: {why}; "
                "relaying arrives in a later release",
            )

    async def _handshake(self, peer: _Peer) -> None:
        self._set(peer, stage="handshake")
        self._emit(StageStarted("handshake", peer.name))
        with trio.move_on_after(self._handshake_timeout):
            await peer.handshake.wait()
            return
        raise ConnectError(
            peer.name,
            "handshake",
            f"no WireGuard handshake with {peer.name} at {peer.state.endpoint} "
            f"within {self._handshake_timeout:g} s",
        )

    async def _keep(self, peer: _Peer) -> None:
        """After the tunnel is up: when a lost path cannot be found again, fetch the peer's record
        (its mapping may have changed) and punch again."""
        while True:
            outcome = await peer.outcome[1].receive()
            if isinstance(outcome, _PunchFailed):
                await trio.sleep(self._restun_interval / 10)
                with contextlib.suppress(RendezvousError):
                    record = await self.rendezvous.lookup(peer.name)
                    if record.public_key.raw == peer.key:
                        peer.candidates = _candidates(record)
                self._start_punch(peer)

    def _start_punch(self, peer: _Peer) -> None:
        assert peer.key is not None
        self._puncher.start(
            peer.key, peer.candidates, trio.current_time(), local_networks=self._networks
        )
        self._pump()

    # -- synchronous handlers: called inside the tunnel's drain loop ------------------------

    def _on_probe(self, data: bytes, addr: Address, now: float) -> None:
        self._puncher.receive_datagram(data, addr, now)
        self._pump()

    def _pump(self) -> None:
        puncher = self._puncher
        sock = self._sock
        for data, address in puncher.datagrams_to_send():
            with contextlib.suppress(OSError):
                sock.sendto(data, address)
        while (event := puncher.next_event()) is not None:
            self._on_punch(event)
        if self._timer_scope is not None:
            deadline = puncher.get_timer()
            self._timer_scope.deadline = math.inf if deadline is None else deadline

    def _on_punch(self, event: PunchEvent) -> None:
        peer = self._by_key.get(event.peer)
        if peer is None:
            return
        if isinstance(event, _PunchPathChosen):
            # Set before the tunnel flushes this batch: the peer's persistent keepalive is then due
            # at once, which starts the handshake. Only the side with the lower public key starts
            # it: simultaneous initiations leave the two sides on different sessions. The other
            # side's device learns the endpoint from the initiation itself.
            if self.public_key.raw < event.peer or peer.handshake.is_set():
                self._device.set_endpoint(event.peer, event.endpoint)
            upgrade = peer.state.path is not None
            endpoint = _format(event.endpoint)
            self._set(peer, path=event.kind, endpoint=endpoint)
            self._emit(PathChosen(peer.name, event.kind, endpoint, event.rtt * 1000, upgrade))
            if not upgrade:
                peer.outcome[0].send_nowait(event)
        elif isinstance(event, _PunchPathLost):
            self._set(peer, path=None)
            self._emit(PathLost(peer.name, _format(event.endpoint)))
        else:
            peer.outcome[0].send_nowait(event)

    def _on_wireguard(self, event: object) -> None:
        if isinstance(event, _WgHandshakeCompleted):
            peer = self._by_key.get(event.peer)
            if peer is not None:
                self._emit(HandshakeCompleted(peer.name, _format(event.endpoint)))
                peer.handshake.set()

    async def _punch_timer(self) -> None:
        puncher = self._puncher
        while True:
            deadline = puncher.get_timer()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            puncher.handle_timer(trio.current_time())
            self._pump()

    # -- plumbing ----------------------------------------------------------------------------

    def _emit(self, event: ConnectEvent) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send_events.send_nowait(event)

    def _set(self, peer: _Peer, **changes: Any) -> None:
        values = {**peer.state.__dict__, **changes}
        peer.state = PeerState(**values)

    def _open_socket(self) -> Any:
        factory = self._socket_factory
        if factory is None:
            # No simulation runs unless punchtrio.netsim was imported: don't import it here.
            netsim = sys.modules.get("punchtrio.netsim")
            host = netsim.current_host() if netsim is not None else None
            factory = host.nonblocking_socket if host is not None else socket.socket
        sock = factory(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("", self.config.listen_port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_tun(self) -> TunDevice:
        from ..tunnel._netlink import configure_interface

        tun = TunDevice(self.config.interface_name)
        try:
            configure_interface(
                tun.name, addresses=[self.config.interface], routes=[], mtu=self.config.mtu
            )
        except BaseException:
            tun.close()
            raise
        return tun


@contextlib.asynccontextmanager
async def open_connector(
    name: str,
    private_key: PrivateKey,
    rendezvous: Rendezvous | str,
    tunnel: TunnelConfig | str,
    **options: Any,
) -> AsyncIterator[Connector]:
    """Run a :class:`Connector` (same arguments) for the duration of the ``async with`` block.

    The pipeline runs in a nursery inside the block; leaving the block (normally, by an exception
    or by cancellation) stops it and removes everything: the record at the rendezvous, the tasks,
    the socket and any TUN device. Yields the running connector.
    """
    connector = Connector(name, private_key, rendezvous, tunnel, **options)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(connector.run)
        try:
            yield connector
        except Exception as exc:
            failure = exc  # re-raised below as it is, not wrapped in an exception group
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
