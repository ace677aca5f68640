"""TAI64N timestamps, as carried (encrypted) in handshake initiations."""

from __future__ import annotations

import struct

from ._messages import MessageError

TAI64_BASE = 0x400000000000000A
"""TAI64 label of the Unix epoch: 2**62 plus the 10 s TAI-UTC offset of 1970."""
WHITENER_MASK = 0xFFFFFF
"""Low nanosecond bits cleared before sending (~16.8 ms resolution), so the timestamp does not
leak a precise clock, as the reference implementation does."""

_TAI64N = struct.Struct(">QI")


def encode(unix_time: float, *, whiten: bool = True) -> bytes:
    """Return the 12-byte TAI64N form of ``unix_time`` (seconds since the epoch, >= 0).

    Big-endian seconds + :data:`TAI64_BASE`, then big-endian nanoseconds, the low 24 bits of which
    are cleared when ``whiten`` is true.
    """
    seconds = int(unix_time)
    nanos = min(round((unix_time - seconds) * 1e9), 999_999_999)
    if whiten:
        nanos &= ~WHITENER_MASK
    return _TAI64N.pack(TAI64_BASE + seconds, nanos)


def decode(data: bytes) -> float:
    """Return the Unix time of a 12-byte TAI64N timestamp. Raises :class:`MessageError`."""
    if len(data) != 12:
        raise MessageError(f"a TAI64N timestamp is 12 bytes, got {len(data)}")
    label: int
    nanos: int
    label, nanos = _TAI64N.unpack(data)
    if nanos >= 1_000_000_000:
        raise MessageError("TAI64N nanoseconds out of range")
    return float(label - TAI64_BASE) + nanos / 1e9


def after(timestamp: bytes) -> bytes:
    """Return the smallest whitened TAI64N timestamp greater than ``timestamp`` (12 bytes).

    An initiator uses it when its wall clock has not moved past the last timestamp it sent (a
    clock step backwards, or two initiations within one whitening step), since the responder only
    accepts strictly newer ones. Raises :class:`MessageError` if ``timestamp`` is malformed.
    """
    if len(timestamp) != 12:
        raise MessageError(f"a TAI64N timestamp is 12 bytes, got {len(timestamp)}")
    label, nanos = _TAI64N.unpack(timestamp)
    nanos = (nanos | WHITENER_MASK) + 1
    if nanos >= 1_000_000_000:
        label, nanos = label + 1, 0
    return _TAI64N.pack(label, nanos)
