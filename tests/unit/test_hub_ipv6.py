"""The hub on IPv4 and IPv6 at once: repeatable ``--listen``/``--stun``, ``GET /v1/hub`` naming
each family's STUN server, HubClient over ``http://[::1]:port``, and one-line errors."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from functools import partial

import httpx
import pytest
import trio

from punchtrio import PrivateKey, format_endpoint
from punchtrio.cli import _hub
from punchtrio.cli._main import build_parser, main
from punchtrio.rendezvous import (
    Endpoint,
    HubClient,
    HubConfig,
    HubInfo,
    HubServeError,
    MemoryStore,
    StunAddress,
    ValidationError,
    bind_hub_sockets,
    serve_hub,
)
from punchtrio.rendezvous._serve import _published
from punchtrio.stun import BindingSucceeded, StunTransaction

BOTH = [("127.0.0.1", 0), ("::1", 0)]


def _has_ipv6_loopback() -> bool:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            return False
    return True


def test_this_machine_has_ipv6_loopback() -> None:
    # Every other test here needs ::1; without it they must fail, not pass vacuously.
    assert _has_ipv6_loopback(), "::1 is missing: `ip -6 addr` shows no loopback address"


async def _binding(server: tuple[str, int]) -> tuple[str, int]:
    """One STUN Binding request to ``server``; the mapped (server-reflexive) address."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.bind((server[0], 0))
        tx = StunTransaction(server, trio.current_time(), rto=0.2)
        with trio.fail_after(5):
            while True:
                now = trio.current_time()
                tx.handle_timer(now)
                for data, destination in tx.datagrams_to_send(now):
                    await sock.sendto(data, destination)
                event = tx.next_event()
                if event is not None:
                    assert isinstance(event, BindingSucceeded), event
                    return event.mapped
                with trio.move_on_at(tx.get_timer() or now + 0.2):
                    data, source = await sock.recvfrom(2048)
                    tx.receive_datagram(data, source[:2], trio.current_time())
    raise AssertionError("unreachable")


async def test_serve_hub_listens_and_serves_stun_on_both_families() -> None:
    assert _has_ipv6_loopback()
    key = PrivateKey.generate()
    config = HubConfig(key, rate=0.0)
    async with trio.open_nursery() as nursery:
        serve = partial(serve_hub, store=MemoryStore(), stun=BOTH)
        listeners = await nursery.start(serve, config, BOTH)
        assert [url.split("://")[1].rsplit(":", 1)[0] for url in listeners.http] == [
            "127.0.0.1",
            "[::1]",
        ]
        assert [ip for ip, _port in listeners.stun] == ["127.0.0.1", "::1"]
        for url in listeners.http:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                info = HubInfo.from_json((await http.get("/v1/hub")).json())
            # Loopback is published as null ("the hub's own host"), tagged with its family.
            assert info.stun == (
                StunAddress(None, listeners.stun[0][1], family=4),
                StunAddress(None, listeners.stun[1][1], family=6),
            )
        for ip, port in listeners.stun:
            mapped = await _binding((ip, port))
            assert mapped[0] == ip

        for url in listeners.http:
            client = HubClient(url, PrivateKey.generate(), f"peer{len(url)}", watch=False)
            async with client:
                record = await client.register([Endpoint.parse("[2001:db8::7]:51820")])
                assert record.endpoints[0].address == "[2001:db8::7]:51820"
                assert (await client.lookup(client.name)).public_key == client.public_key
        nursery.cancel_scope.cancel()


async def test_ipv4_and_ipv6_unspecified_share_one_port() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    sockets = bind_hub_sockets([("0.0.0.0", port), ("::", port)])
    try:
        assert [s.family for s in sockets] == [socket.AF_INET, socket.AF_INET6]
        assert sockets[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in sockets:
            sock.close()


def test_a_taken_second_address_closes_the_first() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HubServeError, match=rf"cannot listen on \[::1\]:{port}"):
            bind_hub_sockets([("127.0.0.1", 0), ("::1", port)])


def test_one_ipv4_stun_address_publishes_as_before() -> None:
    assert _published([("0.0.0.0", 3478)]) == (StunAddress(None, 3478),)
    # IPv6 alone is tagged: a dual-stack client would otherwise ask the hub host's IPv4 address.
    assert _published([("::", 3478)]) == (StunAddress(None, 3478, family=6),)
    assert StunAddress(None, 3478).to_json() == {"ip": None, "port": 3478}
    both = _published([("0.0.0.0", 3478), ("::", 3478), ("2001:db8::1", 3478)])
    assert [s.to_json() for s in both] == [
        {"ip": None, "port": 3478, "family": 4},
        {"ip": None, "port": 3478, "family": 6},
        {"ip": "2001:db8::1", "port": 3478},
    ]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"ip": None, "port": 3478, "family": 5}, "stun family must be 4 or 6"),
        ({"ip": None, "port": 3478, "family": True}, "stun family must be 4 or 6"),
        ({"ip": "2001:db8::1", "port": 3478, "family": 6}, "only given with a null ip"),
        ({"ip": "::1", "port": 3478}, "stun ip: ::1 is loopback"),
    ],
)
def test_bad_stun_entries_are_refused(obj: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StunAddress.from_json(obj)


def test_stun_entries_round_trip() -> None:
    for entry in (StunAddress(None, 1, family=6), StunAddress(None, 2), StunAddress(None, 3, 4)):
        assert StunAddress.from_json(entry.to_json()) == entry


def test_listen_and_stun_are_repeatable() -> None:
    args = build_parser().parse_args(
        ["hub", "--listen", "0.0.0.0:7777", "--listen", "[::]:7777", "--stun", "[::1]:3478"]
    )
    assert _hub._addresses(args.listen, "--listen", _hub.DEFAULT_LISTEN) == [
        ("0.0.0.0", 7777),
        ("::", 7777),
    ]
    assert _hub._addresses(args.stun, "--stun", None) == [("::1", 3478)]
    assert _hub._addresses(None, "--stun", None) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "::1:7777"], "--listen must be IPv4:port or [IPv6]:port"),
        (["--listen", "[::1]7777"], "--listen must be IPv4:port or [IPv6]:port"),
        (["--listen", "[fe80::1%eth0]:7777"], "--listen must be a literal IP address"),
        (["--listen", "[::1]:70000"], "--listen must have a port from 1 to 65535"),
        (
            ["--listen", "[::1]:7777", "--listen", "[::1]:7777"],
            "--listen [::1]:7777 is given twice",
        ),
        (["--stun", "[::1]:3478", "--stun", "[::1]:x"], "--stun must have a port"),
        ([a for i in range(9) for a in ("--listen", f"192.0.2.1:{i + 1}")], "at most 8"),
        (
            ["--relay", "0.0.0.0:7778", "--relay", "127.0.0.1:7778"],
            "--relay: give at most one IPv4 and one IPv6 address",
        ),
        (
            ["--relay", "0.0.0.0:7778", "--relay", "[::]:7779"],
            "--relay: both addresses need the same port",
        ),
        (["--relay", "[::1]:7778", "--relay", "[::1]:7778"], "--relay [::1]:7778 is given twice"),
    ],
)
def test_bad_listen_exits_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["hub", "--store", "memory", *argv])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("punchtrio: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_stun_alternate_without_a_stun_of_its_family_is_one_line() -> None:
    hub = ["hub", "--store", "memory", "--listen", "127.0.0.1:0", "--stun", "127.0.0.1:0"]
    proc = subprocess.run(
        [sys.executable, "-m", "punchtrio.cli", *hub, "--stun-alternate", "[::1]:0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "punchtrio: error: --stun-alternate [::1]:0 has no --stun address of its family"
    ]


def test_endpoints_print_with_brackets() -> None:
    assert format_endpoint(("::1", 7777)) == "[::1]:7777"
    assert _hub._addresses(["[::1]:0"], "--listen", None) == [("::1", 0)]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://192.0.2.9:7777", [("192.0.2.9", 3478), ("2001:db8::3", 3480)]),
        ("http://[2001:db8::9]:7777", [("2001:db8::9", 3479), ("2001:db8::3", 3480)]),
    ],
)
async def test_the_connector_uses_the_stun_entry_of_its_hub_urls_family(
    url: str, expected: list[tuple[str, int]]
) -> None:
    from punchtrio import Connector, TunnelConfig

    info = HubInfo(
        PrivateKey.generate().public_key(),
        (
            StunAddress(None, 3478, family=4),
            StunAddress(None, 3479, family=6),
            StunAddress(ipaddress.IPv6Address("2001:db8::3"), 3480),
        ),
        300.0,
        60.0,
        60.0,
        1.0,
        False,
    )
    connector = Connector("alice", PrivateKey.generate(), url, TunnelConfig("10.99.0.1/24"))
    connector.rendezvous._info = info  # type: ignore[attr-defined]  # as if GET /v1/hub had run
    try:
        assert await connector._stun_addresses() == expected
    finally:
        await connector.rendezvous.aclose()


def test_a_relay_on_both_families_is_published_per_family() -> None:
    from punchtrio.rendezvous import HubRelayAddress, published_addresses

    relays = tuple(
        HubRelayAddress(ip, port, False, family)
        for ip, port, family in published_addresses([("0.0.0.0", 7778), ("::", 7778)])
    )
    info = HubInfo(PrivateKey.generate().public_key(), (), 300, 60, 60, 0, False, relays=relays)
    body = info.to_json()
    assert "relay" not in body
    assert body["relays"] == [
        {"ip": None, "port": 7778, "tls": False, "family": 4},
        {"ip": None, "port": 7778, "tls": False, "family": 6},
    ]
    assert HubInfo.from_json(body) == info
    assert info.relay == relays[0]


@pytest.mark.parametrize(
    ("relays", "message"),
    [
        ({"relay": {"ip": None, "port": 1, "tls": False}, "relays": []}, "not both"),
        ({"relays": []}, "one or two"),
        ({"relays": [{"ip": None, "port": n, "tls": False, "family": 4} for n in (1, 2, 3)]},
         "one or two"),
        ({"relays": [{"ip": None, "port": 1, "tls": False, "family": 6},
                     {"ip": "2001:db8::1", "port": 1, "tls": False}]}, "one address per IP"),
        ({"relays": [{"ip": None, "port": 1, "tls": False},
                     {"ip": None, "port": 1, "tls": False, "family": 6}]}, "one address per IP"),
        ({"relay": {"ip": None, "port": 1, "tls": False, "family": 5}}, "relay family must be"),
        ({"relay": {"ip": "192.0.2.1", "port": 1, "tls": False, "family": 4}}, "null ip"),
    ],
)  # fmt: skip
def test_bad_relay_entries_are_refused(relays: dict[str, object], message: str) -> None:
    body = HubInfo(PrivateKey.generate().public_key(), (), 300, 60, 60, 0, False).to_json()
    with pytest.raises(ValidationError, match=message):
        HubInfo.from_json({**body, **relays})
