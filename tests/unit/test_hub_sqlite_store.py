"""The SQLite store: what it acknowledged is what a reopened store holds; bad files are one error.

Each test reopens the database as a restarted hub would (a new ``SqliteStore`` on the same file),
and the replay tests run the hub app itself across such a restart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    AllowedIPsConflictError,
    Endpoint,
    HubConfig,
    NameTakenError,
    RegisterRequest,
    RequestSigner,
    SqliteStore,
    StateOpenError,
    StoreError,
    create_app,
)

from .hub_harness import BASE, hub_clock

KEYS = [PrivateKey.generate().public_key() for _ in range(4)]


class FakeClock:
    def __init__(self, now: float = BASE) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _request(owner: int, *allowed: str, endpoint: str = "192.0.2.1:1") -> RegisterRequest:
    return RegisterRequest(
        KEYS[owner],
        (Endpoint.parse(endpoint),),
        tuple(ipaddress.ip_network(a) for a in allowed),
    )


async def _snapshot(store: SqliteStore, names: list[str]) -> dict[str, Any]:
    peers = {name: await store.get("", name) for name in names}
    return {name: peer for name, peer in peers.items() if peer is not None}


operations = st.lists(
    st.tuples(
        st.integers(0, 3),  # owner
        st.integers(0, 4),  # name
        st.sampled_from(["put", "put", "delete", "delete by owner"]),
        st.integers(0, 7),  # which /26 of 10.0.0.0/24
        st.integers(0, 25),  # seconds to pass before the operation
    ),
    max_size=25,
)


@given(operations)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_reopened_store_holds_what_was_acknowledged(tmp_path: Path, ops: list[Any]) -> None:
    """Random puts, deletes and expiries; after every operation a store reopened on the file
    agrees with the running one on every record, and on who may take which name and range."""
    path = tmp_path / f"state-{len(list(tmp_path.iterdir()))}.sqlite3"
    names = [f"n{i}" for i in range(5)]

    async def scenario() -> None:
        clock = FakeClock()
        store = SqliteStore(path, clock=clock)
        for owner, index, action, block, later in ops:
            clock.now += later
            name = names[index]
            network = f"10.0.{block}.0/26" if block < 4 else f"10.0.0.{(block - 4) * 64}/26"
            try:
                if action == "delete by owner":
                    held = await store.get("", name)
                    await store.delete("", name, KEYS[owner] if held is None else held.public_key)
                elif action == "delete":
                    await store.delete("", name, KEYS[owner])
                elif action == "put":
                    await store.put("", name, _request(owner, network), 60)
            except (NameTakenError, AllowedIPsConflictError):
                pass
            reopened = SqliteStore(path, clock=clock)
            try:
                assert await _snapshot(reopened, names) == await _snapshot(store, names)
                for other in range(4):  # the same refusals after the restart
                    for candidate in names:
                        outcomes = []
                        for probe in (store, reopened):
                            peer = await probe.get("", candidate)
                            outcomes.append(peer is not None and peer.public_key != KEYS[other])
                        assert outcomes[0] == outcomes[1]
            finally:
                reopened.close()
        store.close()

    trio.run(scenario)


async def test_names_and_ranges_stay_bound_across_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "hub.sqlite3"
    store = SqliteStore(path, clock=clock)
    alice, created = await store.put("", "alice", _request(0, "10.9.0.1/32"), 300)
    assert created
    await store.put("red", "alice", _request(1, "10.9.0.1/32"), 300)  # another network
    store.close()  # as after kill -9: nothing is flushed at close that was not already

    clock.now += 100
    restarted = SqliteStore(path, clock=clock)
    again = await restarted.get("", "alice")
    assert again == alice
    with pytest.raises(NameTakenError):
        await restarted.put("", "alice", _request(2), 300)
    with pytest.raises(AllowedIPsConflictError):
        await restarted.put("", "bob", _request(2, "10.9.0.0/30"), 300)
    refreshed, created = await restarted.put("", "alice", _request(0, "10.9.0.1/32"), 300)
    assert not created
    assert refreshed.revision == alice.revision  # a refresh keeps the revision, as before
    changed, _ = await restarted.put("", "alice", _request(0, "10.9.0.2/32"), 300)
    assert changed.revision > alice.revision
    assert restarted.stats().peers == 2
    restarted.close()


async def test_expired_records_are_not_loaded_and_free_their_name(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "hub.sqlite3"
    store = SqliteStore(path, clock=clock)
    await store.put("", "alice", _request(0, "10.9.0.1/32"), 30)
    await store.put("", "bob", _request(1), 300)
    store.close()
    clock.now += 31
    restarted = SqliteStore(path, clock=clock)
    assert await restarted.get("", "alice") is None
    assert (await restarted.put("", "alice", _request(2, "10.9.0.1/32"), 30))[1]
    assert await restarted.get("", "bob") is not None
    restarted.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 2


async def test_a_delete_is_durable(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "hub.sqlite3"
    store = SqliteStore(path, clock=clock)
    await store.put("", "alice", _request(0), 300)
    assert await store.delete("", "alice", KEYS[0])
    store.close()
    restarted = SqliteStore(path, clock=clock)
    assert await restarted.get("", "alice") is None
    restarted.close()


async def test_concurrent_writes_share_commits_and_all_survive(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "hub.sqlite3"
    store = SqliteStore(path, clock=clock)
    async with trio.open_nursery() as nursery:
        for number in range(200):
            request = RegisterRequest(
                KEYS[number % 4], (Endpoint.parse(f"192.0.2.1:{number + 1}"),)
            )
            nursery.start_soon(store.put, "", f"p{number}", request, 300.0)
    assert store.commits < 100  # group commit: far fewer transactions than writes
    store.close()
    restarted = SqliteStore(path, clock=clock)
    assert restarted.stats().peers == 200
    restarted.close()


async def test_a_failed_commit_is_a_store_error_and_is_written_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    path = tmp_path / "hub.sqlite3"
    store = SqliteStore(path, clock=clock)
    real_write = store._write
    calls = 0

    def failing_once(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        real_write(*args)

    monkeypatch.setattr(store, "_write", failing_once)
    with pytest.raises(StoreError, match="disk is full"):
        await store.put("", "alice", _request(0), 300)
    await store.put("", "bob", _request(1), 300)  # the next commit writes alice too
    store.close()
    restarted = SqliteStore(path, clock=clock)
    assert {p for p in ("alice", "bob") if await restarted.get("", p) is not None} == {
        "alice",
        "bob",
    }
    restarted.close()


def test_files_that_are_not_a_state_database_are_one_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateOpenError, match="garbage"):
        SqliteStore(garbage)
    foreign = tmp_path / "foreign.sqlite3"
    with contextlib.closing(sqlite3.connect(foreign)) as db, db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StateOpenError, match="not a punchtrio hub state database"):
        SqliteStore(foreign)
    with pytest.raises(StateOpenError, match="cannot open"):
        SqliteStore(tmp_path / "missing-dir" / "hub.sqlite3")


async def test_an_invalid_record_refuses_to_load(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    store = SqliteStore(path, clock=FakeClock())
    await store.put("", "alice", _request(0), 300)
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE records SET endpoints = ?", (json.dumps([["host", "127.0.0.1:1"]]),))
    with pytest.raises(StateOpenError, match="record 1 \\('alice'\\) is invalid"):
        SqliteStore(path, clock=FakeClock())


# -- the hub app across a restart: captured requests stay dead ---------------------------------


def _app(key: PrivateKey, store: SqliteStore, not_before: float) -> httpx.AsyncClient:
    config = HubConfig(key, rate=0.0, not_before=not_before)
    app = create_app(config, store, clock=hub_clock)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://hub.test")


async def test_requests_captured_before_a_restart_are_refused_after_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The store keeps alice's record; the restarted hub refuses the captured PUT and DELETE
    (signed before it started) and a squatter, and accepts alice's fresh requests."""
    hub_key, alice_key, mallory_key = (PrivateKey.generate() for _ in range(3))
    alice = RequestSigner(alice_key, hub_key.public_key())
    mallory = RequestSigner(mallory_key, hub_key.public_key())
    path = tmp_path / "hub.sqlite3"
    body = json.dumps(
        RegisterRequest(alice_key.public_key(), (Endpoint.parse("192.0.2.7:51820"),)).to_json()
    ).encode()

    def signed(signer: RequestSigner, method: str, content: bytes = b"") -> dict[str, str]:
        return signer.sign(method, "/v1/peers/alice", content, now=hub_clock())

    store = SqliteStore(path, clock=hub_clock)
    async with _app(hub_key, store, 0.0) as http:
        put = await http.put("/v1/peers/alice", content=body, headers=signed(alice, "PUT", body))
        assert put.status_code == 201
        captured_put = signed(alice, "PUT", body)
        captured_delete = signed(alice, "DELETE")
        assert (await http.put("/v1/peers/alice", content=body, headers=captured_put)).is_success
    store.close()

    await trio.sleep(2.5)  # the hub is down; it comes back well inside the 60 s window
    store = SqliteStore(path, clock=hub_clock)
    async with _app(hub_key, store, int(hub_clock()) + 1) as http:
        await trio.sleep(1)  # the hub answers from the next second on
        replayed = await http.put("/v1/peers/alice", content=body, headers=captured_put)
        assert (replayed.status_code, replayed.json()) == (
            401,
            {"error": "request was signed before the hub started"},
        )
        deleted = await http.delete("/v1/peers/alice", headers=captured_delete)
        assert deleted.status_code == 401
        squat = json.dumps(
            RegisterRequest(mallory_key.public_key(), (Endpoint.parse("192.0.2.8:1"),)).to_json()
        ).encode()
        taken = await http.put(
            "/v1/peers/alice", content=squat, headers=signed(mallory, "PUT", squat)
        )
        assert taken.status_code == 409
        seen = await http.get("/v1/peers/alice", headers=signed(mallory, "GET"))
        assert seen.json()["public_key"] == alice_key.public_key().to_base64()
        fresh = await http.put("/v1/peers/alice", content=body, headers=signed(alice, "PUT", body))
        assert fresh.status_code == 200
    store.close()


async def test_timestamps_ahead_of_the_hub_are_refused(autojump_clock: trio.abc.Clock) -> None:
    hub_key, alice_key = PrivateKey.generate(), PrivateKey.generate()
    alice = RequestSigner(alice_key, hub_key.public_key())
    app = create_app(HubConfig(hub_key, rate=0.0), clock=hub_clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://h") as http:
        await trio.sleep(0.5)  # mid-second: one second ahead is ahead, this second is not
        ahead = alice.sign("GET", "/v1/peers/x", now=hub_clock() + 1)
        reply = await http.get("/v1/peers/x", headers=ahead)
        assert reply.status_code == 401
        assert "ahead of the hub's clock" in reply.json()["error"]
        now = alice.sign("GET", "/v1/peers/x", now=hub_clock())
        assert (await http.get("/v1/peers/x", headers=now)).status_code == 404
