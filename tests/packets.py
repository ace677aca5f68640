"""Minimal IP packets for tests: the WireGuard device reads only version, length and addresses."""

from __future__ import annotations

import ipaddress
import struct


def ipv4(src: str, dst: str, payload: bytes = b"ping") -> bytes:
    """Return an IPv4 packet with UDP's protocol number and no checksum."""
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6(src: str, dst: str, payload: bytes = b"ping6") -> bytes:
    """Return an IPv6 packet with UDP as next header."""
    return (
        struct.pack("!IHBB", 0x60000000, len(payload), 17, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )
