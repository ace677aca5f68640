"""Listing a network's peers across two hub replicas on one real ``redis-server``: a watcher
long-polling one replica wakes when a peer joins, leaves or expires at the other."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    Endpoint,
    HubAuth,
    HubConfig,
    NetworkSecret,
    PeerListing,
    RegisterRequest,
    RequestSigner,
    create_app,
)
from punchtrio.rendezvous._redis_store import RedisStore

from .test_hub_redis import redis_url

pytestmark = pytest.mark.interop
__all__ = ["redis_url"]  # the fixture, used by name

NETWORK = NetworkSecret(b"the redis mesh network")


class Replica:
    def __init__(self, key: PrivateKey, url: str, ttl: float) -> None:
        self.store = RedisStore(url)
        self.app = create_app(HubConfig(key, (NETWORK,), ttl=ttl, rate=0.0), self.store)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://r")


def auth(hub_key: PrivateKey, key: PrivateKey) -> HubAuth:
    return HubAuth(RequestSigner(key, hub_key.public_key(), NETWORK))


def body(key: PrivateKey) -> bytes:
    request = RegisterRequest(key.public_key(), (Endpoint.parse("192.0.2.7:51820"),), ())
    return json.dumps(request.to_json()).encode()


async def test_listing_long_poll_wakes_across_replicas(redis_url: str) -> None:
    hub_key = PrivateKey.generate()
    a, b = Replica(hub_key, redis_url, ttl=3.0), Replica(hub_key, redis_url, ttl=3.0)
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.run)
            await nursery.start(b.store.run)

            async def listing(since: str = "", wait: str = "20") -> tuple[PeerListing, float]:
                params = {"since": since, "wait": wait} if since else None
                start = time.monotonic()
                reply = await b.http.get(
                    "/v1/peers", params=params, auth=auth(hub_key, bob), timeout=30
                )
                assert reply.status_code == 200, reply.text
                return PeerListing.from_json(reply.json()), time.monotonic() - start

            empty, _ = await listing()
            assert empty.peers == ()

            async def put_later() -> None:
                await trio.sleep(0.5)
                reply = await a.http.put(
                    "/v1/peers/alice", content=body(alice), auth=auth(hub_key, alice)
                )
                assert reply.status_code == 201, reply.text

            nursery.start_soon(put_later)
            joined, took = await listing(empty.tag)
            assert joined.names == {"alice"}
            assert 0.4 < took < 1.5  # woken by the other replica's write, not by a timeout

            async def delete_later() -> None:
                await trio.sleep(0.5)
                reply = await a.http.delete("/v1/peers/alice", auth=auth(hub_key, alice))
                assert reply.status_code == 204

            nursery.start_soon(delete_later)
            left, took = await listing(joined.tag)
            assert left.names == set()
            assert took < 1.5

            reply = await a.http.put(
                "/v1/peers/alice", content=body(alice), auth=auth(hub_key, alice)
            )
            assert reply.status_code == 201
            back, _ = await listing()
            expired, took = await listing(back.tag)  # nobody writes: the record's TTL ends it
            assert expired.names == set()
            assert 2.0 < took < 4.5
            nursery.cancel_scope.cancel()
    finally:
        for replica in (a, b):
            await replica.http.aclose()
            replica.store.close()
