"""The hub's HTTP API through ``httpx.ASGITransport``: behaviour, ownership, auth, networks, limits."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
import trio.lowlevel

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    HEADER_MAC,
    HEADER_NETWORK,
    AddressPolicy,
    HubInfo,
    NetworkSecret,
    PeerRecord,
    StoreLimits,
    messages_from_json,
)

from .hub_harness import Hub, hub_clock


async def test_hub_info_publishes_key_and_limits() -> None:
    async with Hub(ttl=120.0) as hub:
        reply = await hub.http.get("/v1/hub")
        assert reply.status_code == 200
        info = HubInfo.from_json(reply.json())
        assert info.public_key == hub.key.public_key()
        assert info.ttl == 120.0
        assert info.stun == ()
        assert info.network_required is False
        assert abs(info.time - hub_clock()) < 1


async def test_healthz_and_unknown_routes_answer_json() -> None:
    async with Hub() as hub:
        assert (await hub.http.get("/healthz")).json() == {"status": "ok"}
        missing = await hub.http.get("/v2/peers/x")
        assert (missing.status_code, missing.json()) == (404, {"error": "not found"})
        wrong = await hub.http.patch("/v1/peers/alice")
        assert (wrong.status_code, wrong.json()) == (405, {"error": "method not allowed"})


async def test_register_lookup_refresh_delete(autojump_clock: trio.abc.Clock) -> None:
    async with Hub() as hub:
        alice, bob = hub.peer(), hub.peer()
        created = await alice.put("alice", alice.body(["10.1.2.3:51820"], ["10.9.0.1/32"]))
        assert created.status_code == 201
        record = PeerRecord.from_json(created.json())
        assert record.public_key == alice.key.public_key()
        assert record.expires_in == 300.0
        assert [e.address for e in record.endpoints] == ["10.1.2.3:51820"]

        seen = PeerRecord.from_json((await bob.get("alice")).json())
        assert seen == record

        await trio.lowlevel.checkpoint()
        refreshed = await alice.put("alice", alice.body(["10.1.2.3:51820"], ["10.9.0.1/32"]))
        assert refreshed.status_code == 200
        assert PeerRecord.from_json(refreshed.json()).revision == record.revision

        changed = await alice.put("alice", alice.body(["192.0.2.1:4000"], ["10.9.0.1/32"]))
        assert PeerRecord.from_json(changed.json()).revision > record.revision

        assert (await alice.delete("alice")).status_code == 204
        gone = await bob.get("alice")
        assert (gone.status_code, gone.json()) == (404, {"error": "no such peer"})
        assert (await alice.delete("alice")).status_code == 404


async def test_name_hijack_with_another_key_is_refused_and_changes_nothing() -> None:
    async with Hub() as hub:
        owner, thief = hub.peer(), hub.peer()
        first = await owner.put("alice", owner.body(["198.51.100.1:1000"]))
        hijack = await thief.put("alice", thief.body(["203.0.113.66:6666"]))
        assert hijack.status_code == 409
        assert hijack.json() == {"error": "name is registered to another key"}
        assert (await thief.delete("alice")).status_code == 409
        assert (await thief.send("alice", "alice", "spoofed")).status_code == 409
        assert (await thief.receive("alice")).status_code == 409
        before, after = first.json(), (await thief.get("alice")).json()
        del before["expires_in"], after["expires_in"]
        assert after == before


async def test_public_key_in_body_must_be_the_signing_key() -> None:
    async with Hub() as hub:
        alice, mallory = hub.peer(), hub.peer()
        reply = await mallory.put("alice", alice.body())
        assert reply.status_code == 400
        assert "signs the request" in reply.json()["error"]
        assert hub.store.stats().peers == 0


async def test_replayed_signed_request_is_refused() -> None:
    async with Hub() as hub:
        alice = hub.peer()
        content = json.dumps(alice.body()).encode()
        request = hub.http.build_request("PUT", "/v1/peers/alice", content=content)
        headers = alice.signer.sign("PUT", "/v1/peers/alice", content, now=hub_clock())
        request.headers.update(headers)
        assert (await hub.http.send(request)).status_code == 201
        await alice.delete("alice")
        replay = hub.http.build_request("PUT", "/v1/peers/alice", content=content)
        replay.headers.update(headers)
        answer = await hub.http.send(replay)
        assert (answer.status_code, answer.json()) == (401, {"error": "replayed request"})
        assert hub.store.stats().peers == 0


async def test_stale_and_future_timestamps_are_refused(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(auth_window=30.0) as hub:
        alice = hub.peer()
        for skew in (-31, 31):
            headers = alice.signer.sign("GET", "/v1/peers/x", b"", now=hub_clock() + skew)
            reply = await hub.http.get("/v1/peers/x", headers=headers)
            assert reply.status_code == 401
            assert "window" in reply.json()["error"]
        headers = alice.signer.sign("GET", "/v1/peers/x", b"", now=hub_clock() - 29)
        assert (await hub.http.get("/v1/peers/x", headers=headers)).status_code == 404


@pytest.mark.parametrize("tamper", ["path", "body", "method", "mac", "key"])
async def test_tampered_requests_fail_authentication(tamper: str) -> None:
    async with Hub() as hub:
        alice, other = hub.peer(), hub.peer()
        content = json.dumps(alice.body()).encode()
        headers = alice.signer.sign("PUT", "/v1/peers/alice", content, now=hub_clock())
        method, path = "PUT", "/v1/peers/alice"
        if tamper == "path":
            path = "/v1/peers/alicf"
        elif tamper == "body":
            content = content.replace(b"192.0.2.10", b"192.0.2.11")
        elif tamper == "method":
            method = "POST"
            path = "/v1/peers/alice/messages"
        elif tamper == "mac":
            headers[HEADER_MAC] = other.signer.sign("PUT", path, content, now=hub_clock())[
                HEADER_MAC
            ]
        else:
            headers["X-Punchtrio-Key"] = other.key.public_key().to_base64()
        reply = await hub.http.request(method, path, content=content, headers=headers)
        assert (reply.status_code, reply.json()) == (401, {"error": "authentication failed"})
        assert hub.store.stats().peers == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Punchtrio-Key": "x"},
        {
            "X-Punchtrio-Key": "A" * 43 + "=",
            "X-Punchtrio-Time": "1",
            "X-Punchtrio-Nonce": "A" * 22,
            "X-Punchtrio-Mac": "A" * 43 + "=",
        },
        {
            "X-Punchtrio-Key": "not base64 at all, but 44 characters long!!",
            "X-Punchtrio-Time": "1800000000",
            "X-Punchtrio-Nonce": "A" * 22,
            "X-Punchtrio-Mac": "A" * 43 + "=",
        },
    ],
)
async def test_missing_or_malformed_credentials_get_401(headers: dict[str, str]) -> None:
    async with Hub() as hub:
        reply = await hub.http.put("/v1/peers/alice", json={}, headers=headers)
        assert reply.status_code == 401
        assert set(reply.json()) == {"error"}


async def test_lookup_sweep_without_credentials_is_uniform() -> None:
    async with Hub() as hub:
        alice = hub.peer()
        assert (await alice.put("name-4242")).status_code == 201
        answers = set()
        for number in range(10_000):
            reply = await hub.http.get(f"/v1/peers/name-{number}")
            answers.add((reply.status_code, reply.content))
        assert answers == {(401, b'{"error": "missing authentication headers"}')}


async def test_networks_isolate_and_refuse_outsiders() -> None:
    red, blue = NetworkSecret(b"red network secret!"), NetworkSecret(b"blue network secret")
    async with Hub(networks=(red, blue)) as hub:
        assert (await hub.http.get("/v1/hub")).json()["network_required"] is True
        alice_red, bob_red = hub.peer(red), hub.peer(red)
        carol_blue, outsider = hub.peer(blue), hub.peer()
        guesser = hub.peer(NetworkSecret(b"a guessed secret, wrong"))

        assert (await alice_red.put("alice")).status_code == 201
        # Same name in another network: its own namespace, so no conflict and no leak.
        assert (await carol_blue.put("alice")).status_code == 201
        assert PeerRecord.from_json((await bob_red.get("alice")).json()).public_key == (
            alice_red.key.public_key()
        )
        assert PeerRecord.from_json((await carol_blue.get("alice")).json()).public_key == (
            carol_blue.key.public_key()
        )
        for intruder in (outsider, guesser):
            for reply in (
                await intruder.put("mallory"),
                await intruder.get("alice"),
                await intruder.get("alice", wait="1"),
            ):
                assert reply.status_code == 401
        # Knowing the network id is not enough: the MAC key is derived from the secret.
        spoof = outsider.signer.sign("GET", "/v1/peers/alice", b"", now=hub_clock())
        spoof[HEADER_NETWORK] = red.network_id
        assert (await hub.http.get("/v1/peers/alice", headers=spoof)).status_code == 401

        blue_only = await carol_blue.put("carol")
        assert blue_only.status_code == 201
        unknown, foreign = await bob_red.get("nobody"), await bob_red.get("carol")
        assert (unknown.status_code, unknown.content) == (foreign.status_code, foreign.content)
        assert (await bob_red.send("carol", "alice", "hi")).status_code == 409
        assert (await alice_red.send("carol", "alice", "hi")).status_code == 404


async def test_open_hub_refuses_a_request_naming_a_network() -> None:
    async with Hub() as hub:
        member = hub.peer(NetworkSecret(b"sixteen bytes!!!"))
        assert (await member.put("alice")).status_code == 401


async def test_lookup_sweep_from_another_network_is_uniform() -> None:
    red, blue = NetworkSecret(b"red network secret!"), NetworkSecret(b"blue network secret")
    async with Hub(networks=(red, blue)) as hub:
        owner, prober = hub.peer(red), hub.peer(blue)
        for number in range(0, 200, 7):
            await owner.put(f"host-{number}")
        answers = {
            (r.status_code, r.content) for r in [await prober.get(f"host-{n}") for n in range(200)]
        }
        assert answers == {(404, b'{"error": "no such peer"}')}


async def test_allowed_ips_overlapping_another_peer_conflict() -> None:
    keys = PrivateKey.generate(), PrivateKey.generate()
    routers = AddressPolicy(route_keys=frozenset(key.public_key() for key in keys))
    async with Hub(addresses=routers) as hub:
        alice, bob = hub.peer(key=keys[0]), hub.peer(key=keys[1])
        assert (
            await alice.put("alice", alice.body(allowed=["10.8.0.0/24", "fd00::/64"]))
        ).status_code == 201
        for overlapping in (["10.8.0.7/32"], ["10.0.0.0/8"], ["10.8.0.0/24"], ["fd00::1/128"]):
            reply = await bob.put("bob", bob.body(allowed=overlapping))
            assert reply.status_code == 409, overlapping
            assert "overlaps another peer" in reply.json()["error"]
        assert (
            await bob.put("bob", bob.body(allowed=["10.8.1.0/24", "fd00:0:0:1::/64"]))
        ).status_code == 201
        # The owner may move within its own prefixes; once alice lets go, bob may take them.
        assert (await alice.put("alice", alice.body(allowed=["10.8.0.0/25"]))).status_code == 200
        assert (await bob.put("bob", bob.body(allowed=["10.8.0.128/25"]))).status_code == 200
        await alice.delete("alice")
        assert (await bob.put("bob", bob.body(allowed=["10.8.0.0/24"]))).status_code == 200
        assert hub.store.stats().peers == 1


async def test_waiter_wakes_the_moment_the_peer_registers(autojump_clock: trio.abc.Clock) -> None:
    async with Hub() as hub:
        alice, bob = hub.peer(), hub.peer()
        woke_at: list[float] = []
        replies: list[httpx.Response] = []

        async def wait_for_bob() -> None:
            replies.append(await alice.get("bob", wait="50"))
            woke_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            nursery.start_soon(wait_for_bob)
            await trio.sleep(17)
            assert hub.store.stats().waiters == 1
            await bob.put("bob")
        assert replies[0].status_code == 200
        assert PeerRecord.from_json(replies[0].json()).public_key == bob.key.public_key()
        assert woke_at == [start + 17]
        assert hub.store.stats().waiters == 0


async def test_wait_times_out_with_404_capped_at_max_wait(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(max_wait=20.0) as hub:
        alice = hub.peer()
        start = trio.current_time()
        reply = await alice.get("bob", wait="3600")
        assert (reply.status_code, reply.json()) == (404, {"error": "no such peer"})
        assert trio.current_time() - start == pytest.approx(20.0)


async def test_wait_since_revision_wakes_on_change_only(autojump_clock: trio.abc.Clock) -> None:
    async with Hub() as hub:
        alice, bob = hub.peer(), hub.peer()
        first = PeerRecord.from_json((await bob.put("bob")).json())
        replies: list[httpx.Response] = []

        async def watch() -> None:
            replies.append(await alice.get("bob", wait="60", since=str(first.revision)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(5)
            await bob.put("bob")  # a refresh without change: the watcher keeps waiting
            await trio.sleep(5)
            assert not replies
            await bob.put("bob", bob.body(["198.51.100.9:9"]))
        assert PeerRecord.from_json(replies[0].json()).revision > first.revision


async def test_records_expire_unless_refreshed(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(ttl=30.0) as hub:
        alice, bob = hub.peer(), hub.peer()
        await alice.put("alice")
        await trio.sleep(20)
        assert (await alice.put("alice")).status_code == 200
        await trio.sleep(20)
        assert (await bob.get("alice")).status_code == 200
        await trio.sleep(11)
        assert (await bob.get("alice")).status_code == 404
        assert hub.store.stats().peers == 0
        # An expired name is free again.
        assert (await bob.put("alice")).status_code == 201


async def test_signalling_messages_queue_and_long_poll(autojump_clock: trio.abc.Clock) -> None:
    async with Hub() as hub:
        alice, bob = hub.peer(), hub.peer()
        await alice.put("alice")
        await bob.put("bob")
        assert (await alice.send("bob", "alice", "punch at 12")).json() == {"queued": 1}
        got = messages_from_json((await bob.receive("bob")).json())
        assert [(m.sender, m.data) for m in got] == [("alice", "punch at 12")]
        assert messages_from_json((await bob.receive("bob")).json()) == ()

        received: list[httpx.Response] = []

        async def poll() -> None:
            received.append(await bob.receive("bob", wait="30"))

        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            nursery.start_soon(poll)
            await trio.sleep(3)
            await alice.send("bob", "alice", "now")
        assert trio.current_time() == start + 3
        assert [m.data for m in messages_from_json(received[0].json())] == ["now"]

        start = trio.current_time()
        empty = await bob.receive("bob", wait="30")
        assert (empty.status_code, empty.json()) == (200, {"messages": []})
        assert trio.current_time() == pytest.approx(start + 30)

        assert (await alice.send("nobody", "alice", "x")).status_code == 404
        assert (await alice.send("bob", "bob", "spoof")).status_code == 409
        assert (await bob.receive("nobody")).status_code == 404


async def test_message_queue_is_bounded_and_messages_expire(autojump_clock: trio.abc.Clock) -> None:
    limits = StoreLimits(max_queued_per_peer=3, max_queued=5, message_ttl=10.0)
    async with Hub(limits=limits) as hub:
        alice, bob, carol = hub.peer(), hub.peer(), hub.peer()
        for peer, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            await peer.put(name)
        for number in range(3):
            assert (await alice.send("bob", "alice", str(number))).status_code == 202
        full = await alice.send("bob", "alice", "3")
        assert full.status_code == 429
        assert full.headers["retry-after"] == "1"
        assert (await alice.send("carol", "alice", "a")).status_code == 202
        assert (await alice.send("carol", "alice", "b")).status_code == 202
        assert (await alice.send("carol", "alice", "c")).status_code == 503
        await trio.sleep(11)
        assert messages_from_json((await bob.receive("bob")).json()) == ()
        assert (await alice.send("bob", "alice", "fresh")).status_code == 202


async def test_store_limits_give_503_and_change_nothing() -> None:
    async with Hub(limits=StoreLimits(max_peers=2)) as hub:
        peers = [hub.peer() for _ in range(3)]
        assert (await peers[0].put("p0")).status_code == 201
        assert (await peers[1].put("p1")).status_code == 201
        full = await peers[2].put("p2")
        assert (full.status_code, full.headers["retry-after"]) == (503, "1")
        assert (await peers[0].put("p0")).status_code == 200  # refreshing still works
        assert hub.store.stats().peers == 2


async def test_too_many_waiters_get_503(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(limits=StoreLimits(max_waiters=2)) as hub:
        alice = hub.peer()
        replies: list[int] = []

        async def wait() -> None:
            replies.append((await alice.get("ghost", wait="10")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(wait)
        assert sorted(replies) == [404, 404, 503]


async def test_rate_limit_per_source(autojump_clock: trio.abc.Clock) -> None:
    async with Hub(rate=2.0, burst=5.0) as hub:
        codes = [(await hub.http.get("/v1/hub")).status_code for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        limited = await hub.http.get("/v1/peers/alice")
        assert limited.json() == {"error": "rate limit exceeded"}
        await trio.sleep(1)
        assert [(await hub.http.get("/v1/hub")).status_code for _ in range(3)] == [200, 200, 429]


async def test_metrics_count_requests_and_gauges(autojump_clock: trio.abc.Clock) -> None:
    async with Hub() as hub:
        alice = hub.peer()
        await alice.put("alice")
        await alice.get("nobody")
        await hub.http.get("/v1/peers/alice")
        assert (await hub.http.get("/metrics")).status_code == 404  # not on the API listener
        metrics = hub.scrape()
        assert metrics["punchtrio_hub_peers"] == 1
        assert metrics["punchtrio_hub_open_waits"] == 0
        requests = 'punchtrio_hub_requests_total{{method="{}",route="{}",status="{}"}}'
        assert metrics[requests.format("PUT", "/v1/peers/{name}", 201)] == 1
        assert metrics[requests.format("GET", "/v1/peers/{name}", 404)] == 1
        assert metrics[requests.format("GET", "/v1/peers/{name}", 401)] == 1
        assert metrics[requests.format("GET", "other", 404)] == 1  # the /metrics above


async def test_1000_concurrent_registrations_distinct_and_contested() -> None:
    async with Hub() as hub:
        peers = [hub.peer() for _ in range(1000)]
        distinct: list[int] = []
        contested: list[tuple[int, int]] = []

        async def register_own(index: int) -> None:
            distinct.append((await peers[index].put(f"peer-{index}")).status_code)

        async def contest(index: int) -> None:
            contested.append((index, (await peers[index].put("contested")).status_code))

        async with trio.open_nursery() as nursery:
            for index in range(1000):
                nursery.start_soon(register_own, index)
                nursery.start_soon(contest, index)
        assert distinct == [201] * 1000
        winners = [index for index, status in contested if status == 201]
        assert len(winners) == 1
        assert sorted(status for _, status in contested) == [201] + [409] * 999
        record = PeerRecord.from_json((await peers[0].get("contested")).json())
        assert record.public_key == peers[winners[0]].key.public_key()
        assert hub.store.stats().peers == 1001


def test_rate_limit_is_keyed_per_ipv4_address_and_ipv6_64() -> None:
    # The buckets themselves (bounded table, burst + rate) are tested in test_token_bucket.py.
    from punchtrio.rendezvous._hub import _source_of

    def key(host: str) -> bytes:
        return _source_of({"client": (host, 5)})

    assert key("2001:db8:1:2:aaaa::1") == key("2001:db8:1:2:bbbb::9") != key("2001:db8:1:3::1")
    assert key("::ffff:192.0.2.7") == key("192.0.2.7") != key("192.0.2.8")
    assert _source_of({"client": None}) == _source_of({}) != key("198.51.100.4")
