"""Listing a network's peers: ``GET /v1/peers`` (auth, long poll by tag, expiry), the wire model
(hypothesis), the stores, ``HubClient.list_peers``/``watch_peers`` and ``MemoryRendezvous``."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    HubClient,
    ListedPeer,
    MemoryHub,
    NetworkSecret,
    PeerListing,
    RendezvousRefusedError,
    SqliteStore,
    ValidationError,
    listing_tag,
)

from .hub_harness import Hub, Peer, hub_clock

RED = NetworkSecret(b"red network secret!")
BLUE = NetworkSecret(b"blue network secret")


async def list_peers(peer: Peer, **params: Any) -> httpx.Response:
    return await peer.hub.http.get("/v1/peers", params=params or None, auth=peer.auth, timeout=None)


def names(reply: httpx.Response) -> list[str]:
    return [p["name"] for p in reply.json()["peers"]]


# -- the hub ------------------------------------------------------------------------------------


async def test_listing_names_the_signers_network_only(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(networks=(RED, BLUE)) as hub:
        alice, bob, eve = hub.peer(RED), hub.peer(RED), hub.peer(BLUE)
        assert (await alice.put("alice")).status_code == 201
        assert (await bob.put("bob", bob.body(["192.0.2.20:51820"]))).status_code == 201
        assert (await eve.put("eve", eve.body(["192.0.2.30:51820"]))).status_code == 201
        reply = await list_peers(bob)
        assert reply.status_code == 200
        listing = PeerListing.from_json(reply.json())
        assert [p.name for p in listing.peers] == ["alice", "bob"]
        assert all(p.expires_in == 300.0 and p.revision > 0 for p in listing.peers)
        assert names(await list_peers(eve)) == ["eve"]
        assert hub.counters.requests["/v1/peers", "GET", 200] == 2


async def test_listing_is_refused_without_a_network_or_with_a_bad_tag() -> None:
    async with Hub() as hub:
        stranger = hub.peer()
        await stranger.put("alice")
        reply = await list_peers(stranger)
        assert reply.status_code == 403
        assert "needs a network secret" in reply.json()["error"]
    async with Hub(networks=(RED,)) as hub:
        member = hub.peer(RED)
        unsigned = await hub.http.get("/v1/peers")
        assert unsigned.status_code == 401
        for bad in ("xyz", "A" * 32, "0" * 31):
            reply = await list_peers(member, since=bad, wait="1")
            assert reply.status_code == 400
            assert reply.json()["error"].startswith("since must be a listing tag")
        reply = await list_peers(member, wait="forever")
        assert reply.status_code == 400


async def test_long_poll_wakes_on_join_change_delete_and_expiry(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with Hub(networks=(RED,), ttl=100.0, max_wait=60.0) as hub:
        alice, bob = hub.peer(RED), hub.peer(RED)
        await alice.put("alice")
        first = (await list_peers(alice)).json()
        assert first["tag"] == listing_tag([("alice", first["peers"][0]["revision"])])

        async def watch(since: str, wait: str = "20") -> tuple[dict[str, Any], float]:
            start = trio.current_time()
            reply = await list_peers(alice, since=since, wait=wait)
            assert reply.status_code == 200
            return reply.json(), trio.current_time() - start

        async def later(seconds: float, action: Any) -> None:
            await trio.sleep(seconds)
            await action()

        # A join ends the wait at once.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(later, 2.0, lambda: bob.put("bob", bob.body(["192.0.2.2:1"])))
            joined, took = await watch(first["tag"])
        assert [p["name"] for p in joined["peers"]] == ["alice", "bob"]
        assert 2.0 <= took < 2.1

        # A refresh that changes nothing does not; the poll times out with the same listing.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(later, 1.0, lambda: bob.put("bob", bob.body(["192.0.2.2:1"])))
            nursery.start_soon(later, 1.0, lambda: alice.put("alice"))
            same, took = await watch(joined["tag"])
        assert same["tag"] == joined["tag"]
        assert took == pytest.approx(20.0, abs=0.1)

        # A changed record does.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(later, 1.0, lambda: bob.put("bob", bob.body(["192.0.2.3:1"])))
            moved, took = await watch(same["tag"])
        assert moved["tag"] != same["tag"]
        assert took < 1.1

        # A deletion does.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(later, 1.0, lambda: bob.delete("bob"))
            left, took = await watch(moved["tag"])
        assert [p["name"] for p in left["peers"]] == ["alice"]
        assert took < 1.1

        # Expiry does, within a moment of the record's end (no write happens then).
        expires = left["peers"][0]["expires_in"]
        assert expires > 60.0  # more than one poll
        start = trio.current_time()
        tag = left["tag"]
        while (gone := (await watch(tag, "60"))[0])["tag"] == tag:
            pass
        assert gone["peers"] == []
        assert trio.current_time() - start == pytest.approx(expires, abs=0.05)


async def test_listing_without_since_answers_at_once(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(networks=(RED,)) as hub:
        alice = hub.peer(RED)
        start = trio.current_time()
        reply = await list_peers(alice, wait="30")
        assert reply.json()["peers"] == []
        assert trio.current_time() - start < 0.01


async def test_a_large_network_is_listed_truncated_by_name() -> None:
    from punchtrio.rendezvous import MAX_LISTED_PEERS, RegisterRequest

    async with Hub(networks=(RED,)) as hub:
        member = hub.peer(RED)
        request = RegisterRequest(member.key.public_key(), (), ())
        for i in range(MAX_LISTED_PEERS + 5):
            await hub.store.put(RED.network_id, f"p{i:05d}", request, 300.0)
        reply = await list_peers(member)
        listing = PeerListing.from_json(reply.json())
        assert listing.truncated is True
        assert len(listing.peers) == MAX_LISTED_PEERS
        assert listing.peers[-1].name == f"p{MAX_LISTED_PEERS - 1:05d}"


# -- the wire model -----------------------------------------------------------------------------

_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
_entries = st.dictionaries(_names, st.tuples(st.integers(1, 2**62), st.floats(0, 1e6)), max_size=20)


@given(_entries)
def test_listing_round_trips_and_its_tag_follows_names_and_revisions(
    entries: dict[str, tuple[int, float]],
) -> None:
    listing = PeerListing.of((n, r, e) for n, (r, e) in entries.items())
    parsed = PeerListing.from_json(json.loads(json.dumps(listing.to_json())))
    assert parsed.tag == listing.tag
    assert parsed.names == set(entries)
    assert listing.tag == listing_tag((n, r) for n, (r, _) in entries.items())
    if entries:
        name, (revision, expires) = next(iter(entries.items()))
        bumped = dict(entries, **{name: (revision + 1, expires)})
        assert PeerListing.of((n, r, e) for n, (r, e) in bumped.items()).tag != listing.tag
        later = dict(entries, **{name: (revision, expires + 1)})
        assert PeerListing.of((n, r, e) for n, (r, e) in later.items()).tag == listing.tag


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=40),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
        max_leaves=20,
    )
)
def test_listing_parser_refuses_anything_else_with_validation_error(obj: object) -> None:
    try:
        listing = PeerListing.from_json(obj)
    except ValidationError:
        return
    assert listing.to_json() == obj


def test_listing_parser_refuses_a_tag_that_does_not_match() -> None:
    good = PeerListing.of([("alice", 3, 10.0)]).to_json()
    with pytest.raises(ValidationError, match="tag does not match"):
        PeerListing.from_json(dict(good, tag="0" * 32))
    with pytest.raises(ValidationError, match="sorted by name"):
        PeerListing((ListedPeer("bob", 1, 1.0), ListedPeer("alice", 1, 1.0)))
    with pytest.raises(ValidationError, match="unknown field"):
        PeerListing.from_json(dict(good, extra=1))


# -- stores -------------------------------------------------------------------------------------


async def test_sqlite_store_lists_records_loaded_back(tmp_path: Any) -> None:
    key = PrivateKey.generate().public_key()
    from punchtrio.rendezvous import RegisterRequest

    store = SqliteStore(tmp_path / "state.db", clock=hub_clock)
    try:
        await store.put(RED.network_id, "alice", RegisterRequest(key, (), ()), 300.0)
    finally:
        store.close()
    again = SqliteStore(tmp_path / "state.db", clock=hub_clock)
    try:
        assert [p.name for p in await again.list_peers(RED.network_id)] == ["alice"]
        assert await again.list_peers(BLUE.network_id) == ()
        assert await again.delete(RED.network_id, "alice", key)
        assert await again.list_peers(RED.network_id) == ()
    finally:
        again.close()


# -- clients ------------------------------------------------------------------------------------


def client(hub: Hub, name: str, network: NetworkSecret | None = RED) -> HubClient:
    return HubClient(
        "http://hub.test",
        PrivateKey.generate(),
        name,
        network_secret=network,
        transport=httpx.ASGITransport(hub.app),
        clock=hub_clock,
        rng=random.Random(1),
        wait=20.0,
    )


async def test_hub_client_lists_and_watches(autojump_clock: trio.abc.Clock) -> None:
    async with (
        Hub(networks=(RED,)) as hub,
        client(hub, "alice") as alice,
        client(hub, "bob") as bob,
    ):
        await alice.register()
        listing = await bob.list_peers()
        assert listing.names == {"alice"}
        assert (await bob.watch_peers()).tag == listing.tag  # no tag: at once

        async def join() -> None:
            await trio.sleep(5.0)
            await bob.register()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)
            start = trio.current_time()
            # Longer than one poll (20 s): the unchanged answers are waited through.
            joined = await alice.watch_peers(listing.tag)
        assert joined.names == {"alice", "bob"}
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
        async with trio.open_nursery() as nursery:

            async def leave() -> None:
                await trio.sleep(45.0)
                await bob.unregister()

            nursery.start_soon(leave)
            left = await alice.watch_peers(joined.tag)
        assert left.names == {"alice"}


async def test_hub_client_needs_the_network_secret() -> None:
    async with Hub() as hub:
        lone = client(hub, "alice", network=None)
        with pytest.raises(RendezvousRefusedError, match="needs the network secret"):
            await lone.list_peers()
        with pytest.raises(RendezvousRefusedError, match="needs the network secret"):
            await lone.watch_peers()
        await lone.aclose()


async def test_memory_rendezvous_lists_and_watches(autojump_clock: trio.abc.Clock) -> None:
    hub = MemoryHub()
    alice = hub.peer("alice", PrivateKey.generate().public_key())
    bob = hub.peer("bob", PrivateKey.generate().public_key())
    await alice.register()
    first = await bob.list_peers()
    assert first.names == {"alice"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bob.register)
        joined = await alice.watch_peers(first.tag)
    assert joined.names == {"alice", "bob"}
    await bob.unregister()
    assert (await alice.watch_peers(joined.tag)).names == {"alice"}
