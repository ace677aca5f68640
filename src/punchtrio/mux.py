"""One UDP socket shared by WireGuard, STUN, punch probes and TURN: demultiplexing by first bytes.

The NAT mapping a hole punch opens belongs to one local port, so everything punchtrio says to the
outside world leaves from, and arrives at, the WireGuard listen socket. Three pieces share it:

- :func:`classify`, a pure function of the datagram's first bytes, returning a :class:`Kind`;
- :class:`Mux`, the sans-IO dispatcher: :meth:`Mux.receive_datagram` has the signature of
  :meth:`punchtrio.wireguard.Device.receive_datagram`, so a shell's drain loop calls it in place of
  the device's. WireGuard datagrams go straight to the device (one extra call, no copy, no await);
  the rest go to the handler routed for their kind, or into a bounded queue (:meth:`Mux.open_queue`);
- two ways to run it: :class:`MuxedDevice` puts the mux into the userspace tunnel's own drain loop,
  and :func:`serve_mux` drains a socket when no tunnel runs yet (or in tests).

See ``docs/punch.md`` for why the four kinds can never be confused with one another.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import trio

from ._exceptions import PunchtrioError

__all__ = [
    "CHANNEL_DATA_MIN_SIZE",
    "PROBE_MAGIC",
    "RELAY_MAGIC",
    "STUN_MAGIC_COOKIE",
    "WIREGUARD_MIN_SIZE",
    "Datagram",
    "Kind",
    "Mux",
    "MuxCounters",
    "MuxError",
    "MuxedDevice",
    "RouteTable",
    "classify",
    "serve_mux",
]

Address = tuple[str, int]
Route = Callable[[bytes], object]
"""A relayed path's sender (:meth:`MuxedDevice.set_route`): ``route(datagram)`` wraps the datagram
and sends it to the relay; its result is ignored."""

Wrap = Callable[[bytes], tuple[bytes, Address]]
"""A relayed path over the shared socket (:meth:`MuxedDevice.set_route`): ``wrap(datagram)``
returns the frame carrying the datagram and the relay's ``(ip, port)``, for the tunnel to send
with the rest of its batch (equal-sized runs in one GSO send)."""

Handoff = Callable[[Callable[[], object]], None]
"""Where work that must run on the Trio thread goes while another thread drives the mux
(:meth:`Mux.set_handoff`): ``handoff(call)`` makes ``call()`` later on the Trio thread, in order,
and writes a ``bytes`` result (an IP packet) to the TUN."""

Handler = Callable[[bytes, Address, float], object]
"""A receiver of one demultiplexed datagram: ``handler(data, source, now)``.

A handler that unwraps relayed WireGuard (TURN ChannelData, relay frames) may return the IP packet
its inner datagram decrypted to; :meth:`Mux.receive_datagram` passes ``bytes`` results on, so the
tunnel writes them to the TUN like any other. Any other result is ignored."""

STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
"""RFC 8489's magic cookie, bytes 4 to 8 of every STUN message."""

PROBE_MAGIC = b"\xf0pun"
"""The first four bytes of every punch probe (:mod:`punchtrio.punch`).

0xF0 is outside every range RFC 7983 assigns (STUN 0-3, DTLS 20-63, TURN channels 64-79, RTP
128-191) and outside WireGuard's message types 1-4.
"""

RELAY_MAGIC = b"\xf1prl"
"""The first four bytes of every frame of the hub's own relay (:mod:`punchtrio.relay`).

0xF1, like the probe's 0xF0, lies outside every range RFC 7983 assigns and outside WireGuard's
message types.
"""

WIREGUARD_MIN_SIZE = 32
"""The smallest WireGuard message: a transport header (16 bytes) and an empty AEAD tag (16)."""

CHANNEL_DATA_MIN_SIZE = 4
"""A TURN ChannelData header: channel number and length (RFC 8656 section 12.4)."""

_MAX_DATAGRAM = 65535
_WG_ZEROS = b"\x00\x00\x00"


class Kind(enum.IntEnum):
    """What a datagram on the shared socket is, by its first bytes."""

    UNKNOWN = 0
    """None of the others: dropped and counted."""
    STUN = 1
    """A STUN message (RFC 8489)."""
    PROBE = 2
    """A punchtrio punch probe."""
    WIREGUARD = 3
    """A WireGuard message of type 1 to 4."""
    CHANNEL_DATA = 4
    """TURN ChannelData (RFC 8656), first byte 0x40-0x4F (channels 0x4000-0x4FFF)."""
    RELAY = 5
    """A frame of the hub's own relay: starts with :data:`RELAY_MAGIC`."""


def classify(data: bytes) -> Kind:
    """Return the :class:`Kind` of ``data``, testing in the order STUN, probe, WireGuard, TURN.

    - STUN: at least 20 bytes, first two bits 00, the magic cookie at bytes 4-8, and a length field
      (bytes 2-4) equal to the datagram's length minus the 20-byte header (a multiple of 4);
    - probe: starts with :data:`PROBE_MAGIC`;
    - WireGuard: first byte 1-4, then three zero bytes, at least :data:`WIREGUARD_MIN_SIZE` bytes;
    - ChannelData: first byte 0x40-0x4F (RFC 8656 channels 0x4000-0x4FFF), at least
      :data:`CHANNEL_DATA_MIN_SIZE` bytes;
    - relay frame: starts with :data:`RELAY_MAGIC`;
    - anything else, including the empty datagram: :attr:`Kind.UNKNOWN`.

    The five sets are disjoint (a WireGuard message has a zero STUN length field, so it could only
    pass the STUN test at 20 bytes, below its minimum size), so the order never changes a result.
    Total: never raises for any ``bytes``, and copies nothing.
    """
    n = len(data)
    if not n:
        return _UNKNOWN
    first = data[0]
    if (
        first < 0x40
        and n >= 20
        and not n & 3
        and data.startswith(STUN_MAGIC_COOKIE, 4)
        and ((data[2] << 8) | data[3]) == n - 20
    ):
        return _STUN
    if first == 0xF0 and data.startswith(PROBE_MAGIC):
        return _PROBE
    if 0 < first < 5 and n >= WIREGUARD_MIN_SIZE and data.startswith(_WG_ZEROS, 1):
        return _WIREGUARD
    if 0x40 <= first < 0x50 and n >= CHANNEL_DATA_MIN_SIZE:
        return _CHANNEL_DATA
    if first == 0xF1 and data.startswith(RELAY_MAGIC):
        return _RELAY
    return _UNKNOWN


# Module-level aliases: a global lookup is cheaper than an attribute of the enum class.
_UNKNOWN, _STUN, _PROBE, _WIREGUARD, _CHANNEL_DATA, _RELAY = (
    Kind.UNKNOWN,
    Kind.STUN,
    Kind.PROBE,
    Kind.WIREGUARD,
    Kind.CHANNEL_DATA,
    Kind.RELAY,
)
_COUNTER = {kind: kind.name.lower() for kind in Kind}


class MuxError(PunchtrioError):
    """A route cannot be set: the kind is :attr:`Kind.UNKNOWN` or already has a handler."""


@dataclass
class MuxCounters:
    """What the mux saw: datagrams received of each kind (``wireguard``, ``stun``, ``probe``,
    ``channel_data``, ``relay``, and ``unknown`` ones, which are dropped); ``unrouted`` those of a known kind
    with no handler; ``queue_full`` those dropped because a queue from :meth:`Mux.open_queue` was
    full or closed."""

    wireguard: int = 0
    stun: int = 0
    probe: int = 0
    channel_data: int = 0
    relay: int = 0
    unknown: int = 0
    unrouted: int = 0
    queue_full: int = 0

    def received(self, kind: Kind) -> int:
        """Return the number of datagrams of ``kind`` received."""
        return int(getattr(self, kind.name.lower()))


class Datagram(NamedTuple):
    """One datagram taken off the shared socket: payload, source ``(ip, port)``, arrival time."""

    data: bytes
    source: Address
    time: float


class Mux:
    """Dispatch the datagrams of one shared UDP socket to WireGuard, STUN, probes and TURN.

    ``wireguard`` is the WireGuard receiver, normally ``Device.receive_datagram``: it may be set
    later (:meth:`route` with :attr:`Kind.WIREGUARD`); until then WireGuard datagrams are dropped
    and counted as unrouted. Never raises for any input datagram.
    """

    def __init__(
        self, wireguard: Callable[[bytes, Address, float], bytes | None] | None = None
    ) -> None:
        self.counters = MuxCounters()
        """Datagrams seen and dropped (see :class:`MuxCounters`)."""
        self._wireguard = wireguard
        self._handlers: dict[Kind, Handler] = {}
        self._by_source: dict[tuple[Kind, Address], Handler] = {}
        self._handoff: Handoff | None = None

    def set_handoff(self, handoff: Handoff | None) -> None:
        """Pass every handler call except WireGuard's to ``handoff`` instead of making it.

        For a tunnel whose data thread calls :meth:`receive_datagram` (see
        :class:`punchtrio.tunnel.UserspaceTunnel`): the handlers of STUN, probes, TURN and relay
        frames use Trio and must run on its thread, while WireGuard datagrams, nearly all the
        traffic, still go to the WireGuard receiver at once. Counting and routing still happen
        here; ``None`` (the default) makes the calls at once again.
        """
        self._handoff = handoff

    def route(self, kind: Kind, handler: Handler, *, source: Address | None = None) -> None:
        """Send every datagram of ``kind`` to ``handler(data, source, now)`` from now on.

        With ``source``, only the datagrams of ``kind`` from that address (a TURN server's STUN
        answers and ChannelData), which then never reach the kind's general handler. For
        :attr:`Kind.WIREGUARD` the handler's result, an IP packet or ``None``, is what
        :meth:`receive_datagram` returns (WireGuard takes no ``source``). Raises
        :class:`MuxError` if ``kind`` is :attr:`Kind.UNKNOWN` or already routed (for that source;
        call :meth:`unroute` first).
        """
        if kind is Kind.UNKNOWN:
            raise MuxError("unknown datagrams are always dropped; they cannot be routed")
        if source is not None:
            if kind is Kind.WIREGUARD or (kind, source) in self._by_source:
                raise MuxError(f"{kind.name} datagrams from {source} cannot be routed")
            self._by_source[kind, source] = handler
            return
        if kind in self._handlers or (kind is Kind.WIREGUARD and self._wireguard is not None):
            raise MuxError(f"{kind.name} datagrams already have a handler")
        if kind is Kind.WIREGUARD:
            self._wireguard = handler  # type: ignore[assignment]
        else:
            self._handlers[kind] = handler

    def unroute(self, kind: Kind, *, source: Address | None = None) -> None:
        """Stop delivering ``kind`` (from ``source`` only, if given); such datagrams then go to
        the general handler, or are dropped and counted. No error if unset."""
        if source is not None:
            self._by_source.pop((kind, source), None)
            return
        if kind is Kind.WIREGUARD:
            self._wireguard = None
        self._handlers.pop(kind, None)

    def open_queue(self, kind: Kind, max_size: int = 64) -> trio.MemoryReceiveChannel[Datagram]:
        """Route ``kind`` into a new bounded queue and return its receiving end.

        The dispatcher never waits: beyond ``max_size`` queued datagrams (default 64), or once the
        receiving end is closed, new ones are dropped and counted in ``queue_full``. Raises
        :class:`MuxError` like :meth:`route`; closing the channel does not unroute the kind.
        """
        send, receive = trio.open_memory_channel[Datagram](max_size)
        counters = self.counters

        def enqueue(data: bytes, source: Address, now: float) -> None:
            try:
                send.send_nowait(Datagram(data, source, now))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                counters.queue_full += 1

        self.route(kind, enqueue)
        return receive

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bytes | None:
        """Dispatch one datagram from ``addr`` received at ``now``.

        Returns what the WireGuard receiver returns for WireGuard datagrams (the inner IP packet
        for the TUN device, or ``None``); for other kinds, what their handler returned if that is
        ``bytes`` (a relay unwrapper's decrypted packet), else ``None`` (always ``None`` while a
        handoff is set: the handoff's owner writes the packet, see :meth:`set_handoff`).
        """
        counters = self.counters
        # The WireGuard test comes first here for speed; the kinds are disjoint (see classify).
        if data.startswith(_WG_ZEROS, 1) and 0 < data[0] < 5 and len(data) >= WIREGUARD_MIN_SIZE:
            counters.wireguard += 1
            wireguard = self._wireguard
            if wireguard is None:
                counters.unrouted += 1
                return None
            return wireguard(data, addr, now)
        kind = classify(data)
        if kind is _UNKNOWN:
            counters.unknown += 1
            return None
        name = _COUNTER[kind]
        setattr(counters, name, getattr(counters, name) + 1)
        handler = self._by_source.get((kind, addr)) if self._by_source else None
        if handler is None:
            handler = self._handlers.get(kind)
        if handler is None:
            counters.unrouted += 1
            return None
        if self._handoff is not None:
            self._handoff(functools.partial(handler, data, addr, now))
            return None
        result = handler(data, addr, now)
        return result if type(result) is bytes else None


class RouteTable(Protocol):
    """Where relayed paths are registered: :class:`MuxedDevice` (punchtrio's WireGuard) or
    :class:`punchtrio.connect.UapiDevice` (wireguard-go, through loopback proxies)."""

    def set_route(self, address: Address, route: Route | None, *, wrap: Wrap | None = None) -> None:
        """Hand what WireGuard sends to ``address`` to ``route(datagram)``; ``None`` removes it."""
        ...

    def routed(self, address: Address) -> Route | None:
        """Return the route set for ``address``, or ``None``."""
        ...


class MuxedDevice:
    """A WireGuard device whose receive path goes through a :class:`Mux` first.

    It offers what :class:`punchtrio.tunnel.UserspaceTunnel` needs from a device, so the tunnel's
    tight drain loop demultiplexes the shared socket: WireGuard datagrams reach ``device``, the
    others the handlers routed on ``mux``. The mux's WireGuard route is set to ``device`` here
    (raises :class:`MuxError` if it already has one). Everything else is the device's own method.
    """

    def __init__(self, device: Any, mux: Mux) -> None:
        mux.route(Kind.WIREGUARD, device.receive_datagram)
        self.device = device
        self.mux = mux
        self.receive_datagram: Callable[[bytes, Address, float], bytes | None] = (
            mux.receive_datagram
        )
        self._routes: dict[Address, Route] = {}
        self._wraps: dict[Address, Wrap] = {}
        self._handoff: Handoff | None = None
        self.send_packet: Callable[[bytes, float], tuple[bytes, Address] | None] = (
            device.send_packet
        )
        self.datagrams_to_send: Callable[[], list[tuple[bytes, Address]]] = device.datagrams_to_send
        self.get_timer: Callable[[], float | None] = device.get_timer
        self.handle_timer: Callable[[float], None] = device.handle_timer
        self.process_handshakes: Callable[[float, int], bool] = device.process_handshakes
        self.next_event: Callable[[], Any] = device.next_event
        self.peer_stats: Callable[[], Mapping[bytes, Any]] = device.peer_stats

    def set_route(self, address: Address, route: Route | None, *, wrap: Wrap | None = None) -> None:
        """Hand what WireGuard sends to ``address`` to ``route(datagram)`` instead of the socket.

        This is how a relayed path works: ``address`` names the path in WireGuard's endpoint
        table, and ``route`` wraps the datagram for the relay and sends it there (its result is
        ignored). With ``wrap`` (a relay reached over the shared socket, see :data:`Wrap`), the
        tunnel's own send paths (:attr:`send_packet`, :attr:`datagrams_to_send`) return the
        wrapped frame addressed to the relay instead, so it leaves in the tunnel's batches;
        :meth:`routed` callers still get ``route``. ``None`` removes the route. While no route
        is set, sending is the device's own method, with no cost per packet.
        """
        if route is None:
            self._routes.pop(address, None)
            self._wraps.pop(address, None)
        else:
            self._routes[address] = route
            if wrap is None:
                self._wraps.pop(address, None)
            else:
                self._wraps[address] = wrap
        device = self.device
        if self._routes:
            self.send_packet = self._routed_send_packet
            self.datagrams_to_send = self._routed_datagrams
        else:
            self.send_packet = device.send_packet
            self.datagrams_to_send = device.datagrams_to_send

    def routed(self, address: Address) -> Route | None:
        """Return the route set for ``address`` (see :meth:`set_route`), or ``None``."""
        return self._routes.get(address)

    def set_handoff(self, handoff: Handoff | None) -> None:
        """Hand the calls that need the Trio thread to ``handoff`` (``None``: make them at once).

        :class:`punchtrio.tunnel.UserspaceTunnel` sets it while its data thread drives this
        device: the mux's handlers other than WireGuard's (:meth:`Mux.set_handoff`) and the
        routes of relayed paths (:meth:`set_route`, which send over a stream or a TURN shell)
        then run on the Trio thread, in order; wrapped frames (``wrap``) still leave with the
        tunnel's batches.
        """
        self.mux.set_handoff(handoff)
        self._handoff = handoff

    def _route(self, route: Route, datagram: bytes) -> None:
        if self._handoff is None:
            route(datagram)
        else:
            self._handoff(functools.partial(route, datagram))

    def _routed_send_packet(self, packet: bytes, now: float) -> tuple[bytes, Address] | None:
        out: tuple[bytes, Address] | None = self.device.send_packet(packet, now)
        if out is not None:
            route = self._routes.get(out[1])
            if route is not None:
                wrap = self._wraps.get(out[1])
                if wrap is not None:
                    return wrap(out[0])
                self._route(route, out[0])
                return None
        return out

    def _routed_datagrams(self) -> list[tuple[bytes, Address]]:
        routes = self._routes
        wraps = self._wraps
        out = []
        for data, address in self.device.datagrams_to_send():
            route = routes.get(address)
            if route is None:
                out.append((data, address))
            else:
                wrap = wraps.get(address)
                if wrap is not None:
                    out.append(wrap(data))
                else:
                    self._route(route, data)
        return out

    @property
    def handshake_queue_room(self) -> int:
        """The device's ``handshake_queue_room`` (messages its handshake queue can still take)."""
        return int(self.device.handshake_queue_room)

    @property
    def under_load(self) -> bool:
        """The device's ``under_load`` flag (set by the shell)."""
        return bool(self.device.under_load)

    @under_load.setter
    def under_load(self, value: bool) -> None:
        self.device.under_load = value


async def serve_mux(
    sock: Any, mux: Mux, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Read ``sock`` until cancelled and hand every datagram to ``mux``; results are discarded.

    Use it while no tunnel drains the socket (before WireGuard starts, or in tests). ``sock`` is a
    Trio UDP socket (one ``await`` per datagram), or a non-blocking stdlib-like socket
    (:class:`socket.socket`, :class:`punchtrio.netsim.NonBlockingSocket`), drained in a tight loop
    with one checkpoint per batch. The caller owns closing the socket. Reports started once reading.
    """
    receive = mux.receive_datagram
    if isinstance(sock, trio.socket.SocketType):
        task_status.started()
        while True:
            data, source = await sock.recvfrom(_MAX_DATAGRAM)
            receive(data, source[:2], trio.current_time())
    task_status.started()
    recvfrom = sock.recvfrom
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(256):
            try:
                data, source = recvfrom(_MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError:
                continue  # a queued ICMP error; the next read goes on
            receive(data, source[:2], trio.current_time())
        await trio.lowlevel.checkpoint()
