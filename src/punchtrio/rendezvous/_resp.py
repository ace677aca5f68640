"""A small Redis client on Trio streams (RESP2): commands, Lua scripts and one subscription.

Only what :class:`~punchtrio.rendezvous.RedisStore` needs: ``EVALSHA`` (loading the script on
``NOSCRIPT``), ``PUBLISH`` and ``SUBSCRIBE``, over TCP, TLS (``rediss://``) or a Unix socket, with
``AUTH`` and ``SELECT`` from the URL. It runs in the hub's Trio loop: a command costs a write and
a read on a pooled connection, where a synchronous client would cost a hop to a worker thread and
back (``benchmarks/hub.py`` measures the difference). While :meth:`RespClient.run` runs, commands
share one pipelined connection instead: the commands of every task that are ready at once go out
in one write and their replies come back in one read, in order.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio

Arg = str | bytes | int | float

MAX_CONNECTIONS = 64
"""Connections per client: more concurrent commands wait for one (all are kept open)."""
MAX_REPLY_BYTES = 64 * 1024 * 1024
"""Largest bulk reply accepted, in bytes."""
MAX_LINE_BYTES = 64 * 1024
"""Longest reply line (a status, an error, a length) accepted, in bytes."""


_INTEGER = re.compile(rb"-?[0-9]{1,19}")


class RespError(Exception):
    """Redis answered a command with an error, or the connection failed or timed out."""


@dataclass(frozen=True)
class RedisAddress:
    """Where a Redis server is and how to log in, parsed from a ``redis://``, ``rediss://`` or
    ``unix://`` URL (``redis://[user:password@]host[:port][/db]``, ``unix:///path?db=N``)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Parse ``url``; raises :class:`ValueError` naming what is wrong."""
        try:
            return cls._parse(url)
        except ValueError as exc:
            if "scheme" in str(exc) or "starts with" in str(exc):
                raise
            raise ValueError(
                f"{exc}; the form is redis://[user:password@]host[:port][/db]"
            ) from None

    @classmethod
    def _parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            db = int(query.get("db", ["0"])[0])
            return cls(path=parts.path, db=db, username=user, password=password)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        path = parts.path.strip("/")
        db = int(path or query.get("db", ["0"])[0])
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=parts.scheme == "rediss",
            db=db,
            username=user,
            password=password,
        )


def _encode(args: tuple[Arg, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Connection:
    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = socket
        self.buffer = bytearray()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise RespError("Redis closed the connection")
        self.buffer += data

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_LINE_BYTES:
                raise RespError("Redis sent a line too long")
            await self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def reply(self) -> Any:
        """Read one reply: bytes, int, ``None``, a list, or a :class:`RespError` for an error
        reply (returned, not raised). Raises :class:`RespError` on a malformed reply."""
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b":", b"$", b"*") and not _INTEGER.fullmatch(rest):
            raise RespError(f"Redis sent a malformed reply {line[:40]!r}")
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            if size > MAX_REPLY_BYTES:
                raise RespError("Redis sent a reply too large")
            while len(self.buffer) < size + 2:
                await self._fill()
            data = bytes(self.buffer[:size])
            del self.buffer[: size + 2]
            return data
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            if count > MAX_REPLY_BYTES // 4:
                raise RespError("Redis sent a reply too large")
            return [await self.reply() for _ in range(count)]
        raise RespError(f"Redis sent an unknown reply type {kind!r}")

    async def call(self, *args: Arg) -> Any:
        await self.stream.send_all(_encode(args))
        answer = await self.reply()
        if isinstance(answer, RespError):
            raise answer
        return answer

    def close(self) -> None:
        self.socket.close()


class _Slot:
    """Where the reply of one pipelined command arrives."""

    __slots__ = ("answer", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.answer: Any = None


class _Pipeline:
    """One connection carrying the commands of every task: a writer sends what has queued up, a
    reader hands each reply to the oldest waiting :class:`_Slot` (Redis answers in order)."""

    def __init__(self, connection: _Connection, scope: trio.CancelScope) -> None:
        self.connection = connection
        self.scope = scope
        self.unsent: list[tuple[_Slot, bytes]] = []
        self.waiting: deque[_Slot] = deque()
        self.ready = trio.Event()

    def submit(self, args: tuple[Arg, ...]) -> _Slot:
        slot = _Slot()
        self.unsent.append((slot, _encode(args)))
        self.ready.set()
        return slot

    def withdraw(self, slot: _Slot) -> None:
        """Drop ``slot``'s command if it is not written yet (its caller was cancelled)."""
        self.unsent = [entry for entry in self.unsent if entry[0] is not slot]

    async def write(self) -> None:
        while True:
            if not self.unsent:
                self.ready = trio.Event()
                await self.ready.wait()
                continue
            batch, self.unsent = self.unsent, []
            self.waiting.extend(slot for slot, _ in batch)
            await self.connection.stream.send_all(b"".join(data for _, data in batch))

    async def read(self) -> None:
        while True:
            answer = await self.connection.reply()
            if not self.waiting:
                raise RespError("Redis sent a reply to no command")
            slot = self.waiting.popleft()
            slot.answer = answer
            slot.event.set()

    def fail(self, error: RespError) -> None:
        """Answer every command not answered yet with ``error`` (whether Redis ran those
        written is unknown)."""
        for slot in [*self.waiting, *(slot for slot, _ in self.unsent)]:
            slot.answer = error
            slot.event.set()
        self.waiting.clear()
        self.unsent = []


class RespClient:
    """Commands to the Redis server at ``url`` over pooled connections, or over one pipelined
    connection while :meth:`run` runs; each call bounded by ``timeout`` seconds. Every failure
    raises :class:`RespError`."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        try:
            self.address = RedisAddress.parse(url)
        except ValueError as exc:
            raise RespError(f"bad Redis URL: {exc}") from None
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._shas: dict[str, str] = {}
        self._limiter: trio.CapacityLimiter | None = None
        self._pipeline: _Pipeline | None = None

    async def _connect(self) -> _Connection:
        address = self.address
        try:
            if address.path is not None:
                stream: trio.abc.Stream = await trio.open_unix_socket(address.path)
            else:
                stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise RespError(f"cannot connect to Redis: {exc.strerror or exc}") from None
        socket = stream.socket  # type: ignore[attr-defined]
        if address.tls:
            tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=address.host)
            await tls.do_handshake()
            stream = tls
        connection = _Connection(stream, socket)
        try:
            if address.password is not None:
                login = (address.username, address.password) if address.username else ()
                await connection.call("AUTH", *(login or (address.password,)))
            if address.db:
                await connection.call("SELECT", address.db)
        except BaseException:
            connection.close()
            raise
        return connection

    async def call(self, *args: Arg) -> Any:
        """Send one command and return its reply (bytes, int, ``None`` or a list of them)."""
        pipeline = self._pipeline
        if pipeline is not None:
            return await self._pipelined(pipeline, args)
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        async with self._limiter:
            return await self._call(args)

    async def _call(self, args: tuple[Arg, ...]) -> Any:
        connection = None
        try:
            with trio.fail_after(self.timeout):
                connection = self._idle.pop() if self._idle else await self._connect()
                answer = await connection.call(*args)
        except RespError as exc:
            if connection is not None and "closed" not in str(exc):
                self._release(connection)  # an error reply: the connection is fine
            elif connection is not None:
                connection.close()
            raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
            if connection is not None:
                connection.close()
            raise RespError(f"Redis did not answer: {exc or type(exc).__name__}") from None
        except BaseException:  # cancelled mid-command: the reply would come to the next caller
            if connection is not None:
                connection.close()
            raise
        self._release(connection)
        return answer

    def _release(self, connection: _Connection) -> None:
        self._idle.append(connection)

    async def _pipelined(self, pipeline: _Pipeline, args: tuple[Arg, ...]) -> Any:
        # A caller cancelled before its command is written withdraws it; after, the command
        # runs (as it would have on a connection of its own) and the reader drops its reply.
        slot = pipeline.submit(args)
        try:
            with trio.fail_after(self.timeout):
                await slot.event.wait()
        except trio.TooSlowError:
            pipeline.withdraw(slot)
            pipeline.scope.cancel()  # Redis is stuck: run() opens another connection
            raise RespError("Redis did not answer in time") from None
        except BaseException:
            pipeline.withdraw(slot)
            raise
        if isinstance(slot.answer, RespError):
            raise slot.answer
        return slot.answer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry every command on one pipelined connection until cancelled; never raises.

        Reports started at once. While the connection is being opened (and without ``run``),
        commands use pooled connections, one command each. A lost connection fails the commands
        waiting on it (:class:`RespError`) and is opened again after 0.1 s (doubling to 5 s while
        opening it fails).
        """
        task_status.started()
        backoff = 0.1
        while True:
            try:
                with trio.fail_after(self.timeout):
                    connection = await self._connect()
            except (RespError, OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError):
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 5.0)
                continue
            backoff = 0.1
            error = RespError("lost the pipelined connection to Redis")
            try:
                with trio.CancelScope() as scope:
                    pipeline = _Pipeline(connection, scope)
                    self._pipeline = pipeline
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._guard, pipeline, pipeline.write)
                        nursery.start_soon(self._guard, pipeline, pipeline.read)
            finally:
                self._pipeline = None
                pipeline.fail(error)
                connection.close()
            await trio.sleep(backoff)  # a server that accepts and drops is not retried hot

    @staticmethod
    async def _guard(pipeline: _Pipeline, part: Any) -> None:
        """Run the reader or the writer; a failure of either ends the pipeline."""
        try:
            await part()
        except (
            RespError,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ssl.SSLError,
        ):
            pipeline.scope.cancel()

    async def script(self, source: str, keys: list[str], args: list[Arg]) -> Any:
        """Run the Lua ``source`` with ``keys`` and ``args`` (``EVALSHA``, loading it once)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", source, len(keys), *keys, *args)

    async def subscribe(self, channel: str) -> Subscription:
        """Subscribe to ``channel`` on a connection of its own. Raises :class:`RespError`."""
        try:
            with trio.fail_after(self.timeout):
                connection = await self._connect()
                try:
                    await connection.stream.send_all(_encode(("SUBSCRIBE", channel)))
                    await connection.reply()
                except BaseException:
                    connection.close()
                    raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
            raise RespError(f"cannot subscribe at Redis: {exc or type(exc).__name__}") from None
        return Subscription(connection)

    def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._idle.pop().close()


class Subscription:
    """The messages of one subscribed channel (from :meth:`RespClient.subscribe`)."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def receive(self) -> bytes:
        """Wait for the next message and return its payload. Raises :class:`RespError` when the
        connection is lost."""
        while True:
            try:
                message = await self._connection.reply()
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                raise RespError(f"lost the Redis subscription: {exc}") from None
            if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                return bytes(message[2])

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()
