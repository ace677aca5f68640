"""Punch probes: the Scapy layer, its parser, the probe key and the checks on received probes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult_base

from punchtrio.mux import PROBE_MAGIC
from punchtrio.punch import (
    PING,
    PONG,
    PROBE_SIZE,
    Probe,
    ProbeError,
    ProbeGuard,
    ProbeKeyError,
    ProbeRejected,
    build_probe,
    derive_probe_key,
    encode_probe,
    key_id,
    parse_probe,
    verify_mac,
)

PRIV_A = bytes(range(1, 33))
PRIV_B = bytes(range(101, 133))
PUB_A = crypto_scalarmult_base(PRIV_A)
PUB_B = crypto_scalarmult_base(PRIV_B)
KEY = derive_probe_key(PRIV_A, PUB_B)
ID_A = key_id(PUB_A)
WALL = 1.7e9
TXID = bytes(range(12))

_ip4 = st.ip_addresses(v=4).map(str)
_ip6 = st.ip_addresses(v=6).map(str)


def test_both_peers_derive_the_same_probe_key_and_nobody_else_does() -> None:
    assert derive_probe_key(PRIV_B, PUB_A) == KEY
    third = bytes(range(50, 82))
    assert derive_probe_key(third, PUB_B) != KEY
    assert len(KEY) == 32


def test_key_id_is_the_first_8_bytes_of_blake2s_of_the_public_key() -> None:
    assert key_id(PUB_A) == hashlib.blake2s(PUB_A).digest()[:8]
    assert key_id(PUB_A) != key_id(PUB_B)


@pytest.mark.parametrize(
    "public",
    [bytes(32), (1).to_bytes(32, "little"), bytes(31)],
    ids=["zero", "order-1 point", "short"],
)
def test_a_low_order_or_malformed_peer_key_gives_no_probe_key(public: bytes) -> None:
    with pytest.raises(ProbeKeyError):
        derive_probe_key(PRIV_A, public)


def test_the_wire_layout() -> None:
    data = build_probe(PONG, TXID, ID_A, WALL, KEY, ("198.51.100.7", 40000))
    assert len(data) == PROBE_SIZE
    assert data[:4] == PROBE_MAGIC
    assert data[4:8] == b"\x01\x02\x00\x00"
    assert data[8:20] == TXID
    assert data[20:28] == ID_A
    assert int.from_bytes(data[28:36], "big") == int(WALL * 1e6)
    assert data[36:40] == b"\x04\x00" + (40000).to_bytes(2, "big")
    assert data[40:56] == bytes([198, 51, 100, 7]) + bytes(12)
    assert data[56:] == hashlib.blake2s(data[:56], key=KEY, digest_size=16).digest()


@given(
    st.sampled_from([PING, PONG]),
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=8, max_size=8),
    st.floats(0, 1.8e10),
    st.one_of(st.none(), st.tuples(st.one_of(_ip4, _ip6), st.integers(1, 65535))),
)
def test_built_probes_parse_back(
    kind: int, txid: bytes, sender: bytes, wall: float, observed: tuple[str, int] | None
) -> None:
    observed = observed if kind == PONG else None
    data = build_probe(kind, txid, sender, wall, KEY, observed)
    probe = parse_probe(data)
    assert isinstance(probe, Probe)
    assert (probe.kind, probe.txid, probe.key_id) == (kind, txid, sender)
    assert probe.observed == observed
    assert abs(probe.sent_at - wall) < 1e-5
    assert verify_mac(data, KEY)
    assert bytes(probe) == data  # the layer rebuilds bit-exactly
    assert encode_probe(probe, KEY) == data


@given(st.binary(max_size=100))
def test_the_parser_raises_only_probe_error_on_arbitrary_bytes(data: bytes) -> None:
    try:
        probe = parse_probe(data)
    except ProbeError:
        return
    assert len(data) == PROBE_SIZE
    assert probe.kind in (PING, PONG)


@given(st.binary(min_size=PROBE_SIZE - 4, max_size=PROBE_SIZE - 4))
def test_the_parser_raises_only_probe_error_on_magic_prefixed_noise(rest: bytes) -> None:
    data = PROBE_MAGIC + rest
    try:
        probe = parse_probe(data)
    except ProbeError:
        return
    assert bytes(probe) == data  # whatever passes the checks rebuilds bit-exactly


@given(st.integers(0, PROBE_SIZE - 1), st.integers(1, 255))
def test_the_parser_raises_only_probe_error_on_mutated_probes(index: int, flip: int) -> None:
    data = bytearray(build_probe(PONG, TXID, ID_A, WALL, KEY, ("2001:db8::1", 5)))
    data[index] ^= flip
    try:
        probe = parse_probe(bytes(data))
    except ProbeError:
        return
    assert bytes(probe) == bytes(data)
    assert not verify_mac(bytes(data), KEY)


VALID_PING = build_probe(PING, TXID, ID_A, WALL, KEY)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (4, 2, "version"),
        (5, 3, "kind"),
        (6, 1, "reserved"),
        (37, 1, "reserved"),
        (36, 5, "family"),
        (36, 4, "ping carries no observed address"),
        (38, 1, "without a family"),
        (3, 0, "magic"),
    ],
)
def test_malformed_probes_are_refused(offset: int, value: int, message: str) -> None:
    data = bytearray(VALID_PING)
    data[offset] = value
    if message == "ping carries no observed address":
        data[39] = 1
    with pytest.raises(ProbeError, match=message):
        parse_probe(bytes(data))


def test_a_pong_address_block_must_be_consistent() -> None:
    data = bytearray(build_probe(PONG, TXID, ID_A, WALL, KEY, ("192.0.2.1", 9)))
    data[50] = 1  # beyond the 4 bytes of the IPv4 address
    with pytest.raises(ProbeError, match="beyond"):
        parse_probe(bytes(data))
    data = bytearray(build_probe(PONG, TXID, ID_A, WALL, KEY, ("192.0.2.1", 9)))
    data[38:40] = b"\x00\x00"
    with pytest.raises(ProbeError, match="port"):
        parse_probe(bytes(data))


def guard(**kwargs: float) -> ProbeGuard:
    return ProbeGuard(KEY, ID_A, **kwargs)  # type: ignore[arg-type]


def reason(g: ProbeGuard, data: bytes, wall: float = WALL) -> str:
    with pytest.raises(ProbeRejected) as info:
        g.check(data, wall)
    return info.value.reason


def test_the_guard_accepts_a_fresh_probe_once() -> None:
    g = guard()
    assert g.check(VALID_PING, WALL + 1).txid == TXID
    assert reason(g, VALID_PING, WALL + 1) == "replay"
    # The pong with the same transaction id is another message.
    pong = build_probe(PONG, TXID, ID_A, WALL, KEY, ("192.0.2.1", 9))
    assert g.check(pong, WALL).kind == PONG


@given(st.integers(0, PROBE_SIZE - 1), st.integers(1, 255))
def test_any_tampering_is_refused_and_changes_nothing(index: int, flip: int) -> None:
    g = guard()
    data = bytearray(VALID_PING)
    data[index] ^= flip
    assert reason(g, bytes(data)) in {"malformed", "unknown_key", "mac"}
    assert g.check(VALID_PING, WALL).txid == TXID


def test_a_probe_under_another_key_or_from_another_sender_is_refused() -> None:
    g = guard()
    other_key = derive_probe_key(bytes(range(50, 82)), PUB_B)
    assert reason(g, build_probe(PING, TXID, ID_A, WALL, other_key)) == "mac"
    assert reason(g, build_probe(PING, TXID, key_id(PUB_B), WALL, KEY)) == "unknown_key"
    assert reason(g, b"\x00" * PROBE_SIZE) == "malformed"
    assert reason(g, VALID_PING[:-1]) == "malformed"


def test_stale_probes_are_refused_both_ways() -> None:
    g = guard(window=30.0)
    assert reason(g, VALID_PING, WALL + 31) == "stale"
    assert reason(g, VALID_PING, WALL - 31) == "stale"
    assert g.check(VALID_PING, WALL + 29).txid == TXID


def test_an_evicted_transaction_id_cannot_be_replayed() -> None:
    g = guard(cache_size=2)
    probes = [build_probe(PING, bytes([i]) * 12, ID_A, WALL + i, KEY) for i in range(3)]
    for p in probes:
        g.check(p, WALL + 3)
    assert reason(g, probes[0], WALL + 3) == "stale"  # evicted: below the floor now
    assert reason(g, probes[2], WALL + 3) == "replay"
    later = build_probe(PING, b"\x09" * 12, ID_A, WALL + 4, KEY)
    assert g.check(later, WALL + 4).kind == PING


def test_expired_entries_leave_the_cache() -> None:
    g = guard(window=10.0)
    g.check(VALID_PING, WALL)
    fresh = build_probe(PING, b"\x01" * 12, ID_A, WALL + 20, KEY)
    g.check(fresh, WALL + 20)
    assert len(g._seen) == 1
    assert reason(g, VALID_PING, WALL + 20) == "stale"
