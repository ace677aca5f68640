"""``python -m benchmarks._flood_sender``: send pre-built WireGuard handshake messages fast.

Run by the ``flood`` benchmark inside a lab namespace. It reads a file of 148-byte initiations
(made by the benchmark, each from a fresh key with a valid mac1 for the target), then sends them
round-robin to ``--target`` at up to ``--rate`` packets per second for ``--seconds``: from one
UDP socket, or with ``--spoof N`` as raw IPv4 packets whose sources cycle through N addresses of
``--spoof-net`` (every header is built before the clock starts, so the loop is one ``sendto``
per packet). Prints one JSON line: packets sent, seconds and the rate achieved.
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
CHUNK = 512


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
    parser.add_argument("--rate", type=float, required=True, help="packets per second, at most")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--spoof", type=int, default=0, help="number of spoofed sources (0: none)")
    parser.add_argument("--spoof-net", default="10.200.0.0/16")
    args = parser.parse_args(argv)
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
    n = len(batch)
    sent = errors = 0
    i = 0
    start = time.monotonic()
    end = start + args.seconds
    interval = 1.0 / args.rate
    while True:
        now = time.monotonic()
        if now >= end:
            break
        ahead = start + sent * interval - now
        if ahead > 0:
            time.sleep(ahead)
        for _ in range(CHUNK):
            data, addr = batch[i]
            i = i + 1 if i + 1 < n else 0
            try:
                sendto(data, addr)
            except OSError:
                errors += 1
        sent += CHUNK
    elapsed = time.monotonic() - start
    sock.close()
    result = {"sent": sent - errors, "errors": errors, "seconds": elapsed}
    result["rate"] = result["sent"] / elapsed
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
