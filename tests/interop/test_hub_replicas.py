"""Several real ``punchtrio hub`` processes on one real ``redis-server`` act as one hub.

Hub A runs two workers on one socket (``--workers 2``), hub B is one more process on another port,
as behind a load balancer; every cross-replica check goes from A to B or back.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.relay import HubRelayClient, RefusalCode, RelayRefused
from punchtrio.rendezvous import HubInfo, StoreFullError, StoreLimits, messages_from_json
from punchtrio.rendezvous._redis_store import RedisStore
from punchtrio.rendezvous._resp import RespClient
from tests.conftest import require_root_and
from tests.interop.test_hub_redis import Peer, Replica, redis_url
from tests.interop.test_relay_hub_process import _data, _udp

pytestmark = pytest.mark.interop

__all__ = ["redis_url"]  # the fixture, shared with test_hub_redis


class Hub:
    """One ``punchtrio hub --redis`` process (a supervisor with ``workers`` > 1)."""

    def __init__(
        self, redis: str, directory: Path, name: str, *extra: str, workers: int = 1, more: int = 0
    ):
        self.log = directory / f"{name}.log"
        command = [
            sys.executable, "-m", "punchtrio.cli", "hub", "--listen", "127.0.0.1:0",
            "--key-file", str(directory / "hub.key"), "--redis", redis, "--rate", "0",
            "--workers", str(workers), *extra,
        ]  # fmt: skip
        with self.log.open("w") as sink:
            self.process = subprocess.Popen(command, stderr=sink, text=True)
        self.url = self._wait(r"serving (http://\S+)")[1]
        self.workers = workers
        if workers > 1:  # ``more``: processes beside the HTTP workers (the relay's)
            processes = workers + more
            self._wait_until(lambda: len(self.children()) == processes and self._served(workers))

    def _served(self, count: int) -> bool:
        return len(re.findall(r"serving http://", self.log.read_text())) >= count

    def _wait(self, pattern: str) -> re.Match[str]:
        for _ in range(300):
            match = re.search(pattern, self.log.read_text())
            if match:
                return match
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"the hub did not log {pattern!r} within 15 s")

    def _wait_until(self, condition: object, seconds: float = 15.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if callable(condition) and condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out; hub log:\n{self.log.read_text()}")

    def children(self) -> list[int]:
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def hubs(redis_url: str, tmp_path: Path) -> Iterator[tuple[PrivateKey, Hub, Hub]]:
    key = PrivateKey.generate()
    key.write(tmp_path / "hub.key")
    a = Hub(redis_url, tmp_path, "a", "--max-queued", "2", "--max-messages", "3", workers=2)
    b = Hub(redis_url, tmp_path, "b", "--max-queued", "2", "--max-messages", "3")
    try:
        yield key, a, b
    finally:
        assert (a.stop(), b.stop()) == (0, 0)


async def _register(http: httpx.AsyncClient, hub: Hub, name: str, peer: Peer) -> httpx.Response:
    return await http.put(f"{hub.url}/v1/peers/{name}", content=peer.body(), auth=peer.auth)


async def test_a_registration_at_one_replica_wakes_a_long_poll_at_another(
    hubs: tuple[PrivateKey, Hub, Hub],
) -> None:
    key, a, b = hubs
    alice, bob = Peer(key), Peer(key)
    woke: list[float] = []
    async with httpx.AsyncClient(timeout=20) as http:
        for waiting_at, registering_at, name in ((b, a, "bob"), (a, b, "carol")):

            async def wait(where: Hub = waiting_at, who: str = name) -> None:
                answer = await http.get(
                    f"{where.url}/v1/peers/{who}", params={"wait": 10}, auth=alice.auth
                )
                assert answer.status_code == 200
                woke.append(time.monotonic())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.sleep(0.5)  # the poll is open at the other replica
                sent = time.monotonic()
                assert (await _register(http, registering_at, name, bob)).status_code == 201
            assert woke[-1] - sent < 1.0


async def test_messages_and_caps_hold_across_replicas(hubs: tuple[PrivateKey, Hub, Hub]) -> None:
    key, a, b = hubs
    alice, bob, carol = Peer(key), Peer(key), Peer(key)
    async with httpx.AsyncClient(timeout=20) as http:
        for name, peer, hub in (("alice", alice, a), ("bob", bob, b), ("carol", carol, a)):
            assert (await _register(http, hub, name, peer)).status_code == 201

        async def send(hub: Hub, to: str, data: str) -> int:
            reply = await http.post(
                f"{hub.url}/v1/peers/{to}/messages",
                json={"from": "alice", "data": data},
                auth=alice.auth,
            )
            return reply.status_code

        # --max-queued 2: the recipient's queue is one, whichever replica takes the message.
        assert [await send(a, "bob", "1"), await send(b, "bob", "2")] == [202, 202]
        assert await send(a, "bob", "3") == 429
        # --max-messages 3: one bound for every replica.
        assert await send(b, "carol", "4") == 202
        assert await send(a, "carol", "5") == 503
        inbox = await http.get(f"{a.url}/v1/peers/bob/messages", auth=bob.auth)
        assert [m.data for m in messages_from_json(inbox.json())] == ["1", "2"]
        assert await send(b, "carol", "6") == 202  # room again, seen from the other replica

        # A long poll for messages at A wakes on a message sent through B.
        got: list[list[str]] = []

        async def poll() -> None:
            reply = await http.get(
                f"{a.url}/v1/peers/bob/messages", params={"wait": 10}, auth=bob.auth
            )
            got.append([m.data for m in messages_from_json(reply.json())])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.5)
            assert await send(b, "bob", "go") == 202
        assert got == [["go"]]


async def test_a_request_captured_at_one_replica_is_refused_at_another(
    hubs: tuple[PrivateKey, Hub, Hub],
) -> None:
    key, a, b = hubs
    alice = Peer(key)
    async with httpx.AsyncClient(timeout=20) as http:
        request = http.build_request("PUT", f"{a.url}/v1/peers/alice", content=alice.body())
        signed = next(alice.auth.auth_flow(request))
        assert (await http.send(signed)).status_code == 201
        replay = http.build_request(
            "PUT", f"{b.url}/v1/peers/alice", content=alice.body(), headers=dict(signed.headers)
        )
        answer = await http.send(replay)
        assert (answer.status_code, answer.json()) == (401, {"error": "replayed request"})


async def test_kill_9_of_a_worker_loses_nothing_acknowledged(
    hubs: tuple[PrivateKey, Hub, Hub],
) -> None:
    key, a, b = hubs
    acknowledged: list[str] = []
    victim = a.children()[0]
    async with httpx.AsyncClient(timeout=20) as http:
        for index in range(60):
            if index == 20:
                os.kill(victim, signal.SIGKILL)
            name = f"peer-{index}"
            with contextlib.suppress(httpx.TransportError):  # the victim's open connections
                reply = await _register(http, a, name, Peer(key))
                if reply.status_code == 201:
                    acknowledged.append(name)
            await trio.sleep(0.02)
        assert len(acknowledged) >= 50
        for name in acknowledged:  # every one is at the other hub too
            assert (
                await http.get(f"{b.url}/v1/peers/{name}", auth=Peer(key).auth)
            ).status_code == 200
    a._wait_until(lambda: len(a.children()) == 2 and victim not in a.children())
    assert "was killed by signal 9; restarting it" in a.log.read_text()
    async with httpx.AsyncClient(timeout=20) as http:  # fresh connections: served by both
        for _ in range(10):
            assert (await http.get(f"{a.url}/healthz")).status_code == 200


def test_killing_the_supervisor_stops_every_worker(redis_url: str, tmp_path: Path) -> None:
    PrivateKey.generate().write(tmp_path / "hub.key")
    hub = Hub(redis_url, tmp_path, "a", workers=3)
    workers = hub.children()
    assert len(workers) == 3
    hub.process.kill()  # -9: nothing to forward a signal; the kernel tells the workers
    hub.process.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.05)
    for worker in workers:  # gone, or exited and not yet reaped by init
        with contextlib.suppress(FileNotFoundError):
            state = re.search(r"State:\s+(\S)", Path(f"/proc/{worker}/status").read_text())
            assert state is not None
            assert state[1] == "Z", f"worker {worker} outlived its supervisor"


async def test_the_replay_cache_bound_is_one_for_every_replica(redis_url: str) -> None:
    limits = StoreLimits(max_nonces=3)
    first, second = RedisStore(redis_url, limits), RedisStore(redis_url, limits)
    try:
        assert await first.remember_nonce(b"n1" * 8, 1.0)
        assert await second.remember_nonce(b"n2" * 8, 1.0)
        assert not await second.remember_nonce(b"n1" * 8, 1.0)  # a replay, seen by the other
        assert await first.remember_nonce(b"n3" * 8, 1.0)
        with pytest.raises(StoreFullError):
            await second.remember_nonce(b"n4" * 8, 1.0)
        await trio.sleep(1.1)  # remembered nonces expire, and the bound frees itself
        assert await second.remember_nonce(b"n4" * 8, 1.0)
    finally:
        first.close()
        second.close()


def _redis_server(port: int, directory: Path) -> subprocess.Popen[bytes]:
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(directory),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        time.sleep(0.05)
    server.kill()
    raise AssertionError("redis-server did not start")


async def test_wake_ups_recover_when_redis_restarts(tmp_path: Path) -> None:
    require_root_and("redis-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _redis_server(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    key = PrivateKey.generate()
    a, b = Replica(key, url, 30.0), Replica(key, url, 30.0)
    alice, bob = Peer(key), Peer(key)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.run)
            await nursery.start(b.store.run)
            server.terminate()
            server.wait(10)
            refused = await a.http.put("/v1/peers/bob", content=bob.body(), auth=bob.auth)
            assert refused.status_code == 503  # down: refused, not hung
            server = await trio.to_thread.run_sync(_redis_server, port, tmp_path)
            answers: list[httpx.Response] = []
            answered = trio.Event()

            async def wait_for_bob() -> None:
                answers.append(
                    await b.http.get("/v1/peers/bob", params={"wait": 15}, auth=alice.auth)
                )
                answered.set()

            nursery.start_soon(wait_for_bob)
            await trio.sleep(6)  # past the listener's longest back-off: subscribed again
            put = await a.http.put("/v1/peers/bob", content=bob.body(), auth=bob.auth)
            assert put.status_code == 201
            with trio.fail_after(2):
                await answered.wait()
            assert answers[0].status_code == 200
            nursery.cancel_scope.cancel()
    finally:
        for replica in (a, b):
            await replica.http.aclose()
            replica.store.close()
        server.terminate()
        server.wait(10)


async def test_every_key_carries_the_hash_tag_of_its_network(redis_url: str) -> None:
    # Redis Cluster shards by the text between the first { and }: one network is one slot.
    key = PrivateKey.generate()
    replica = Replica(key, redis_url, 30.0)
    alice, bob = Peer(key, routes=True), Peer(key)
    body = alice.body(("10.9.0.0/24",))
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.store.run)
        assert (
            await replica.http.put("/v1/peers/alice", content=body, auth=alice.auth)
        ).status_code == 201
        await replica.http.put("/v1/peers/bob", content=bob.body(), auth=bob.auth)
        sent = await replica.http.post(
            "/v1/peers/bob/messages", json={"from": "alice", "data": "hi"}, auth=alice.auth
        )
        assert sent.status_code == 202
        nursery.cancel_scope.cancel()
    client = RespClient(redis_url)
    keys = sorted(k.decode() for k in await client.call("KEYS", "*"))
    client.close()
    await replica.http.aclose()
    replica.store.close()
    assert "punchtrio:{nonces}" in keys  # the replay cache: one slot for the whole hub
    network = sorted(k.split("}:", 1)[1] for k in keys if k.startswith("punchtrio:{n:}:"))
    assert network == sorted(["r:alice", "r:bob", "q:bob", "expiry", "revision", "ip4", "queued"])
    assert len(keys) == len(network) + 1, keys  # nothing outside those two tags


async def test_workers_share_one_relay_that_follows_their_registrations(
    redis_url: str, tmp_path: Path
) -> None:
    """``--workers 2 --relay``: a third process serves the relay, learning from Redis whom the
    workers registered; both workers publish it, registered peers bind and exchange frames, an
    unregistered key is refused, and a peer deleted at a worker can no longer bind."""
    key = PrivateKey.generate()
    key.write(tmp_path / "hub.key")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = ("127.0.0.1", port)
    hub = Hub(redis_url, tmp_path, "r", "--relay", f"127.0.0.1:{port}", workers=2, more=1)
    try:
        hub._wait(rf"relay on 127\.0\.0\.1 port {port} \(UDP, TCP\)")
        async with httpx.AsyncClient(timeout=20) as http:
            infos = [HubInfo.from_json((await http.get(f"{hub.url}/v1/hub")).json()) for _ in "ab"]
            assert all(i.relay is not None and i.relay.port == port for i in infos)
            alice, bob, carol = Peer(key), Peer(key), Peer(key)
            for name, peer in (("alice", alice), ("bob", bob), ("carol", carol)):
                assert (await _register(http, hub, name, peer)).status_code == 201
            registered = time.monotonic()
            clients: dict[str, HubRelayClient] = {}
            socks: dict[str, trio.socket.SocketType] = {}
            for name, peer in (("alice", alice), ("bob", bob), ("carol", carol)):
                while name not in clients:  # refused until the relay's mirror has the record
                    client = HubRelayClient(peer.key.raw, key.public_key().raw)
                    sock = await _udp(client, relay)
                    if client.bound:
                        clients[name], socks[name] = client, sock
                    else:
                        sock.close()
                        assert time.monotonic() - registered < 5, client.counters
                        await trio.sleep(0.05)
            print(f"bound {time.monotonic() - registered:.2f} s after registering")
            a, b = clients["alice"], clients["bob"]
            await socks["alice"].sendto(a.wrap(b.public_key, b"via the relay process"), relay)
            with trio.fail_after(10):
                assert await _data(b, socks["bob"]) == (a.public_key, b"via the relay process")
            # Deleted at a worker: the relay hears it through Redis; a new bind is refused.
            deleted = await http.delete(f"{hub.url}/v1/peers/carol", auth=carol.auth)
            assert deleted.status_code == 204
            await trio.sleep(1.0)
            again = HubRelayClient(carol.key.raw, key.public_key().raw)
            stranger = HubRelayClient(PrivateKey.generate().raw, key.public_key().raw)
            for client in (again, stranger):
                sock = await _udp(client, relay)
                event = client.next_event()
                assert isinstance(event, RelayRefused), client.counters
                assert event.code == RefusalCode.NOT_REGISTERED
                sock.close()
            for sock in socks.values():
                sock.close()
    finally:
        assert hub.stop() == 0, hub.log.read_text()
