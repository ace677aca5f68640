"""STUN Binding responses per second on loopback: punchtrio's server beside coturn, same client.

Each server runs in its own process (one core's worth); one Python client keeps a window of requests
in flight for a few seconds and counts the responses. The client is the same for both, so the ratio
compares the servers (while the client is not the bottleneck: see the note it prints). A micro
benchmark in the same run shows why the server's hot path uses ``struct`` and not Scapy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

NAME = "stun"

DURATION = 3.0
"""Seconds each server is measured for."""
WINDOW = 32
"""Requests kept in flight."""
TARGET = 5000.0
"""Responses per second the issue asks for, on one core."""

_REQUEST = bytes.fromhex("000100002112a442") + bytes(range(12))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_answering(port: int, proc: subprocess.Popen[bytes], limit: float = 15.0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            sock.sendto(_REQUEST, ("127.0.0.1", port))
            with contextlib.suppress(OSError):
                sock.recvfrom(2048)
                return
        raise RuntimeError("server did not answer within 15 s")


def _cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _server(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_answering(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _measure(port: int, proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """Return (responses per second, server CPU microseconds per response)."""
    cpu = _cpu_seconds(proc.pid)
    rate, count = _load(port)
    return rate, (_cpu_seconds(proc.pid) - cpu) / max(count, 1) * 1e6


def _load(port: int) -> tuple[float, int]:
    """Return (responses per second, responses) from 127.0.0.1:``port`` over :data:`DURATION`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.05)
        received = 0
        start = time.perf_counter()
        end = start + DURATION
        for _ in range(WINDOW):
            sock.send(_REQUEST)
        while True:
            try:
                sock.recv(2048)
            except TimeoutError:
                # A response was lost (rate limit, full buffer): refill the window.
                for _ in range(WINDOW):
                    sock.send(_REQUEST)
                if time.perf_counter() >= end:
                    break
                continue
            received += 1
            if received % 256 == 0 and time.perf_counter() >= end:
                break
            sock.send(_REQUEST)
        return received / (time.perf_counter() - start), received


def _per_response_costs() -> tuple[float, float]:
    """Return microseconds per response: Scapy (parse + build), punchtrio's struct responder."""
    from punchtrio.stun import (
        MappedAddress,
        OtherAddress,
        ResponseOrigin,
        StunMessage,
        StunResponder,
        XorMappedAddress,
        parse_message,
    )

    client, primary, alternate = ("198.51.100.9", 40000), ("192.0.2.1", 3478), ("192.0.2.2", 3479)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        request = parse_message(_REQUEST)
        bytes(
            StunMessage(
                msg_type=0x0101,
                transaction_id=request.transaction_id,
                attributes=[
                    XorMappedAddress(ip=client[0], port=client[1]),
                    OtherAddress(ip=alternate[0], port=alternate[1]),
                    MappedAddress(ip=client[0], port=client[1]),
                    ResponseOrigin(ip=primary[0], port=primary[1]),
                ],
            )
        )
    scapy_us = (time.perf_counter() - start) / n * 1e6
    responder = StunResponder(primary, alternate, rate=None)
    n = 50000
    start = time.perf_counter()
    for _ in range(n):
        responder.handle(_REQUEST, primary, client, 0.0)
    struct_us = (time.perf_counter() - start) / n * 1e6
    return scapy_us, struct_us


def _coturn(port: int, workdir: str) -> list[str]:
    return [
        "turnserver",
        "-n",
        "--stun-only",
        "--listening-ip",
        "127.0.0.1",
        "--listening-port",
        str(port),
        "--no-tcp",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--relay-threads",
        "1",
        "--log-file",
        os.path.join(workdir, "turn.log"),
        "--pidfile",
        os.path.join(workdir, "turn.pid"),
        "--userdb",
        os.path.join(workdir, "turndb"),
    ]


def run() -> str:
    """Measure both servers and return the Markdown section."""
    port = _free_port()
    ours_argv = [sys.executable, "-m", "punchtrio.cli", "stun-server"]
    ours_argv += ["--primary", f"127.0.0.1:{port}", "--rate", "0"]
    with _server(ours_argv, port) as proc:
        ours, ours_cpu = _measure(port, proc)
    coturn: tuple[float, float] | None = None
    coturn_note = ""
    if shutil.which("turnserver") is None:
        coturn_note = "coturn (`turnserver`) is not installed, so there is no coturn baseline."
    else:
        port = _free_port()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                with _server(_coturn(port, workdir), port) as proc:
                    coturn = _measure(port, proc)
            except RuntimeError as exc:
                coturn_note = f"coturn did not start ({exc}), so there is no coturn baseline."
    scapy_us, struct_us = _per_response_costs()

    lines = [
        "### STUN server: Binding responses per second on loopback",
        "",
        f"Command: `.venv/bin/python -m benchmarks stun` ({DURATION:g} s per server, "
        f"{WINDOW} requests in flight, one Python client process; each server is its own process).",
        "",
        "| server | responses/s | vs target (5,000/s) | server CPU per response | vs coturn (CPU) |",
        "|---|---|---|---|---|",
    ]
    ratio = f"{ours_cpu / coturn[1]:.1f}x the CPU" if coturn else "n/a"
    lines.append(
        f"| punchtrio stun-server | {ours:,.0f} | {ours / TARGET:.1f}x | {ours_cpu:.1f} us | {ratio} |"
    )
    if coturn:
        lines.append(
            f"| coturn (`turnserver --stun-only`) | {coturn[0]:,.0f} | "
            f"{coturn[0] / TARGET:.1f}x | {coturn[1]:.1f} us | 1.0x |"
        )
    lines += [
        "",
        "Responses/s depend on the Python client too (it shares the machine's cores with the "
        "server); server CPU time per response, read from /proc, compares the servers themselves.",
        "",
        f"Per response, in this process: Scapy parse + build {scapy_us:.0f} us, punchtrio's "
        f"`struct` responder {struct_us:.1f} us ({scapy_us / struct_us:.0f}x less), which is why "
        "the server's hot path does not use Scapy.",
    ]
    if coturn_note:
        lines += ["", coturn_note]
    return "\n".join(lines)
