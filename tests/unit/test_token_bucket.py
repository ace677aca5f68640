"""The one token-bucket rate limiter (punchtrio._token_bucket) and how each user keys it."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio._token_bucket import TokenBuckets, address_key
from punchtrio.rendezvous._hub import _source_of
from punchtrio.stun import StunMessage, StunResponder, StunServerError
from punchtrio.wireguard import RateLimiter, source_key

KEYS = [b"a", b"b", b"c", b"d"]
STEPS = st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0])
EVENTS = st.lists(
    st.tuples(st.integers(0, len(KEYS) - 1), STEPS, st.sampled_from([0.5, 1.0, 1.0, 2.0, 7.0])),
    max_size=60,
)
RATES = st.sampled_from([0.5, 1.0, 4.0, 20.0, 50.0])
BURSTS = st.sampled_from([1.0, 2.0, 5.0, 100.0])


def _run(
    buckets: TokenBuckets, events: list[tuple[int, float, float]]
) -> list[tuple[bytes, float, float, bool]]:
    """Feed ``events`` (key index, seconds since the previous event, cost); return each
    ``(key, now, cost, allowed)`` and check the table never outgrows ``max_keys``."""
    now, out = 100.0, []
    for index, step, cost in events:
        now += step
        out.append((KEYS[index], now, cost, buckets.allow(KEYS[index], now, cost)))
        assert len(buckets) <= buckets.max_keys
    return out


@settings(max_examples=400, deadline=None)
@given(events=EVENTS, rate=RATES, burst=BURSTS, max_keys=st.integers(1, 5))
def test_no_key_ever_gets_more_than_burst_plus_rate_times_elapsed(
    events: list[tuple[int, float, float]], rate: float, burst: float, max_keys: int
) -> None:
    decisions = _run(TokenBuckets(rate=rate, burst=burst, max_keys=max_keys), events)
    for key in KEYS:
        allowed = [(now, cost) for k, now, cost, ok in decisions if k == key and ok]
        for i, (start, _) in enumerate(allowed):
            taken = 0.0
            for end, cost in allowed[i:]:
                taken += cost
                assert taken <= burst + rate * (end - start) + 1e-6


def _reference(rate: float, burst: float, events: list[tuple[bytes, float, float]]) -> list[bool]:
    """An unbounded textbook token bucket per key: what the limiter must answer while the table
    has room for every key."""
    state: dict[bytes, tuple[float, float]] = {}
    answers = []
    for key, now, cost in events:
        last, tokens = state.get(key, (now, burst))
        tokens = min(burst, tokens + (now - last) * rate)
        ok = tokens >= cost
        state[key] = (now, tokens - cost if ok else tokens)
        answers.append(ok)
    return answers


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, rate=RATES, burst=BURSTS)
def test_with_room_for_every_key_it_is_exactly_a_token_bucket(
    events: list[tuple[int, float, float]], rate: float, burst: float
) -> None:
    decisions = _run(TokenBuckets(rate=rate, burst=burst, max_keys=len(KEYS)), events)
    expected = _reference(rate, burst, [(k, now, cost) for k, now, cost, _ in decisions])
    assert [ok for *_, ok in decisions] == expected


def test_a_full_table_refuses_new_keys_until_a_bucket_has_refilled() -> None:
    buckets = TokenBuckets(rate=1.0, burst=2.0, max_keys=2)
    assert buckets.allow(b"a", 0.0, 2.0)  # empty: full again at 2.0
    assert buckets.allow(b"b", 0.0)  # full again at 1.0
    assert not buckets.allow(b"c", 0.9)  # neither has refilled: c is refused, a and b kept
    assert not buckets.allow(b"a", 0.9)  # ... so a still cannot burst again
    assert len(buckets) == 2
    assert buckets.allow(b"c", 1.5)  # b refilled at 1.0 and is forgotten (a is not)
    assert len(buckets) == 2
    assert not buckets.allow(b"a", 1.5, 2.0)  # a kept its state: 1.5 tokens


def test_sweeps_of_a_full_table_are_spaced() -> None:
    # After a sweep that frees nothing, the next waits burst / rate / 4 seconds (0.5 s here),
    # even if a bucket refills sooner: a flood of new keys costs O(1) each.
    buckets = TokenBuckets(rate=1.0, burst=2.0, max_keys=1)
    assert buckets.allow(b"a", 0.0, 0.1)  # full again at 0.1
    assert not buckets.allow(b"b", 0.05)  # sweep: a not refilled yet
    assert not buckets.allow(b"b", 0.2)  # a has refilled, but the last sweep was 0.15 s ago
    assert buckets.allow(b"b", 0.55)
    assert len(buckets) == 1


def test_a_higher_rate_takes_effect_at_once() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1.0, max_keys=1)
    assert buckets.allow(b"a", 0.0)
    assert not buckets.allow(b"b", 0.0)
    buckets.rate = 100.0
    assert buckets.rate == 100.0
    assert buckets.allow(b"b", 0.5)  # a refilled at 0.01 with the new rate and was forgotten
    assert not buckets.allow(b"b", 0.5, 2.0)  # more than burst: always refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0, "burst": 1.0, "max_keys": 1}, "rate must be positive"),
        ({"rate": math.inf, "burst": 1.0, "max_keys": 1}, "rate must be positive"),
        ({"rate": 1.0, "burst": -1.0, "max_keys": 1}, "burst must be positive"),
        ({"rate": 1.0, "burst": math.nan, "max_keys": 1}, "burst must be positive"),
        ({"rate": 1.0, "burst": 1.0, "max_keys": 0}, "max_keys must be at least 1"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBuckets(**kwargs)  # type: ignore[arg-type]
    buckets = TokenBuckets(rate=1.0, burst=1.0, max_keys=1)
    with pytest.raises(ValueError, match="rate must be positive"):
        buckets.rate = -1.0


IPV6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@given(a=IPV6, b=IPV6)
def test_ipv6_is_keyed_by_its_64(a: ipaddress.IPv6Address, b: ipaddress.IPv6Address) -> None:
    same_64 = a.packed[:8] == b.packed[:8]
    if a.ipv4_mapped is None and b.ipv4_mapped is None:
        assert (address_key(str(a)) == address_key(str(b))) == same_64
    assert address_key(f"{a}%eth0") == address_key(str(a))


@given(a=st.integers(0, 2**32 - 1), b=st.integers(0, 2**32 - 1))
def test_ipv4_is_keyed_by_its_address(a: int, b: int) -> None:
    first, second = ipaddress.IPv4Address(a), ipaddress.IPv4Address(b)
    assert (address_key(str(first)) == address_key(str(second))) == (a == b)
    assert address_key(f"::ffff:{first}") == address_key(str(first))
    # No IPv4 key is an IPv6 /64 key, or the other way round.
    assert address_key(str(first)) != address_key(f"{first}::")


def test_text_that_is_no_address_is_its_own_key() -> None:
    assert address_key("unknown") == b"unknown" != address_key("")


def _stun_limited(source: str, other: str) -> bool:
    responder = StunResponder(("2001:db8::1", 3478), rate=1.0, burst=1.0)
    request = bytes(StunMessage())
    assert responder.handle(request, responder.primary, (source, 5000), 0.0) is not None
    return responder.handle(request, responder.primary, (other, 5001), 0.0) is None


def _wireguard_limited(source: str, other: str) -> bool:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.allow((source, 5000), 0.0)
    return not limiter.allow((other, 5001), 0.0)


def _hub_limited(source: str, other: str) -> bool:
    buckets = TokenBuckets(rate=1.0, burst=1.0, max_keys=8)
    assert buckets.allow(_source_of({"client": (source, 5000)}), 0.0)
    return not buckets.allow(_source_of({"client": (other, 5001)}), 0.0)


def _source_key_shared(source: str, other: str) -> bool:
    return source_key((source, 1)) == source_key((other, 2))  # punchtrio.wireguard's public name


@pytest.mark.parametrize(
    "limited", [_stun_limited, _wireguard_limited, _hub_limited, _source_key_shared]
)
def test_every_user_keys_ipv6_by_64_and_ipv4_by_address(
    limited: Callable[[str, str], bool],
) -> None:
    assert limited("2001:db8:0:1::1", "2001:db8:0:1:ffff::2")  # one /64: one bucket
    assert not limited("2001:db8:0:1::1", "2001:db8:0:2::1")
    assert not limited("192.0.2.1", "192.0.2.2")
    assert limited("192.0.2.1", "192.0.2.1")


def test_stun_rate_must_be_positive_or_none() -> None:
    with pytest.raises(StunServerError, match="rate must be positive"):
        StunResponder(("192.0.2.1", 3478), rate=0.0)
    StunResponder(("192.0.2.1", 3478), rate=None)  # no limit
