"""The Rendezvous interface: one conformance suite run on MemoryRendezvous and on HubClient (against
the hub's ASGI app, in process, on Trio's fake clock), then HubClient's own duties: re-registration
after a hub restart, refresh before expiry, retries with bounded jittered backoff, distrust of the
hub's answers."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    Backoff,
    Endpoint,
    EndpointType,
    HubClient,
    HubConfig,
    MemoryHub,
    NetworkSecret,
    NotRegisteredError,
    PeerNotFoundError,
    RegisterRequest,
    Rendezvous,
    RendezvousProtocolError,
    RendezvousRefusedError,
    RendezvousUnavailableError,
    create_app,
)

BASE = 1_800_000_000.0
EP_A = Endpoint.parse("198.51.100.7:51820", EndpointType.SRFLX)
EP_B = Endpoint.parse("203.0.113.9:40000", EndpointType.SRFLX)


def hub_clock() -> float:
    """The hub's and the clients' wall clock: follows Trio's (fake) clock."""
    return BASE + trio.current_time()


class RestartableHub(httpx.AsyncBaseTransport):
    """The hub app behind an ASGI transport that can go down and come back as a new process would:
    with a new app, an empty store and (unless kept) a new key. Requests in flight when it stops
    fail like a dropped connection; requests while it is down fail to connect."""

    def __init__(self, *, keep_key: bool = False, **config: Any) -> None:
        self.keep_key = keep_key
        self.config = config
        self.config.setdefault("rate", 0.0)
        self.key = PrivateKey.generate()
        self.app: Starlette | None = self._make_app()
        self._in_flight: set[trio.CancelScope] = set()
        self.requests: list[tuple[str, str]] = []

    def _make_app(self) -> Starlette:
        return create_app(HubConfig(self.key, **self.config), clock=hub_clock)

    def stop(self) -> None:
        for scope in self._in_flight:
            scope.cancel()
        self.app = None

    def start(self) -> None:
        if not self.keep_key:
            self.key = PrivateKey.generate()
        self.app = self._make_app()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        if self.app is None:
            raise httpx.ConnectError("connection refused", request=request)
        scope = trio.CancelScope()
        self._in_flight.add(scope)
        try:
            with scope:
                return await httpx.ASGITransport(self.app).handle_async_request(request)
            raise httpx.RemoteProtocolError("server disconnected", request=request)
        finally:
            self._in_flight.discard(scope)


def hub_client(hub: httpx.AsyncBaseTransport, name: str, **kwargs: Any) -> HubClient:
    kwargs.setdefault("rng", random.Random(1))
    return HubClient(
        "http://hub.test", PrivateKey.generate(), name, transport=hub, clock=hub_clock, **kwargs
    )


# -- conformance: every backend behaves the same -----------------------------------------------

PeerFactory = Callable[[str], Rendezvous]


@pytest.fixture(params=["memory", "hub"])
async def make_peer(request: pytest.FixtureRequest) -> AsyncIterator[PeerFactory]:
    async with AsyncExitStack() as stack:
        if request.param == "memory":
            memory = MemoryHub()

            def make(name: str) -> Rendezvous:
                return memory.peer(name, PrivateKey.generate().public_key())

        else:
            hub = RestartableHub()

            def make(name: str) -> Rendezvous:
                client = hub_client(hub, name)
                stack.push_async_callback(client.aclose)
                return client

        yield make


async def test_backends_implement_the_protocol(make_peer: PeerFactory) -> None:
    assert isinstance(make_peer("alice"), Rendezvous)


async def test_register_then_lookup(make_peer: PeerFactory) -> None:
    alice, bob = make_peer("alice"), make_peer("bob")
    stored = await alice.register([EP_A], ["10.9.0.1/32"])
    assert stored.name == "alice"
    assert stored.public_key == alice.public_key
    assert stored.endpoints == (EP_A,)
    assert [str(n) for n in stored.allowed_ips] == ["10.9.0.1/32"]
    found = await bob.lookup("alice")
    assert (found.public_key, found.endpoints, found.revision) == (
        alice.public_key,
        (EP_A,),
        stored.revision,
    )


async def test_lookup_of_unknown_peer(make_peer: PeerFactory) -> None:
    with pytest.raises(PeerNotFoundError):
        await make_peer("alice").lookup("nobody")


async def test_invalid_names_and_inputs_are_refused(make_peer: PeerFactory) -> None:
    alice = make_peer("alice")
    with pytest.raises(RendezvousRefusedError):
        await alice.lookup("Not/A/Name")
    with pytest.raises(RendezvousRefusedError):
        await alice.register([EP_A], ["10.0.0.1/24"])  # not canonical
    with pytest.raises(PeerNotFoundError):
        await alice.lookup("alice")  # the refusal changed nothing


async def test_wait_returns_the_moment_the_peer_registers(
    make_peer: PeerFactory, autojump_clock: trio.abc.Clock
) -> None:
    alice, bob = make_peer("alice"), make_peer("bob")
    woke_at: list[float] = []

    async def wait() -> None:
        record = await alice.wait_for_peer("bob")
        assert record.endpoints == (EP_B,)
        woke_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(95.5)  # longer than any long poll: the wait spans several
        assert woke_at == []
        await bob.register([EP_B])
        registered_at = trio.current_time()
    assert woke_at == [registered_at]


async def test_wait_for_a_newer_revision(
    make_peer: PeerFactory, autojump_clock: trio.abc.Clock
) -> None:
    alice, bob = make_peer("alice"), make_peer("bob")
    first = await bob.register([EP_B])
    assert (await alice.wait_for_peer("bob")).revision == first.revision
    result: list[int] = []

    async def wait() -> None:
        result.append((await alice.wait_for_peer("bob", newer_than=first.revision)).revision)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(10)
        await bob.register([EP_B])  # same content: same revision, no wake-up
        await trio.sleep(10)
        assert result == []
        second = await bob.register([EP_A, EP_B])
    assert result == [second.revision]
    assert second.revision > first.revision


async def test_a_name_belongs_to_its_first_key(make_peer: PeerFactory) -> None:
    owner, thief, carol = make_peer("alice"), make_peer("alice"), make_peer("carol")
    await owner.register([EP_A])
    with pytest.raises(RendezvousRefusedError):
        await thief.register([EP_B])
    assert (await carol.lookup("alice")).endpoints == (EP_A,)
    await thief.unregister()  # not the owner: the record stays
    assert (await carol.lookup("alice")).public_key == owner.public_key


async def test_overlapping_allowed_ips_are_refused(make_peer: PeerFactory) -> None:
    alice, bob = make_peer("alice"), make_peer("bob")
    await alice.register([EP_A], ["10.9.0.7/32"])
    with pytest.raises(RendezvousRefusedError):
        await bob.register([EP_B], ["10.9.0.7/32"])
    with pytest.raises(PeerNotFoundError):
        await alice.lookup("bob")


async def test_signalling_both_ways(make_peer: PeerFactory, autojump_clock: trio.abc.Clock) -> None:
    alice, bob = make_peer("alice"), make_peer("bob")
    await alice.register([EP_A])
    await bob.register([EP_B])
    got: list[tuple[str, str, float]] = []

    async def receive(peer: Rendezvous) -> None:
        message = await peer.receive_signal()
        got.append((peer.name, message.sender, trio.current_time()))
        await peer.send_signal(message.sender, "ack " + message.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive, bob)
        await trio.sleep(70)  # bob's receive spans more than one long poll
        await alice.send_signal("bob", "punch at 12.5")
        sent_at = trio.current_time()
    reply = await alice.receive_signal("bob")
    assert got == [("bob", "alice", sent_at)]
    assert (reply.sender, reply.data) == ("bob", "ack punch at 12.5")


async def test_receive_from_one_sender_keeps_the_others(make_peer: PeerFactory) -> None:
    alice, bob, carol = make_peer("alice"), make_peer("bob"), make_peer("carol")
    for peer in (alice, bob, carol):
        await peer.register()
    await carol.send_signal("alice", "from carol")
    await bob.send_signal("alice", "from bob")
    assert (await alice.receive_signal("bob")).data == "from bob"
    assert (await alice.receive_signal()).data == "from carol"


async def test_signalling_needs_registration_and_a_known_recipient(
    make_peer: PeerFactory,
) -> None:
    alice, bob = make_peer("alice"), make_peer("bob")
    with pytest.raises(NotRegisteredError):
        await alice.send_signal("bob", "hello")
    with pytest.raises(NotRegisteredError):
        await alice.receive_signal()
    await alice.register()
    with pytest.raises(PeerNotFoundError):
        await alice.send_signal("bob", "hello")
    with pytest.raises(RendezvousRefusedError):
        await alice.send_signal("alice", "x" * 3000)  # over 2048 bytes
    assert bob.name == "bob"


async def test_unregister_removes_the_record(make_peer: PeerFactory) -> None:
    alice, bob = make_peer("alice"), make_peer("bob")
    await alice.register([EP_A])
    await alice.unregister()
    await alice.unregister()  # idempotent
    with pytest.raises(PeerNotFoundError):
        await bob.lookup("alice")
    await bob.register([EP_B])  # and the name is free again
    assert (await alice.lookup("bob")).public_key == bob.public_key


# -- HubClient: restarts, refresh, retries -------------------------------------------------------


async def test_hub_restart_during_a_wait(autojump_clock: trio.abc.Clock) -> None:
    """The hub dies while alice waits for bob and comes back empty with a new key: alice's wait
    survives, alice registers again by herself, and the wait completes when bob registers."""
    hub = RestartableHub()
    result: list[Any] = []
    async with hub_client(hub, "alice") as alice, hub_client(hub, "bob") as bob:
        await alice.register([EP_A], ["10.9.0.1/32"])

        async def wait() -> None:
            result.append(await alice.wait_for_peer("bob"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(40)
            hub.stop()
            await trio.sleep(20)  # down: alice retries with backoff
            hub.start()
            await trio.sleep(35)  # backoff tops out at 30 s: alice is back by now
            assert result == []
            found = await bob.lookup("alice")  # alice re-registered on the new hub
            assert (found.public_key, found.endpoints) == (alice.public_key, (EP_A,))
            await bob.register([EP_B])
        assert result[0].public_key == bob.public_key


async def test_idle_client_reregisters_at_once_after_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Nothing else in flight: the client's watch on its own record drops with the hub, and the
    record is back within a second, not at the next refresh (ttl/3 = 20 s)."""
    hub = RestartableHub(keep_key=True, ttl=60.0)
    async with hub_client(hub, "alice") as alice, hub_client(hub, "bob") as bob:
        await alice.register([EP_A])
        await trio.sleep(1)
        hub.stop()
        hub.start()
        await trio.sleep(1)
        assert (await bob.lookup("alice")).public_key == alice.public_key


def _squat(hub: RestartableHub, name: str, key: PrivateKey) -> None:
    """Register ``name`` for ``key`` in the restarted hub's store before any client runs."""
    assert hub.app is not None
    request = RegisterRequest(key.public_key(), (EP_B,))
    coroutine = hub.app.state.hub.store.put("", name, request, hub.config.get("ttl", 300.0))
    try:  # a memory store's put never suspends: this runs it to completion now
        coroutine.send(None)
    except StopIteration:
        return
    raise AssertionError("the store's put suspended")


async def test_a_name_squatted_in_the_gap_comes_back_when_the_squatter_lets_go(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = RestartableHub(keep_key=True, ttl=60.0)
    async with hub_client(hub, "alice") as alice, hub_client(hub, "bob") as bob:
        await alice.register([EP_A])
        await trio.sleep(1)  # alice's watch is polling when the hub goes down
        hub.stop()
        hub.start()
        _squat(hub, "alice", PrivateKey.generate())
        await trio.sleep(5)
        assert "refuses the record of alice: name is registered to another key" in caplog.text
        await trio.sleep(80)  # the squatter's record expired at 61 s; alice's retries took it back
        assert (await bob.lookup("alice")).public_key == alice.public_key
        assert "accepts the record of alice again" in caplog.text


async def test_a_name_kept_by_another_key_is_refused_for_good(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Another key took alice's name on the restarted, empty hub and keeps refreshing it: alice
    retries for the TTL and a third, then reports the refusal; her later calls raise it."""
    hub = RestartableHub(keep_key=True, ttl=60.0)
    async with hub_client(hub, "alice") as alice:
        await alice.register([EP_A])
        await trio.sleep(1)
        hub.stop()
        hub.start()
        mallory_key = PrivateKey.generate()
        _squat(hub, "alice", mallory_key)
        mallory = HubClient("http://hub.test", mallory_key, "alice", transport=hub, clock=hub_clock)
        async with mallory:
            await mallory.register([EP_B])
            started = trio.current_time()
            error = await alice.wait_refused()
            assert 80 <= trio.current_time() - started <= 90
            assert isinstance(error, RendezvousRefusedError)
            assert error.status == 409
            assert "another key" in str(error)
            assert "refused the record of alice for good" in caplog.text
            with pytest.raises(RendezvousRefusedError, match="another key"):
                await alice.lookup("bob")
            assert (await mallory.lookup("alice")).public_key == mallory.public_key


async def test_refresh_keeps_the_record_past_its_ttl(autojump_clock: trio.abc.Clock) -> None:
    hub = RestartableHub(ttl=30.0)
    async with hub_client(hub, "alice") as alice, hub_client(hub, "bob") as bob:
        first = await alice.register([EP_A])
        await trio.sleep(300)
        again = await bob.lookup("alice")
        assert again.revision == first.revision  # refreshed, not re-created with new content
        assert 0 < again.expires_in <= 30.0
    # leaving the context deleted it
    async with hub_client(hub, "carol") as carol:
        with pytest.raises(PeerNotFoundError):
            await carol.lookup("alice")


async def test_errors_leave_the_context_unwrapped_and_still_unregister() -> None:
    hub = RestartableHub()

    async def session() -> None:
        async with hub_client(hub, "alice") as alice:
            await alice.register([EP_A])
            await alice.lookup("nobody")

    with pytest.raises(PeerNotFoundError):
        await session()
    bob = hub_client(hub, "bob")
    with pytest.raises(PeerNotFoundError):
        await bob.lookup("alice")
    await bob.aclose()


async def test_exit_without_unregister_keeps_the_record() -> None:
    hub = RestartableHub()
    async with hub_client(hub, "alice", unregister_on_exit=False) as alice:
        await alice.register([EP_A])
    bob = hub_client(hub, "bob")
    assert (await bob.lookup("alice")).endpoints == (EP_A,)
    await bob.aclose()


async def test_signalling_survives_a_restart(autojump_clock: trio.abc.Clock) -> None:
    hub = RestartableHub()
    async with hub_client(hub, "alice") as alice, hub_client(hub, "bob") as bob:
        await alice.register([EP_A])
        await bob.register([EP_B])
        got: list[str] = []

        async def receive() -> None:
            got.append((await bob.receive_signal("alice")).data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.sleep(5)
            hub.stop()
            await trio.sleep(3)
            hub.start()
            await trio.sleep(35)  # bob is back, registered again, polling
            await alice.send_signal("bob", "go")  # alice re-registers on the 409, then resends
        assert got == ["go"]


async def test_unreachable_hub_fails_after_the_attempts(autojump_clock: trio.abc.Clock) -> None:
    hub = RestartableHub()
    hub.stop()
    alice = hub_client(hub, "alice", attempts=3)
    start = trio.current_time()
    with pytest.raises(RendezvousUnavailableError, match="cannot reach the hub"):
        await alice.lookup("bob")
    assert len(hub.requests) == 3
    backoff = Backoff()
    assert trio.current_time() - start <= backoff.ceiling(0) + backoff.ceiling(1)
    await alice.aclose()


def json_response(status: int, body: object, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


def fake_hub(answer: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    """A hub that answers ``/v1/hub`` correctly and everything else with ``answer``."""
    key = PrivateKey.generate().public_key()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/hub":
            info = {
                "api": 1,
                "public_key": key.to_base64(),
                "stun": [],
                "ttl": 300,
                "max_wait": 60,
                "auth_window": 60,
                "time": hub_clock(),
                "network_required": False,
            }
            return json_response(200, info)
        return answer(request)

    return httpx.MockTransport(handler)


async def test_busy_hub_is_retried_after_retry_after(autojump_clock: trio.abc.Clock) -> None:
    answers = iter([503, 429, 404])
    times: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        status = next(answers)
        return json_response(status, {"error": "busy"}, **{"Retry-After": "7"})

    alice = hub_client(fake_hub(answer), "alice")
    with pytest.raises(PeerNotFoundError):
        await alice.lookup("bob")
    assert len(times) == 3
    assert all(later - earlier >= 7 for earlier, later in itertools.pairwise(times))
    await alice.aclose()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda r: httpx.Response(200, content=b"{nope"), "not valid JSON"),
        (lambda r: httpx.Response(200, content=b" " * (2 << 20)), "larger than"),
        (lambda r: json_response(200, {"name": "mallory"}), "invalid record"),
    ],
)
async def test_hostile_answers_are_refused(
    answer: Callable[[httpx.Request], httpx.Response], message: str
) -> None:
    alice = hub_client(fake_hub(answer), "alice")
    with pytest.raises(RendezvousProtocolError, match=message):
        await alice.lookup("bob")
    await alice.aclose()


async def test_a_record_for_another_name_is_refused() -> None:
    hub = RestartableHub()
    mallory = hub_client(hub, "mallory")
    record = (await mallory.register([EP_B])).to_json()
    alice = hub_client(fake_hub(lambda request: json_response(200, record)), "alice")
    with pytest.raises(RendezvousProtocolError, match="'mallory' for 'bob'"):
        await alice.lookup("bob")
    await alice.aclose()
    await mallory.aclose()


async def test_pinned_hub_key() -> None:
    hub = RestartableHub()
    good = hub_client(hub, "alice", hub_public_key=hub.key.public_key())
    await good.register([EP_A])
    bad = hub_client(hub, "bob", hub_public_key=PrivateKey.generate().public_key())
    with pytest.raises(RendezvousProtocolError, match="pinned"):
        await bad.lookup("alice")
    await good.aclose()
    await bad.aclose()


async def test_network_secret_is_required_and_separates_networks() -> None:
    secret = NetworkSecret(b"correct horse battery staple")
    other = NetworkSecret(b"another network, another world")
    hub = RestartableHub(networks=(secret, other))
    alice = hub_client(hub, "alice", network_secret=secret)
    await alice.register([EP_A])
    outsider = hub_client(hub, "eve")
    with pytest.raises(RendezvousRefusedError, match="network secret"):
        await outsider.lookup("alice")
    neighbour = hub_client(hub, "bob", network_secret=other)
    with pytest.raises(PeerNotFoundError):
        await neighbour.lookup("alice")
    friend = hub_client(hub, "carol", network_secret=secret)
    assert (await friend.lookup("alice")).public_key == alice.public_key
    for client in (alice, outsider, neighbour, friend):
        await client.aclose()


@given(
    initial=st.floats(0.01, 10),
    factor=st.floats(1, 4),
    extra=st.floats(0, 100),
    attempt=st.integers(0, 10_000),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_bounded_and_jittered(
    initial: float, factor: float, extra: float, attempt: int, seed: int
) -> None:
    backoff = Backoff(initial, initial + extra, factor)
    rng = random.Random(seed)
    ceiling = backoff.ceiling(attempt)
    assert initial <= ceiling <= backoff.maximum
    assert ceiling <= backoff.ceiling(attempt + 1)  # never shrinks
    for _ in range(5):
        assert ceiling / 2 <= backoff.delay(attempt, rng) <= ceiling


def test_backoff_spreads_clients_that_failed_together() -> None:
    backoff = Backoff()
    delays = {round(backoff.delay(3, random.Random(seed)), 6) for seed in range(50)}
    assert len(delays) > 40


@pytest.mark.parametrize(
    "values", [(0, 1, 2), (1, 0.5, 2), (1, 2, 0.5), (float("nan"), 1, 2), (1, float("inf"), 2)]
)
def test_backoff_refuses_nonsense(values: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(*values)


def test_client_refuses_bad_urls_and_names() -> None:
    key = PrivateKey.generate()
    with pytest.raises(ValueError, match="http"):
        HubClient("ftp://hub.example", key, "alice")
    with pytest.raises(ValueError, match="http"):
        HubClient("/relative", key, "alice")
    with pytest.raises(Exception, match="name must match"):
        HubClient("http://hub.example", key, "Alice")
