"""Two hub replicas sharing one real ``redis-server`` through :class:`RedisStore`."""

from __future__ import annotations

import itertools
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    AddressPolicy,
    Endpoint,
    HubAuth,
    HubConfig,
    PeerRecord,
    RegisterRequest,
    RequestSigner,
    create_app,
    messages_from_json,
    parse_allowed_ip,
)
from punchtrio.rendezvous._redis_store import RedisStore
from tests.conftest import require_root_and

pytestmark = pytest.mark.interop


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    require_root_and("redis-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmp_path), "--protected-mode", "yes",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


# The tests claim subnets across replicas, which a hub allows only for the keys it is told of.
PEER_KEYS = [PrivateKey.generate() for _ in range(6)]
_next_key = itertools.cycle(PEER_KEYS)


class Replica:
    def __init__(self, key: PrivateKey, url: str, ttl: float) -> None:
        self.store = RedisStore(url)
        routers = AddressPolicy(route_keys=frozenset(k.public_key() for k in PEER_KEYS))
        config = HubConfig(key, ttl=ttl, rate=0.0, addresses=routers)
        self.app = create_app(config, self.store)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://r")


class Peer:
    def __init__(self, hub_key: PrivateKey, *, routes: bool = False) -> None:
        self.key = next(_next_key) if routes else PrivateKey.generate()
        self.auth = HubAuth(RequestSigner(self.key, hub_key.public_key()))

    def body(self, allowed: tuple[str, ...] = ()) -> bytes:
        request = RegisterRequest(
            self.key.public_key(),
            (Endpoint.parse("192.0.2.44:51820"),),
            tuple(parse_allowed_ip(a) for a in allowed),
        )
        return json.dumps(request.to_json()).encode()


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[PrivateKey, Replica, Replica]]:
    key = PrivateKey.generate()
    first, second = Replica(key, redis_url, 2.0), Replica(key, redis_url, 2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.store.run)
        await nursery.start(second.store.run)
        yield key, first, second
        nursery.cancel_scope.cancel()
    for replica in (first, second):
        await replica.http.aclose()
        replica.store.close()


async def test_replicas_share_records_ownership_and_overlaps(
    replicas: tuple[PrivateKey, Replica, Replica],
) -> None:
    key, a, b = replicas
    alice, mallory = Peer(key, routes=True), Peer(key, routes=True)
    put = await a.http.put("/v1/peers/alice", content=alice.body(("10.5.0.0/24",)), auth=alice.auth)
    assert put.status_code == 201
    seen = await b.http.get("/v1/peers/alice", auth=mallory.auth)
    assert PeerRecord.from_json(seen.json()).public_key == alice.key.public_key()
    assert PeerRecord.from_json(seen.json()).revision == put.json()["revision"]
    hijack = await b.http.put("/v1/peers/alice", content=mallory.body(), auth=mallory.auth)
    assert hijack.status_code == 409
    overlap = await b.http.put(
        "/v1/peers/mallory", content=mallory.body(("10.5.0.128/25",)), auth=mallory.auth
    )
    assert overlap.status_code == 409
    fine = await b.http.put(
        "/v1/peers/mallory", content=mallory.body(("10.6.0.0/24",)), auth=mallory.auth
    )
    assert fine.status_code == 201
    refresh = await b.http.put(
        "/v1/peers/alice", content=alice.body(("10.5.0.0/24",)), auth=alice.auth
    )
    assert (refresh.status_code, refresh.json()["revision"]) == (200, put.json()["revision"])
    assert (await b.http.delete("/v1/peers/alice", auth=mallory.auth)).status_code == 409
    assert (await b.http.delete("/v1/peers/alice", auth=alice.auth)).status_code == 204
    assert (await a.http.get("/v1/peers/alice", auth=alice.auth)).status_code == 404


async def test_a_replayed_request_is_refused_by_the_other_replica(
    replicas: tuple[PrivateKey, Replica, Replica],
) -> None:
    key, a, b = replicas
    alice = Peer(key)
    request = a.http.build_request("GET", "/v1/peers/nobody")
    signed = next(alice.auth.auth_flow(request))
    assert (await a.http.send(signed)).status_code == 404
    replay = b.http.build_request("GET", "/v1/peers/nobody", headers=dict(signed.headers))
    answer = await b.http.send(replay)
    assert (answer.status_code, answer.json()) == (401, {"error": "replayed request"})


async def test_wait_and_messages_wake_across_replicas(
    replicas: tuple[PrivateKey, Replica, Replica],
) -> None:
    key, a, b = replicas
    alice, bob = Peer(key), Peer(key)
    answers: list[httpx.Response] = []

    async def wait_for_bob() -> None:
        answers.append(await b.http.get("/v1/peers/bob", params={"wait": 8}, auth=alice.auth))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_bob)
        await trio.sleep(0.3)
        assert (
            await a.http.put("/v1/peers/bob", content=bob.body(), auth=bob.auth)
        ).status_code == 201
    assert answers[0].status_code == 200

    await a.http.put("/v1/peers/alice", content=alice.body(), auth=alice.auth)
    inbox: list[httpx.Response] = []

    async def poll() -> None:
        inbox.append(await b.http.get("/v1/peers/bob/messages", params={"wait": 8}, auth=bob.auth))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.3)
        sent = await a.http.post(
            "/v1/peers/bob/messages", json={"from": "alice", "data": "go"}, auth=alice.auth
        )
        assert sent.status_code == 202
    assert [m.data for m in messages_from_json(inbox[0].json())] == ["go"]


async def test_records_expire_and_free_name_and_prefixes(
    replicas: tuple[PrivateKey, Replica, Replica],
) -> None:
    key, a, b = replicas
    alice, bob = Peer(key, routes=True), Peer(key, routes=True)
    await a.http.put("/v1/peers/alice", content=alice.body(("10.7.0.0/24",)), auth=alice.auth)
    await trio.sleep(2.2)
    assert (await b.http.get("/v1/peers/alice", auth=bob.auth)).status_code == 404
    taken = await b.http.put("/v1/peers/alice", content=bob.body(("10.7.0.0/24",)), auth=bob.auth)
    assert taken.status_code == 201


async def test_contested_name_across_replicas_has_one_owner(
    replicas: tuple[PrivateKey, Replica, Replica],
) -> None:
    key, a, b = replicas
    peers = [Peer(key) for _ in range(100)]
    statuses: list[int] = []

    async def contest(index: int) -> None:
        replica = a if index % 2 else b
        reply = await replica.http.put(
            "/v1/peers/contested", content=peers[index].body(), auth=peers[index].auth
        )
        statuses.append(reply.status_code)

    async with trio.open_nursery() as nursery:
        for index in range(100):
            nursery.start_soon(contest, index)
    assert sorted(statuses) == [201] + [409] * 99


def _start_hub(redis_url: str, log: Path) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-m", "punchtrio.cli", "hub", "--listen", "127.0.0.1:0",
        "--key-file", str(log.parent / "hub.key"), "--redis", redis_url, "--rate", "0",
    ]  # fmt: skip
    with log.open("w") as sink:
        process = subprocess.Popen(command, stderr=sink, text=True)
    for _ in range(300):
        match = re.search(r"serving (http://\S+)", log.read_text())
        if match:
            return process, match[1]
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the hub did not start within 15 s")


async def test_two_hub_processes_share_one_redis(redis_url: str, tmp_path: Path) -> None:
    hub_key = PrivateKey.generate()
    hub_key.write(tmp_path / "hub.key")
    first, first_url = _start_hub(redis_url, tmp_path / "first.log")
    second, second_url = _start_hub(redis_url, tmp_path / "second.log")
    try:
        alice = Peer(hub_key)
        async with httpx.AsyncClient(timeout=20) as http:
            put = await http.put(
                f"{first_url}/v1/peers/alice", content=alice.body(), auth=alice.auth
            )
            assert put.status_code == 201
            seen = await http.get(f"{second_url}/v1/peers/alice", auth=alice.auth)
            assert seen.status_code == 200
            assert seen.json()["revision"] == put.json()["revision"]
    finally:
        for process in (first, second):
            process.terminate()
            assert process.wait(10) == 0
