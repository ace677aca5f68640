"""``follow_registrations``: a relay process's directory follows a shared store's records."""

from __future__ import annotations

import trio
import trio.testing

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    Endpoint,
    KeyDirectory,
    MemoryStore,
    RegisterRequest,
    StoreError,
    follow_registrations,
)
from punchtrio.rendezvous._follow import FOLLOW_EVERY, FOLLOW_PAUSE, FOLLOW_RETRY

NET = "0" * 32


def _wall() -> float:
    return 1_800_000_000.0 + trio.current_time()


def _request(key: PrivateKey) -> RegisterRequest:
    return RegisterRequest(key.public_key(), (Endpoint.parse("192.0.2.7:51820"),))


async def test_records_come_and_go_per_network(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore(clock=_wall)
    directory = KeyDirectory(clock=_wall)
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    await store.put(NET, "alice", _request(alice), 60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(follow_registrations, store, directory, ["", NET])
        a, b = alice.public_key().raw, bob.public_key().raw
        assert directory.is_registered(a, NET, _wall())  # read before it reports started
        assert not directory.is_registered(a, "", _wall())  # another network
        await store.put("", "bob", _request(bob), 60.0)
        await trio.sleep(FOLLOW_PAUSE + 0.1)
        assert directory.is_registered(b, "", _wall())
        assert await store.delete(NET, "alice", alice.public_key())
        await trio.sleep(FOLLOW_PAUSE + 0.1)
        assert not directory.is_registered(a, NET, _wall())
        # Refreshed without a change (no listing wakes): still registered past its first expiry.
        for _ in range(4):
            await trio.sleep(FOLLOW_EVERY)
            await store.put("", "bob", _request(bob), 60.0)
        assert directory.is_registered(b, "", _wall())
        # Not refreshed: gone once it expired.
        await trio.sleep(61.0 + FOLLOW_EVERY)
        assert not directory.is_registered(b, "", _wall())
        nursery.cancel_scope.cancel()


class FailingOnce(MemoryStore):
    """A store that fails its first read, as Redis does while it restarts."""

    def __init__(self) -> None:
        super().__init__(clock=_wall)
        self.failures = 1

    async def list_peers(self, network_id: str):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise StoreError("Redis is not reachable")
        return await super().list_peers(network_id)


async def test_a_failing_store_is_read_again(autojump_clock: trio.testing.MockClock) -> None:
    store = FailingOnce()
    directory = KeyDirectory(clock=_wall)
    alice = PrivateKey.generate()
    await store.put("", "alice", _request(alice), 60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(follow_registrations, store, directory, [""])
        assert not directory.is_registered(alice.public_key().raw, "", _wall())
        await trio.sleep(FOLLOW_RETRY + 0.1)
        assert directory.is_registered(alice.public_key().raw, "", _wall())
        nursery.cancel_scope.cancel()


def test_replace_keeps_other_networks() -> None:
    directory = KeyDirectory(clock=lambda: 0.0)
    directory.note("", "a", b"a" * 32, 10.0)
    directory.note(NET, "b", b"b" * 32, 10.0)
    directory.replace("", [("c", b"c" * 32, 10.0)])
    assert not directory.is_registered(b"a" * 32, "", 1.0)
    assert directory.is_registered(b"c" * 32, "", 1.0)
    assert directory.is_registered(b"b" * 32, NET, 1.0)
