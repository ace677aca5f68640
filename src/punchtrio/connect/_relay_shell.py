"""The Trio shell of a connector's relay links: the hub's relay over UDP, TCP or TLS.

Decisions live elsewhere: the bind exchange in :class:`punchtrio.relay.HubRelayClient`, which
relayed path wins in the puncher, the naming of relayed paths in :class:`RelayLinks`. This shell
sends the frames, runs each link's timer, keeps a stream link connected (with backoff), and hands
unwrapped datagrams to the tunnel.
"""

from __future__ import annotations

import contextlib
import functools
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .._exceptions import PunchtrioError
from ..mux import Mux
from ..relay import (
    HubRelayClient,
    HubStreamDecoder,
    RelayBound,
    RelayRefused,
    RelayStream,
    encode_hub_stream_frame,
)
from ..rendezvous import NetworkSecret
from ._relays import RelayLink, RelayLinks, Transport

Address = tuple[str, int]

STREAM_BACKOFF = (1.0, 30.0)
"""Seconds before a dropped stream link reconnects: first wait and ceiling (doubling between)."""


@dataclass(frozen=True)
class RelayTarget:
    """Where to reach the hub's relay: ``udp`` and ``tcp`` addresses (either may be ``None``),
    the TLS context when TCP speaks TLS (verified for ``server_hostname``), and the hub's public
    key, which authenticates the relay's answers."""

    hub_key: bytes
    udp: Address | None
    tcp: Address | None
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None


class Notify:
    """A task status that sets an event when the task reports it started."""

    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


def _nowhere(frame: bytes) -> None:
    """The transport of a stream link while it is not connected: frames are dropped."""


class RelayShell:
    """Run the hub relay links of one connector.

    ``links`` is the connector's :class:`RelayLinks`; ``mux`` its dispatcher (relayed datagrams
    go through it, so probes and WireGuard find their cores); ``sock`` the shared UDP socket;
    ``deliver(data, source)`` hands a datagram that arrived on a stream to the tunnel;
    ``changed()`` is called whenever a link's paths changed (the connector then sends what the
    puncher queued).
    """

    def __init__(
        self,
        links: RelayLinks,
        mux: Mux,
        sock: Any,
        *,
        private_key: bytes,
        network_secret: NetworkSecret | None,
        wall_clock: Callable[[], float],
        deliver: Callable[[bytes, Address], None],
        changed: Callable[[], None],
    ) -> None:
        self._links = links
        self._mux = mux
        self._sock = sock
        self._private_key = private_key
        self._secret = network_secret
        self._wall_clock = wall_clock
        self._deliver = deliver
        self._changed = changed
        self._udp: dict[Address, RelayLink] = {}
        self._scopes: dict[RelayLink, trio.CancelScope] = {}
        self.drops = 0
        """Relay frames dropped before a link's core saw them (an unknown source or peer)."""

    async def run(self, target: RelayTarget, *, stream_after: float, udp_blocked: bool) -> None:
        """Bind to the hub's relay until cancelled: over UDP, and over TCP (TLS) at once when
        ``udp_blocked``, else when the UDP binding has not succeeded after ``stream_after``
        seconds.

        Design decision: UDP is tried even when ``udp_blocked`` (no STUN answer yet), because
        that verdict comes from a short first wait; a UDP binding that succeeds later is
        preferred over the stream, and in a network that really drops UDP it costs a HELLO
        now and then (the client's backoff, up to 30 s).
        """
        if udp_blocked:
            stream_after = 0.0
        async with trio.open_nursery() as nursery:
            udp: RelayLink | None = None
            if target.udp is not None:
                server = (str(target.udp[0]), int(target.udp[1]))
                udp = self._links.add_link(
                    "hub", "udp", server, self._client(target.hub_key), self._udp_sender(server)
                )
                self._udp[server] = udp
                udp.client.connect(trio.current_time())  # type: ignore[attr-defined]
                self._service(udp)
                nursery.start_soon(self._timer, udp)
            if target.tcp is not None:
                if udp is not None and stream_after > 0:
                    await trio.sleep(stream_after)
                if udp is None or not udp.client.bound:
                    nursery.start_soon(self._stream_link, target)

    # -- receiving -------------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: Address, now: float) -> bytes | None:
        """A relay frame on the shared socket (the mux's handler): unwrap it if it comes from a
        relay we use, and return what the inner datagram gives (an IP packet for the TUN)."""
        link = self._udp.get(addr)
        if link is None:
            self.drops += 1
            return None
        unwrapped = self._unwrap(link, data, now)
        if unwrapped is None:
            return None
        return self._mux.receive_datagram(unwrapped[0], unwrapped[1], now)

    def _on_stream_frame(self, link: RelayLink, frame: bytes, now: float) -> None:
        unwrapped = self._unwrap(link, frame, now)
        if unwrapped is not None:
            self._deliver(*unwrapped)

    def _unwrap(self, link: RelayLink, frame: bytes, now: float) -> tuple[bytes, Address] | None:
        client: Any = link.client
        got = client.receive_frame(frame, now)
        if got is None:
            self._service(link)  # a control frame: we may be bound now, or refused
            return None
        source = self._links.source(link, got[0])
        if source is None:
            self.drops += 1
            return None
        return got[1], source

    # -- links -----------------------------------------------------------------------------

    def _client(self, hub_key: bytes) -> HubRelayClient:
        return HubRelayClient(
            self._private_key, hub_key, network_secret=self._secret, wall_clock=self._wall_clock
        )

    def _udp_sender(self, server: Address) -> Callable[[bytes], object]:
        sock = self._sock

        def send(frame: bytes) -> None:
            with contextlib.suppress(OSError):
                sock.sendto(frame, server)

        return send

    async def _stream_link(self, target: RelayTarget) -> None:
        assert target.tcp is not None
        hub_key = target.hub_key
        server = (str(target.tcp[0]), int(target.tcp[1]))
        transport: Transport = "tls" if target.tls is not None else "tcp"
        link = self._links.add_link("hub", transport, server, self._client(hub_key), _nowhere)
        delay = STREAM_BACKOFF[0]
        while True:
            link.client = self._client(hub_key)
            stream = RelayStream(
                server,
                decoder_factory=HubStreamDecoder,
                tls=target.tls,
                server_hostname=target.server_hostname,
            )
            link.send = functools.partial(_send_framed, stream)
            began = trio.current_time()
            await self._carry(link, stream)
            link.client, link.send = self._client(hub_key), _nowhere  # unbound: paths go
            self._links.update(trio.current_time())
            self._changed()
            if trio.current_time() - began > STREAM_BACKOFF[1]:
                delay = STREAM_BACKOFF[0]
            await trio.sleep(delay)
            delay = min(STREAM_BACKOFF[1], delay * 2)

    async def _carry(self, link: RelayLink, stream: RelayStream) -> None:
        """Run one connection of a stream link until it fails or drops (``link.error`` says)."""
        connected = trio.Event()
        async with trio.open_nursery() as nursery:

            async def carry() -> None:
                try:
                    on_frame = functools.partial(self._on_stream_frame, link)
                    await stream.run(on_frame, task_status=Notify(connected))
                except PunchtrioError as exc:
                    link.error = f"the hub's relay over {link.transport.upper()}: {exc}"
                nursery.cancel_scope.cancel()

            nursery.start_soon(carry)
            await connected.wait()
            link.client.connect(trio.current_time())  # type: ignore[attr-defined]
            self._service(link)
            nursery.start_soon(self._timer, link)

    async def _timer(self, link: RelayLink) -> None:
        client: Any = link.client
        while True:
            deadline = client.get_timer()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._scopes[link] = scope
                await trio.sleep_forever()
            self._scopes.pop(link, None)
            client.handle_timer(trio.current_time())
            self._service(link)

    def _service(self, link: RelayLink) -> None:
        """Send what the link's core queued, act on its events, re-arm its timer."""
        client: Any = link.client
        for frame in client.datagrams_to_send():
            link.send(frame)
        changed = False
        while (event := client.next_event()) is not None:
            changed = True
            if isinstance(event, RelayRefused):
                link.error = f"the hub's relay refused us: {event.reason}"
            elif isinstance(event, RelayBound):
                link.error = None
        if changed:
            self._links.update(trio.current_time())
            self._changed()
        scope = self._scopes.get(link)
        if scope is not None:
            deadline = client.get_timer()
            scope.deadline = math.inf if deadline is None else deadline


def _send_framed(stream: RelayStream, frame: bytes) -> bool:
    return stream.send_nowait(encode_hub_stream_frame(frame))
