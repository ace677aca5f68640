"""TURN over a byte stream (TCP or TLS): splitting STUN messages and ChannelData, RFC 8656 12.5.

On a stream, TURN messages follow each other with no framing of their own: a STUN message is its
20-byte header plus the length in that header (always a multiple of 4), a ChannelData message its
4-byte header plus the length in that header, padded with zeros to a multiple of 4 bytes (the
padding is not counted in the length). :class:`TurnStreamDecoder` turns the received chunks back
into messages; :func:`pad_channel_data` adds the padding on the way out.
"""

from __future__ import annotations

import struct

from .._exceptions import PunchtrioError

__all__ = ["MAX_BUFFERED", "TurnStreamDecoder", "TurnStreamError", "pad_channel_data"]

MAX_BUFFERED = 20 + 0xFFFF + 3
"""The most bytes one message can take on a stream (a STUN header plus the longest body)."""

_HEADER = struct.Struct("!HH")


class TurnStreamError(PunchtrioError):
    """The stream carries something that is neither STUN nor ChannelData: it cannot be resynced.

    The connection is useless afterwards; close it (and its allocation with it).
    """


def pad_channel_data(message: bytes) -> bytes:
    """Return a ChannelData message padded with zeros to a multiple of 4 bytes, as streams need."""
    extra = -len(message) % 4
    return message + bytes(extra) if extra else message


class TurnStreamDecoder:
    """Split a TURN byte stream into whole messages, sans-IO.

    Feed each chunk read from the connection to :meth:`feed`; it returns the messages completed so
    far, each without its stream padding (a ChannelData message is exactly ``4 + length`` bytes).
    A first byte that starts neither a STUN message (0x00-0x03) nor ChannelData on a channel
    0x4000-0x4FFF raises :class:`TurnStreamError`, and so does every later call: there is no way
    to find the next message boundary. At most :data:`MAX_BUFFERED` bytes are held.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken: str | None = None
        self.messages = 0
        """Messages returned so far."""

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` (any size, also empty) and return the messages it completed, in order.

        Raises :class:`TurnStreamError` once the stream is desynchronised.
        """
        if self._broken is not None:
            raise TurnStreamError(self._broken)
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        offset = 0
        size = len(buffer)
        while size - offset >= 4:
            first, length = _HEADER.unpack_from(buffer, offset)
            kind = first >> 12
            if first < 0x4000:
                if length % 4:
                    self._broken = f"STUN message length {length} is not a multiple of 4"
                    break
                total = 20 + length
                keep = total
            elif kind == 4:
                keep = 4 + length
                total = keep + (-keep % 4)
            else:
                self._broken = f"not TURN on this stream: first bytes 0x{first:04x}"
                break
            if size - offset < total:
                break
            out.append(bytes(buffer[offset : offset + keep]))
            offset += total
        del buffer[:offset]
        self.messages += len(out)
        if self._broken is not None:
            buffer.clear()
            if not out:
                raise TurnStreamError(self._broken)
        return out
