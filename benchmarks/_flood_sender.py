"""``python -m benchmarks._flood_sender``: send pre-built WireGuard handshake messages at a fixed rate.

Run by the ``flood`` benchmark inside a lab namespace. It reads a file of 148-byte initiations
(made by the benchmark, each from a fresh key with a valid mac1 for the target), then sends them
round-robin to ``--target`` at ``--rate`` packets per second for ``--seconds``: from one UDP
socket, or with ``--spoof N`` as raw IPv4 packets whose sources cycle through N addresses of
``--spoof-net`` (every header is built before the clock starts, so the loop is one ``sendto``
per packet).

The rate is a target, not a ceiling: the sender paces in steps of :data:`STEP` seconds (sleeping
when ahead) so that every target is offered the same load, evenly spread. When it falls behind
(the machine is busy), it catches up by at most :data:`MAX_BACKLOG` seconds of packets, then
forgets the rest of the deficit: no long bursts, and the achieved rate shows the shortfall.
Prints one JSON line: packets sent, errors, seconds, the target and achieved rates, and
``kept_up`` (the achieved rate is within :data:`TOLERANCE` of the target).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import struct
import sys
import time

MESSAGE_SIZE = 148
STEP = 0.0005
"""Seconds of packets sent between two looks at the clock (0.5 ms: 60 packets at 120k/s)."""
MAX_BACKLOG = 0.005
"""Seconds of packets the sender catches up at most after falling behind (5 ms)."""
TOLERANCE = 0.05
"""Relative shortfall of the achieved rate below which the sender kept up (5 %)."""


def _raw_packets(
    messages: list[bytes], target: tuple[str, int], sources: list[str]
) -> list[tuple[bytes, tuple[str, int]]]:
    """IPv4 + UDP headers (checksums left to the kernel / zero) around every message, per source."""
    dst = socket.inet_aton(target[0])
    out = []
    for i in range(max(len(messages), len(sources))):
        msg = messages[i % len(messages)]
        src = socket.inet_aton(sources[i % len(sources)])
        length = 20 + 8 + len(msg)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, 0, 0x4000, 64, 17, 0, src, dst)
        udp = struct.pack("!HHHH", 1024 + i % 60000, target[1], 8 + len(msg), 0)
        out.append((ip + udp + msg, (target[0], 0)))
    return out


def main(argv: list[str]) -> int:
    """Parse the options, flood, print the JSON result line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._flood_sender")
    parser.add_argument("--packets", required=True, help="file of concatenated initiations")
    parser.add_argument("--target", required=True, help="IP:PORT of the WireGuard peer")
    parser.add_argument("--rate", type=float, required=True, help="packets per second to offer")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--spoof", type=int, default=0, help="number of spoofed sources (0: none)")
    parser.add_argument("--spoof-net", default="10.200.0.0/16")
    args = parser.parse_args(argv)
    if not args.rate > 0 or not args.seconds > 0:
        parser.error("--rate and --seconds must be positive")
    with open(args.packets, "rb") as f:
        blob = f.read()
    messages = [blob[i : i + MESSAGE_SIZE] for i in range(0, len(blob), MESSAGE_SIZE)]
    host, _, port = args.target.rpartition(":")
    target = (host, int(port))
    if args.spoof:
        net = ipaddress.ip_network(args.spoof_net)
        sources = [str(net[1 + i]) for i in range(args.spoof)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        batch = _raw_packets(messages, target, sources)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        batch = [(m, target) for m in messages]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sendto = sock.sendto
    monotonic = time.monotonic
    n = len(batch)
    rate = args.rate
    step = max(1, round(rate * STEP))
    backlog = max(step, round(rate * MAX_BACKLOG))
    sent = errors = forgiven = 0
    i = 0
    start = monotonic()
    end = start + args.seconds
    while True:
        now = monotonic()
        if now >= end:
            break
        due = int((now - start) * rate) - forgiven  # packets the target rate asks for by now
        ahead = sent - due
        if ahead >= step:
            time.sleep((ahead - step + 1) / rate)
            continue
        if -ahead > backlog:
            forgiven += -ahead - backlog  # fell behind: catch up a little, forget the rest
        for _ in range(step):
            data, addr = batch[i]
            i = i + 1 if i + 1 < n else 0
            try:
                sendto(data, addr)
            except OSError:
                errors += 1
        sent += step
    elapsed = monotonic() - start
    sock.close()
    achieved = (sent - errors) / elapsed
    result = {
        "sent": sent - errors,
        "errors": errors,
        "seconds": elapsed,
        "target": rate,
        "rate": achieved,
        "kept_up": achieved >= (1 - TOLERANCE) * rate,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
