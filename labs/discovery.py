"""STUN servers in the lab's hub and NAT discovery tools on its hosts, with their output parsed.

Servers (each waits until all four RFC 5780 sockets listen, and is stopped with the lab):

- :func:`start_punchtrio_stun`: ``punchtrio stun-server --primary A1:P1 --alternate A2:P2``;
- :func:`start_coturn`: coturn's ``turnserver`` in STUN-only mode on both hub addresses;
- :func:`start_reflector`: :mod:`labs.udpprobe`'s plain-UDP reflector (ground truth, no STUN).

Clients, run in a host namespace, each returning a dict with at least ``mapping`` and ``filtering``
spelled as ``punchtrio nat --json`` spells them (:data:`labs.topology.EXPECTED`):

- :func:`punchtrio_nat`: ``punchtrio nat --stun A1:P1 --json``;
- :func:`coturn_natdiscovery`: ``turnutils_natdiscovery -m -f``;
- :func:`stun_client`: Debian's RFC 3489 ``stun`` client, whose mapping is only ``endpoint-independent``
  or ``dependent`` (RFC 3489 cannot tell address- from address-and-port-dependent mapping);
- :func:`udpprobe_classify`: :mod:`labs.udpprobe` against :func:`start_reflector`.

Each client function has a ``start_*`` twin returning the running process, and a parser for its
output, so several hosts can be probed in parallel (:func:`run_parallel`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from punchtrio import format_endpoint

from .netns import LabError, Namespace
from .topology import Host, Network

STUN_PORT = 3478
STUN_ALT_PORT = 3479
REPO = Path(__file__).resolve().parents[1]
PUNCHTRIO = (sys.executable, "-m", "punchtrio.cli")
"""argv prefix that runs this checkout's ``punchtrio`` command with the current interpreter."""


@dataclass(frozen=True)
class Server:
    """A running RFC 5780 server (or reflector) in the hub: primary and alternate endpoints."""

    name: str
    process: subprocess.Popen[bytes]
    primary: tuple[str, int]
    alternate: tuple[str, int]

    @property
    def endpoint(self) -> str:
        """The primary endpoint as ``ip:port`` (``[ip6]:port``), as clients take it."""
        return format_endpoint(self.primary)


def wait_listening(
    ns: Namespace,
    endpoints: Sequence[tuple[str, int]],
    process: subprocess.Popen[bytes],
    timeout: float = 10.0,
) -> None:
    """Wait until UDP sockets listen on every endpoint in ``ns``; raise :class:`LabError` if not.

    Also fails early if ``process`` exits meanwhile.
    """
    wanted = {format_endpoint((ip, port)) for ip, port in endpoints}  # as ss: [2001:db8::1]:3478
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = {line.split()[3] for line in ns.run("ss", "-H", "-uln").splitlines() if line}
        if wanted <= listening:
            return
        if process.poll() is not None:
            raise LabError(f"{process.args!r} exited with {process.returncode} before listening")
        time.sleep(0.05)
    raise LabError(f"nothing listens on {sorted(wanted)} after {timeout} s: {process.args!r}")


def _hub_endpoints(
    net: Network, port: int, alt_port: int, pair: tuple[str, str] | None = None
) -> list[tuple[str, int]]:
    primary, alternate = pair or (net.hub.primary_ip, net.hub.alternate_ip)
    return [(ip, p) for ip in (primary, alternate) for p in (port, alt_port)]


def start_punchtrio_stun(
    net: Network,
    port: int = STUN_PORT,
    alt_port: int = STUN_ALT_PORT,
    log: Path | None = None,
    *,
    family: int = 4,
) -> Server:
    """Start ``punchtrio stun-server`` in the hub on both addresses of IP version ``family``
    (default 4; 6 needs a hub with IPv6); stopped when the lab closes."""
    hub = net.hub
    if family == 6:
        if hub.primary_ip6 is None or hub.alternate_ip6 is None:
            raise LabError("this lab's hub has no IPv6 (build(..., hub='dual'))")
        primary, alternate = hub.primary_ip6, hub.alternate_ip6
    else:
        primary, alternate = hub.primary_ip, hub.alternate_ip
    argv = [
        *PUNCHTRIO,
        "stun-server",
        "--primary",
        format_endpoint((primary, port)),
        "--alternate",
        format_endpoint((alternate, alt_port)),
    ]
    proc = _spawn_logged(net, argv, log)
    wait_listening(hub.ns, _hub_endpoints(net, port, alt_port, (primary, alternate)), proc)
    return Server("punchtrio", proc, (primary, port), (alternate, alt_port))


def start_coturn(
    net: Network, workdir: Path, port: int = STUN_PORT, alt_port: int = STUN_ALT_PORT
) -> Server:
    """Start coturn (STUN only, RFC 5780 on) in the hub; its files go to ``workdir``."""
    hub = net.hub
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        "turnserver",
        "-n",
        "--stun-only",
        "--listening-ip",
        hub.primary_ip,
        "--listening-ip",
        hub.alternate_ip,
        "--listening-port",
        str(port),
        "--alt-listening-port",
        str(alt_port),
        "--no-tcp",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--relay-threads",
        "1",
        "--log-file",
        "stdout",
        "--simple-log",
        "--pidfile",
        str(workdir / "turnserver.pid"),
        "--userdb",
        str(workdir / "turndb"),
    ]
    proc = _spawn_logged(net, argv, workdir / "turnserver.log")
    wait_listening(hub.ns, _hub_endpoints(net, port, alt_port), proc)
    return Server("coturn", proc, (hub.primary_ip, port), (hub.alternate_ip, alt_port))


def start_reflector(net: Network, port: int = 4000, alt_port: int = 4001) -> Server:
    """Start the :mod:`labs.udpprobe` reflector in the hub on both addresses and two ports."""
    hub = net.hub
    argv = [
        sys.executable,
        "-m",
        "labs.udpprobe",
        "serve",
        hub.primary_ip,
        hub.alternate_ip,
        str(port),
        str(alt_port),
    ]
    proc = net.lab.spawn(hub.ns, *argv, cwd=REPO, stdout=subprocess.DEVNULL)
    wait_listening(hub.ns, _hub_endpoints(net, port, alt_port), proc)
    return Server("reflector", proc, (hub.primary_ip, port), (hub.alternate_ip, alt_port))


def _spawn_logged(net: Network, argv: Sequence[str], log: Path | None) -> subprocess.Popen[bytes]:
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        return net.lab.spawn(net.hub.ns, *argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


@dataclass
class Probe:
    """A discovery client running on a host; :meth:`result` waits and parses its output."""

    host: Host
    tool: str
    process: subprocess.Popen[str]
    parse: Callable[[str, int], dict[str, object]]
    timeout: float

    def result(self) -> dict[str, object]:
        """Wait for the client and return its parsed report (raises :class:`LabError`)."""
        try:
            out, err = self.process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            raise LabError(f"{self.tool} on {self.host.name} timed out: {err.strip()}") from None
        try:
            return self.parse(out, self.process.returncode)
        except (LabError, ValueError, KeyError) as exc:
            raise LabError(
                f"{self.tool} on {self.host.name}: {exc}\nstdout: {out.strip()}\nstderr: {err.strip()}"
            ) from None


def _start(
    host: Host,
    tool: str,
    argv: Sequence[str],
    parse: Callable[[str, int], dict[str, object]],
    timeout: float,
) -> Probe:
    proc = subprocess.Popen(
        host.ns.exec(*argv),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return Probe(host, tool, proc, parse, timeout)


def parse_json_report(out: str, returncode: int) -> dict[str, object]:
    """Parse the JSON object ``punchtrio nat --json`` or ``udpprobe classify`` printed."""
    if returncode != 0:
        raise LabError(f"exit status {returncode}")
    report = json.loads(out)
    if not isinstance(report, dict):
        raise LabError("not a JSON object")
    return report


def start_punchtrio_nat(host: Host, server: Server, timeout: float = 90.0) -> Probe:
    """Start ``punchtrio nat --stun SERVER --json`` on ``host``."""
    argv = [*PUNCHTRIO, "nat", "--stun", server.endpoint, "--json"]
    return _start(host, "punchtrio nat", argv, parse_json_report, timeout)


_NATDISCOVERY = re.compile(r"NAT with (.+?) (Mapping|Filtering)!")


def _rfc4787_name(words: str) -> str:
    return words.strip().lower().replace(" ", "-")


def parse_natdiscovery(out: str, returncode: int) -> dict[str, object]:
    """Parse ``turnutils_natdiscovery -m -f`` output into ``mapping`` and ``filtering``."""
    found: dict[str, object] = {
        kind.lower(): _rfc4787_name(words) for words, kind in _NATDISCOVERY.findall(out)
    }
    if "no nat" in out.lower():
        found.setdefault("mapping", "none")
    if "mapping" not in found or "filtering" not in found:
        raise LabError(f"no mapping/filtering verdict (exit status {returncode})")
    return found


def start_coturn_natdiscovery(host: Host, server: Server, timeout: float = 30.0) -> Probe:
    """Start ``turnutils_natdiscovery -m -f`` against ``server`` on ``host``."""
    ip, port = server.primary
    argv = ["turnutils_natdiscovery", "-m", "-f", "-p", str(port), ip]
    return _start(host, "turnutils_natdiscovery", argv, parse_natdiscovery, timeout)


_STUN_MAPPING = {"Independent Mapping": "endpoint-independent", "Dependent Mapping": "dependent"}
_STUN_FILTER = {
    "Independent Filter": "endpoint-independent",
    "Address Dependent Filter": "address-dependent",
    "Port Dependent Filter": "address-and-port-dependent",
}


def parse_stun_client(out: str, returncode: int) -> dict[str, object]:
    """Parse the ``stun`` client's ``Primary:`` verdict; see the module docstring."""
    line = next((ln for ln in out.splitlines() if ln.startswith("Primary:")), None)
    if line is None:
        raise LabError(f"no 'Primary:' verdict (exit status {returncode})")
    fields = [field.strip() for field in line.removeprefix("Primary:").split(",")]
    report: dict[str, object] = {"verdict": line.strip(), "returncode": returncode}
    for field in fields:
        if field in _STUN_MAPPING:
            report["mapping"] = _STUN_MAPPING[field]
        elif field in _STUN_FILTER:
            report["filtering"] = _STUN_FILTER[field]
        elif field in ("preserves ports", "random port"):
            report["port_preservation"] = field == "preserves ports"
        elif field in ("will hairpin", "no hairpin"):
            report["hairpinning"] = field == "will hairpin"
    if "mapping" not in report:
        raise LabError(f"no mapping in {line.strip()!r}")
    return report


def start_stun_client(host: Host, server: Server, timeout: float = 30.0) -> Probe:
    """Start Debian's ``stun SERVER:PORT -v`` (RFC 3489 client) on ``host``."""
    argv = ["stun", server.endpoint, "-v"]
    return _start(host, "stun", argv, parse_stun_client, timeout)


def start_udpprobe_classify(
    host: Host, reflector: Server, timeout: float = 30.0, port: int = 0
) -> Probe:
    """Start :mod:`labs.udpprobe` ``classify`` against a reflector on ``host``, from ``port``."""
    (a1, p1), (a2, p2) = reflector.primary, reflector.alternate
    argv = [sys.executable, "-m", "labs.udpprobe", "classify", a1, a2, str(p1), str(p2)]
    argv += ["--port", str(port)]
    return _start(host, "udpprobe", argv, parse_json_report, timeout)


def run_parallel(probes: Sequence[Probe]) -> list[dict[str, object]]:
    """Wait for every probe (started in parallel) and return their reports in order."""
    return [probe.result() for probe in probes]


def punchtrio_nat(host: Host, server: Server) -> dict[str, object]:
    """Run ``punchtrio nat --json`` on ``host`` and return its report."""
    return start_punchtrio_nat(host, server).result()


def coturn_natdiscovery(host: Host, server: Server) -> dict[str, object]:
    """Run ``turnutils_natdiscovery`` on ``host`` and return ``mapping`` and ``filtering``."""
    return start_coturn_natdiscovery(host, server).result()


def stun_client(host: Host, server: Server) -> dict[str, object]:
    """Run the ``stun`` client on ``host``; see the module docstring for its fields."""
    return start_stun_client(host, server).result()


def udpprobe_classify(host: Host, reflector: Server, port: int = 0) -> dict[str, object]:
    """Run :mod:`labs.udpprobe` ``classify`` on ``host`` against ``reflector``, from ``port``."""
    return start_udpprobe_classify(host, reflector, port=port).result()


@dataclass(frozen=True)
class HairpinResult:
    """What :func:`hairpin` saw: both public mappings and the source the receiver saw, if any."""

    sender_mapping: str
    receiver_mapping: str
    received_from: str | None


def hairpin(sender: Host, receiver: Host, reflector: Server, timeout: float = 2.0) -> HairpinResult:
    """Send from ``sender`` to ``receiver``'s public mapping (learnt from ``reflector``).

    With hairpinning, ``received_from`` is the sender's public mapping; without, it is None (after
    ``timeout`` seconds).
    """
    probe = [sys.executable, "-m", "labs.udpprobe"]
    listen = subprocess.Popen(
        receiver.ns.exec(*probe, "hairpin-listen", reflector.endpoint, "--timeout", str(timeout)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        receiver_mapping = json.loads(listen.stdout.readline())["mapping"]  # type: ignore[union-attr]
        sent = subprocess.run(
            sender.ns.exec(*probe, "hairpin-send", reflector.endpoint, receiver_mapping),
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        received = json.loads(listen.stdout.readline())["received_from"]  # type: ignore[union-attr]
    finally:
        listen.kill()
        listen.communicate()
    return HairpinResult(json.loads(sent)["mapping"], receiver_mapping, received)


def punch(
    a: Host, b: Host, reflector: Server, duration: float = 1.5
) -> tuple[str | None, str | None]:
    """Plain-UDP hole punching between ``a`` and ``b``, each sending to the other's STUN-like mapping.

    Both learn their mapping from ``reflector``, then send to each other for ``duration`` seconds.
    Returns the source each side received the other's datagrams from (None: nothing got through).
    """
    argv = [sys.executable, "-m", "labs.udpprobe", "punch", reflector.endpoint]
    argv += ["--duration", str(duration)]
    sides = [
        subprocess.Popen(
            host.ns.exec(*argv), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for host in (a, b)
    ]
    try:
        mappings = [json.loads(side.stdout.readline())["mapping"] for side in sides]  # type: ignore[union-attr]
        for side, peer_mapping in zip(sides, reversed(mappings), strict=True):
            side.stdin.write(peer_mapping + "\n")  # type: ignore[union-attr]
            side.stdin.flush()  # type: ignore[union-attr]
        outs = [side.communicate(timeout=duration + 10)[0] for side in sides]
    finally:
        for side in sides:
            if side.poll() is None:
                side.kill()
                side.communicate()
    a_got, b_got = (json.loads(out)["received_from"] for out in outs)
    return a_got, b_got
