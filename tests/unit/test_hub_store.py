"""The in-memory store on its own: overlap index against brute force, expiry, nonces, revisions."""

from __future__ import annotations

import ipaddress

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    AllowedIPsConflictError,
    Endpoint,
    MemoryStore,
    NameTakenError,
    RegisterRequest,
    StoreFullError,
    StoreLimits,
)

KEYS = [PrivateKey.generate().public_key() for _ in range(4)]


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _request(owner: int, allowed: tuple[ipaddress.IPv4Network, ...] = ()) -> RegisterRequest:
    return RegisterRequest(KEYS[owner], (Endpoint.parse("192.0.2.1:1"),), allowed)


small_prefixes = st.builds(
    lambda start, length: ipaddress.ip_network(f"10.0.{start}.0/{length}", strict=False),
    st.integers(0, 15),
    st.integers(20, 26),
)
operations = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.booleans(),
        st.lists(small_prefixes, max_size=3),
    ),
    max_size=30,
)


@given(operations)
@settings(max_examples=150, deadline=None)
def test_overlap_index_agrees_with_brute_force(ops: list[tuple[int, bool, list]]) -> None:
    async def scenario() -> None:
        store = MemoryStore(clock=FakeClock())
        model: dict[int, tuple[ipaddress.IPv4Network, ...]] = {}
        for owner, delete, wanted in ops:
            name = f"peer-{owner}"
            if delete:
                assert await store.delete("", name, KEYS[owner]) == (owner in model)
                model.pop(owner, None)
                continue
            allowed: list[ipaddress.IPv4Network] = []
            for network in wanted:
                if not any(network.overlaps(mine) for mine in allowed):
                    allowed.append(network)
            clash = any(
                a.overlaps(b)
                for other, theirs in model.items()
                if other != owner
                for a in allowed
                for b in theirs
            )
            if clash:
                with pytest.raises(AllowedIPsConflictError):
                    await store.put("", name, _request(owner, tuple(allowed)), 60)
            else:
                await store.put("", name, _request(owner, tuple(allowed)), 60)
                model[owner] = tuple(allowed)
            for other, theirs in model.items():
                stored = await store.get("", f"peer-{other}")
                assert stored is not None
                assert stored.allowed_ips == theirs
        assert store.stats().peers == len(model)

    trio.run(scenario)


async def test_ownership_and_expiry() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    first, created = await store.put("", "alice", _request(0), 30)
    assert created
    with pytest.raises(NameTakenError):
        await store.put("", "alice", _request(1), 30)
    clock.now += 20
    refreshed, created = await store.put("", "alice", _request(0), 30)
    assert not created
    assert refreshed.revision == first.revision
    clock.now += 20
    assert await store.get("", "alice") is not None  # the refresh re-armed the expiry
    clock.now += 10
    assert await store.get("", "alice") is None
    assert store.stats().peers == 0
    _, created = await store.put("", "alice", _request(1), 30)
    assert created


async def test_revisions_grow_across_a_restart() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    before, _ = await store.put("", "alice", _request(0), 30)
    for third in range(100):
        network = ipaddress.ip_network(f"10.1.{third}.0/24")
        await store.put("", "alice", _request(0, (network,)), 30)
    clock.now += 0.001
    restarted = MemoryStore(clock=clock)
    after, _ = await restarted.put("", "alice", _request(0), 30)
    assert after.revision > before.revision


async def test_nonces_are_remembered_for_their_lifetime_and_bounded() -> None:
    clock = FakeClock()
    store = MemoryStore(StoreLimits(max_nonces=3), clock=clock)
    assert await store.remember_nonce(b"a" * 16, 120)
    assert not await store.remember_nonce(b"a" * 16, 120)
    clock.now += 119
    assert not await store.remember_nonce(b"a" * 16, 120)
    assert await store.remember_nonce(b"b" * 16, 120)
    clock.now += 2  # a rotated into the old generation: still refused
    assert not await store.remember_nonce(b"a" * 16, 120)
    assert await store.remember_nonce(b"c" * 16, 120)
    with pytest.raises(StoreFullError):
        await store.remember_nonce(b"d" * 16, 120)
    clock.now += 240
    assert await store.remember_nonce(b"a" * 16, 120)


async def test_networks_are_separate_namespaces() -> None:
    store = MemoryStore(clock=FakeClock())
    network = (ipaddress.ip_network("10.0.0.0/24"),)
    await store.put("red", "alice", _request(0, network), 30)
    await store.put("blue", "alice", _request(1, network), 30)
    red, blue = await store.get("red", "alice"), await store.get("blue", "alice")
    assert red is not None
    assert blue is not None
    assert (red.public_key, blue.public_key) == (KEYS[0], KEYS[1])
