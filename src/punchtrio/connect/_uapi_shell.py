"""The connector's tunnel when wireguard-go moves the packets: its process, steering and proxies.

The decisions are :class:`~punchtrio.connect.UapiDevice`'s; this shell does the I/O:

- wireguard-go runs on its own port (Q); the connector keeps the shared port (P), whose NAT
  mapping the punch opened, for STUN, probes and relay frames. Two stateless nftables rules
  (:func:`~punchtrio.tunnel.steer_wireguard`) move WireGuard messages arriving at P to Q, and
  make what wireguard-go sends leave from P, so its packets use the punched mapping;
- one task sends the device's ``set=1`` requests, another reads ``get=1`` (fast while a
  handshake is expected) and hands the events to the connector;
- a relayed path gets a loopback proxy: a UDP socket on 127.0.0.1 that wireguard-go is told is
  the peer. What wireguard-go sends there goes to the path's route (the relay); what the relay
  delivers is sent from that socket to wireguard-go;
- a wireguard-go that exits is started again on the same port after :data:`RESTART_DELAY` and
  given every peer as it stands.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import trio

from ..tunnel import (
    InterfaceConfig,
    WgQuickConfig,
    WireGuardGoError,
    WireGuardGoTunnel,
    open_wireguard_go_tunnel,
)
from ..wireguard import PeerStats
from ._config import TunnelConfig
from ._uapi_device import UapiDevice

Address = tuple[str, int]

RESTART_DELAY = 1.0
"""Seconds before a wireguard-go that exited is started again."""
LOOPBACK = "127.0.0.1"
_MAX_DATAGRAM = 65535


@dataclass
class ProxyCounters:
    """Datagrams through the loopback proxies: ``to_relay`` (from wireguard-go to a relayed
    path), ``to_wireguard`` (delivered by a relay to wireguard-go), and ``dropped`` (no route or
    proxy for the path any more, or a full socket)."""

    to_relay: int = 0
    to_wireguard: int = 0
    dropped: int = 0


class UapiTunnel:
    """wireguard-go as the connector's tunnel (a :class:`~punchtrio.tunnel.Tunnel`).

    Made by :func:`open_uapi_tunnel`. :attr:`name` is wireguard-go's interface, :attr:`listen_port`
    the shared port peers send to (wireguard-go's own is :attr:`wireguard_port`), and
    :meth:`peer_stats` what the device last read.
    """

    def __init__(
        self,
        device: UapiDevice,
        process: WireGuardGoTunnel,
        *,
        config: WgQuickConfig,
        shared_port: int,
        on_event: Callable[[object], None],
        process_exit: contextlib.AsyncExitStack,
    ) -> None:
        self.device = device
        self.process = process
        """The running wireguard-go (a new one after a restart)."""
        self.counters = ProxyCounters()
        """What the loopback proxies carried and dropped."""
        self.restarts = 0
        """How often wireguard-go was started again after exiting."""
        self.last_error: str | None = None
        """The last request wireguard-go refused or did not answer, or ``None``."""
        self._config = config
        self._shared_port = shared_port
        self._on_event = on_event
        self._wake = trio.Event()
        self._proxies: dict[Address, socket.socket] = {}
        self._nursery: trio.Nursery | None = None
        self._process_exit = process_exit  # stops the current wireguard-go
        device.changed = lambda: self._wake.set()

    @property
    def name(self) -> str:
        """wireguard-go's network interface."""
        return self.process.name

    @property
    def listen_port(self) -> int:
        """The shared UDP port peers send to (steered to :attr:`wireguard_port`)."""
        return self._shared_port

    @property
    def wireguard_port(self) -> int:
        """The UDP port wireguard-go itself listens on."""
        return self.process.listen_port

    def peer_stats(self) -> Mapping[bytes, PeerStats]:
        """Each peer's statistics as last read from wireguard-go (at most a second old)."""
        return self.device.peer_stats()

    def receive_relayed(self, data: bytes, source: Address) -> None:
        """Hand a WireGuard datagram a relay delivered from the path ``source`` to wireguard-go,
        from that path's loopback proxy (dropped and counted if there is none)."""
        sock = self._proxy(source)
        if sock is None:
            self.counters.dropped += 1
            return
        try:
            sock.sendto(data, (LOOPBACK, self.wireguard_port))
        except OSError:
            self.counters.dropped += 1
            return
        self.counters.to_wireguard += 1

    def receive_datagram(self, data: bytes, source: Address, now: float) -> None:
        """The shared port's WireGuard route (:meth:`Mux.route <punchtrio.mux.Mux.route>`):
        relay frames and TURN ChannelData that arrive there are unwrapped into WireGuard from
        their path's address, which :meth:`receive_relayed` hands on. Steering keeps direct
        WireGuard away from this port; any that arrives anyway is dropped and counted."""
        self.receive_relayed(data, source)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: requests, reads, proxies, and restarts of wireguard-go. Reports
        started at once; the proxies are closed on exit."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_requests)
                task_status.started()
                while True:
                    async with trio.open_nursery() as reads:
                        reads.start_soon(self._read_device)
                        await self.process.process.wait()
                        reads.cancel_scope.cancel()
                    await self._restart()
        finally:
            self._nursery = None
            for sock in self._proxies.values():
                sock.close()
            self._proxies.clear()

    async def _restart(self) -> None:
        await self._process_exit.aclose()  # the socket file and interface it left
        interface = self._config.interface
        config = WgQuickConfig(
            InterfaceConfig(
                interface.private_key, interface.addresses, self.wireguard_port, interface.mtu
            )
        )
        while True:
            await trio.sleep(RESTART_DELAY)
            stack = contextlib.AsyncExitStack()
            try:
                process = await stack.enter_async_context(
                    open_wireguard_go_tunnel(config, name=self.process.name)
                )
            except WireGuardGoError as exc:
                self.last_error = str(exc)
                await stack.aclose()
                continue
            # Requests from now on go to the new process; the full state is read after the
            # swap, so it holds every change a request to the old one may have lost.
            self.process, self._process_exit = process, stack
            self.restarts += 1
            try:
                await process.apply(self.device.full_request())
            except WireGuardGoError as exc:  # it exited again: serve() restarts it once more
                self.last_error = str(exc)
            return

    async def _send_requests(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._sync_proxies()
            text = self.device.next_request(trio.current_time())
            if text is None:
                continue
            try:
                await self.process.apply(text)
            except WireGuardGoError as exc:  # it exited (restarted with the full state) or refused
                self.last_error = str(exc)

    async def _read_device(self) -> None:
        while True:
            now = trio.current_time()
            try:
                info = await self.process.info()
            except WireGuardGoError as exc:
                self.last_error = str(exc)
            else:
                self.device.observe(info, now)
                while (event := self.device.next_event()) is not None:
                    self._on_event(event)
            await trio.sleep(self.device.poll_interval(now))

    # -- loopback proxies ----------------------------------------------------------------------

    def _sync_proxies(self) -> None:
        routes = self.device.routes
        for address in routes:
            self._proxy(address)
        for address in [a for a in self._proxies if a not in routes]:
            self._proxies.pop(address).close()
            self.device.set_proxy(address, None)

    def _proxy(self, address: Address) -> socket.socket | None:
        sock = self._proxies.get(address)
        if sock is not None or self._nursery is None or self.device.routed(address) is None:
            return sock
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((LOOPBACK, 0))
        self._proxies[address] = sock
        self.device.set_proxy(address, sock.getsockname())
        self._nursery.start_soon(self._relay_from, address, sock)
        return sock

    async def _relay_from(self, address: Address, sock: socket.socket) -> None:
        """Send what wireguard-go sends to the proxy of ``address`` along that path."""
        with contextlib.suppress(OSError):  # closed: the path's route is gone
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(64):
                    try:
                        data = sock.recv(_MAX_DATAGRAM)
                    except BlockingIOError:
                        break
                    route = self.device.routed(address)
                    if route is None:
                        self.counters.dropped += 1
                        continue
                    route(data)
                    self.counters.to_relay += 1
                await trio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def open_uapi_tunnel(
    device: UapiDevice,
    config: TunnelConfig,
    private_key: bytes,
    *,
    shared_port: int,
    on_event: Callable[[object], None],
) -> AsyncIterator[UapiTunnel]:
    """Start wireguard-go for ``config`` (its interface, address and MTU; its own port picked by
    the kernel), steer WireGuard between ``shared_port`` and it, and yield the tunnel (run its
    :meth:`~UapiTunnel.serve`). Leaving stops wireguard-go and removes the interface and the
    steering rules. Raises :class:`~punchtrio.tunnel.TunnelError` (wireguard-go missing or
    failing, ``nft`` missing or refusing) with nothing left behind."""
    wg_config = WgQuickConfig(InterfaceConfig(private_key, (config.interface,), None, config.mtu))
    from ..tunnel import steer_wireguard, steering_table_name

    async with contextlib.AsyncExitStack() as first:
        process = await first.enter_async_context(
            open_wireguard_go_tunnel(wg_config, name=config.interface_name)
        )
        table = steering_table_name(process.name)
        with steer_wireguard(
            shared_port=shared_port, wireguard_port=process.listen_port, table=table
        ):
            tunnel = UapiTunnel(
                device,
                process,
                config=wg_config,
                shared_port=shared_port,
                on_event=on_event,
                process_exit=first.pop_all(),
            )
            try:
                yield tunnel
            finally:
                with trio.CancelScope(shield=True):
                    await tunnel._process_exit.aclose()
