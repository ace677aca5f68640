"""Three tunnels through the kernel NAT lab, measured in one run: userspace, backend, plain (root).

The lab is ``build(["port", "port"])`` (two hosts, each behind its own port-restricted cone NAT,
and the public hub namespace) with a real ``punchtrio hub`` (embedded STUN and relay). In each
round the same two hosts carry, one after the other (rounds interleaved, every NAT's mappings
flushed before each tunnel):

- ``userspace``: ``punchtrio up --hub`` on both hosts (punchtrio's userspace WireGuard), started
  at once as the lab tests do (:func:`labs.scenarios.punch_matrix.running_pair`);
- ``backend``: the same with ``--tunnel wireguard-go`` (punchtrio punches and configures
  wireguard-go, which moves the packets);
- ``plain``: wireguard-go on both hosts configured by hand with ``wg`` and ``ip``, no punchtrio
  at all. The port NATs keep a flow's source port when it is free, so each side listens on
  51820, has the other NAT's public address with port 51820 as its endpoint and a persistent
  keepalive of 1 s: the two sides' first datagrams open each NAT's filter for the other (a
  datagram that arrives before its own side has sent is dropped and leaves no state), and the
  handshake completes. It counts as connected only when a ping crosses the tunnel and ``wg show``
  on both hosts reports a handshake with the other NAT's public address at port 51820 as the
  peer's endpoint.

Each tunnel is measured with single-stream TCP each way (iperf3, ``SECONDS`` long) and the median
ping RTT at 20 and at 500 pings per second (:mod:`benchmarks.wireguard`'s helpers); the table
holds the median over ``ROUNDS`` rounds and the ratios against ``plain`` from the same run. A
tunnel that does not come up is reported as ``failed: <first stderr line>`` and the other rows
still print. ``python -m benchmarks tunnels-lab``; ``PUNCHTRIO_BENCH_ROUNDS`` and
``PUNCHTRIO_BENCH_SECONDS`` shorten a smoke run.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from labs.netns import LabError, require_binaries
from labs.scenarios.punch_matrix import PING_DEADLINE, PairResult, running_pair, start_hub
from labs.topology import Host, Network, build
from labs.wireguard import UDP_PORT, Pair, genkey, ping, start_wireguard_go, wg_show

from benchmarks.wireguard import ROUNDS, SECONDS, tunnel_rtt, tunnel_throughput

NAME = "tunnels-lab"

KINDS = ("plain", "userspace", "backend")
"""The tunnels (``plain`` is the baseline); round N starts at the N-th one, in turn."""
LABELS = {
    "plain": "plain: wireguard-go <-> wireguard-go, set up with `wg`",
    "userspace": "userspace: `punchtrio up --hub`",
    "backend": "backend: `punchtrio up --hub --tunnel wireguard-go`",
}
"""The table's name of each tunnel."""
ADDRESSES = ("10.99.0.1", "10.99.0.2")
"""Tunnel addresses of host a and host b (/24), as :func:`running_pair` assigns them."""
PLAIN_DEADLINE = 20.0
"""Seconds the plain tunnel gets for its first ping reply (pings 0.2 s apart)."""

USERSPACE_THROUGHPUT = 1.4
"""Goal: userspace throughput >= 1.4x plain, each direction."""
USERSPACE_RTT = 1.2
"""Goal: userspace median RTT <= 1.2x plain, at both ping rates."""
BACKEND_SHARE = 0.95
"""Goal: the backend within 0.95x of plain (throughput >= 0.95x, RTT <= 1/0.95x)."""

Sample = tuple[float, float, float, float]
"""(Mbit/s a->b, Mbit/s b->a, median RTT ms at 20 pings/s, median RTT ms at 500 pings/s)."""


class TunnelFailed(Exception):
    """A tunnel did not come up; the message is the one line the table shows."""


@dataclass
class Row:
    """What one tunnel gave over the rounds: its samples, paths and failure reasons."""

    samples: list[Sample] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def median(self) -> Sample | None:
        """Each column's median over the successful rounds (``None``: none succeeded)."""
        if not self.samples:
            return None
        a, b, c, d = (statistics.median(column) for column in zip(*self.samples, strict=True))
        return a, b, c, d


def _measure(pair: Pair) -> Sample:
    """Measure the tunnel from ``pair.a`` to b's tunnel address (:data:`ADDRESSES`)."""
    address = ADDRESSES[1]
    return (
        tunnel_throughput(pair, address=address),
        tunnel_throughput(pair, reverse=True, address=address),
        tunnel_rtt(pair, interval=0.05, count=100, address=address),
        tunnel_rtt(pair, interval=0.002, count=1000, address=address),
    )


@contextlib.contextmanager
def plain_tunnel(net: Network, hosts: tuple[Host, Host], tag: str) -> Iterator[None]:
    """wireguard-go on both hosts, set up with ``wg``/``ip``, each endpoint the other NAT's public
    address at :data:`UDP_PORT`; yields once a ping crosses and both ``wg show`` agree.

    Raises :class:`TunnelFailed` if no ping reply comes within :data:`PLAIN_DEADLINE` or a side
    reports another endpoint or no handshake. The interfaces are deleted on leaving (which ends
    wireguard-go).
    """
    keys = [genkey(), genkey()]
    names = [f"{net.lab.prefix}{tag}{i}" for i in range(2)]
    started: list[int] = []
    try:
        for i, host in enumerate(hosts):
            other = 1 - i
            start_wireguard_go(
                net.lab,
                host.ns,
                names[i],
                private_key=keys[i][0],
                address=f"{ADDRESSES[i]}/24",
                peer_public=keys[other][1],
                allowed_ips=f"{ADDRESSES[other]}/32",
                endpoint=f"{hosts[other].nat.internet_ip}:{UDP_PORT}",
            )
            started.append(i)
            host.ns.run("wg", "set", names[i], "peer", keys[other][1], "persistent-keepalive", "1")
        deadline = time.monotonic() + PLAIN_DEADLINE
        while ping(hosts[0].ns, ADDRESSES[1], count=1)[0] == 0:
            if time.monotonic() > deadline:
                raise TunnelFailed(f"failed: no ping reply within {PLAIN_DEADLINE:.0f} s")
        for i, host in enumerate(hosts):
            expected = f"{hosts[1 - i].nat.internet_ip}:{UDP_PORT}"
            endpoints = wg_show(host.ns, names[i], "endpoints").split()
            handshakes = wg_show(host.ns, names[i], "latest-handshakes").split()
            if endpoints[1:] != [expected] or handshakes[1:] == ["0"]:
                raise TunnelFailed(
                    f"failed: {host.name} sees endpoint {endpoints[1:]} and handshake "
                    f"{handshakes[1:]}, not {expected}"
                )
        yield
    finally:
        for i in started:
            hosts[i].ns.run("ip", "link", "del", names[i], check=False)
        _wait_gone([Path("/var/run/wireguard") / f"{name}.sock" for name in names])


def _wait_gone(paths: list[Path], timeout: float = 10) -> None:
    """Wait until none of ``paths`` exists (wireguard-go removes its socket as it exits)."""
    deadline = time.monotonic() + timeout
    while any(path.exists() for path in paths) and time.monotonic() < deadline:
        time.sleep(0.05)


def _first_line(result: PairResult) -> str:
    """The first non-empty stderr line of either side (of a traceback: its last line, the
    exception), or the exit codes when there was none."""
    for text in result.stderr.values():
        lines = [line.strip(" |+-\t") for line in text.splitlines()]
        lines = [line for line in lines if line]
        if lines:
            return lines[-1] if "Traceback" in lines[0] else lines[0]
    codes = ", ".join(f"{name} {code}" for name, code in result.returncodes.items())
    return f"no ping reply within {PING_DEADLINE:.0f} s, nothing on stderr (exit: {codes})"


def _punchtrio(
    net: Network, hosts: tuple[Host, Host], workdir: Path, tag: str, extra: tuple[str, ...]
) -> tuple[Sample, str]:
    """``punchtrio up --hub`` (with ``extra``) on both hosts; return the sample and a's path.

    Raises :class:`TunnelFailed` with the first stderr line if no ping crossed.
    """
    interfaces = (f"{net.lab.prefix}{tag}0", f"{net.lab.prefix}{tag}1")
    sample: Sample | None = None
    path = ""
    with running_pair(net, tag, *hosts, workdir, interfaces=interfaces, extra=extra) as live:
        if live.result.seconds is not None:
            path = "/".join(str(live.result.path(name)) for name in live.names)
            sample = _measure(Pair(net.lab, hosts[0].ns, hosts[1].ns))
    if sample is None:
        raise TunnelFailed(f"failed: {_first_line(live.result)}")
    return sample, path


def _one(
    net: Network, hosts: tuple[Host, Host], workdir: Path, kind: str, tag: str
) -> tuple[Sample, str]:
    """Bring up the ``kind`` tunnel, measure it, take it down; return the sample and its path."""
    net.flush_conntrack()
    if kind == "plain":
        with plain_tunnel(net, hosts, tag):
            return _measure(Pair(net.lab, hosts[0].ns, hosts[1].ns)), "direct/direct"
    extra = ("--tunnel", "wireguard-go") if kind == "backend" else ()
    return _punchtrio(net, hosts, workdir, tag, extra)


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None or base == 0 else value / base


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _goal(text: str, ratios: list[float | None], ok: bool) -> str:
    """One goal line: ``text``, the ratios it was judged on, and met / not met."""
    if any(r is None for r in ratios):
        return f"- {text}: not met (no measurement)"
    shown = ", ".join(_x(r) for r in ratios)
    return f"- {text}: {shown}: {'met' if ok else 'not met'}"


def report(rows: dict[str, Row], rounds: int, seconds: int) -> str:
    """Return the Markdown section for ``rows`` (one :class:`Row` per kind of :data:`KINDS`)."""
    base = rows["plain"].median()
    lines = [
        "## Tunnels through the NAT lab: userspace, wireguard-go backend, plain wireguard-go",
        "",
        'Two hosts behind two port-restricted cone NATs (`build(["port", "port"])`) and a real '
        "`punchtrio hub`; the same two hosts carry each tunnel in turn, NAT mappings flushed "
        f"before each. Single-stream TCP (`iperf3 -t {seconds}`, each way) and median ping RTT at "
        f"20 and 500 pings/s; median of {rounds} interleaved rounds; ratios against plain "
        "wireguard-go from the same run. Plain wireguard-go is set up with `wg` and `ip` only "
        "(ListenPort 51820, endpoint = the other NAT's public address:51820, persistent "
        "keepalive 1 s): both sides' first datagrams open the port NATs (which keep the source "
        "port), and it counts only once a ping crosses and `wg show` on both hosts reports a "
        "handshake at the other NAT's public address. "
        "Command: `.venv/bin/python -m benchmarks tunnels-lab` (root).",
        "",
        "| tunnel | paths (a/b) | TCP a->b Mbit/s | ratio | TCP b->a Mbit/s | ratio "
        "| RTT ms, 20 pings/s | ratio | RTT ms, 500 pings/s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios: dict[str, list[float | None]] = {}
    for kind in KINDS:
        row = rows[kind]
        got = row.median()
        if got is None:
            reason = row.failures[0] if row.failures else "failed: not run"
            if len(row.failures) > 1:
                reason += f" ({len(row.failures)} of {rounds} rounds failed)"
            lines.append(f"| {LABELS[kind]} | {reason} | | | | | | | | |")
            ratios[kind] = [None] * 4
            continue
        ratios[kind] = [
            _ratio(value, None if base is None else base[i]) for i, value in enumerate(got)
        ]
        paths = ", ".join(sorted(row.paths))
        if row.failures:
            paths += f" ({len(row.failures)} of {rounds} rounds {row.failures[0]})"
        fwd, back, sparse, dense = got
        rf, rb, rs, rd = ratios[kind]
        lines.append(
            f"| {LABELS[kind]} | {paths} | {fwd:.0f} | {_x(rf)} | {back:.0f} | {_x(rb)} "
            f"| {sparse:.3f} | {_x(rs)} | {dense:.3f} | {_x(rd)} |"
        )
    user, backend = ratios["userspace"], ratios["backend"]

    def at_least(values: list[float | None], goal: float) -> bool:
        return all(v is not None and v >= goal for v in values)

    def at_most(values: list[float | None], goal: float) -> bool:
        return all(v is not None and v <= goal for v in values)

    rtt_cap = 1 / BACKEND_SHARE
    lines += [
        "",
        "Goals, judged on the ratios above:",
        "",
        _goal(
            f"userspace throughput >= {USERSPACE_THROUGHPUT}x plain (a->b, b->a)",
            user[:2],
            at_least(user[:2], USERSPACE_THROUGHPUT),
        ),
        _goal(
            f"userspace RTT <= {USERSPACE_RTT}x plain (20, 500 pings/s)",
            user[2:],
            at_most(user[2:], USERSPACE_RTT),
        ),
        _goal(
            f"backend throughput >= {BACKEND_SHARE}x plain (a->b, b->a)",
            backend[:2],
            at_least(backend[:2], BACKEND_SHARE),
        ),
        _goal(
            f"backend RTT <= {rtt_cap:.3f}x plain, i.e. 1/{BACKEND_SHARE} (20, 500 pings/s)",
            backend[2:],
            at_most(backend[2:], rtt_cap),
        ),
    ]
    return "\n".join(lines)


def run() -> str:
    """Measure the three tunnels in :data:`~benchmarks.wireguard.ROUNDS` interleaved rounds
    through the NAT lab and return the Markdown section. Needs root, the lab's programs,
    wireguard-go, wg, iperf3 and ping; raises :class:`LabError` when the lab or the hub cannot
    start (a tunnel that fails is a table row, not an exception)."""
    require_binaries("wireguard-go", "wg", "iperf3", "ping", "ip")
    rows = {kind: Row() for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="pt-tunnels-") as tmp, build(["port", "port"]) as net:
        workdir = Path(tmp)
        start_hub(net, workdir / "hub.log")
        hosts = (net.requested[0].hosts[0], net.requested[1].hosts[0])
        for number in range(ROUNDS):
            # Each round starts with the next tunnel, so none always runs first (or after the
            # same one) while load from elsewhere comes and goes.
            shift = number % len(KINDS)
            for kind in KINDS[shift:] + KINDS[:shift]:
                tag = f"{kind[0]}{number}"
                try:
                    sample, path = _one(net, hosts, workdir, kind, tag)
                except (TunnelFailed, RuntimeError, LabError) as error:
                    text = str(error)
                    rows[kind].failures.append(
                        text if text.startswith("failed") else f"failed: {text}"
                    )
                    continue
                rows[kind].samples.append(sample)
                rows[kind].paths.add(path)
    return report(rows, ROUNDS, SECONDS)
