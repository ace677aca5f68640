"""Services that simulated scenarios need: a STUN server on a simulated host, a distant hub."""

from __future__ import annotations

import socket
from collections.abc import Iterable

import trio

from ..keys import PublicKey
from ..rendezvous import Endpoint, PeerRecord, Rendezvous, SignalMessage
from ..rendezvous._protocol import AllowedIP
from ..stun import StunResponder
from ._socket import UDPSocket
from ._topology import Host


async def serve_stun(
    host: Host,
    primary: tuple[str, int],
    alternate: tuple[str, int] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run punchtrio's RFC 5780 STUN server (:class:`punchtrio.stun.StunResponder`) on ``host``.

    ``primary`` and the optional ``alternate`` are ``(ip, port)`` endpoints and their IPs must be
    addresses of ``host`` (IPv4 or IPv6); with an alternate the server binds all four IP x port combinations and
    honours CHANGE-REQUEST. There is no per-source rate limit (simulated clients are trusted). Start
    it with ``await nursery.start(serve_stun, host, primary, alternate)`` inside the running
    :class:`Internet`: it returns from ``start`` once every socket is bound, then answers until
    cancelled. Raises :class:`punchtrio.stun.StunServerError` for an alternate that does not differ
    from the primary in both IP and port, and ``OSError`` if an endpoint cannot be bound on ``host``.
    """
    responder = StunResponder(primary, alternate, rate=None)
    sockets: dict[tuple[str, int], UDPSocket] = {}
    for endpoint in responder.local_endpoints:
        family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
        sockets[endpoint] = host.udp_socket(family)
        await sockets[endpoint].bind(endpoint)

    async def answer(local: tuple[str, int], sock: UDPSocket) -> None:
        while True:
            data, remote = await sock.recvfrom(2048)
            reply = responder.handle(data, local, remote[:2], trio.current_time())
            if reply is not None:
                sockets[reply.source].sendto_nowait(reply.data, reply.destination)

    async with trio.open_nursery() as nursery:
        for endpoint, sock in sockets.items():
            nursery.start_soon(answer, endpoint, sock)
        task_status.started()


class DistantRendezvous:
    """A :class:`punchtrio.rendezvous.Rendezvous` that is far away: every call takes virtual time.

    Wraps ``inner`` (for example a :class:`punchtrio.rendezvous.MemoryRendezvous`). Each call,
    ``unregister`` included, sleeps ``request_delay`` seconds before it reaches ``inner`` (the
    request on its way) and ``reply_delay`` seconds (default 0) after ``inner`` answers (the answer
    on its way back); ``aclose`` is local and immediate. A hub one round trip R away is
    ``DistantRendezvous(inner, R / 2, R / 2)``. It raises whatever ``inner`` raises, and
    :class:`ValueError` for a negative delay.
    """

    def __init__(self, inner: Rendezvous, request_delay: float, reply_delay: float = 0.0) -> None:
        if request_delay < 0 or reply_delay < 0:
            raise ValueError("delays must not be negative")
        self.inner = inner
        self.request_delay, self.reply_delay = request_delay, reply_delay

    @property
    def name(self) -> str:
        """The inner rendezvous' peer name."""
        return self.inner.name

    @property
    def public_key(self) -> PublicKey:
        """The inner rendezvous' public key."""
        return self.inner.public_key

    async def register(
        self, endpoints: Iterable[Endpoint] = (), allowed_ips: Iterable[AllowedIP] = ()
    ) -> PeerRecord:
        """``inner.register`` after ``request_delay``, answered after ``reply_delay``."""
        await trio.sleep(self.request_delay)
        record = await self.inner.register(endpoints, allowed_ips)
        await trio.sleep(self.reply_delay)
        return record

    async def lookup(self, name: str) -> PeerRecord:
        """``inner.lookup`` after ``request_delay``, answered after ``reply_delay``."""
        await trio.sleep(self.request_delay)
        record = await self.inner.lookup(name)
        await trio.sleep(self.reply_delay)
        return record

    async def wait_for_peer(self, name: str, *, newer_than: int = 0) -> PeerRecord:
        """``inner.wait_for_peer`` after ``request_delay``, answered after ``reply_delay``."""
        await trio.sleep(self.request_delay)
        record = await self.inner.wait_for_peer(name, newer_than=newer_than)
        await trio.sleep(self.reply_delay)
        return record

    async def send_signal(self, recipient: str, data: str) -> None:
        """``inner.send_signal`` after ``request_delay``, acknowledged after ``reply_delay``."""
        await trio.sleep(self.request_delay)
        await self.inner.send_signal(recipient, data)
        await trio.sleep(self.reply_delay)

    async def receive_signal(self, sender: str | None = None) -> SignalMessage:
        """``inner.receive_signal`` after ``request_delay``, delivered after ``reply_delay``."""
        await trio.sleep(self.request_delay)
        message = await self.inner.receive_signal(sender)
        await trio.sleep(self.reply_delay)
        return message

    async def unregister(self) -> None:
        """``inner.unregister`` after ``request_delay``, acknowledged after ``reply_delay``."""
        await trio.sleep(self.request_delay)
        await self.inner.unregister()
        await trio.sleep(self.reply_delay)

    async def aclose(self) -> None:
        """Close ``inner`` at once."""
        await self.inner.aclose()
