"""Every validation rule of the hub: a 4xx with a one-line reason, and nothing changes."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import AddressPolicy

from .hub_harness import Hub, Peer, hub_clock

TEN_MIB = 10 * 1024 * 1024


def _body(peer: Peer, **changes: Any) -> Any:
    body = peer.body(["192.0.2.10:51820"], ["10.20.0.1/32"])
    body.update(changes)
    return body


def _endpoint(address: str, kind: str = "host") -> dict[str, str]:
    return {"type": kind, "address": address}


BAD_BODIES: list[tuple[str, Any]] = [
    ("not json", b"{not json"),
    ("not utf-8", b'{"public_key": "\xff"}'),
    ("array", b"[]"),
    ("NaN", b'{"public_key": NaN}'),
    ("duplicate key", b'{"endpoints": [], "endpoints": []}'),
    ("deep nesting", b"[" * 30000 + b"]" * 30000),
    ("missing field", {"public_key": None}),
    ("unknown field", {"extra": 1}),
    ("endpoints not a list", {"endpoints": "192.0.2.1:1"}),
    ("endpoint not an object", {"endpoints": ["192.0.2.1:1"]}),
    ("endpoint bad type", {"endpoints": [_endpoint("192.0.2.1:1", "turn")]}),
    ("endpoint type not a string", {"endpoints": [{"type": 1, "address": "192.0.2.1:1"}]}),
    ("endpoint extra field", {"endpoints": [{**_endpoint("192.0.2.1:1"), "x": 1}]}),
    ("endpoint DNS name", {"endpoints": [_endpoint("example.com:51820")]}),
    ("endpoint localhost", {"endpoints": [_endpoint("localhost:51820")]}),
    ("endpoint no port", {"endpoints": [_endpoint("192.0.2.1")]}),
    ("endpoint port 0", {"endpoints": [_endpoint("192.0.2.1:0")]}),
    ("endpoint port 65536", {"endpoints": [_endpoint("192.0.2.1:65536")]}),
    ("endpoint port sign", {"endpoints": [_endpoint("192.0.2.1:+80")]}),
    ("endpoint unspecified v4", {"endpoints": [_endpoint("0.0.0.0:51820")]}),
    ("endpoint unspecified v6", {"endpoints": [_endpoint("[::]:51820")]}),
    ("endpoint loopback v4", {"endpoints": [_endpoint("127.0.0.1:51820")]}),
    ("endpoint loopback v6", {"endpoints": [_endpoint("[::1]:51820")]}),
    ("endpoint multicast v4", {"endpoints": [_endpoint("239.1.1.1:51820")]}),
    ("endpoint multicast v6", {"endpoints": [_endpoint("[ff02::1]:51820")]}),
    ("endpoint link-local", {"endpoints": [_endpoint("169.254.1.1:51820")]}),
    ("endpoint zone id", {"endpoints": [_endpoint("[fe80::1%eth0]:51820")]}),
    ("endpoint broadcast", {"endpoints": [_endpoint("255.255.255.255:51820")]}),
    ("endpoint v4-mapped", {"endpoints": [_endpoint("[::ffff:192.0.2.1]:51820")]}),
    ("endpoint v6 without brackets", {"endpoints": [_endpoint("2001:db8::1:51820")]}),
    ("endpoint leading zeros", {"endpoints": [_endpoint("192.0.2.01:51820")]}),
    ("endpoint repeated", {"endpoints": [_endpoint("192.0.2.1:1")] * 2}),
    ("17 endpoints", {"endpoints": [_endpoint(f"192.0.2.{n}:1") for n in range(1, 18)]}),
    ("key not base64", {"public_key": "!" * 44}),
    ("key 31 bytes", {"public_key": base64.b64encode(bytes(range(1, 32))).decode()}),
    ("key all zero", {"public_key": base64.b64encode(bytes(32)).decode()}),
    ("key not a string", {"public_key": 5}),
    ("allowed not a list", {"allowed_ips": "10.0.0.1/32"}),
    ("allowed not a string", {"allowed_ips": [167772161]}),
]

HOSTILE_ALLOWED_IPS = [
    ["0.0.0.0/0"],
    ["::/0"],
    ["0.0.0.0/1", "128.0.0.0/1"],
    ["::/1", "8000::/1"],
    ["127.0.0.0/8"],
    ["127.0.0.1/32"],
    ["::1/128"],
    ["224.0.0.0/4"],
    ["ff00::/8"],
    ["255.255.255.255/32"],
    ["::ffff:0:0/96"],
    ["::ffff:10.0.0.1/128"],
    ["10.0.0.1/24"],
    ["10.0.0.1"],
    ["10.0.0.0/33"],
    ["10.000.0.0/16"],
    ["FD00::/64"],
    ["fd00:0::/64"],
    [" 10.0.0.0/24"],
    ["10.0.0.0/24", "10.0.0.128/25"],
    ["10.0.0.1/32", "10.0.0.1/32"],
    ["example.com/32"],
    [f"10.{n // 256}.{n % 256}.0/24" for n in range(65)],
]


async def _assert_refused(hub: Hub, peer: Peer, payload: Any, status: int) -> str:
    reply = await peer.put("alice", payload)
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}
    assert body["error"]
    assert "\n" not in body["error"]
    assert hub.store.stats().peers == 0
    return str(body["error"])


@pytest.mark.parametrize(("label", "change"), BAD_BODIES, ids=[label for label, _ in BAD_BODIES])
async def test_bad_register_bodies_are_400(label: str, change: Any) -> None:
    async with Hub() as hub:
        peer = hub.peer()
        payload = change if isinstance(change, bytes) else _body(peer, **change)
        if label == "missing field":
            payload = {k: v for k, v in _body(peer).items() if k != "public_key"}
        await _assert_refused(hub, peer, payload, 400)


@pytest.mark.parametrize("allowed", HOSTILE_ALLOWED_IPS, ids=lambda a: ",".join(a)[:40])
async def test_hostile_allowed_ips_are_400(allowed: list[str]) -> None:
    async with Hub() as hub:
        peer = hub.peer()
        reason = await _assert_refused(hub, peer, _body(peer, allowed_ips=allowed), 400)
        assert "allowed_ips" in reason


@pytest.mark.parametrize(
    "name",
    ["", "-alice", ".alice", "_x", "Alice", "al ice", "a" * 64, "al%C3%A9", "a%2Fb", "%2E%2E"],
)
async def test_bad_names_are_400(name: str) -> None:
    async with Hub() as hub:
        peer = hub.peer()
        reply = await peer.put(name) if name else await hub.http.put("/v1/peers/", json={})
        # An empty or slash-containing name does not match the route at all: 404.
        assert reply.status_code == (404 if name in ("", "a%2Fb") else 400)
        assert hub.store.stats().peers == 0


@pytest.mark.parametrize("name", ["a", "0", "a" * 63, "web-1.eu_west", "9.9.9.9"])
async def test_good_names_register(name: str) -> None:
    async with Hub() as hub:
        peer = hub.peer()
        assert (await peer.put(name)).status_code == 201


@pytest.mark.parametrize(
    "endpoint",
    ["10.0.0.7:51820", "192.168.1.2:1", "172.16.0.1:65535", "[fd12:3456::1]:51820", "100.64.0.1:9"],
)
async def test_private_addresses_are_valid_host_candidates(endpoint: str) -> None:
    async with Hub() as hub:
        peer = hub.peer()
        reply = await peer.put("alice", _body(peer, endpoints=[_endpoint(endpoint)]))
        assert reply.status_code == 201
        assert reply.json()["endpoints"] == [_endpoint(endpoint)]


async def test_64_allowed_ips_are_accepted() -> None:
    key = PrivateKey.generate()
    async with Hub(addresses=AddressPolicy(route_keys=frozenset({key.public_key()}))) as hub:
        peer = hub.peer(key=key)
        allowed = [f"10.{n}.0.0/16" for n in range(64)]
        reply = await peer.put("alice", _body(peer, allowed_ips=allowed))
        assert reply.status_code == 201
        assert reply.json()["allowed_ips"] == allowed


async def test_refused_refresh_keeps_the_old_record() -> None:
    async with Hub() as hub:
        peer = hub.peer()
        assert (await peer.put("alice")).status_code == 201
        before = (await peer.get("alice")).json()
        bad = await peer.put("alice", _body(peer, allowed_ips=["0.0.0.0/0"]))
        assert bad.status_code == 400
        after = (await peer.get("alice")).json()
        assert after["revision"] == before["revision"]
        assert after["allowed_ips"] == before["allowed_ips"]


@pytest.mark.parametrize(
    "query", ["wait=-1", "wait=abc", "wait=1e3", "wait=3601", "since=-1", "since=x", "wait=nan"]
)
async def test_bad_wait_parameters_are_400(query: str) -> None:
    async with Hub() as hub:
        peer = hub.peer()
        reply = await hub.http.get(f"/v1/peers/bob?{query}", auth=peer.auth)
        assert reply.status_code == 400


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"from": "alice", "data": "x" * 2049}, 400),
        ({"from": "alice", "data": "é" * 1025}, 400),
        ({"from": "Alice", "data": "x"}, 400),
        ({"from": "alice", "data": 5}, 400),
        ({"from": "alice"}, 400),
        ({"from": "alice", "data": "x", "to": "bob"}, 400),
        ({"from": "alice", "data": "x" * 2048}, 202),
    ],
)
async def test_signal_message_validation(payload: Any, status: int) -> None:
    async with Hub() as hub:
        alice, bob = hub.peer(), hub.peer()
        await alice.put("alice")
        await bob.put("bob")
        reply = await hub.http.post("/v1/peers/bob/messages", json=payload, auth=alice.auth)
        assert reply.status_code == status
        queued = hub.store.stats().queued
        assert queued == (1 if status == 202 else 0)


async def test_ten_mib_body_with_content_length_is_413_before_reading() -> None:
    async with Hub() as hub:
        peer = hub.peer()
        reply = await peer.put("alice", b"x" * TEN_MIB)
        assert (reply.status_code, reply.json()) == (
            413,
            {"error": "body is larger than 65536 bytes"},
        )
        assert hub.store.stats().peers == 0


# The hub stops reading after 64 KiB, so httpx's ASGI transport is left holding its half-consumed
# body generator and reports it when it is garbage collected: that report is this test's point.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_ten_mib_streamed_body_is_cut_after_64_kib() -> None:
    async with Hub() as hub:
        sent = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal sent
            for _ in range(TEN_MIB // 4096):
                sent += 4096
                yield b" " * 4096

        headers = hub.peer().signer.sign("PUT", "/v1/peers/alice", b"", now=hub_clock())
        reply = await hub.http.put("/v1/peers/alice", content=chunks(), headers=headers)
        assert reply.status_code == 413
        assert hub.store.stats().peers == 0
        assert 64 * 1024 < sent < 1024 * 1024


async def test_slow_body_is_408(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(body_timeout=10.0) as hub:

        async def slow() -> AsyncIterator[bytes]:
            yield b"{"
            await trio.sleep(11)
            yield b"}"

        start = trio.current_time()
        reply = await hub.http.put("/v1/peers/alice", content=slow(), headers={"x": "y"})
        assert reply.status_code == 408
        assert trio.current_time() - start >= 10


async def test_bad_content_length_is_400() -> None:
    async with Hub() as hub:
        peer = hub.peer()
        reply = await peer.put("alice", headers={"Content-Length": "-5"})
        assert reply.status_code == 400
        assert json.loads(reply.content) == {"error": "invalid Content-Length"}
