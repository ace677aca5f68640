"""The Trio shell of a connector's TURN allocation (RFC 8656): over the shared UDP socket, or
over a TCP connection of its own when the network drops UDP.

The protocol is :class:`punchtrio.relay.TurnClient`'s; this shell sends what it queues to the
server, runs its timer, and routes: a peer's relayed candidate (an address on a TURN server) is
reached through our own allocation, by ChannelData, so both peers only ever talk to TURN servers;
what the server relays to us is handed to the mux as if it came from the peer's address. A peer
that sends to our relayed address without a TURN allocation of its own is learnt as a relayed
address the first time its datagram arrives (the puncher then counts that pair as ``relay``).
"""

from __future__ import annotations

import contextlib
import math
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Literal

import trio

from .._exceptions import PunchtrioError
from ..mux import Mux, RouteTable
from ..punch import Candidate, CandidateType, Puncher
from ..relay import (
    RelayStream,
    TurnAllocated,
    TurnClient,
    TurnCredentials,
    TurnFailed,
    TurnServer,
    TurnStreamDecoder,
)
from ._relay_shell import Notify

Address = tuple[str, int]

PREFERENCE = {"udp": 1, "tcp": 2}
"""TURN over UDP ranks between the hub's relay over UDP (0) and any relay over a stream (2)."""


class TurnShell:
    """One TURN allocation of a connector: ``server`` with its credentials, on ``sock``, or
    over a TCP connection of its own (a ``turn:...?transport=tcp`` server; a ``turns:`` one over
    TLS with ``tls``, verified for the URI's host).

    Route the server's STUN and ChannelData datagrams to :meth:`on_datagram` (``Mux.route`` with
    ``source``). :attr:`relayed` is our relayed address once allocated; :attr:`error` why there
    is none.
    """

    def __init__(
        self,
        server: TurnServer,
        address: Address,
        *,
        tls: ssl.SSLContext | None = None,
        sock: Any,
        mux: Mux,
        device: RouteTable,
        puncher: Puncher,
        changed: Callable[[], None],
        deliver: Callable[[bytes, Address], None],
    ) -> None:
        self.server = server
        self.address = address
        self.name = str(server.uri)
        self.transport: Literal["udp", "tcp"] = "udp" if server.uri.transport == "udp" else "tcp"
        """How datagrams reach the server: ``"tcp"`` for TCP and for TLS over TCP."""
        self._tls = tls
        self._client = TurnClient(address, server.credentials, transport=self.transport)
        self._deliver = deliver
        self._stream: RelayStream | None = None
        self._sock = sock
        self._mux = mux
        self._device = device
        self._puncher = puncher
        self._changed = changed
        self._scope: trio.CancelScope | None = None
        self._routed: set[Address] = set()
        self.allocated = trio.Event()
        """Set once the allocation succeeded or failed for good (see :attr:`error`)."""
        self.relayed: Address | None = None
        self.error: str | None = None

    @property
    def candidate(self) -> Candidate | None:
        """Our relayed address as a candidate to publish, once allocated."""
        if self.relayed is None:
            return None
        return Candidate(CandidateType.RELAY, self.relayed[0], self.relayed[1])

    def owns(self, address: Address) -> bool:
        """Whether ``address`` is reached through this allocation."""
        return address in self._routed

    async def run(self) -> None:
        """Allocate and keep the allocation, its permissions and channels alive until cancelled;
        the allocation is deleted (LIFETIME 0) on the way out. Over TCP, a connection that fails
        or drops fails the allocation (:attr:`error`); it is not made again."""
        if self.transport == "udp":
            await self._allocate()
            return
        stream = self._stream = RelayStream(
            self.address,
            decoder_factory=TurnStreamDecoder,
            tls=self._tls,
            server_hostname=self.server.uri.host,
        )
        connected = trio.Event()
        async with trio.open_nursery() as nursery:

            async def carry() -> None:
                try:
                    await stream.run(self._on_stream_frame, task_status=Notify(connected))
                except PunchtrioError as exc:
                    self.error = f"TURN server {self.name}: {exc}"
                self.relayed = None
                self.allocated.set()
                self._changed()
                nursery.cancel_scope.cancel()

            nursery.start_soon(carry)
            await connected.wait()
            await self._allocate()

    def _on_stream_frame(self, frame: bytes, now: float) -> None:
        unwrapped = self._unwrap(frame, now)
        if unwrapped is not None:
            self._deliver(*unwrapped)

    async def _allocate(self) -> None:
        client = self._client
        client.allocate(trio.current_time())
        self._service()
        try:
            while True:
                deadline = client.get_timer()
                with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
                client.handle_timer(trio.current_time())
                self._service()
        finally:
            client.close(trio.current_time())
            self._flush()

    def update_credentials(self, credentials: TurnCredentials) -> None:
        """Sign from now on with ``credentials`` (fresh REST credentials; a new user name
        re-allocates at the next refresh, and :attr:`relayed` then changes)."""
        self._client.update_credentials(credentials)
        self._service()

    def add_peer(self, candidates: Iterable[Candidate]) -> None:
        """Permit the peer's addresses and route its relayed candidates through our allocation."""
        now = trio.current_time()
        for candidate in candidates:
            address = candidate.endpoint
            if candidate.type is CandidateType.RELAY:
                self._route(address)
            elif candidate.version == 4:
                self._client.add_peer(address, now)  # its datagrams to our relayed address
        self._service()

    # -- receiving: the mux's handler for STUN and ChannelData from our server --------------

    def on_datagram(self, data: bytes, addr: Address, now: float) -> bytes | None:
        """What the TURN server sent (STUN or ChannelData): a relayed datagram goes on through
        the mux, as if from the peer's address."""
        unwrapped = self._unwrap(data, now)
        if unwrapped is None:
            return None
        return self._mux.receive_datagram(unwrapped[0], unwrapped[1], now)

    def _unwrap(self, data: bytes, now: float) -> tuple[bytes, Address] | None:
        got = self._client.receive(data, now, source=self.address)
        self._service()
        if got is None:
            return None
        peer, payload = got
        if peer not in self._routed:
            self._route(peer)  # a peer that reached our relayed address directly
            self._puncher.mark_relayed(peer, PREFERENCE[self.transport])
        return payload, peer

    # -- plumbing ------------------------------------------------------------------------

    def _route(self, address: Address) -> None:
        if address in self._routed:
            return
        self._routed.add(address)
        self._client.add_peer(address, trio.current_time())
        if self.transport == "tcp":
            self._puncher.mark_relayed(address, PREFERENCE["tcp"])
        client = self._client
        put = self._put

        def send(datagram: bytes) -> None:
            frame = client.wrap(address, datagram)
            if frame is not None:  # else no channel or permission yet: dropped
                put(frame)  # one by one, as for the hub's relay (see RelayLinks._sender)

        self._device.set_route(address, send)

    def _put(self, data: bytes) -> None:
        """Send one message (already framed for a stream) to the server."""
        if self._stream is not None:
            self._stream.send_nowait(data)
            return
        with contextlib.suppress(OSError):
            self._sock.sendto(data, self.address)

    def _flush(self) -> None:
        for data in self._client.datagrams_to_send():
            self._put(data)

    def _service(self) -> None:
        self._flush()
        changed = False
        while (event := self._client.next_event()) is not None:
            if isinstance(event, TurnAllocated):
                changed = self.relayed != event.relayed
                self.relayed, self.error = event.relayed, None
                self.allocated.set()
            elif isinstance(event, TurnFailed):
                self.error = f"TURN server {self.name}: {event.reason}"
                self.allocated.set()
        if self._scope is not None:
            deadline = self._client.get_timer()
            self._scope.deadline = math.inf if deadline is None else deadline
        if changed:
            self._changed()
