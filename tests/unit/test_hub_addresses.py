"""The hub governs overlay addresses: claims limits, network prefixes and assignment, every
encoding of loopback refused, request-head limits, and /healthz outside the API's rate limit."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.cli._main import UsageError
from punchtrio.cli._up import UpPlan, assigned_address
from punchtrio.keys import PublicKey
from punchtrio.rendezvous import (
    ASSIGN_ATTEMPTS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    AddressPolicy,
    Endpoint,
    HubClient,
    HubInfo,
    ValidationError,
    assignment_candidates,
)
from punchtrio.rendezvous._models import check_unicast

from .hub_harness import Hub, hub_clock

V4 = ipaddress.ip_network("100.64.0.0/10")
V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")
PREFIXED = AddressPolicy(prefixes=(V4, V6))


def _routers(*keys: PrivateKey, **options: Any) -> AddressPolicy:
    return AddressPolicy(route_keys=frozenset(key.public_key() for key in keys), **options)


# -- every encoding of loopback ------------------------------------------------------------------

LOOPBACKS = [
    "127.0.0.1:51820",
    "127.255.255.254:51820",
    "[::1]:51820",
    "[::ffff:127.0.0.1]:51820",  # IPv4-mapped
    "[::127.0.0.1]:51820",  # IPv4-compatible (deprecated)
    "[64:ff9b::7f00:1]:51820",  # NAT64 well-known prefix
    "[64:ff9b:1::7f00:1]:51820",  # NAT64 local-use prefix
    "[2002:7f00:1::]:51820",  # 6to4
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]:51820",  # Teredo, client 127.0.0.1 (obfuscated)
    "[::ffff:0:7f00:1]:51820",  # IPv4-translated
    "0.0.0.0:51820",
    "[::]:51820",
]


@pytest.mark.parametrize("address", LOOPBACKS)
def test_every_encoding_of_loopback_is_refused(address: str) -> None:
    with pytest.raises(ValidationError, match=r"^endpoint address: \S+ is "):
        Endpoint.parse(address)


@pytest.mark.parametrize(
    "address",
    [
        "[64:ff9b::808:808]:51820",  # NAT64 of 8.8.8.8
        "[2002:c000:201::1]:51820",  # 6to4 of 192.0.2.1
        "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:51820",  # Teredo, client 192.0.2.45
        "[2001:db8::7]:51820",
        "192.0.2.7:51820",
    ],
)
def test_public_addresses_in_those_encodings_are_accepted(address: str) -> None:
    assert Endpoint.parse(address).address == address


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=300)
def test_an_embedded_ipv4_is_judged_like_the_ipv4(value: int) -> None:
    ipv4 = ipaddress.IPv4Address(value)
    try:
        check_unicast(ipv4)
        plain_ok = True
    except ValidationError:
        plain_ok = False
    for embedded in (
        ipaddress.IPv6Address((0x0064FF9B << 96) | value),  # 64:ff9b::a.b.c.d
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1),  # 2002:aabb:ccdd::1
    ):
        try:
            check_unicast(embedded)
            embedded_ok = True
        except ValidationError:
            embedded_ok = False
        assert embedded_ok == plain_ok, embedded


async def test_the_hub_refuses_an_ipv6_encoded_loopback_endpoint() -> None:
    async with Hub() as hub:
        peer = hub.peer()
        body = peer.body()
        for address in ("[::127.0.0.1]:51820", "[64:ff9b::7f00:1]:51820", "[2002:7f00:1::]:51820"):
            body["endpoints"] = [{"type": "host", "address": address}]
            reply = await peer.put("alice", body)
            assert reply.status_code == 400, address
            assert reply.json()["error"].startswith("endpoint address: "), address
        assert hub.store.stats().peers == 0


# -- claims limits -----------------------------------------------------------------------------


async def test_the_squatting_registration_is_refused_and_others_register() -> None:
    """One fresh key claiming all of 10.0.0.0/8 (25 prefixes) no longer locks everyone out."""
    squat = [f"10.{n}.0.0/16" for n in range(24)] + ["10.128.0.0/9"]
    assert sum(ipaddress.ip_network(p).num_addresses for p in squat) < 2**24
    async with Hub() as hub:
        attacker, victim = hub.peer(), hub.peer()
        reply = await attacker.put("squatter", attacker.body(allowed=squat))
        assert reply.status_code == 403
        assert "subnet route" in reply.json()["error"]
        assert (await victim.put("alice", victim.body(allowed=["10.77.0.1/32"]))).status_code == 201
        many = [f"10.1.0.{n}/32" for n in range(1, 26)]  # 25 single addresses: also refused
        assert (await attacker.put("squatter", attacker.body(allowed=many))).status_code == 403
        assert hub.store.stats().peers == 1


async def test_default_limit_is_one_address_per_version_both_sides() -> None:
    async with Hub() as hub:
        peer = hub.peer()
        one_each = ["10.77.0.1/32", "fd00::1/128"]
        assert (await peer.put("alice", peer.body(allowed=one_each))).status_code == 201
        for too_many in (["10.77.0.1/32", "10.77.0.2/32"], ["fd00::1/128", "fd00::2/128"]):
            reply = await peer.put("alice", peer.body(allowed=too_many))
            assert reply.status_code == 403, too_many
            assert "at most 1 " in reply.json()["error"]
        for route in ("10.77.0.0/31", "fd00::/127"):
            assert (await peer.put("alice", peer.body(allowed=[route]))).status_code == 403
        assert (await peer.get("alice")).json()["allowed_ips"] == one_each


async def test_max_addresses_is_a_bound_both_sides() -> None:
    async with Hub(addresses=AddressPolicy(max_addresses=2)) as hub:
        peer = hub.peer()
        two = ["10.77.0.1/32", "10.77.0.2/32"]
        assert (await peer.put("alice", peer.body(allowed=two))).status_code == 201
        three = [*two, "10.77.0.3/32"]
        assert (await peer.put("alice", peer.body(allowed=three))).status_code == 403


async def test_routes_only_for_keys_the_operator_allows() -> None:
    router = PrivateKey.generate()
    async with Hub(addresses=_routers(router)) as hub:
        allowed, other = hub.peer(key=router), hub.peer()
        routes = ["10.77.0.1/32", "192.168.1.0/24", "fd00:1::/64"]
        assert (await allowed.put("router", allowed.body(allowed=routes))).status_code == 201
        reply = await other.put("bob", other.body(allowed=["192.168.2.0/24"]))
        assert reply.status_code == 403
        assert "--allow-routes" in reply.json()["error"]


# -- network prefixes and assignment -----------------------------------------------------------


async def test_a_prefixed_hub_refuses_addresses_outside_its_prefix() -> None:
    router = PrivateKey.generate()
    async with Hub(
        addresses=AddressPolicy((V4, V6), route_keys=frozenset({router.public_key()}))
    ) as hub:
        peer, routing = hub.peer(), hub.peer(key=router)
        for outside in ("10.77.0.1/32", "fd00::1/128"):
            reply = await peer.put("alice", peer.body(allowed=[outside]))
            assert reply.status_code == 403, outside
            assert "outside this hub's network prefix" in reply.json()["error"]
        inside = ["100.64.0.5/32", "fd7a:115c:a1e0::5/128"]
        assert (await peer.put("alice", peer.body(allowed=inside))).status_code == 201
        # Routes of an allowed key lie outside the prefix, never inside it.
        lan = ["100.64.0.6/32", "192.168.1.0/24"]
        assert (await routing.put("gw", routing.body(allowed=lan))).status_code == 201
        reply = await routing.put("gw", routing.body(allowed=["100.65.0.0/16"]))
        assert reply.status_code == 403
        assert "overlaps the network prefix" in reply.json()["error"]


async def _assign(peer: Any, name: str, allowed: list[str] | None = None) -> httpx.Response:
    body = peer.body(allowed=allowed)
    body["assign"] = True
    return await peer.put(name, body)


async def test_assignment_is_in_the_prefixes_and_stable_per_key() -> None:
    async with Hub(addresses=PREFIXED) as hub:
        info = HubInfo.from_json((await hub.http.get("/v1/hub")).json())
        assert info.network_prefixes == (V4, V6)
        peer = hub.peer()
        first = await _assign(peer, "alice")
        assert first.status_code == 201
        v4, v6 = (ipaddress.ip_network(n) for n in first.json()["allowed_ips"])
        assert (v4.prefixlen, v6.prefixlen) == (32, 128)
        expected = [next(assignment_candidates(peer.key.public_key(), p)) for p in (V4, V6)]
        assert [v4, v6] == expected
        refreshed = await _assign(peer, "alice")
        assert refreshed.status_code == 200
        assert refreshed.json()["allowed_ips"] == first.json()["allowed_ips"]
        assert (await peer.delete("alice")).status_code == 204
        again = await _assign(peer, "alice")
        assert again.json()["allowed_ips"] == first.json()["allowed_ips"]
        # A peer that claims its own IPv4 address gets only the IPv6 one assigned.
        other = hub.peer()
        own = await _assign(other, "bob", ["100.64.9.9/32"])
        assert own.json()["allowed_ips"][0] == "100.64.9.9/32"
        assert ipaddress.ip_network(own.json()["allowed_ips"][1]).version == 6


async def test_assignment_probes_past_a_taken_address_and_keeps_it_on_refresh() -> None:
    v4_only = AddressPolicy(prefixes=(V4,))
    async with Hub(addresses=v4_only) as hub:
        newcomer, squatter = hub.peer(), hub.peer()
        wanted = list(itertools.islice(assignment_candidates(newcomer.key.public_key(), V4), 2))
        taken = await squatter.put("squatter", squatter.body(allowed=[str(wanted[0])]))
        assert taken.status_code == 201
        reply = await _assign(newcomer, "alice")
        assert reply.json()["allowed_ips"] == [str(wanted[1])]
        # The first choice frees up: a refresh keeps the address the peer has.
        await squatter.delete("squatter")
        assert (await _assign(newcomer, "alice")).json()["allowed_ips"] == [str(wanted[1])]


async def test_many_keys_get_distinct_addresses() -> None:
    small = ipaddress.ip_network("100.64.0.0/22")  # 1022 hosts for 200 keys
    async with Hub(addresses=AddressPolicy(prefixes=(small,))) as hub:
        seen = set()
        for n in range(200):
            peer = hub.peer()
            reply = await _assign(peer, f"p{n}")
            assert reply.status_code == 201, reply.json()
            (address,) = reply.json()["allowed_ips"]
            assert ipaddress.ip_network(address).subnet_of(small)  # type: ignore[arg-type]
            seen.add(address)
        assert len(seen) == 200


async def test_a_full_prefix_answers_409_and_changes_nothing() -> None:
    tiny = ipaddress.ip_network("100.64.0.0/30")  # two hosts
    async with Hub(addresses=AddressPolicy(prefixes=(tiny,))) as hub:
        codes = [(await _assign(hub.peer(), f"p{n}")).status_code for n in range(2)]
        assert codes == [201, 201]
        reply = await _assign(hub.peer(), "third")
        assert reply.status_code == 409
        assert "no free address in 100.64.0.0/30" in reply.json()["error"]
        assert hub.store.stats().peers == 2


async def test_a_tiny_prefix_finds_its_last_free_address_whatever_the_key() -> None:
    # A key whose every hashed candidate in a two-host prefix is the taken address (1 key in
    # 256) still gets the free one: a prefix with no more hosts than tries is tried host by host.
    tiny = ipaddress.ip_network("100.64.0.0/30")
    taken = ipaddress.ip_network("100.64.0.1/32")
    unlucky = next(
        key
        for key in iter(PrivateKey.generate, None)
        if set(itertools.islice(assignment_candidates(key.public_key(), tiny), 8)) == {taken}
    )
    async with Hub(addresses=AddressPolicy(prefixes=(tiny,))) as hub:
        squatter = hub.peer()
        assert (
            await squatter.put("squatter", squatter.body(allowed=[str(taken)]))
        ).status_code == 201
        reply = await _assign(hub.peer(key=unlucky), "unlucky")
        assert reply.status_code == 201, reply.json()
        assert reply.json()["allowed_ips"] == ["100.64.0.2/32"]


async def test_assign_on_a_hub_without_prefix_is_400() -> None:
    async with Hub() as hub:
        reply = await _assign(hub.peer(), "alice")
        assert reply.status_code == 400
        assert "assigns no addresses" in reply.json()["error"]


@given(
    st.binary(min_size=32, max_size=32),
    st.sampled_from(["100.64.0.0/10", "10.9.0.0/30", "fd7a:115c:a1e0::/48", "fd00::/126"]),
)
@settings(max_examples=200)
def test_candidates_are_hosts_of_the_prefix_and_deterministic(raw: bytes, text: str) -> None:
    if raw == bytes(32):
        raw = b"\x01" * 32
    key = PublicKey(raw)
    prefix = ipaddress.ip_network(text)
    first = list(itertools.islice(assignment_candidates(key, prefix), ASSIGN_ATTEMPTS))
    assert first == list(itertools.islice(assignment_candidates(key, prefix), ASSIGN_ATTEMPTS))
    for network in first:
        assert network.prefixlen == prefix.max_prefixlen
        assert network.subnet_of(prefix)  # type: ignore[arg-type]
        assert network.network_address != prefix.network_address
        if prefix.version == 4:
            assert network.network_address != prefix.broadcast_address


def test_network_prefixes_are_checked() -> None:
    for bad in (
        (V4, ipaddress.ip_network("10.0.0.0/8")),
        (ipaddress.ip_network("10.0.0.0/31"),),
        (ipaddress.ip_network("127.0.0.0/16"),),
    ):
        with pytest.raises(ValueError, match=r"network.prefix"):
            AddressPolicy(prefixes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_addresses"):
        AddressPolicy(max_addresses=0)


# -- up without --address ----------------------------------------------------------------------


def _plan(key: PrivateKey) -> UpPlan:
    return UpPlan("http://hub.test", "alice", key, None, ("bob",))


async def test_up_takes_the_assigned_ipv4_address_with_the_prefix_length() -> None:
    async with Hub(addresses=PREFIXED) as hub:
        key = PrivateKey.generate()
        client = HubClient(
            "http://hub.test", key, "alice", transport=httpx.ASGITransport(hub.app), clock=hub_clock
        )
        address = await assigned_address(_plan(key), client)
        assert address.network == V4
        assert address.ip == next(assignment_candidates(key.public_key(), V4)).network_address
        assert await assigned_address(_plan(key), client) == address  # stable
        await client.aclose()


async def test_up_without_address_on_a_hub_without_prefix_says_pass_address() -> None:
    async with Hub() as hub:
        key = PrivateKey.generate()
        client = HubClient(
            "http://hub.test", key, "alice", transport=httpx.ASGITransport(hub.app), clock=hub_clock
        )
        with pytest.raises(UsageError, match=r"assigns no addresses.*pass --address CIDR"):
            await assigned_address(_plan(key), client)
        await client.aclose()
        assert hub.store.stats().peers == 0


# -- request-head limits and /healthz -------------------------------------------------------------


def _head_size(request: httpx.Request) -> int:
    line = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    return len(line) + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2


async def _get_with_head(hub: Hub, size: int) -> httpx.Response:
    request = hub.http.build_request("GET", "/healthz", headers={"x-pad": ""})
    request.headers["x-pad"] = "a" * (size - _head_size(request))
    assert _head_size(request) == size
    return await hub.http.send(request)


async def test_head_size_limit_both_sides() -> None:
    async with Hub() as hub:
        assert (await _get_with_head(hub, MAX_HEADER_BYTES)).status_code == 200
        refused = await _get_with_head(hub, MAX_HEADER_BYTES + 1)
        assert refused.status_code == 431
        assert refused.json() == {"error": f"request head is larger than {MAX_HEADER_BYTES} bytes"}


async def test_header_count_limit_both_sides() -> None:
    async with Hub() as hub:
        base = len(hub.http.build_request("GET", "/healthz").headers.raw)
        for count, status in ((MAX_HEADERS, 200), (MAX_HEADERS + 1, 431)):
            extra = [(f"x-h{n}", "1") for n in range(count - base)]
            request = hub.http.build_request("GET", "/healthz", headers=extra)
            assert len(request.headers.raw) == count
            assert (await hub.http.send(request)).status_code == status, count


async def test_healthz_is_not_rate_limited_with_the_api(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(rate=2.0, burst=5.0) as hub:
        codes = [(await hub.http.get("/v1/hub")).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        assert [(await hub.http.get("/healthz")).status_code for _ in range(50)] == [200] * 50
        assert (await hub.http.get("/v1/hub")).status_code == 429


async def _raw_status(port: int, head: bytes) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head)
        answer = b""
        with trio.fail_after(5):
            while b"\r\n" not in answer:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                answer += chunk
    return int(answer.split(b" ", 2)[1])


async def test_the_real_server_refuses_the_reported_heads() -> None:
    """Over TCP to Hypercorn: the 65,400-byte header and the 5,000 headers once answered 200."""
    from punchtrio.rendezvous._hub import HubConfig
    from punchtrio.rendezvous._serve import serve_hub

    config = HubConfig(PrivateKey.generate(), rate=0.0)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_hub, config, ("127.0.0.1", 0))
        port = int(listeners.http[0].rsplit(":", 1)[1])
        line = b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n"
        fits = line + b"X-Pad: " + b"a" * (MAX_HEADER_BYTES - len(line) - 11) + b"\r\n\r\n"
        assert len(fits) == MAX_HEADER_BYTES
        assert await _raw_status(port, fits) == 200
        assert await _raw_status(port, fits[:-4] + b"a\r\n\r\n") == 431
        big = line + b"X-Pad: " + b"a" * 65_400 + b"\r\n\r\n"
        assert await _raw_status(port, big) in (400, 431)  # 400: Hypercorn's own limit
        many = line + b"".join(b"X-%d: 1\r\n" % n for n in range(5000)) + b"\r\n"
        assert len(many) < 65_536
        assert await _raw_status(port, many) in (400, 431)
        nursery.cancel_scope.cancel()
