"""The hub relay's wire format: every parser and the stream decoder, fuzzed with hypothesis."""

from __future__ import annotations

import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.mux import Kind, classify
from punchtrio.relay import (
    MAX_FRAME,
    BoundedWriter,
    HubRelayClient,
    HubRelayFrameError,
    HubRelayServer,
    HubStreamDecoder,
    encode_hub_stream_frame,
)
from punchtrio.relay._hub_frames import (
    Bind,
    Bound,
    Challenge,
    Channel,
    Hello,
    Refused,
    bind_body,
    bound_body,
    channel_body,
    channel_prefix,
    encode_challenge,
    encode_hello,
    encode_refused,
    parse_control,
    parse_data,
)

keys = st.binary(min_size=32, max_size=32)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
channels = st.integers(min_value=1, max_value=0xFFFF)
relay_frames = st.builds(
    lambda kind, body: b"\xf1prl" + bytes([kind]) + body,
    st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x11, 0x12, 0x13, 0x00, 0xFF]),
    st.binary(max_size=200),
)
anything = st.one_of(st.binary(max_size=200), relay_frames)


@given(keys, st.binary(min_size=16, max_size=16))
def test_hello_and_challenge_round_trip(key: bytes, cookie: bytes) -> None:
    assert parse_control(encode_hello(key)) == Hello(key)
    assert parse_control(encode_challenge(cookie)) == Challenge(cookie)
    assert len(encode_challenge(cookie)) < len(encode_hello(key))  # no amplification


@given(keys, st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), u64,
       st.binary(min_size=32, max_size=32))  # fmt: skip
def test_bind_round_trips(
    key: bytes, network: bytes, cookie: bytes, stamp: int, mac: bytes
) -> None:
    frame = bind_body(key, network, cookie, stamp) + mac
    assert parse_control(frame) == Bind(key, network, cookie, stamp, mac)
    assert classify(frame) is Kind.RELAY


@given(u64, u32, u32, st.binary(min_size=32, max_size=32), st.integers(min_value=0, max_value=255))
def test_bound_and_refused_round_trip(
    stamp: int, lifetime: int, epoch: int, mac: bytes, code: int
) -> None:
    frame = bound_body(stamp, lifetime, epoch) + mac
    assert parse_control(frame) == Bound(stamp, lifetime, epoch, mac)
    assert len(frame) == 53
    assert parse_control(encode_refused(stamp, code)) == Refused(stamp, code)


@given(u32, channels, keys, st.binary(min_size=32, max_size=32))
def test_channel_round_trips(epoch: int, channel: int, key: bytes, mac: bytes) -> None:
    frame = channel_body(epoch, channel, key) + mac
    assert parse_control(frame) == Channel(epoch, channel, key, mac)
    assert len(frame) == 75
    assert classify(frame) is Kind.RELAY
    with pytest.raises(HubRelayFrameError, match="75 bytes"):
        parse_control(frame[:-1])


@given(st.sampled_from([0x12, 0x13]), channels, st.binary(max_size=1500))
def test_channel_data_frames_round_trip(kind: int, channel: int, payload: bytes) -> None:
    frame = channel_prefix(kind, channel) + payload
    assert parse_data(frame) == (kind, channel.to_bytes(2, "big"), payload)
    assert len(frame) == 7 + len(payload)
    assert classify(frame) is Kind.RELAY


def test_a_full_sized_channel_frame_fits_a_1500_byte_ip_packet() -> None:
    # a WireGuard datagram of the default tunnel MTU (1420 + 32) in IPv4 + UDP (28 bytes)
    assert len(channel_prefix(0x12, 0xFFFF) + bytes(1452)) + 28 <= 1500
    assert len(b"\xf1prl\x10" + bytes(32) + bytes(1452)) + 28 > 1500  # the keyed frame does not


@given(anything)
def test_parsers_raise_only_their_error(data: bytes) -> None:
    for parse in (parse_control, parse_data):
        try:
            parse(data)
        except HubRelayFrameError:
            pass


@given(keys, st.binary(max_size=1500))
def test_data_frames_round_trip(key: bytes, payload: bytes) -> None:
    client = HubRelayClient(PrivateKey.generate().raw, PrivateKey.generate().public_key().raw)
    frame = client.wrap(key, payload)
    assert parse_data(frame) == (0x10, key, payload)
    assert classify(frame) is Kind.RELAY


def test_parse_data_refuses_oversized_and_short() -> None:
    with pytest.raises(HubRelayFrameError, match="at most"):
        parse_data(b"\xf1prl\x10" + bytes(MAX_FRAME))
    with pytest.raises(HubRelayFrameError, match="at least"):
        parse_data(b"\xf1prl\x10" + bytes(10))
    with pytest.raises(HubRelayFrameError, match="at most"):
        parse_data(b"\xf1prl\x12" + bytes(1503))
    with pytest.raises(HubRelayFrameError, match="at least 7"):
        parse_data(b"\xf1prl\x13\x00")


_CLIENT = HubRelayClient(PrivateKey.generate().raw, PrivateKey.generate().public_key().raw)
_CLIENT.connect(0.0)
_SERVER = HubRelayServer(PrivateKey.generate(), registered=lambda key, net, now: True)


@given(anything)
def test_client_and_server_never_raise_on_any_input(data: bytes) -> None:
    _CLIENT.receive_frame(data, 1.0)
    _SERVER.receive_datagram(data, ("192.0.2.1", 1), 1.0)
    stream = _SERVER.open_stream(("192.0.2.1", 2), 1.0)
    _SERVER.receive_stream_frame(stream, data, 1.0)
    _SERVER.close_stream(stream)
    _SERVER.datagrams_to_send()


@given(st.lists(st.binary(min_size=1, max_size=MAX_FRAME), max_size=8), st.data())
def test_stream_decoder_reassembles_however_the_bytes_are_cut(
    frames: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(encode_hub_stream_frame(frame) for frame in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = HubStreamDecoder()
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == frames
    assert decoder.pending == 0


@given(st.binary(max_size=300))
def test_stream_decoder_raises_only_its_error(data: bytes) -> None:
    decoder = HubStreamDecoder(max_frame=100)
    try:
        for frame in decoder.feed(data):
            assert 0 < len(frame) <= 100
    except HubRelayFrameError:
        pass


def test_stream_decoder_refuses_zero_and_oversized_lengths() -> None:
    with pytest.raises(HubRelayFrameError, match="outside"):
        HubStreamDecoder().feed(b"\x00\x00")
    with pytest.raises(HubRelayFrameError, match="outside"):
        HubStreamDecoder().feed((MAX_FRAME + 1).to_bytes(2, "big"))
    with pytest.raises(HubRelayFrameError, match="1 to 65535"):
        encode_hub_stream_frame(b"")


async def test_bounded_writer_drops_whole_frames_when_full() -> None:
    writer = BoundedWriter(max_buffer=10)
    assert writer.send_nowait(b"12345")
    assert writer.send_nowait(b"12345")
    assert not writer.send_nowait(b"1")
    assert (writer.dropped, writer.dropped_bytes, writer.buffered) == (1, 1, 10)
    send, receive = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, send)
        assert await receive.receive_some(100) == b"1234512345"
        writer.close()
    assert not writer.send_nowait(b"x")
    assert writer.sent_bytes == 10


async def test_bounded_writer_writes_a_full_queue_through_to_the_socket() -> None:
    left, right = socket.socketpair()
    left.setblocking(False)
    writer = BoundedWriter(max_buffer=10)
    assert writer.send_nowait(b"12345678")
    assert not writer.send_nowait(b"abcdef")  # no write-through yet: dropped
    writer.write_through(left.fileno())
    assert writer.send_nowait(b"abcdef")  # the queue went to the socket, this one is queued
    assert (writer.direct_writes, writer.sent_bytes, writer.buffered) == (1, 8, 6)
    assert right.recv(100) == b"12345678"
    writer.close()  # closing stops writing through
    assert not writer.send_nowait(b"x")
    assert writer.direct_writes == 1
    left.close()
    right.close()


async def test_bounded_writer_queued_from_another_thread_wakes_the_loop() -> None:
    # As the userspace tunnel's data thread does while Trio's loop sleeps in its I/O wait:
    # nothing else wakes the loop here until the 5 s timeout.
    import threading
    import time

    left, right = socket.socketpair()
    left.setblocking(False)
    sender = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    writer = BoundedWriter(max_buffer=1024)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, sender)
            await trio.sleep(0.05)  # the writer waits on its event
            began = time.monotonic()
            frames = [b"frame-%d;" % n for n in range(3)]

            def data_thread() -> None:
                time.sleep(0.2)  # meanwhile the loop sleeps in its I/O wait, below
                for frame in frames:
                    writer.send_nowait(frame)

            thread = threading.Thread(target=data_thread)
            thread.start()
            got = b""
            with trio.move_on_after(5):
                while len(got) < len(b"".join(frames)):
                    await trio.lowlevel.wait_readable(right)
                    got += right.recv(1024)
            thread.join()
            assert got == b"".join(frames)
            assert time.monotonic() - began < 2.0
            assert writer.thread_wakes == 1  # one wake for the burst
            nursery.cancel_scope.cancel()
    finally:
        right.close()
        left.close()
