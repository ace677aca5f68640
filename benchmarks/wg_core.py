"""Per-packet cost of the WireGuard core's transport paths against a bare PyNaCl call.

No sockets and no TUN: ``Device.send_packet`` and ``Device.receive_datagram`` on an established
session, against the loop the design's 500 Mbit/s baseline ran (pack a counter nonce, one
``nacl.bindings`` ChaCha20-Poly1305 call). The ratio is what the protocol adds per packet.
"""

from __future__ import annotations

import ipaddress
import os
import statistics
import struct
import time
from collections.abc import Callable

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

from punchtrio.wireguard import Device, PeerConfig, _aead

NAME = "wg-core"
PACKET_SIZES = (64, 1420)
ROUNDS = 20_000


def _ipv4(size: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    )
    return header + bytes(size - 20)


def _best(fn: Callable[[], None], repeat: int = 5) -> float:
    """Best of ``repeat`` runs of ``fn`` (which does ROUNDS packets), in microseconds per packet."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / ROUNDS * 1e6


def _pair() -> tuple[Device, Device]:
    a, b = Device(os.urandom(32)), Device(os.urandom(32))
    a.add_peer(
        PeerConfig(
            b.public_key,
            allowed_ips=(ipaddress.ip_network("10.0.0.2/32"),),
            endpoint=("192.0.2.2", 51820),
        )
    )
    b.add_peer(PeerConfig(a.public_key, allowed_ips=(ipaddress.ip_network("10.0.0.1/32"),)))
    a.send_packet(_ipv4(64), 0.0)
    for _ in range(3):
        for d, _addr in a.datagrams_to_send():
            b.receive_datagram(d, ("192.0.2.1", 51820), 0.0)
        for d, _addr in b.datagrams_to_send():
            a.receive_datagram(d, ("192.0.2.2", 51820), 0.0)
    return a, b


def _measure(size: int) -> dict[str, float]:
    packet = _ipv4(size)
    key = os.urandom(32)
    pack_nonce = struct.Struct("<4xQ").pack
    sealed = [
        crypto_aead_chacha20poly1305_ietf_encrypt(packet, None, pack_nonce(i), key)
        for i in range(ROUNDS)
    ]

    def bare_encrypt() -> None:
        for i in range(ROUNDS):
            crypto_aead_chacha20poly1305_ietf_encrypt(packet, None, pack_nonce(i), key)

    def bare_decrypt() -> None:
        for i in range(ROUNDS):
            crypto_aead_chacha20poly1305_ietf_decrypt(sealed[i], None, pack_nonce(i), key)

    a, b = _pair()
    send = a.send_packet
    receive = b.receive_datagram
    addr = ("192.0.2.1", 51820)
    now = 1.0

    def core_send() -> None:
        for _ in range(ROUNDS):
            send(packet, now)

    prefix = b"\x04\x00\x00\x00\x01\x02\x03\x04"
    messages = [_aead.seal(prefix, pack_nonce(i)[4:], packet, key) for i in range(ROUNDS)]

    def direct_encrypt() -> None:
        for i in range(ROUNDS):
            _aead.seal(prefix, pack_nonce(i)[4:], packet, key)

    def direct_decrypt() -> None:
        for m in messages:
            _aead.open_(m, key)

    result = {
        "bare_encrypt": _best(bare_encrypt),
        "bare_decrypt": _best(bare_decrypt),
        "direct_encrypt": _best(direct_encrypt),
        "direct_decrypt": _best(direct_decrypt),
    }
    result["core_send"] = _best(core_send)
    # Receiving needs fresh datagrams each run (the replay window rejects repeats).
    best = float("inf")
    for _ in range(5):
        batch = []
        for _ in range(ROUNDS):
            out = send(packet, now)
            assert out is not None
            batch.append(out[0])
        start = time.perf_counter()
        for d in batch:
            receive(d, addr, now)
        best = min(best, time.perf_counter() - start)
        assert sum(b.counters.values()) == 0
    result["core_receive"] = best / ROUNDS * 1e6
    return result


ASLEEP = 0.05
"""Seconds asleep before each sample of :func:`_after_sleep` (a ping every 50 ms: 20 per second)."""
ASLEEP_SAMPLES = 100
"""Samples per row of :func:`_after_sleep`."""


def _after_sleep() -> dict[str, tuple[float, float]]:
    """The first thing done after :data:`ASLEEP` seconds asleep: the median µs of ``nothing``
    (two clock reads), the bare libsodium seal the core calls, ``send_packet`` and
    ``receive_datagram`` of a 64-byte packet, each with the same call made again at once (warm)
    beside it."""
    a, b = _pair()
    packet = _ipv4(64)
    addr = ("192.0.2.1", 51820)
    clock = time.perf_counter_ns

    def nothing() -> None:
        pass

    key = os.urandom(32)
    prefix, counter = b"\x04\x00\x00\x00\x01\x02\x03\x04", bytes(8)

    def seal() -> None:
        _aead.seal(prefix, counter, packet, key)

    def send() -> None:
        a.send_packet(packet, 1.0)

    pending: list[bytes] = []

    def receive() -> None:
        b.receive_datagram(pending.pop(), addr, 1.0)

    result = {}
    calls = {"nothing": nothing, "libsodium seal": seal, "send_packet": send}
    for name, call in {**calls, "receive_datagram": receive}.items():
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(ASLEEP_SAMPLES):
            for _ in range(2):
                out = a.send_packet(packet, 1.0)
                assert out is not None
                pending.append(out[0])
            time.sleep(ASLEEP)
            for samples in (cold, warm):
                start = clock()
                call()
                samples.append((clock() - start) / 1000)
            pending.clear()
        result[name] = (statistics.median(cold), statistics.median(warm))
    assert sum(b.counters.values()) == 0
    return result


def run() -> str:
    """Measure both paths at two packet sizes, and the first call after a sleep; return the
    Markdown tables of µs/packet and ratios."""
    lines = [
        "## WireGuard core: per-packet cost (`python -m benchmarks wg-core`)",
        "",
        f"Best of 5 runs of {ROUNDS} packets on an established session, no I/O. Baselines: one",
        "bare `nacl.bindings` ChaCha20-Poly1305 call with a packed counter nonce (the design's",
        "500 Mbit/s loop), and the bare direct libsodium call the core uses",
        f"(backend: {_aead.BACKEND}). Ratios below 1 mean the whole protocol path is cheaper",
        "than the design's bare loop.",
        "",
        "| IP packet | path | bare bindings µs | bare direct µs | core µs | core / bindings | core / direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in PACKET_SIZES:
        r = _measure(size)
        for path, bare, direct, core in (
            ("`send_packet`", "bare_encrypt", "direct_encrypt", "core_send"),
            ("`receive_datagram`", "bare_decrypt", "direct_decrypt", "core_receive"),
        ):
            lines.append(
                f"| {size} B | {path} | {r[bare]:.2f} | {r[direct]:.2f} | {r[core]:.2f} | "
                f"{r[core] / r[bare]:.2f}x | {r[core] / r[direct]:.2f}x |"
            )
    lines += [
        "",
        f"The same calls as the first thing done after {ASLEEP * 1000:.0f} ms asleep (a ping "
        f"every {ASLEEP * 1000:.0f} ms finds the tunnel so), and made again at once; medians of "
        f"{ASLEEP_SAMPLES}, 64 B packets. `nothing` is the two clock reads around an empty call.",
        "",
        "| first call after the sleep | µs | made again at once, µs | ratio |",
        "|---|---|---|---|",
    ]
    for name, (cold, warm) in _after_sleep().items():
        lines.append(f"| `{name}` | {cold:.1f} | {warm:.1f} | {cold / warm:.0f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run())
