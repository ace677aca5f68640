"""RFC 5780 NAT behaviour discovery: a thin Trio shell over :class:`StunTransaction`.

The decisions are pure functions (:func:`classify_mapping`, :func:`classify_filtering`); the shell
only sequences the probes. No probe may open the filter a later test measures, so the filtering
tests run on a fresh socket that only ever sends to the primary address, and they run before the
mapping tests II and III send anything to the alternate address. Hairpinning uses a third socket,
the optional lifetime test a fourth and fifth.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass, replace
from typing import Any

import trio

from .._endpoint import format_endpoint
from .._exceptions import PunchtrioError
from ._transaction import (
    RTO,
    BindingFailed,
    BindingSucceeded,
    BindingTimedOut,
    StunTransaction,
    TransactionEvent,
)

__all__ = [
    "IPV6_TRANSLATIONS",
    "MAPPING_BEHAVIOURS",
    "Ipv6Report",
    "NatDiscoveryError",
    "NatReport",
    "StunAlternateNoResponseError",
    "StunNoAlternateError",
    "StunNoResponseError",
    "StunUnreachableError",
    "classify_filtering",
    "classify_ipv6_translation",
    "classify_mapping",
    "discover_ipv6",
    "discover_nat",
    "format_endpoint",
    "parse_endpoint",
    "resolve_ipv6",
]

Endpoint = tuple[str, int]

MAPPING_BEHAVIOURS = (
    "none",
    "endpoint-independent",
    "address-dependent",
    "address-and-port-dependent",
)
"""The values of :attr:`NatReport.mapping` (``filtering`` uses the last three)."""

LIFETIME_WAITS = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)
"""Idle periods (seconds) tried, in order, by the mapping lifetime test."""


class NatDiscoveryError(PunchtrioError):
    """NAT discovery could not finish; subclasses say why. The CLI exits with ``exit_code``."""

    exit_code = 1


class StunUnreachableError(NatDiscoveryError):
    """The STUN server's name does not resolve, or the network reports it unreachable (exit 3)."""

    exit_code = 3


class StunNoResponseError(NatDiscoveryError):
    """The STUN server never answered: UDP is blocked on this network, or the server is down (4)."""

    exit_code = 4


class StunNoAlternateError(NatDiscoveryError):
    """The server sent no OTHER-ADDRESS, so it cannot run RFC 5780 tests (exit 5)."""

    exit_code = 5


class StunAlternateNoResponseError(NatDiscoveryError):
    """The server's alternate address (its OTHER-ADDRESS) never answered (exit 6)."""

    exit_code = 6


def parse_endpoint(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``; raise ``ValueError`` with a readable message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: [{host}]:{port}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class NatReport:
    """What RFC 5780 tests found out about the NAT between us and a STUN server.

    ``mapping`` is one of :data:`MAPPING_BEHAVIOURS` ("none" when the mapped address equals the
    local one: no NAT); ``filtering`` is one of the three dependent/independent values (with no
    NAT it describes the firewall); ``hairpinning`` is ``None`` when there is no NAT to hairpin
    through; ``port_preservation`` tells whether the NAT kept our local port;
    ``mapping_lifetime`` is ``None`` unless measured, else ``(at_least, less_than)`` seconds of
    idleness (``less_than`` ``None`` when the mapping outlived every wait).
    """

    server: Endpoint
    other_address: Endpoint
    local_endpoint: Endpoint
    public_endpoint: Endpoint
    mapping: str
    filtering: str
    hairpinning: bool | None
    port_preservation: bool
    mapping_lifetime: tuple[float, float | None] | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (endpoints as ``ip:port`` strings)."""
        lifetime = None
        if self.mapping_lifetime is not None:
            lifetime = {
                "at_least_s": self.mapping_lifetime[0],
                "less_than_s": self.mapping_lifetime[1],
            }
        return {
            "public_endpoint": format_endpoint(self.public_endpoint),
            "mapping": self.mapping,
            "filtering": self.filtering,
            "hairpinning": self.hairpinning,
            "port_preservation": self.port_preservation,
            "local_endpoint": format_endpoint(self.local_endpoint),
            "server": format_endpoint(self.server),
            "other_address": format_endpoint(self.other_address),
            "mapping_lifetime": lifetime,
        }


def classify_mapping(
    local: Endpoint, test1: Endpoint, test2: Endpoint | None, test3: Endpoint | None
) -> str:
    """Return the RFC 5780 section 4.3 mapping behaviour from the mapped addresses of tests I-III.

    ``test2``/``test3`` may be ``None`` when not needed (no NAT, or test II already decided).
    """
    if test1 == local:
        return "none"
    if test2 == test1:
        return "endpoint-independent"
    if test3 == test2:
        return "address-dependent"
    return "address-and-port-dependent"


def classify_filtering(change_ip_and_port_answered: bool, change_port_answered: bool) -> str:
    """Return the RFC 5780 section 4.4 filtering behaviour from the two change-request tests."""
    if change_ip_and_port_answered:
        return "endpoint-independent"
    if change_port_answered:
        return "address-dependent"
    return "address-and-port-dependent"


_UNREACHABLE = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}


class _Prober:
    """Runs transactions over Trio sockets with one per-transaction ``timeout`` (seconds)."""

    def __init__(self, server: Endpoint, timeout: float, rto: float) -> None:
        self.server = server
        self.timeout = timeout
        self.rto = rto
        self.family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.local_ip = ""

    async def open(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            await sock.bind((self.local_ip, 0))
        except OSError:
            sock.close()
            raise
        return sock

    async def run(
        self,
        tx: StunTransaction,
        send: trio.socket.SocketType,
        receive: trio.socket.SocketType | None = None,
    ) -> TransactionEvent:
        """Drive ``tx``: send on ``send``, receive on ``receive`` (default ``send``)."""
        receive = receive or send
        deadline = trio.current_time() + self.timeout
        while True:
            now = trio.current_time()
            tx.handle_timer(now)
            for data, destination in tx.datagrams_to_send(now):
                await self._io(send.sendto(data, destination))
            event = tx.next_event()
            if event is not None:
                return event
            if now >= deadline:
                return BindingTimedOut(tx.attempts)
            wake = min(tx.get_timer() or deadline, deadline)
            with trio.move_on_at(wake):
                data, source = await self._io(receive.recvfrom(2048))
                tx.receive_datagram(data, source[:2], trio.current_time())

    async def _io(self, operation: Any) -> Any:
        try:
            return await operation
        except OSError as exc:
            if exc.errno in _UNREACHABLE:
                raise StunUnreachableError(
                    f"STUN server {format_endpoint(self.server)} is unreachable: {exc.strerror}"
                ) from None
            raise StunNoResponseError(
                f"cannot send UDP to {format_endpoint(self.server)}: {exc.strerror}"
            ) from None


async def _resolve(server: Endpoint | str) -> Endpoint:
    try:
        host, port = parse_endpoint(server) if isinstance(server, str) else server
    except ValueError as exc:
        raise NatDiscoveryError(str(exc)) from None
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise StunUnreachableError(f"cannot resolve STUN server {host!r}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    address = infos[0][4]
    return str(ipaddress.ip_address(address[0])), int(address[1])


def _expect(event: TransactionEvent, what: str, server: Endpoint) -> BindingSucceeded:
    if isinstance(event, BindingSucceeded):
        return event
    if isinstance(event, BindingFailed):
        raise NatDiscoveryError(f"{what}: {event.reason}")
    raise StunNoResponseError(
        f"no response from STUN server {format_endpoint(server)} after {event.attempts} "
        "requests: UDP is blocked on this network, or the server is down"
    )


async def discover_nat(
    server: Endpoint | str,
    *,
    probe_timeout: float = 3.0,
    lifetime: float | None = None,
    rto: float = RTO,
) -> NatReport:
    """Run the RFC 5780 tests against ``server`` (``(host, port)`` or ``"host:port"``).

    ``probe_timeout`` (seconds, default 3) bounds each probe: a filtering test that gets no answer waits
    this long, so the whole run takes a few timeouts at most. ``rto`` is the first retransmission
    interval. With ``lifetime`` (minutes) the mapping lifetime is measured too, idling up to that
    long in total. Raises :class:`StunUnreachableError`, :class:`StunNoResponseError`,
    :class:`StunNoAlternateError`, :class:`StunAlternateNoResponseError` or
    :class:`NatDiscoveryError`.
    """
    primary = await _resolve(server)
    prober = _Prober(primary, probe_timeout, rto)

    # Mapping test I on socket M, connected so that ICMP errors surface as "unreachable".
    with trio.socket.socket(prober.family, socket.SOCK_DGRAM) as sock:
        await prober._io(sock.connect(primary))
        prober.local_ip = sock.getsockname()[0]
        local = (str(ipaddress.ip_address(prober.local_ip)), sock.getsockname()[1])
        test1 = _expect(
            await prober.run(StunTransaction(primary, trio.current_time(), rto=rto), sock),
            "mapping test I",
            primary,
        )
        other = test1.other_address
        if other is None:
            raise StunNoAlternateError(
                f"STUN server {format_endpoint(primary)} has no alternate address "
                "(no OTHER-ADDRESS): it cannot test NAT behaviour"
            )
        # Filtering before anything is sent to the alternate address: some NATs open their
        # filter to an address for every mapping once any host behind them has sent to it.
        filtering = await _filtering(prober, primary, other)
        mapped: list[Endpoint | None] = [test1.mapped, None, None]
        if test1.mapped != local:
            for index, target in ((1, (other[0], primary[1])), (2, other)):
                await prober._io(sock.connect(target))
                event = await prober.run(
                    StunTransaction(target, trio.current_time(), rto=rto), sock
                )
                if not isinstance(event, BindingSucceeded):
                    raise StunAlternateNoResponseError(
                        f"the server's alternate address {format_endpoint(target)} did not answer"
                    )
                mapped[index] = event.mapped
                if index == 1 and event.mapped == test1.mapped:
                    break
    mapping = classify_mapping(local, test1.mapped, mapped[1], mapped[2])
    hairpinning = None if mapping == "none" else await _hairpinning(prober, primary)
    measured = None
    if lifetime is not None:
        measured = await _lifetime(prober, primary, lifetime * 60.0)
    return NatReport(
        server=primary,
        other_address=other,
        local_endpoint=local,
        public_endpoint=test1.mapped,
        mapping=mapping,
        filtering=filtering,
        hairpinning=hairpinning,
        port_preservation=test1.mapped[1] == local[1],
        mapping_lifetime=measured,
    )


async def _filtering(prober: _Prober, primary: Endpoint, other: Endpoint) -> str:
    """Filtering tests on a fresh socket that only ever sends to the primary address."""
    with await prober.open() as sock:
        now = trio.current_time()
        _expect(
            await prober.run(StunTransaction(primary, now, rto=prober.rto), sock),
            "filtering test I",
            primary,
        )
        both = StunTransaction(
            primary,
            trio.current_time(),
            change_ip=True,
            change_port=True,
            expected_source=other,
            rto=prober.rto,
        )
        if isinstance(await prober.run(both, sock), BindingSucceeded):
            return classify_filtering(True, False)
        port_only = StunTransaction(
            primary,
            trio.current_time(),
            change_port=True,
            expected_source=(primary[0], other[1]),
            rto=prober.rto,
        )
        answered = isinstance(await prober.run(port_only, sock), BindingSucceeded)
        return classify_filtering(False, answered)


async def _hairpinning(prober: _Prober, primary: Endpoint) -> bool:
    """Send a Binding request from a fresh socket to its own mapped address; see if it comes back."""
    with await prober.open() as sock:
        event = _expect(
            await prober.run(StunTransaction(primary, trio.current_time(), rto=prober.rto), sock),
            "hairpinning test",
            primary,
        )
        probe = StunTransaction(event.mapped, trio.current_time(), rto=prober.rto)
        token = probe.request[8:20]
        with trio.move_on_after(prober.timeout):
            async with trio.open_nursery() as nursery:

                async def resend() -> None:
                    while not probe.done:
                        now = trio.current_time()
                        probe.handle_timer(now)
                        for data, destination in probe.datagrams_to_send(now):
                            await prober._io(sock.sendto(data, destination))
                        await trio.sleep_until(probe.get_timer() or now)

                nursery.start_soon(resend)
                while True:
                    data, _ = await prober._io(sock.recvfrom(2048))
                    if data[8:20] == token:
                        nursery.cancel_scope.cancel()
                        return True
        return False


async def _lifetime(
    prober: _Prober, primary: Endpoint, budget: float
) -> tuple[float, float | None] | None:
    """Measure how long an idle mapping lives, using RESPONSE-PORT to reach it from the server.

    Returns ``None`` if the server cannot send to the mapping at all (no RESPONSE-PORT support, or
    a filter that blocks it).
    """
    with await prober.open() as measured, await prober.open() as helper:
        event = _expect(
            await prober.run(
                StunTransaction(primary, trio.current_time(), rto=prober.rto), measured
            ),
            "lifetime test",
            primary,
        )
        port = event.mapped[1]

        async def alive() -> bool:
            tx = StunTransaction(primary, trio.current_time(), response_port=port, rto=prober.rto)
            return isinstance(await prober.run(tx, helper, measured), BindingSucceeded)

        if not await alive():
            return None
        at_least = 0.0
        spent = 0.0
        for wait in LIFETIME_WAITS:
            if spent + wait > budget:
                break
            # Refresh the mapping from inside first, so each idle period starts at zero whether or
            # not the NAT lets inbound traffic (the previous check) refresh it.
            await prober.run(
                StunTransaction(primary, trio.current_time(), rto=prober.rto), measured
            )
            await trio.sleep(wait)
            spent += wait
            if not await alive():
                return at_least, wait
            at_least = wait
        return at_least, None


# --- the IPv6 side: is there a translator (NPTv6, NAT66), and does unsolicited inbound get in? ----

IPV6_TRANSLATIONS = ("none", "nptv6", "nat66")
"""The values of :attr:`Ipv6Report.translation`: ``none`` (the server saw our own address and
port), ``nptv6`` (the address changed, the port did not: a stateless prefix translator, RFC 6296)
and ``nat66`` (the port changed: a stateful IPv6 NAT)."""


def classify_ipv6_translation(local: Endpoint, public: Endpoint) -> str:
    """Return one of :data:`IPV6_TRANSLATIONS` from our local IPv6 endpoint and the one a STUN
    server saw (its XOR-MAPPED-ADDRESS); addresses compare as addresses, not as text."""
    same_ip = ipaddress.ip_address(local[0]) == ipaddress.ip_address(public[0])
    if local[1] != public[1]:
        return "nat66"
    return "none" if same_ip else "nptv6"


@dataclass(frozen=True)
class Ipv6Report:
    """What ``punchtrio nat`` found out about this host's IPv6 path to a STUN server.

    ``tested`` is false when the test could not run, and ``reason`` says why (the server has no
    IPv6 address, this host has no IPv6 route, no answer over IPv6); the other fields are then
    ``None``. Otherwise ``local_endpoint`` is our socket's address, ``public_endpoint`` the
    server-reflexive one, ``address_changed``/``port_changed`` compare them and ``translation``
    is one of :data:`IPV6_TRANSLATIONS`. ``filtering`` (one of the RFC 5780 filtering behaviours)
    and ``unsolicited_inbound`` (whether an answer from the server's other IP and port, which we
    never sent to, got in) come from the CHANGE-REQUEST tests; both are ``None``, with ``reason``
    saying why, when the server has no IPv6 alternate address (OTHER-ADDRESS) to test with.
    """

    tested: bool
    reason: str | None = None
    server: Endpoint | None = None
    local_endpoint: Endpoint | None = None
    public_endpoint: Endpoint | None = None
    translation: str | None = None
    filtering: str | None = None
    unsolicited_inbound: bool | None = None

    @property
    def address_changed(self) -> bool | None:
        """Whether the server saw another IPv6 address than our own (``None``: not tested)."""
        if self.local_endpoint is None or self.public_endpoint is None:
            return None
        local, public = self.local_endpoint[0], self.public_endpoint[0]
        return ipaddress.ip_address(local) != ipaddress.ip_address(public)

    @property
    def port_changed(self) -> bool | None:
        """Whether the server saw another port than our own (``None``: not tested)."""
        if self.local_endpoint is None or self.public_endpoint is None:
            return None
        return self.local_endpoint[1] != self.public_endpoint[1]

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (endpoints as ``[ip]:port`` strings)."""

        def text(endpoint: Endpoint | None) -> str | None:
            return None if endpoint is None else format_endpoint(endpoint)

        return {
            "tested": self.tested,
            "reason": self.reason,
            "server": text(self.server),
            "local_endpoint": text(self.local_endpoint),
            "public_endpoint": text(self.public_endpoint),
            "address_changed": self.address_changed,
            "port_changed": self.port_changed,
            "translation": self.translation,
            "filtering": self.filtering,
            "unsolicited_inbound": self.unsolicited_inbound,
        }


async def resolve_ipv6(server: Endpoint | str) -> Endpoint | None:
    """Return the STUN server's IPv6 ``(ip, port)``: the address itself if it is an IPv6
    literal, else the first IPv6 address its name resolves to; ``None`` if it has none (an IPv4
    literal, a name without AAAA records, or a name that does not resolve)."""
    try:
        host, port = parse_endpoint(server) if isinstance(server, str) else server
    except ValueError:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (str(ip), port) if ip.version == 6 else None
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, family=socket.AF_INET6, type=socket.SOCK_DGRAM
        )
    except (OSError, UnicodeError):
        return None
    for info in infos:
        found = ipaddress.IPv6Address(str(info[4][0]).partition("%")[0])
        if found.ipv4_mapped is None:
            return str(found), int(info[4][1])
    return None


async def discover_ipv6(
    server: Endpoint | None, *, probe_timeout: float = 3.0, rto: float = RTO
) -> Ipv6Report:
    """Test this host's IPv6 path to the STUN server at ``server`` (an IPv6 ``(ip, port)``, or
    ``None``: the server has none, reported as not tested).

    One Binding request gives the server-reflexive endpoint (NPTv6 / NAT66 detection: does it
    differ from our own?); if the server has an IPv6 alternate address, the RFC 5780 filtering
    tests (CHANGE-REQUEST) tell whether unsolicited inbound gets in. ``probe_timeout`` (seconds,
    default 3) bounds each probe. Never raises for a network problem: it is the report's
    ``reason``.
    """
    if server is None:
        return Ipv6Report(False, "the STUN server has no IPv6 address")
    prober = _Prober(server, probe_timeout, rto)
    name = format_endpoint(server)
    with trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        try:
            await sock.connect(server)
        except OSError as exc:
            return Ipv6Report(False, f"no IPv6 route to {name}: {exc.strerror}", server)
        prober.local_ip = sock.getsockname()[0]
        local = (
            str(ipaddress.ip_address(prober.local_ip.partition("%")[0])),
            sock.getsockname()[1],
        )
        try:
            event = await prober.run(StunTransaction(server, trio.current_time(), rto=rto), sock)
        except NatDiscoveryError as exc:
            return Ipv6Report(False, str(exc), server)
    if not isinstance(event, BindingSucceeded):
        why = event.reason if isinstance(event, BindingFailed) else "no response over IPv6"
        return Ipv6Report(False, f"STUN server {name}: {why}", server)
    report = Ipv6Report(
        True,
        None,
        server,
        local,
        event.mapped,
        classify_ipv6_translation(local, event.mapped),
    )
    other = event.other_address
    if other is None or ":" not in other[0]:
        return replace(
            report,
            reason="inbound not tested: the STUN server has no IPv6 alternate address (OTHER-ADDRESS)",
        )
    try:
        filtering = await _filtering(prober, server, other)
    except NatDiscoveryError as exc:
        return replace(report, reason=f"inbound not tested: {exc}")
    return replace(
        report, filtering=filtering, unsolicited_inbound=filtering == "endpoint-independent"
    )
