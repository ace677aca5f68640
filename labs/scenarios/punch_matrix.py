"""Two `punchtrio up --hub` processes behind real kernel NATs, pinging each other through the tunnel.

The building blocks (:func:`start_hub`, :func:`run_pair`) are shared by
``tests/lab/test_punch_matrix.py`` and ``benchmarks/punch_lab.py``; ``run()`` prints the matrix.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labs import discovery
from labs.netns import LabError
from labs.topology import Host, NatSpec, Network, build
from punchtrio import PrivateKey, format_endpoint

NAME = "punch-matrix"
DESCRIPTION = "punchtrio hub + two `punchtrio up` per NAT pair; ping through the tunnel, time it"

HUB_PORT = 7777
HUB_URL = f"http://203.0.113.1:{HUB_PORT}"
"""The hub's URL on IPv4 (:func:`hub_url` picks the one a host can reach)."""
RELAY_PORT = 7778
"""The hub's own relay, UDP and TCP, on the hub's primary address."""
PING_DEADLINE = 20.0
"""Seconds the first ping keeps trying (every 50 ms) before the pair counts as failed."""

MATRIX_SPECS: tuple[str | NatSpec, ...] = (
    "full",
    "full",
    "port",
    "port",
    "addr",
    "sym",
    NatSpec("port", hosts=2),
    "sym",
    NatSpec("full", block_udp=True),
)
"""The matrix topology: one host behind each of six NATs, two hosts behind one port NAT, a second
symmetric NAT, and a full cone whose network drops every outgoing UDP datagram."""


@dataclass
class PairResult:
    """One pair's outcome: ``seconds`` from starting both ``up`` processes to the first ping reply
    (``None``: no reply), each side's JSON events, exit codes and stderr."""

    label: str
    seconds: float | None
    events: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    returncodes: dict[str, int | None] = field(default_factory=dict)
    stderr: dict[str, str] = field(default_factory=dict)

    def connected(self, name: str) -> dict[str, object] | None:
        """``name``'s ``peer_connected`` event, if it printed one."""
        return next((e for e in self.events.get(name, []) if e["event"] == "peer_connected"), None)

    def path(self, name: str) -> str | None:
        """The path ``name`` reported (``lan``, ``direct``, ``relay``), or ``None``."""
        event = self.connected(name)
        return None if event is None else str(event["path"])


def start_hub(
    net: Network,
    log: Path | None = None,
    *,
    relay: bool = True,
    turn: Sequence[str] = (),
    turn_secret_file: Path | None = None,
    turn_ttl: int | None = None,
    state_dir: Path | None = None,
    network_secret_file: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``punchtrio hub`` with embedded STUN (203.0.113.1:3478, alternate .2:3479) and, with
    ``relay``, its relay (UDP and TCP on :data:`RELAY_PORT`) in the hub namespace, and wait until
    it listens; it stops when the lab closes. ``turn`` URIs (with ``turn_secret_file`` and
    optionally ``turn_ttl``) make it mint TURN credentials (see :func:`start_coturn`). The store
    is memory, or SQLite in ``state_dir`` (names, records and key survive a restart);
    ``network_secret_file`` makes the network private. ``log`` is appended to. Raises
    :class:`LabError` if it does not listen within 10 s.

    On a hub with IPv6 (``build(..., hub="dual" | "ipv6")``) the API and STUN listen on the
    primary address of each family (``[2001:db8::1]:7777``, ``[2001:db8::1]:3478``), the STUN
    alternate is that of the first family, and the relay is on the primary address of each
    family too (one port)."""
    hub = net.hub
    pairs = hub.address_pairs
    store = ["--store", "memory"] if state_dir is None else ["--state-dir", str(state_dir)]
    argv = [*discovery.PUNCHTRIO, "hub", *store]
    for primary, _alternate in pairs:
        argv += ["--listen", format_endpoint((primary, HUB_PORT))]
        argv += ["--stun", format_endpoint((primary, 3478))]
    argv += ["--stun-alternate", format_endpoint((pairs[0][1], 3479))]
    if relay:
        for primary, _alternate in pairs:
            argv += ["--relay", format_endpoint((primary, RELAY_PORT))]
    for uri in turn:
        argv += ["--turn", uri]
    if turn:
        argv += ["--turn-secret-file", str(turn_secret_file)]
    if turn_ttl is not None:
        argv += ["--turn-ttl", str(turn_ttl)]
    if network_secret_file is not None:
        argv += ["--network-secret-file", str(network_secret_file)]
    with contextlib.ExitStack() as stack:
        out: Any = subprocess.DEVNULL if log is None else stack.enter_context(log.open("ab"))
        proc = net.lab.spawn(hub.ns, *argv, stdout=out, stderr=subprocess.STDOUT)
    stuns = [(primary, 3478) for primary, _ in pairs] + [(pairs[0][1], 3479)]
    discovery.wait_listening(hub.ns, stuns, proc)
    deadline = time.monotonic() + 10
    tcp = [(primary, HUB_PORT) for primary, _ in pairs]
    if relay:
        tcp += [(primary, RELAY_PORT) for primary, _ in pairs]
    while not all(format_endpoint(at) in hub.ns.run("ss", "-H", "-tln") for at in tcp):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"punchtrio hub did not start listening: see {log or 'no log'}")
        time.sleep(0.05)
    return proc


TURN_PORT = 3480
"""coturn's port (UDP and TCP) on the hub's alternate address, beside the hub's STUN."""
TURN_TLS_PORT = 5349
"""coturn's TLS port (``turns:``) on the hub's alternate address, with ``start_coturn(tls=True)``."""


def start_coturn(
    net: Network, workdir: Path, secret: str, *, tls: bool = False
) -> tuple[list[str], subprocess.Popen[bytes]]:
    """Start a real coturn (``turnserver``) in the hub namespace on the hub's alternate address,
    :data:`TURN_PORT`, with coturn's REST credentials for ``secret``; wait until it listens and
    return its ``turn:`` URIs (UDP, TCP) for :func:`start_hub`, and the process. It stops when
    the lab closes. With ``tls``, coturn also speaks TLS on :data:`TURN_TLS_PORT` with a
    self-signed certificate for that address (``workdir / "turn.crt"``, the CA bundle peers
    verify it with), and the ``turns:`` URI comes third."""
    hub = net.hub
    log = workdir / "turnserver.log"
    tls_options = ["--no-tls"]
    if tls:
        cert, key = workdir / "turn.crt", workdir / "turn.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=punchtrio lab TURN",
             "-addext", f"subjectAltName=IP:{hub.alternate_ip}",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        tls_options = [
            "--tls-listening-port", str(TURN_TLS_PORT), "--cert", str(cert), "--pkey", str(key),
        ]  # fmt: skip
    with log.open("wb") as out:
        proc = net.lab.spawn(
            hub.ns,
            "turnserver", "-n", "--no-cli", *tls_options, "--no-dtls", "--simple-log",
            "--log-file", "stdout", "--listening-ip", hub.alternate_ip,
            "--relay-ip", hub.alternate_ip, "--listening-port", str(TURN_PORT),
            "--min-port", "49160", "--max-port", "49260", "--realm", "punchtrio.lab",
            "--lt-cred-mech", "--use-auth-secret", "--static-auth-secret", secret,
            "--fingerprint", "--pidfile", str(workdir / "turnserver.pid"),
            "--userdb", str(workdir / "turndb"),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 15
    ports = [TURN_PORT, TURN_TLS_PORT] if tls else [TURN_PORT]
    while not all(f"{hub.alternate_ip}:{p}" in hub.ns.run("ss", "-H", "-tln") for p in ports):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"turnserver did not start: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    base = f"turn:{hub.alternate_ip}:{TURN_PORT}?transport="
    uris = [base + "udp", base + "tcp"]
    if tls:
        uris.append(f"turns:{hub.alternate_ip}:{TURN_TLS_PORT}")
    return uris, proc


def hub_url(net: Network, host: Host) -> str:
    """The URL of :func:`start_hub`'s API that ``host`` can reach: :data:`HUB_URL` (IPv4) when
    both have IPv4, else the hub's primary IPv6 address (``http://[2001:db8::1]:7777``)."""
    if host.nat.has_ipv4 and net.hub.stack != "ipv6":
        return HUB_URL
    return f"http://{format_endpoint((str(net.hub.primary_ip6), HUB_PORT))}"


def up_argv(name: str, key_file: Path, address: str, peer: str, *, hub: str = HUB_URL) -> list[str]:
    """The ``punchtrio up --hub ... --json`` command line for one side (``hub``: the hub's URL,
    default :data:`HUB_URL`)."""
    return [
        *discovery.PUNCHTRIO,
        "up",
        "--hub",
        hub,
        "--name",
        name,
        "--key-file",
        str(key_file),
        "--address",
        address,
        "--peer",
        peer,
        "--json",
    ]


def run_pair(net: Network, label: str, a: Host, b: Host, workdir: Path) -> PairResult:
    """Run ``punchtrio up`` on ``a`` and ``b`` at once and ping b's tunnel address from ``a``.

    Names are ``<label>-a`` / ``<label>-b``, tunnel addresses 10.99.0.1/24 and .2/24, each side's
    hub URL :func:`hub_url` (IPv6 from an IPv6-only site). Returns the
    time to the first ping reply and both sides' events, after stopping both processes with SIGTERM
    (which tears their tunnels down).
    """
    names = (f"{label}-a", f"{label}-b")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    argvs = []
    for index, (host, name) in enumerate(zip((a, b), names, strict=True)):
        key = workdir / f"{name}.key"
        PrivateKey.generate().write(key)
        url = hub_url(net, host)
        argvs.append(up_argv(name, key, f"10.99.0.{index + 1}/24", names[1 - index], hub=url))
    start = time.monotonic()
    for host, name, argv in zip((a, b), names, argvs, strict=True):
        procs[name] = net.lab.spawn(host.ns, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    result = PairResult(label, None, {name: [] for name in names})
    readers = [
        threading.Thread(target=_collect, args=(proc, result.events[name]), daemon=True)
        for name, proc in procs.items()
    ]
    for reader in readers:
        reader.start()
    result.seconds = _first_ping(a, "10.99.0.2", start, list(procs.values()))
    if result.seconds is not None:  # let both sides report peer_connected (the pinged side may lag)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(map(result.connected, names)):
            time.sleep(0.05)
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        result.returncodes[name] = proc.returncode
    for reader in readers:
        reader.join(timeout=5)
    for name, proc in procs.items():
        assert proc.stderr is not None
        assert proc.stdout is not None
        with proc.stderr, proc.stdout:
            result.stderr[name] = proc.stderr.read().decode(errors="replace")
    return result


@dataclass
class LivePair:
    """Two running ``punchtrio up`` processes (see :func:`running_pair`).

    ``started`` is the :func:`time.monotonic` instant both were started; ``events[name]`` holds
    each side's JSON events and ``arrived[name]`` the monotonic instant each one was read, in the
    same order. ``result`` is filled in when the context closes.
    """

    label: str
    a: Host
    b: Host
    names: tuple[str, str]
    started: float
    procs: dict[str, subprocess.Popen[bytes]]
    events: dict[str, list[dict[str, object]]]
    arrived: dict[str, list[float]]
    result: PairResult

    def wait_for(
        self,
        name: str,
        event: str,
        timeout: float,
        where: Callable[[dict[str, object]], bool] | None = None,
    ) -> tuple[dict[str, object], float] | None:
        """The first event of side ``name`` called ``event`` (and matching ``where``) with the
        monotonic instant it was read, waiting up to ``timeout`` seconds; ``None`` if it did not
        come or the process exited."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            events, arrived = self.events[name], self.arrived[name]
            for index in range(seen, len(events)):
                item = events[index]
                if item["event"] == event and (where is None or where(item)):
                    return item, arrived[index]
            seen = len(events)
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                return None
            time.sleep(0.02)

    def ping(self, count: int = 3) -> int:
        """Ping b's tunnel address (10.99.0.2) from ``a`` ``count`` times, 0.2 s apart; return
        the number of replies."""
        argv = self.a.ns.exec("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2")
        out = subprocess.run([*argv, "10.99.0.2"], capture_output=True, text=True, check=False)
        for part in out.stdout.split(","):
            if part.strip().endswith("received"):
                return int(part.split()[0])
        return 0


@contextlib.contextmanager
def running_pair(
    net: Network,
    label: str,
    a: Host,
    b: Host,
    workdir: Path,
    *,
    interfaces: tuple[str, str] | None = None,
    extra: tuple[str, ...] = (),
    extra_a: tuple[str, ...] = (),
) -> Iterator[LivePair]:
    """:func:`run_pair` that keeps both tunnels up while the context is open.

    ``interfaces`` names the two TUN devices (``--interface``; default: the kernel's ``tunN``);
    names unique on the machine keep the sockets in ``/var/run/wireguard`` and
    ``/run/punchtrio``, which all namespaces share, apart. ``extra`` is added to both command
    lines (``--metrics 127.0.0.1:9586``: each side's own loopback, in its own namespace), and
    ``extra_a`` to ``a``'s only (``--tunnel wireguard-go`` on one side).

    Starts ``punchtrio up`` on ``a`` and ``b`` at once (names ``<label>-a`` / ``<label>-b``,
    tunnel addresses 10.99.0.1/24 and .2/24), waits for the first ping reply from ``a`` to
    10.99.0.2 (``result.seconds``, ``None`` when none came within :data:`PING_DEADLINE`) and for
    both sides' ``peer_connected`` (up to 5 s more), then yields. On leaving, even after an
    exception, both are stopped with SIGTERM (SIGKILL after 15 s) and ``result`` gets their exit
    codes and stderr.
    """
    names = (f"{label}-a", f"{label}-b")
    argvs = []
    for index, (host, name) in enumerate(zip((a, b), names, strict=True)):
        key = workdir / f"{name}.key"
        PrivateKey.generate().write(key)
        url = hub_url(net, host)
        argv = up_argv(name, key, f"10.99.0.{index + 1}/24", names[1 - index], hub=url)
        if interfaces is not None:
            argv += ["--interface", interfaces[index]]
        argvs.append([*argv, *extra, *(extra_a if index == 0 else ())])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    start = time.monotonic()
    for host, name, argv in zip((a, b), names, argvs, strict=True):
        procs[name] = net.lab.spawn(host.ns, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    live = LivePair(
        label,
        a,
        b,
        names,
        start,
        procs,
        {name: [] for name in names},
        {name: [] for name in names},
        PairResult(label, None),
    )
    live.result.events = live.events
    readers = [
        threading.Thread(
            target=_collect_timed, args=(proc, live.events[name], live.arrived[name]), daemon=True
        )
        for name, proc in procs.items()
    ]
    for reader in readers:
        reader.start()
    try:
        live.result.seconds = _first_ping(a, "10.99.0.2", start, list(procs.values()))
        if live.result.seconds is not None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not all(map(live.result.connected, names)):
                time.sleep(0.05)
        yield live
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            live.result.returncodes[name] = proc.returncode
        for reader in readers:
            reader.join(timeout=5)
        for name, proc in procs.items():
            assert proc.stderr is not None
            assert proc.stdout is not None
            with proc.stderr, proc.stdout:
                live.result.stderr[name] = proc.stderr.read().decode(errors="replace")


def _collect_timed(
    proc: subprocess.Popen[bytes], events: list[dict[str, object]], arrived: list[float]
) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip():
            arrived.append(time.monotonic())  # before the event, so a reader sees both
            events.append(json.loads(line))


def _collect(proc: subprocess.Popen[bytes], events: list[dict[str, object]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip():
            events.append(json.loads(line))


def _first_ping(
    host: Host, target: str, start: float, running: Sequence[subprocess.Popen[bytes]]
) -> float | None:
    """Ping until the first reply; ``None`` after :data:`PING_DEADLINE` or if an ``up`` exits."""
    deadline = start + PING_DEADLINE
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in running):
            return None
        left = max(1, int(deadline - time.monotonic()))
        argv = host.ns.exec("ping", "-n", "-q", "-c", "1", "-i", "0.05", "-w", str(left), target)
        code = subprocess.run(argv, capture_output=True, check=False).returncode
        if code == 0:
            return time.monotonic() - start
        time.sleep(0.02)  # no route yet (the TUN is not up): try again
    return None


PAIRS = (
    "full/full",
    "port/port",
    "addr/sym",
    "full/sym",
    "same-nat",
    "port/sym",
    "sym/sym",
    "udp-blocked/full",
)


def matrix_pairs(net: Network) -> dict[str, tuple[Host, Host]]:
    """The matrix pairs over a network built from :data:`MATRIX_SPECS`."""
    nats = net.requested
    return {
        "full/full": (nats[0].hosts[0], nats[1].hosts[0]),
        "port/port": (nats[2].hosts[0], nats[3].hosts[0]),
        "addr/sym": (nats[4].hosts[0], nats[5].hosts[0]),
        "full/sym": (nats[0].hosts[0], nats[5].hosts[0]),
        "same-nat": (nats[6].hosts[0], nats[6].hosts[1]),
        "port/sym": (nats[2].hosts[0], nats[5].hosts[0]),
        "sym/sym": (nats[5].hosts[0], nats[7].hosts[0]),
        "udp-blocked/full": (nats[8].hosts[0], nats[1].hosts[0]),
    }


def run() -> int:
    """Run every pair and print pair, paths and time to first ping; 0 if all pinged."""
    failed = 0
    with tempfile.TemporaryDirectory(prefix="pt-punch-") as tmp, build(MATRIX_SPECS) as net:
        start_hub(net, Path(tmp) / "hub.log")
        print("| pair | path (a, b) | time to first ping |")
        print("|---|---|---|")
        for label, (a, b) in matrix_pairs(net).items():
            net.flush_conntrack()
            result = run_pair(net, label.replace("/", "-"), a, b, Path(tmp))
            name_a, name_b = (f"{label.replace('/', '-')}-{s}" for s in "ab")
            took = "no reply" if result.seconds is None else f"{result.seconds:.2f} s"
            failed += result.seconds is None
            print(f"| {label} | {result.path(name_a)}, {result.path(name_b)} | {took} |")
            for name in (name_a, name_b):
                print(f"    {name}: {result.connected(name)} exit {result.returncodes[name]}")
    return 1 if failed else 0
