"""The hub's small Redis client: URLs, the RESP reply parser (hypothesis), commands on a fake
server over an in-memory stream. The real server is in tests/interop/test_hub_redis.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from punchtrio.rendezvous._resp import (
    RedisAddress,
    RespClient,
    RespError,
    _Connection,
    _encode,
    _Pipeline,
)


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


async def _fake_redis(stream: trio.abc.Stream, replies: dict[bytes, bytes], log: list[int]) -> None:
    """Answer each command (a bulk array whose first argument is a key of ``replies``) in order;
    ``log`` gets the number of commands that arrived in each read."""
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        answers, count = b"", 0
        while buffer.count(b"\r\n") >= 5:  # every test command is *2 $N name $N arg
            parts = buffer.split(b"\r\n", 5)
            answers += replies[parts[2]] % parts[4]
            buffer = parts[5]
            count += 1
        log.append(count)
        await stream.send_all(answers)


async def test_pipelined_commands_of_many_tasks_share_writes_and_get_their_own_replies() -> None:
    client, server = trio.testing.memory_stream_pair()
    log: list[int] = []
    replies = {b"ECHO": b"+%s\r\n", b"FAIL": b"-ERR %s\r\n"}
    results: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_redis, server, replies, log)
        with trio.CancelScope() as scope:
            pipeline = _Pipeline(_Connection(client, None), scope)  # type: ignore[arg-type]
            nursery.start_soon(pipeline.write)
            nursery.start_soon(pipeline.read)

            async def one(index: int) -> None:
                slot = pipeline.submit(("FAIL" if index % 5 == 0 else "ECHO", f"n{index}"))
                await slot.event.wait()
                results[index] = slot.answer

            async with trio.open_nursery() as tasks:
                for index in range(50):
                    tasks.start_soon(one, index)
            # A caller that gives up leaves its reply to be dropped: the next gets its own.
            abandoned = pipeline.submit(("ECHO", "gone"))
            last = pipeline.submit(("ECHO", "last"))
            await last.event.wait()
        nursery.cancel_scope.cancel()
    assert abandoned.answer == b"gone"
    assert last.answer == b"last"
    for index in range(50):
        answer = results[index]
        if index % 5 == 0:
            assert isinstance(answer, RespError)
            assert str(answer) == f"ERR n{index}"
        else:
            assert answer == f"n{index}".encode()
    assert max(log) > 1  # commands ready together went out in one write


async def test_a_lost_pipeline_fails_every_command_written_or_not() -> None:
    client, server = trio.testing.memory_stream_pair()
    pipeline = _Pipeline(_Connection(client, None), trio.CancelScope())  # type: ignore[arg-type]
    slots = [pipeline.submit(("ECHO", f"n{i}")) for i in range(3)]
    pipeline.waiting.append(pipeline.unsent.pop(0)[0])  # as if written
    pipeline.fail(RespError("lost the pipelined connection to Redis"))
    assert all(isinstance(s.answer, RespError) and s.event.is_set() for s in slots)
    assert not pipeline.waiting
    assert not pipeline.unsent
    await server.aclose()


async def test_a_command_withdrawn_before_it_is_written_never_reaches_redis() -> None:
    client, server = trio.testing.memory_stream_pair()
    log: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_redis, server, {b"ECHO": b"+%s\r\n"}, log)
        pipeline = _Pipeline(_Connection(client, None), nursery.cancel_scope)  # type: ignore[arg-type]
        withdrawn = pipeline.submit(("ECHO", "withdrawn"))
        kept = pipeline.submit(("ECHO", "kept"))
        pipeline.withdraw(withdrawn)
        nursery.start_soon(pipeline.write)
        nursery.start_soon(pipeline.read)
        await kept.event.wait()
        nursery.cancel_scope.cancel()
    assert kept.answer == b"kept"
    assert not withdrawn.event.is_set()
    assert log == [1]


async def test_run_opens_a_lost_pipelined_connection_again(tmp_path: Path) -> None:
    # A fake Redis on a Unix socket: the first connection answers one command, then drops the
    # next one unanswered; every later connection answers everything.
    path = str(tmp_path / "redis.sock")
    listener_socket = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener_socket.bind(path)
    listener_socket.listen()
    accepted: list[trio.SocketStream] = []
    logs: list[list[int]] = []

    async def serve(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        log: list[int] = []
        logs.append(log)
        if len(accepted) == 1:
            data = await stream.receive_some(65536)  # ECHO first
            log.append(1)
            await stream.send_all(b"+%s\r\n" % data.split(b"\r\n")[4])
            await stream.receive_some(65536)  # ECHO hang: never answered
            log.append(1)
            await stream.aclose()
            return
        await _fake_redis(stream, {b"ECHO": b"+%s\r\n"}, log)

    client = RespClient(f"unix://{path}", timeout=5.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, [trio.SocketListener(listener_socket)])
            await nursery.start(client.run)
            while client._pipeline is None:  # noqa: ASYNC110 - run() sets no event
                await trio.sleep(0.01)
            first = client._pipeline
            assert await client.call("ECHO", "first") == b"first"
            with pytest.raises(RespError, match="lost the pipelined connection to Redis"):
                await client.call("ECHO", "hang")
            while client._pipeline in (None, first):  # noqa: ASYNC110 - run() sets no event
                await trio.sleep(0.01)
            assert await client.call("ECHO", "again") == b"again"
            nursery.cancel_scope.cancel()
    client.close()
    assert len(accepted) == 2
    assert logs[0] == [1, 1]
    assert sum(logs[1]) == 1  # the command after the loss went over the new pipeline
