"""TurnStreamDecoder: STUN messages and padded ChannelData split back out of a byte stream."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio.relay import TurnStreamDecoder, TurnStreamError, pad_channel_data


def stun_message(body_words: int) -> bytes:
    body = bytes(range(4 * body_words % 256))[: 4 * body_words].ljust(4 * body_words, b"\x07")
    return struct.pack("!HHI", 0x0103, len(body), 0x2112A442) + bytes(12) + body


def channel_data(channel: int, payload: bytes) -> bytes:
    return struct.pack("!HH", channel, len(payload)) + payload


messages = st.one_of(
    st.integers(0, 40).map(stun_message),
    st.builds(channel_data, st.integers(0x4000, 0x4FFF), st.binary(max_size=300)),
)


@given(st.lists(messages, max_size=12), st.data())
def test_any_split_gives_back_the_messages(items: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(item if item[0] < 0x40 else pad_channel_data(item) for item in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = TurnStreamDecoder()
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == items
    assert decoder.buffered == 0
    assert decoder.messages == len(items)


def test_padding_is_skipped_and_not_returned() -> None:
    decoder = TurnStreamDecoder()
    frame = channel_data(0x4001, b"abcde")
    assert pad_channel_data(frame) == frame + b"\0\0\0"
    assert decoder.feed(pad_channel_data(frame) + stun_message(1)) == [frame, stun_message(1)]


def test_partial_header_waits() -> None:
    decoder = TurnStreamDecoder()
    assert decoder.feed(b"\x40") == []
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.feed(b"\x01x\0\0\0") == [b"\x40\x00\x00\x01x"]


@pytest.mark.parametrize("garbage", [b"\x50\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x01\x00\x03"])
def test_garbage_breaks_the_stream_for_good(garbage: bytes) -> None:
    decoder = TurnStreamDecoder()
    good = stun_message(0)
    assert decoder.feed(good + garbage) == [good]
    with pytest.raises(TurnStreamError):
        decoder.feed(good)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_turn_stream_error(data: bytes) -> None:
    decoder = TurnStreamDecoder()
    try:
        for message in decoder.feed(data):
            assert message[0] < 0x50
    except TurnStreamError:
        pass
