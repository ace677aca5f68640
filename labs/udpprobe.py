"""Ground truth for the NAT lab: a plain-UDP reflector and RFC 5780-style probes, no STUN involved.

The lab's NATs are checked with this independent tool before any STUN implementation is trusted to
classify them. The reflector (``serve``) listens on two addresses times two ports; every request is
a JSON object ``{"token": str, "reply_from": [ip, port] | null}`` and the answer, sent from the
requested socket (or the one that received it), is ``{"token": str, "seen": "ip:port"}``: the
source address the request arrived from, i.e. the NAT mapping.

``classify`` runs RFC 5780's mapping tests (one local port to A1:P1, A2:P1, A2:P2) and filtering
tests (on a fresh port: a reply from A2:P2, then one from A1:P2) and prints one JSON object with
``mapping``, ``filtering``, ``public_endpoint`` and ``port_preservation`` spelled as ``punchtrio nat
--json`` does. ``hairpin-listen``/``hairpin-send`` check whether a datagram sent to another host's
public mapping arrives, and from which source; ``punch`` is the simplest possible UDP hole punch. Run it as ``python -m labs.udpprobe ...`` inside a namespace.

``agent`` holds one UDP socket of either family and obeys commands on stdin (``send``, ``recv``),
so a test steps datagrams by hand across namespaces; :class:`Agent` (:func:`start_agent`) drives
one from the outside.
"""

from __future__ import annotations

import argparse
import json
import secrets
import select
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import subprocess

    from .netns import Lab, Namespace

_TRIES = 3
_WAIT_S = 0.3


def serve(addresses: Sequence[str], ports: Sequence[int]) -> None:
    """Answer probes on every (address, port) pair until killed; prints ``ready`` once bound."""
    sockets: dict[tuple[str, int], socket.socket] = {}
    for address in addresses:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, port))
            sockets[(address, port)] = sock
    by_fd = {sock.fileno(): sock for sock in sockets.values()}
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select(list(by_fd), [], [])
        for fd in readable:
            sock = by_fd[fd]
            data, source = sock.recvfrom(2048)
            request = parse_request(data)
            if request is None or (request[1] is not None and request[1] not in sockets):
                continue
            token, reply_from = request
            out = sockets[reply_from] if reply_from is not None else sock
            answer = {"token": token, "seen": f"{source[0]}:{source[1]}"}
            out.sendto(json.dumps(answer).encode(), source)


def parse_request(data: bytes) -> tuple[str, tuple[str, int] | None] | None:
    """Return ``(token, reply_from)`` from a reflector request, or None if it is malformed."""
    try:
        request = json.loads(data)
        token = request["token"]
        reply_from = request.get("reply_from")
        if not isinstance(token, str):
            return None
        if reply_from is None:
            return token, None
        address, port = reply_from
        if not isinstance(address, str) or not isinstance(port, int):
            return None
        return token, (address, port)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def probe(
    sock: socket.socket, server: tuple[str, int], reply_from: tuple[str, int] | None = None
) -> str | None:
    """Send one probe (retried) and return the mapping the reflector saw, or None without an answer."""
    token = secrets.token_hex(8)
    request = json.dumps({"token": token, "reply_from": list(reply_from) if reply_from else None})
    for _ in range(_TRIES):
        sock.sendto(request.encode(), server)
        deadline = time.monotonic() + _WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, _ = sock.recvfrom(2048)
            try:
                answer = json.loads(data)
                if answer.get("token") == token:
                    return str(answer["seen"])
            except (ValueError, AttributeError, KeyError, RecursionError):
                continue
    return None


def _udp_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def classify(a1: str, a2: str, p1: int, p2: int, port: int = 0) -> dict[str, object]:
    """Run the mapping and filtering tests against a reflector; see the module docstring.

    The mapping tests use local ``port`` (0: any free port), the filtering tests another one.
    """
    # Both sockets stay open, so the filtering test's port cannot reuse the mapping test's one.
    with _udp_socket(port) as sock, _udp_socket() as fresh:
        local_port = sock.getsockname()[1]
        first = probe(sock, (a1, p1))
        if first is None:
            raise SystemExit("udpprobe: no answer from the reflector")
        second = probe(sock, (a2, p1))
        third = probe(sock, (a2, p2))
        if probe(fresh, (a1, p1), reply_from=(a2, p2)) is not None:
            filtering = "endpoint-independent"
        elif probe(fresh, (a1, p1), reply_from=(a1, p2)) is not None:
            filtering = "address-dependent"
        else:
            filtering = "address-and-port-dependent"
    if first == second:
        mapping = "endpoint-independent"
    elif second == third:
        mapping = "address-dependent"
    else:
        mapping = "address-and-port-dependent"
    return {
        "public_endpoint": first,
        "mapping": mapping,
        "filtering": filtering,
        "port_preservation": int(first.rsplit(":", 1)[1]) == local_port,
    }


def hairpin_listen(server: tuple[str, int], port: int, timeout: float) -> None:
    """Print our mapping (one JSON line), then the source of the first non-probe datagram or null."""
    with _udp_socket(port) as sock:
        print(json.dumps({"mapping": probe(sock, server)}), flush=True)
        readable = select.select([sock], [], [], timeout)[0]
        if not readable:
            print(json.dumps({"received_from": None}), flush=True)
            return
        _, source = sock.recvfrom(2048)
        print(json.dumps({"received_from": f"{source[0]}:{source[1]}"}), flush=True)


def hairpin_send(server: tuple[str, int], target: str, count: int) -> None:
    """Print our mapping (one JSON line), then send ``count`` datagrams to ``target`` (ip:port)."""
    host, port = target.rsplit(":", 1)
    with _udp_socket() as sock:
        print(json.dumps({"mapping": probe(sock, server)}), flush=True)
        for _ in range(count):
            sock.sendto(b"hairpin", (host, int(port)))
            time.sleep(0.05)


def punch(server: tuple[str, int], duration: float) -> None:
    """Plain UDP hole punching: print our mapping, read the peer's from stdin, then send to it.

    Sends a datagram every 50 ms for ``duration`` seconds and prints (one JSON line) the source of
    the first datagram received from anyone but the reflector, or null.
    """
    with _udp_socket() as sock:
        print(json.dumps({"mapping": probe(sock, server)}), flush=True)
        host, port = sys.stdin.readline().strip().rsplit(":", 1)
        peer = (host, int(port))
        received: str | None = None
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            sock.sendto(b"punch", peer)
            if select.select([sock], [], [], 0.05)[0]:
                data, source = sock.recvfrom(2048)
                if data == b"punch" and received is None:
                    received = f"{source[0]}:{source[1]}"
        print(json.dumps({"received_from": received}), flush=True)


def agent(family: int, port: int, address: str | None = None) -> None:
    """One UDP socket (IPv4 or IPv6, ``family`` 4 or 6) on ``port``, driven by lines on stdin.

    ``address`` is the local address to bind (default: every one of the family); bind one where
    the namespace has several, so replies come from the address the peer sent to.

    Prints ``ready PORT`` once bound, then answers each command with one line:
    ``send IP PORT TEXT`` sends ``TEXT`` (``sent``, or ``error ERRNO_NAME`` when the kernel refuses,
    e.g. ``ENETUNREACH`` without a route); ``recv SECONDS`` waits for one datagram (``got IP PORT
    TEXT`` or ``none``). Exits at the end of stdin.
    """
    import errno

    sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    if family == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address or ("::" if family == 6 else "0.0.0.0"), port))
    print(f"ready {sock.getsockname()[1]}", flush=True)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "send":
            host, port_text, text = rest.split(" ", 2)
            try:
                sock.sendto(text.encode(), (host, int(port_text)))
                print("sent", flush=True)
            except OSError as exc:
                print(f"error {errno.errorcode.get(exc.errno or 0, exc)}", flush=True)
        elif command == "recv":
            if select.select([sock], [], [], float(rest))[0]:
                data, source = sock.recvfrom(2048)
                print(f"got {source[0]} {source[1]} {data.decode(errors='replace')}", flush=True)
            else:
                print("none", flush=True)
        else:
            print(f"error unknown command {command!r}", flush=True)


@dataclass
class Agent:
    """A running :func:`agent` in a lab namespace: one UDP socket there, stepped by the caller.

    ``port`` is the socket's local port. The process stops with its lab.
    """

    process: subprocess.Popen[str]
    port: int

    def _ask(self, line: str) -> str:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"udpprobe agent exited (status {self.process.poll()})")
        return answer

    def send(self, host: str, port: int, text: str = "probe") -> str | None:
        """Send ``text`` (one line, default ``"probe"``) to ``(host, port)``; return ``None``, or
        the errno name the kernel refused it with (``"ENETUNREACH"``)."""
        answer = self._ask(f"send {host} {port} {text}")
        return None if answer == "sent" else answer.removeprefix("error ")

    def receive(self, timeout: float = 0.5) -> tuple[str, int, str] | None:
        """The next datagram as ``(source ip, source port, text)``, or ``None`` after ``timeout``
        seconds (default 0.5)."""
        answer = self._ask(f"recv {timeout}")
        if answer == "none":
            return None
        _, host, port, text = answer.split(" ", 3)
        return host, int(port), text


def start_agent(
    lab: Lab, ns: Namespace, *, family: int, port: int = 0, address: str | None = None
) -> Agent:
    """Start :func:`agent` in ``ns`` (stopped when ``lab`` closes) on ``port`` (0: any free one)
    with a socket of IP version ``family`` (4 or 6), bound to ``address`` (default: any), and
    wait until it is bound. Raises :class:`RuntimeError` if it does not start."""
    import subprocess
    from pathlib import Path

    argv = [sys.executable, "-m", "labs.udpprobe", "agent", "--family", str(family)]
    if address is not None:
        argv += ["--address", address]
    spawned = lab.spawn(  # text=True: a Popen[str], which spawn's annotation cannot say
        ns,
        *argv,
        "--port",
        str(port),
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    proc = cast("subprocess.Popen[str]", spawned)
    assert proc.stdout is not None
    ready = proc.stdout.readline().split()
    if len(ready) != 2 or ready[0] != "ready":
        raise RuntimeError(f"udpprobe agent did not start in {ns.name} (status {proc.poll()})")
    return Agent(proc, int(ready[1]))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``serve``, ``classify``, ``hairpin-listen`` or ``hairpin-send``."""
    parser = argparse.ArgumentParser(prog="python -m labs.udpprobe", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    for name in ("serve", "classify"):
        cmd = sub.add_parser(name)
        cmd.add_argument("a1")
        cmd.add_argument("a2")
        cmd.add_argument("p1", type=int)
        cmd.add_argument("p2", type=int)
        cmd.add_argument("--port", type=int, default=0, help="local port (classify only)")
    listen = sub.add_parser("hairpin-listen")
    listen.add_argument("server")
    listen.add_argument("--port", type=int, default=0)
    listen.add_argument("--timeout", type=float, default=3.0)
    send = sub.add_parser("hairpin-send")
    send.add_argument("server")
    send.add_argument("target")
    send.add_argument("--count", type=int, default=10)
    punch_cmd = sub.add_parser("punch")
    punch_cmd.add_argument("server")
    punch_cmd.add_argument("--duration", type=float, default=1.5)
    agent_cmd = sub.add_parser("agent")
    agent_cmd.add_argument("--family", type=int, choices=(4, 6), default=4)
    agent_cmd.add_argument("--port", type=int, default=0)
    agent_cmd.add_argument("--address")
    args = parser.parse_args(argv)
    if args.action == "agent":
        agent(args.family, args.port, args.address)
    elif args.action == "serve":
        serve([args.a1, args.a2], [args.p1, args.p2])
    elif args.action == "classify":
        print(json.dumps(classify(args.a1, args.a2, args.p1, args.p2, args.port)))
    else:
        host, port = args.server.rsplit(":", 1)
        if args.action == "hairpin-listen":
            hairpin_listen((host, int(port)), args.port, args.timeout)
        elif args.action == "punch":
            punch((host, int(port)), args.duration)
        else:
            hairpin_send((host, int(port)), args.target, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
