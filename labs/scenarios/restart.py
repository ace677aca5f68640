"""Peers that restart, NATs that forget, a hub that dies: real `punchtrio up` processes in the lab.

The building blocks of ``tests/lab/test_restart_lab.py`` and ``benchmarks/restart.py``: a hub that
keeps its state on disk (so it can be killed and started again), and one :class:`Side` per
``punchtrio up`` that can be stopped (SIGTERM or SIGKILL) and started again with the same key,
name and port, while its JSON events are collected with the instant each was read.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from labs import discovery
from labs.scenarios.punch_matrix import HUB_URL, start_hub, up_argv
from labs.topology import Host, Nat, Network
from punchtrio import PrivateKey

Event = dict[str, object]


def start_state_hub(net: Network, state_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``punchtrio hub`` with its SQLite store in ``state_dir`` (so its names, records and
    key survive a restart), embedded STUN and its relay (:func:`punch_matrix.start_hub`)."""
    return start_hub(net, log, state_dir=state_dir)


def ordered_keys(workdir: Path, label: str) -> tuple[Path, Path]:
    """Write two fresh private keys and return their files, the one whose public key is lower
    (the side that initiates the first WireGuard handshake) first."""
    keys = sorted((PrivateKey.generate() for _ in range(2)), key=lambda k: k.public_key().raw)
    files = (workdir / f"{label}-low.key", workdir / f"{label}-high.key")
    for key, path in zip(keys, files, strict=True):
        key.write(path)
    return files


@dataclass
class Side:
    """One ``punchtrio up --hub --json`` on ``host``: ``name`` at the hub, ``peer`` to reach,
    tunnel ``address`` (CIDR), ``key`` file, TUN ``interface`` name.

    ``events`` and ``arrived`` (the monotonic instant each was read) accumulate over every run of
    the process; ``runs`` holds each run's exit code once it ended (``None`` while running).
    """

    host: Host
    name: str
    peer: str
    address: str
    key: Path
    interface: str
    lab: Network
    proc: subprocess.Popen[bytes] | None = None
    events: list[Event] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    started: float = 0.0
    extra: tuple[str, ...] = ()
    _readers: list[threading.Thread] = field(default_factory=list)

    @property
    def tunnel_ip(self) -> str:
        """Our tunnel address without the prefix length."""
        return self.address.split("/")[0]

    def start(self) -> None:
        """Start ``punchtrio up`` (again); ``started`` is when."""
        argv = [
            *up_argv(self.name, self.key, self.address, self.peer),
            "--interface",
            self.interface,
        ]
        argv += self.extra
        self.started = time.monotonic()
        self.proc = self.lab.lab.spawn(
            self.host.ns, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out = threading.Thread(target=self._collect, args=(self.proc,), daemon=True)
        err = threading.Thread(target=self._collect_err, args=(self.proc,), daemon=True)
        self._readers = [out, err]
        out.start()
        err.start()

    def running(self) -> bool:
        """Whether the current process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit (SIGKILL after ``timeout`` s); return the exit code
        (negative: killed by that signal). With SIGKILL nothing is cleaned up: the TUN device goes
        with the process, but the record stays at the hub."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode

    def wait_for(
        self,
        event: str,
        timeout: float,
        *,
        since: int = 0,
        where: Callable[[Event], bool] | None = None,
    ) -> tuple[Event, float] | None:
        """The first event called ``event`` (matching ``where``) at index ``since`` or later, with
        the instant it was read, waiting up to ``timeout`` s; ``None`` if it did not come."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for index in range(seen, len(self.events)):
                item = self.events[index]
                if item["event"] == event and (where is None or where(item)):
                    return item, self.arrived[index]
            seen = max(seen, len(self.events))
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def named(self, event: str, *, since: int = 0) -> list[Event]:
        """Every event called ``event`` from index ``since`` on."""
        return [e for e in self.events[since:] if e["event"] == event]

    def _collect(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                self.arrived.append(time.monotonic())  # before the event: a reader sees both
                self.events.append(json.loads(line))

    def _collect_err(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr.append(line.decode(errors="replace"))


def pair(net: Network, label: str, a: Host, b: Host, workdir: Path) -> tuple[Side, Side]:
    """Two :class:`Side` s, not started: ``<label>-a`` on ``a`` (10.99.0.1, the lower public key:
    it initiates) and ``<label>-b`` on ``b`` (10.99.0.2)."""
    low, high = ordered_keys(workdir, label)
    names = (f"{label}-a", f"{label}-b")
    prefix = net.lab.prefix
    alice = Side(a, names[0], names[1], "10.99.0.1/24", low, f"{prefix}{label[:4]}a", net)
    bob = Side(b, names[1], names[0], "10.99.0.2/24", high, f"{prefix}{label[:4]}b", net)
    return alice, bob


def first_ping(host: Host, target: str, timeout: float) -> float | None:
    """Ping ``target`` from ``host`` every 50 ms until one answers; return the seconds that took,
    ``None`` after ``timeout``. (One ``ping`` keeps sending until its first reply, so the time is
    exact to 50 ms; it is started again while the route is missing, before the TUN is up.)"""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        left = max(1, int(deadline - time.monotonic()))
        argv = host.ns.exec("ping", "-n", "-q", "-c", "1", "-i", "0.05", "-w", str(left), target)
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def ping_count(host: Host, target: str, count: int = 3) -> int:
    """Ping ``target`` ``count`` times, 0.2 s apart; return the number of replies."""
    argv = host.ns.exec("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", target)
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    for part in out.stdout.split(","):
        if part.strip().endswith("received"):
            return int(part.split()[0])
    return 0


def lookup(host: Host, name: str, key: Path) -> Event | None:
    """``punchtrio lookup`` of ``name`` from ``host`` (signed with ``key``): the record, or
    ``None`` if the hub has none (or cannot be reached)."""
    argv = host.ns.exec(
        *discovery.PUNCHTRIO, "lookup", "--hub", HUB_URL, "--name", name, "--key-file", str(key),
        "--timeout", "2",
    )  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if out.returncode != 0:
        return None
    record: Event = json.loads(out.stdout)
    return record


def ping_replies(host: Host, target: str, seconds: float) -> list[float]:
    """Ping ``target`` from ``host`` every 0.1 s for ``seconds``; return each reply's arrival
    (Unix time, ``ping -D``)."""
    argv = host.ns.exec("ping", "-n", "-D", "-i", "0.1", "-W", "1", "-w", str(int(seconds)), target)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", proc.stdout, re.M)]


@dataclass
class Outage:
    """Pings through a tunnel around a fault: the gap between the last reply before it and the
    first after it (``None`` if none came back), and the longest gap between any two replies."""

    outage: float | None
    longest_gap: float
    replies_before: int


def outage_around(
    host: Host, target: str, fault: Callable[[], None], *, seconds: float = 12.0
) -> Outage:
    """Ping ``target`` from ``host`` for ``seconds``, run ``fault`` 3 s in, and measure."""
    replies: list[float] = []
    pinger = threading.Thread(
        target=lambda: replies.extend(ping_replies(host, target, seconds)), daemon=True
    )
    pinger.start()
    time.sleep(3.0)
    at = time.time()
    fault()
    pinger.join()
    before = [t for t in replies if t < at]
    after = [t for t in replies if t >= at]
    outage = after[0] - before[-1] if before and after else None
    gaps = [b - a for a, b in itertools.pairwise(replies)]
    return Outage(outage, max(gaps, default=seconds), len(before))


def forget_mappings(nat: Nat, *, reboot: bool) -> None:
    """Make ``nat`` forget its UDP mappings: ``conntrack -F`` only, or (``reboot``) its nftables
    mapping sets as well, as a NAT that restarts does (the next mapping may get another port)."""
    if reboot:
        nat.flush_conntrack()
    else:
        nat.ns.run("conntrack", "-F")
