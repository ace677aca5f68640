"""PeerHubClient against an in-test Starlette app that reproduces peer-hub's API (yago-123/peer-hub:
``POST /register`` answering ``ok``, ``GET /peer/{peer_id}`` answering JSON or 404 as plain text)."""

from __future__ import annotations

import ipaddress
import json
import random
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    Endpoint,
    EndpointType,
    PeerHubClient,
    PeerNotFoundError,
    Rendezvous,
    RendezvousProtocolError,
    RendezvousRefusedError,
    RendezvousUnavailableError,
    SignallingNotSupportedError,
)

HOST = Endpoint.parse("192.168.1.20:51820", EndpointType.HOST)
SRFLX = Endpoint.parse("198.51.100.7:51820", EndpointType.SRFLX)


class FakePeerHub:
    """peer-hub's two handlers, as its Go code behaves: any JSON with the four fields registers
    (overwriting whoever held the id), the endpoint must resolve, CIDRs must parse."""

    def __init__(self) -> None:
        self.peers: dict[str, dict[str, Any]] = {}
        self.bodies: list[Any] = []
        self.lookups = 0
        self.app = Starlette(
            routes=[
                Route("/register", self.register, methods=["POST"]),
                Route("/peer/{peer_id}", self.lookup, methods=["GET"]),
            ]
        )

    async def register(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            peer_id, key, endpoint = body["peer_id"], body["public_key"], body["endpoint"]
            allowed = [str(ipaddress.ip_network(c, strict=False)) for c in body["allowed_ips"]]
        except (ValueError, KeyError, TypeError):
            return PlainTextResponse("invalid request body", 400)
        if ":" not in endpoint:
            return PlainTextResponse("invalid endpoint", 400)
        self.bodies.append(body)
        self.peers[peer_id] = {
            "peer_id": peer_id,
            "public_key": key,
            "endpoint": endpoint,
            "allowed_ips": allowed,
        }
        return PlainTextResponse("ok")

    async def lookup(self, request: Request) -> Response:
        self.lookups += 1
        peer = self.peers.get(request.path_params["peer_id"])
        if peer is None:
            return PlainTextResponse("peer not found", 404)
        return JSONResponse(peer)


def client(hub: FakePeerHub, name: str, **kwargs: Any) -> PeerHubClient:
    return PeerHubClient(
        "http://peer-hub.test:7777",
        name,
        PrivateKey.generate().public_key(),
        transport=httpx.ASGITransport(hub.app),
        rng=random.Random(7),
        **kwargs,
    )


async def test_register_and_lookup_in_peerhub_shape() -> None:
    hub = FakePeerHub()
    alice, bob = client(hub, "alice"), client(hub, "bob")
    assert isinstance(alice, Rendezvous)
    record = await alice.register([HOST, SRFLX], ["10.1.1.1/32"])
    assert hub.bodies == [
        {
            "peer_id": "alice",
            "public_key": alice.public_key.to_base64(),
            "endpoint": "198.51.100.7:51820",  # peer-hub keeps one: the server-reflexive one
            "allowed_ips": ["10.1.1.1/32"],
        }
    ]
    assert record.endpoints == (SRFLX,)
    found = await bob.lookup("alice")
    assert (found.name, found.public_key, found.endpoints) == ("alice", alice.public_key, (SRFLX,))
    assert [str(n) for n in found.allowed_ips] == ["10.1.1.1/32"]
    with pytest.raises(PeerNotFoundError):
        await bob.lookup("carol")
    await alice.aclose()
    await bob.aclose()


async def test_first_endpoint_without_a_reflexive_one_and_none_at_all() -> None:
    hub = FakePeerHub()
    alice = client(hub, "alice")
    record = await alice.register([HOST])
    assert [e.address for e in record.endpoints] == [HOST.address]
    assert hub.bodies[-1]["endpoint"] == "192.168.1.20:51820"
    with pytest.raises(RendezvousRefusedError, match="one endpoint"):
        await alice.register([])
    await alice.aclose()


async def test_wait_polls_until_the_peer_appears(autojump_clock: trio.abc.Clock) -> None:
    hub = FakePeerHub()
    alice, bob = client(hub, "alice"), client(hub, "bob")
    result: list[Any] = []

    async def wait() -> None:
        result.append(await alice.wait_for_peer("bob"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(30)
        polls = hub.lookups
        assert 10 <= polls <= 40  # backoff to a 2 s ceiling: polls, but not in a busy loop
        await bob.register([SRFLX])
        registered_at = trio.current_time()
    assert result[0].public_key == bob.public_key
    assert trio.current_time() - registered_at <= 2.0  # found within one poll interval
    # revisions count the changes this client saw
    first = result[0].revision
    await bob.register([Endpoint.parse("203.0.113.5:1234", EndpointType.SRFLX)])
    assert (await alice.wait_for_peer("bob", newer_than=first)).revision == first + 1
    await alice.aclose()
    await bob.aclose()


async def test_signalling_is_not_supported_and_unregister_is_a_no_op() -> None:
    hub = FakePeerHub()
    alice = client(hub, "alice")
    await alice.register([SRFLX])
    with pytest.raises(SignallingNotSupportedError):
        await alice.send_signal("bob", "hi")
    with pytest.raises(SignallingNotSupportedError):
        await alice.receive_signal()
    await alice.unregister()
    assert "alice" in hub.peers  # peer-hub cannot delete
    await alice.aclose()


async def test_peerhub_refusal_reason_is_reported() -> None:
    hub = FakePeerHub()
    alice = client(hub, "alice")

    async def refuse(request: Request) -> Response:
        return PlainTextResponse("invalid CIDR in allowed_ips\nsecond line \x1b[31m", 400)

    hub.app.router.routes[0] = Route("/register", refuse, methods=["POST"])
    with pytest.raises(RendezvousRefusedError, match=r"^peer-hub: invalid CIDR in allowed_ips$"):
        await alice.register([SRFLX])
    await alice.aclose()


def hostile(record: Any) -> FakePeerHub:
    hub = FakePeerHub()
    hub.peers["bob"] = record
    return hub


GOOD = {
    "peer_id": "bob",
    "public_key": PrivateKey.generate().public_key().to_base64(),
    "endpoint": "203.0.113.9:40000",
    "allowed_ips": ["10.1.1.2/32"],
}


@pytest.mark.parametrize(
    "change",
    [
        {"peer_id": "mallory"},
        {"public_key": "AAAA"},
        {"public_key": "A" * 43 + "="},  # all zero
        {"endpoint": "127.0.0.1:51820"},  # loopback
        {"endpoint": "bob.example:51820"},  # a name: never resolved
        {"endpoint": "203.0.113.9:0"},
        {"allowed_ips": ["0.0.0.0/0"]},
        {"allowed_ips": ["10.1.1.0/24", "10.1.1.2/32"]},
        {"allowed_ips": "10.1.1.2/32"},
    ],
)
async def test_hostile_peerhub_records_are_refused(change: dict[str, Any]) -> None:
    alice = client(hostile({**GOOD, **change}), "alice")
    with pytest.raises(RendezvousProtocolError, match="peer-hub"):
        await alice.lookup("bob")
    await alice.aclose()


async def test_go_null_allowed_ips_is_an_empty_list() -> None:
    alice = client(hostile({**GOOD, "allowed_ips": None}), "alice")
    assert (await alice.lookup("bob")).allowed_ips == ()
    await alice.aclose()


async def test_unreachable_peerhub(autojump_clock: trio.abc.Clock) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    alice = PeerHubClient(
        "http://peer-hub.test",
        "alice",
        PrivateKey.generate().public_key(),
        transport=httpx.MockTransport(refuse),
        attempts=2,
    )
    with pytest.raises(RendezvousUnavailableError, match="cannot reach peer-hub"):
        await alice.lookup("bob")
    await alice.aclose()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
ANSWERS = st.one_of(
    st.text(max_size=80),
    JSON.map(json.dumps),
    st.fixed_dictionaries({}, optional={k: JSON | st.just(v) for k, v in GOOD.items()}).map(
        json.dumps
    ),
)


@settings(max_examples=80, deadline=None)
@given(ANSWERS)
def test_any_lookup_answer_gives_a_record_or_one_clear_error(text: str) -> None:
    """Whatever peer-hub answers with 200, the client returns a valid record or raises its
    protocol error: never another exception."""

    async def main() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=text))
        alice = PeerHubClient(
            "http://peer-hub.test",
            "alice",
            PrivateKey.generate().public_key(),
            transport=transport,
        )
        try:
            await alice.lookup("bob")
        except RendezvousProtocolError:
            pass
        finally:
            await alice.aclose()

    trio.run(main)
