"""Lab building blocks for WireGuard data-path work: a namespace pair joined by a veth, a
wireguard-go peer configured with ``wg``, a punchtrio peer run as ``punchtrio up --json``, ping and
a checksummed TCP transfer.

Shared by the ``tunnel-ping`` scenario, the interop tests (``tests/interop``) and the ``wireguard``
benchmark. Addresses are private 10.x, used inside the lab's namespaces only.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs.netns import Lab, LabError, Namespace

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
UDP_PORT = 51820
# Underlay (veth) and overlay (tunnel) addresses: private ranges inside the namespaces only.
UNDERLAY = ("10.0.0.1", "10.0.0.2")
OVERLAY = ("10.9.0.1", "10.9.0.2")
OVERLAY6 = ("fd09::1", "fd09::2")


def genkey() -> tuple[str, str]:
    """Return a ``(private, public)`` pair of base64 keys made by ``wg``."""
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout
    return private.strip(), public.strip()


@dataclass
class Pair:
    """Two namespaces, ``a`` and ``b``, joined by a veth (``va`` in ``a``, ``vb`` in ``b``)."""

    lab: Lab
    a: Namespace
    b: Namespace


def make_pair(lab: Lab) -> Pair:
    """Create namespaces ``a`` and ``b`` joined by a veth with 10.0.0.1/24 and 10.0.0.2/24."""
    a, b = lab.namespace("a"), lab.namespace("b")
    lab.veth(a, "va", b, "vb")
    a.run("ip", "addr", "add", f"{UNDERLAY[0]}/24", "dev", "va")
    b.run("ip", "addr", "add", f"{UNDERLAY[1]}/24", "dev", "vb")
    return Pair(lab, a, b)


def start_wireguard_go(
    lab: Lab,
    ns: Namespace,
    ifname: str,
    *,
    private_key: str,
    address: str,
    address6: str | None = None,
    peer_public: str,
    allowed_ips: str,
    endpoint: str | None = None,
    listen_port: int = UDP_PORT,
) -> None:
    """Run ``wireguard-go -f ifname`` in ``ns`` and configure it with ``wg`` and ``ip``.

    ``ifname`` must be unique on the machine: wireguard-go's control socket lives in
    ``/var/run/wireguard``, which namespaces share.
    """
    lab.spawn(
        ns, "wireguard-go", "-f", ifname, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    sock = Path("/var/run/wireguard") / f"{ifname}.sock"
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline:
            raise LabError(f"wireguard-go did not create {sock}")
        time.sleep(0.05)
    with tempfile.NamedTemporaryFile("w", delete=False) as key_file:
        os.fchmod(key_file.fileno(), 0o600)
        key_file.write(private_key + "\n")
    try:
        argv = ["wg", "set", ifname, "listen-port", str(listen_port)]
        argv += ["private-key", key_file.name, "peer", peer_public, "allowed-ips", allowed_ips]
        if endpoint is not None:
            argv += ["endpoint", endpoint]
        ns.run(*argv)
    finally:
        os.unlink(key_file.name)
    ns.run("ip", "addr", "add", address, "dev", ifname)
    if address6 is not None:
        ns.run("ip", "addr", "add", address6, "dev", ifname, "nodad")
    ns.run("ip", "link", "set", ifname, "up")


def wg_show(ns: Namespace, ifname: str, what: str) -> str:
    """Return ``wg show IFNAME WHAT`` (e.g. ``latest-handshakes``, ``endpoints``) run in ``ns``."""
    return ns.run("wg", "show", ifname, what)


def write_config(
    path: Path,
    *,
    private_key: str,
    addresses: Sequence[str],
    peer_public: str,
    allowed_ips: str,
    endpoint: str | None = None,
    listen_port: int = UDP_PORT,
    extra: str = "",
) -> Path:
    """Write a wg-quick file for one peer to ``path`` (mode 0600) and return it."""
    lines = [
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"Address = {', '.join(addresses)}",
        f"ListenPort = {listen_port}",
        extra,
        "",
        "[Peer]",
        f"PublicKey = {peer_public}",
        f"AllowedIPs = {allowed_ips}",
    ]
    if endpoint is not None:
        lines.append(f"Endpoint = {endpoint}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@dataclass
class PunchtrioPeer:
    """A punchtrio tunnel process that prints JSON events, one per line, read on a thread."""

    proc: subprocess.Popen[bytes]
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "unparsed", "line": line.decode(errors="replace")})
        self.events.put({"event": "exited"})

    def wait_for(
        self, event: str, timeout: float = 15, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Return the next event named ``event`` (matching ``where``); raise LabError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = self.events.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise LabError(f"punchtrio did not report {event!r} within {timeout} s") from None
            self.seen.append(item)
            if item["event"] == event and (where is None or where(item)):
                return item
            if item["event"] == "exited":
                status = self.proc.wait()
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise LabError(f"punchtrio exited ({status}) before {event!r}: {err.strip()}")

    def command(self, text: str) -> None:
        """Write one command line to the process's stdin (the test helper reads them)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10) -> int:
        """Send SIGTERM, wait for the exit, close the pipes and return the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self._reader.join(timeout=5)
        while not self.events.empty():
            self.seen.append(self.events.get())
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return status


def start_punchtrio(
    lab: Lab, ns: Namespace, config: Path, ifname: str, *, argv: Sequence[str] | None = None
) -> PunchtrioPeer:
    """Run ``punchtrio up --config CONFIG --interface IFNAME --json`` in ``ns``; wait until it is up.

    ``argv`` replaces the program (tests run a helper that accepts the same options and more).
    """
    program = list(argv) if argv is not None else [PYTHON, "-m", "punchtrio.cli", "up"]
    proc = lab.spawn(
        ns,
        *program,
        "--config",
        str(config),
        "--interface",
        ifname,
        "--json",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(ROOT),
    )
    peer = PunchtrioPeer(proc)
    try:
        peer.wait_for("up")
    except LabError:
        peer.stop()
        raise
    return peer


def ping(ns: Namespace, target: str, count: int = 3) -> tuple[int, float]:
    """Ping ``target`` from ``ns``; return (replies received, average RTT in ms)."""
    out = ns.run("ping", "-c", str(count), "-i", "0.2", "-W", "2", target, check=False)
    received = re.search(r"(\d+) received", out)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    return (int(received[1]) if received else 0, float(rtt[1]) if rtt else float("nan"))


_SINK = (
    "import hashlib,socket,sys\n"
    "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])));s.listen(1);print('ready',flush=True)\n"
    "c,_=s.accept();h=hashlib.sha256();n=0\n"
    "while True:\n"
    " b=c.recv(1<<16)\n"
    " if not b:break\n"
    " h.update(b);n+=len(b)\n"
    "print(n,h.hexdigest(),flush=True)\n"
)
_SOURCE = (
    "import hashlib,os,socket,sys,time\n"
    "n,pause=int(sys.argv[3]),float(sys.argv[4]);h=hashlib.sha256();sent=0\n"
    "c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=30)\n"
    "while sent<n:\n"
    " b=os.urandom(min(1<<16,n-sent));c.sendall(b);h.update(b);sent+=len(b)\n"
    " if pause:time.sleep(pause)\n"
    "c.shutdown(socket.SHUT_WR);c.recv(1);print(sent,h.hexdigest(),flush=True)\n"
)


def transfer(
    sender: Namespace,
    receiver: Namespace,
    address: str,
    size: int,
    *,
    pause: float = 0.0,
    port: int = 5201,
    during: Callable[[], None] | None = None,
) -> tuple[str, str, float]:
    """Send ``size`` random bytes over TCP from ``sender`` to ``address`` (in ``receiver``).

    Returns (sender's sha256, receiver's "bytes sha256", seconds taken). ``pause`` sleeps between
    64 KiB writes to stretch the transfer; ``during`` runs while the transfer is in flight.
    """
    sink = subprocess.Popen(
        receiver.exec(PYTHON, "-c", _SINK, address, str(port)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise LabError("the TCP sink did not start")
        start = time.monotonic()
        source = subprocess.Popen(
            sender.exec(PYTHON, "-c", _SOURCE, address, str(port), str(size), str(pause)),
            stdout=subprocess.PIPE,
            text=True,
        )
        if during is not None:
            during()
        sent, _ = source.communicate(timeout=120)
        received, _ = sink.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        for proc in (sink,):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    sent_bytes, _, sent_hash = sent.strip().partition(" ")
    if source.returncode != 0 or sent_bytes != str(size):
        raise LabError(f"the TCP source failed (exit {source.returncode})")
    return sent_hash, received.strip(), elapsed
