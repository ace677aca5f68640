"""The hub's small Redis client: URLs, the RESP reply parser (hypothesis), commands on a fake
server over an in-memory stream. The real server is in tests/interop/test_hub_redis.py."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from punchtrio.rendezvous._resp import RedisAddress, RespError, _Connection, _encode


def _wire(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(_wire(v) for v in value)


replies = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


async def _parse(data: bytes, chunk: int = 7) -> Any:
    """Feed ``data`` to a connection ``chunk`` bytes at a time, then close; return one reply."""
    client, server = trio.testing.memory_stream_pair()
    connection = _Connection(client, None)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:

        async def feed() -> None:
            for start in range(0, len(data), chunk):
                await server.send_all(data[start : start + chunk])
            await server.aclose()

        nursery.start_soon(feed)
        try:
            answer = await connection.reply()
        except RespError as exc:
            answer = exc
        nursery.cancel_scope.cancel()
    if isinstance(answer, RespError) and str(answer).startswith(("Redis ", "lost")):
        raise answer  # a failure, not an error reply
    return answer


@given(replies, st.integers(1, 50))
def test_every_reply_parses_back_whatever_the_chunking(value: Any, chunk: int) -> None:
    assert trio.run(_parse, _wire(value), chunk) == value


@given(st.binary(max_size=200))
def test_garbage_is_a_resp_error_never_another_exception(data: bytes) -> None:
    try:
        trio.run(_parse, data)
    except RespError:
        pass


async def test_an_error_reply_is_returned_and_a_status_is_bytes() -> None:
    error = await _parse(b"-NOSCRIPT No matching script\r\n")
    assert isinstance(error, RespError)
    assert str(error) == "NOSCRIPT No matching script"
    assert await _parse(b"+OK\r\n") == b"OK"


def test_commands_are_encoded_as_bulk_arrays() -> None:
    assert _encode(("SET", b"k\r\n", 5, 0.5)) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n$3\r\n0.5\r\n"
    )


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://10.0.0.5:6380/2", RedisAddress("10.0.0.5", 6380, db=2)),
        ("redis://localhost", RedisAddress("localhost")),
        ("rediss://u:p%40ss@cache.example:6390/0", RedisAddress(
            "cache.example", 6390, tls=True, username="u", password="p@ss")),
        ("redis://:secret@10.0.0.5", RedisAddress("10.0.0.5", password="secret")),
        ("unix:///run/redis.sock?db=3", RedisAddress(path="/run/redis.sock", db=3)),
    ],
)  # fmt: skip
def test_urls(url: str, address: RedisAddress) -> None:
    assert RedisAddress.parse(url) == address


def test_a_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="redis://, rediss:// or unix://"):
        RedisAddress.parse("http://localhost:6379")
