"""Per-packet round trip on loopback: one socket per family versus one dual-stack AF_INET6 socket.

The question it answers is the connector's socket layout for IPv6 (``docs/connect.md``): two
sockets (AF_INET and AF_INET6 with ``IPV6_V6ONLY=1``, same port) or one AF_INET6 socket with
``IPV6_V6ONLY=0`` that reaches IPv4 peers as ``::ffff:a.b.c.d``. An echo thread answers on the
layout under test; the client sends one 1,200-byte datagram at a time and waits for its echo.
Each layout is measured ``ROUNDS`` times interleaved and the median is reported, as the machine is
shared.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

NAME = "dualstack"

PACKETS = 3000
"""Round trips per measurement."""
ROUNDS = 5
"""Interleaved measurements per layout; the median is reported."""
_PAYLOAD = b"\x00" * 1200


def _echo(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        except OSError:
            return
        sock.sendto(data, addr)


def _rtt_us(server_family: int, v6only: bool, client_family: int, dest: str) -> float:
    """Return the median round trip in microseconds through one server layout."""
    server = socket.socket(server_family, socket.SOCK_DGRAM)
    if server_family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        server.bind(("::", 0))
    else:
        server.bind(("0.0.0.0", 0))
    port = server.getsockname()[1]
    stop = threading.Event()
    thread = threading.Thread(target=_echo, args=(server, stop), daemon=True)
    thread.start()
    client = socket.socket(client_family, socket.SOCK_DGRAM)
    client.settimeout(1.0)
    try:
        samples = []
        for _ in range(PACKETS):
            start = time.perf_counter()
            client.sendto(_PAYLOAD, (dest, port))
            client.recvfrom(2048)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e6
    finally:
        stop.set()
        thread.join()
        client.close()
        server.close()


def run() -> str:
    """Measure both layouts for IPv4 and IPv6 peers and return a markdown table with ratios."""
    layouts = {
        "two sockets, IPv4 peer": (socket.AF_INET, True, socket.AF_INET, "127.0.0.1"),
        "two sockets, IPv6 peer": (socket.AF_INET6, True, socket.AF_INET6, "::1"),
        "dual-stack, IPv4 peer (::ffff:)": (socket.AF_INET6, False, socket.AF_INET, "127.0.0.1"),
        "dual-stack, IPv6 peer": (socket.AF_INET6, False, socket.AF_INET6, "::1"),
    }
    results: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(ROUNDS):
        for name, args in layouts.items():
            results[name].append(_rtt_us(*args))
    med = {name: statistics.median(values) for name, values in results.items()}
    lines = [
        f"Loopback echo, {PACKETS} round trips of 1,200 bytes, median of {ROUNDS} interleaved runs.",
        "",
        "| layout | median RTT (µs) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.1f} |" for name, value in med.items()]
    v4 = med["dual-stack, IPv4 peer (::ffff:)"] / med["two sockets, IPv4 peer"]
    v6 = med["dual-stack, IPv6 peer"] / med["two sockets, IPv6 peer"]
    lines += [
        "",
        f"Ratio dual-stack / two sockets: IPv4 peers {v4:.2f}, IPv6 peers {v6:.2f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
