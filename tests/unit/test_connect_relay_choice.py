"""Which TURN server a connector allocates on, how names resolve, and the TLS context of relays."""

from __future__ import annotations

import socket
import ssl

import pytest

from punchtrio.connect._relay_choice import client_tls_context, turn_server
from punchtrio.connect._sockets import turn_addresses
from punchtrio.relay import TurnCredentials, TurnServer, TurnServerURI


def _server(uri: str) -> TurnServer:
    return TurnServer(TurnServerURI.parse(uri), TurnCredentials("u", "p"), 600.0)


UDP4 = _server("turn:203.0.113.5:3478")
TCP4 = _server("turn:203.0.113.5:3478?transport=tcp")
TLS4 = _server("turns:203.0.113.5:5349")
UDP6 = _server("turn:[2001:db8::5]:3478")
NAMED = _server("turns:turn.example:5349")


def _pairs(*servers: TurnServer) -> list[tuple[TurnServer, tuple[str, int]]]:
    return [(s, (str(s.uri.address[0]), s.uri.address[1])) for s in servers if s.uri.address]


@pytest.mark.parametrize(
    ("servers", "families", "blocked", "chosen"),
    [
        # UDP when UDP gets out; never a stream then (the relay over UDP is preferred).
        ((TLS4, TCP4, UDP4), (4, 6), False, UDP4),
        ((TLS4, TCP4), (4, 6), False, None),
        # UDP blocked: TCP first, TLS when there is no TCP one; never UDP.
        ((TLS4, TCP4, UDP4), (4, 6), True, TCP4),
        ((UDP4, TLS4), (4, 6), True, TLS4),
        ((UDP4,), (4, 6), True, None),
        # Only servers of a family we have.
        ((UDP4, UDP6), (6,), False, UDP6),
        ((UDP4,), (6,), False, None),
        ((), (4, 6), False, None),
    ],
)
def test_the_turn_server_is_the_best_transport_the_network_allows(
    servers: tuple[TurnServer, ...],
    families: tuple[int, ...],
    blocked: bool,
    chosen: TurnServer | None,
) -> None:
    got = turn_server(_pairs(*servers), families, udp_blocked=blocked)
    assert (None if got is None else got[0]) == chosen


def test_one_server_s_addresses_go_in_family_order() -> None:
    pairs = [(NAMED, ("2001:db8::5", 5349)), (NAMED, ("203.0.113.5", 5349))]
    assert turn_server(pairs, (4, 6), udp_blocked=True) == (NAMED, ("203.0.113.5", 5349))
    assert turn_server(pairs, (6,), udp_blocked=True) == (NAMED, ("2001:db8::5", 5349))


async def test_a_turn_server_name_is_resolved_per_family(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve(name: str, *args: object) -> list[tuple[object, ...]]:
        if name != "turn.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        v6 = (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("2001:db8::5", 0, 0, 0))
        return [v6, (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("203.0.113.5", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    gone = _server("turn:gone.example:3478")
    assert await turn_addresses([UDP4, NAMED, gone]) == [
        (UDP4, ("203.0.113.5", 3478)),
        (NAMED, ("203.0.113.5", 5349)),
        (NAMED, ("2001:db8::5", 5349)),
    ]


def test_relays_over_tls_are_verified_as_the_hub_is() -> None:
    own = ssl.create_default_context()
    assert client_tls_context(own) is own
    system = client_tls_context(True)
    assert (system.verify_mode, system.check_hostname) == (ssl.CERT_REQUIRED, True)
    unverified = client_tls_context(False)
    assert (unverified.verify_mode, unverified.check_hostname) == (ssl.CERT_NONE, False)
