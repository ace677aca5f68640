"""The root half of ``punchtrio demo``: a small real NAT lab in network namespaces.

The lab is built by :func:`punchtrio.natlab.build`, the builder the NAT lab tests and benchmarks
use (the repository's ``labs/`` is not installed, the package is), so the demo's NATs are the
lab's kinds; its random prefix is ``ptd`` + 4 hex digits::

    wan (bridge br0, 203.0.113.0/24) -- hub: 203.0.113.1 + .2 (punchtrio hub, STUN on both,
       |                                         its relay on 203.0.113.1:7778)
       |-- nat1 203.0.113.11, "port" (port-restricted cone) -- h1 = alice 10.1.0.11
       |-- nat2 203.0.113.12, "full" (full cone)            -- h2 = bob   10.2.0.11
       |-- nat3 203.0.113.13, "port"                        -- h3 = dave  10.3.0.11
       `-- nat4 203.0.113.14, "port"                        -- h4 = erin  10.4.0.11

Then ``punchtrio nat`` on alice and bob, two ``punchtrio up --hub --json`` started at once, ping
and a TCP transfer through the tunnel. In the second act the lab's internet drops the UDP between
nat3 and nat4 (:func:`punchtrio.natlab.udp_blocked_between`): dave and erin connect through the
hub's relay; the rule is deleted, and both move to the direct path by themselves. Every process is
stopped and every namespace deleted afterwards, also on errors and Ctrl-C. A failed lab command
becomes a :class:`~punchtrio.cli._demo.DemoError` at :func:`run_lab_demo`.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..keys import PrivateKey
from ..natlab import Host, Lab, LabError, Namespace, Network, build, udp_blocked_between
from ._demo import (
    ALTERNATE,
    PRIMARY,
    TUNNEL,
    DemoError,
    DemoReport,
    PeerReport,
    RelayAct,
    nat_kind,
)

HUB_HTTP = (PRIMARY[0], 7777)
HUB_RELAY = (PRIMARY[0], 7778)
NATS = {"alice": "port", "bob": "full"}
ACT2 = {"dave": "port", "erin": "port"}
ACT2_TUNNEL = {"dave": "10.98.0.1", "erin": "10.98.0.2"}
UPGRADE_TIMEOUT = 60.0
"""Seconds act 2 waits for both sides to move to the direct path once the firewall opens."""
TRANSFER_BYTES = 32 * 1024 * 1024
PUNCHTRIO = (sys.executable, "-m", "punchtrio.cli")
COMMAND_TIMEOUT = 30  # seconds for any one lab command unless a step says otherwise
# Seconds each process gets after SIGTERM before SIGKILL (``up`` removes its tunnel on the way out).
STOP_TIMEOUT = 10

_RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 5201))
print("ready", flush=True)
conn, _ = server.accept()
total, first = 0, None
while chunk := conn.recv(1 << 16):
    first = first or time.monotonic()
    total += len(chunk)
print(total, time.monotonic() - first, flush=True)
"""
_SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], 5201), timeout=30) as conn:
    block = bytes(1 << 16)
    for _ in range(int(sys.argv[2]) >> 16):
        conn.sendall(block)
"""


def _sh(
    ns: Namespace, *argv: str, input: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> str:
    """Run ``argv`` in ``ns`` and return its stdout; raises LabError if it fails or times out."""
    return ns.run(*argv, input=input, timeout=timeout)


def _wait_for(
    check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise DemoError(f"lab: {what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise DemoError(f"lab: {what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)


def _start_hub(lab: Lab, hub: Namespace) -> None:
    proc = lab.spawn(
        hub,
        *PUNCHTRIO,
        "hub",
        "--store",
        "memory",
        "--listen",
        f"{HUB_HTTP[0]}:{HUB_HTTP[1]}",
        "--stun",
        f"{PRIMARY[0]}:{PRIMARY[1]}",
        "--stun-alternate",
        f"{ALTERNATE[0]}:{ALTERNATE[1]}",
        "--relay",
        f"{HUB_RELAY[0]}:{HUB_RELAY[1]}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        tcp = _sh(hub, "ss", "-H", "-tln")
        udp = _sh(hub, "ss", "-H", "-uln")
        http, relay = f"{HUB_HTTP[0]}:{HUB_HTTP[1]}", f"{HUB_RELAY[0]}:{HUB_RELAY[1]}"
        return http in tcp and relay in tcp and f"{ALTERNATE[0]}:{ALTERNATE[1]}" in udp

    _wait_for(listening, "punchtrio hub", proc)


def _detect(lab: Lab, hosts: dict[str, Namespace]) -> list[PeerReport]:
    procs = {
        name: lab.spawn(
            ns,
            *PUNCHTRIO,
            "nat",
            "--stun",
            f"{PRIMARY[0]}:{PRIMARY[1]}",
            "--timeout",
            "1",
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, ns in hosts.items()
    }
    peers = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise DemoError(f"nat: {name}: {err.decode(errors='replace').strip()[:200]}")
        found = json.loads(out)
        mapping, filtering = str(found["mapping"]), str(found["filtering"])
        peers.append(PeerReport(name, mapping, filtering, nat_kind(mapping, filtering)))
    return peers


def _ping(ns: Namespace, target: str, start: float, ups: list[subprocess.Popen[bytes]]) -> float:
    """Ping until the first reply (every 50 ms); return seconds since ``start``."""
    deadline = start + 30
    while time.monotonic() < deadline:
        for proc in ups:
            if proc.poll() is not None:
                raise DemoError(
                    f"up: exited with {proc.returncode} before the tunnel carried a ping"
                )
        argv = ns.exec("ping", "-n", "-q", "-c", "1", "-i", "0.05", "-w", "20", target)
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise DemoError("ping: no reply through the tunnel within 30 s")


def _collect(proc: subprocess.Popen[bytes], events: list[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))


def _connected(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == "peer_connected"), None)


def _failure(events: list[dict[str, Any]], proc: subprocess.Popen[bytes], log: Path) -> str:
    """Why an ``up`` process has no tunnel: its ``peer_failed`` event, else its exit status and
    the last line it wrote to stderr (``log``)."""
    failed = next((e for e in events if e.get("event") == "peer_failed"), None)
    if failed is not None:
        return f"{failed['stage']}: {failed['reason']}"
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return f"exit {proc.returncode}" + (f": {lines[-1]}" if lines else "")


def run_lab_demo(say: Callable[[str], Any] = print) -> DemoReport:
    """Build the lab, run the story, tear everything down and return the report (root only).

    Raises :class:`~punchtrio.cli._demo.DemoError` naming the step that failed (a failed lab
    command as ``lab: <command>: exit N: <its stderr>``, on one line).
    """
    try:
        return _run_lab_demo(say)
    except LabError as exc:
        raise DemoError(f"lab: {_one_line(str(exc))}") from None


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` with its whitespace collapsed, cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _run_lab_demo(say: Callable[[str], Any]) -> DemoReport:
    report = DemoReport("lab")
    kinds = {**NATS, **ACT2}
    built = build(
        list(kinds.values()), prefix="ptd" + secrets.token_hex(2), stop_timeout=STOP_TIMEOUT
    )
    with built as net, tempfile.TemporaryDirectory(prefix="ptd-") as tmp:
        lab, hub = net.lab, net.hub.ns
        peers = {name: nat.hosts[0] for name, nat in zip(kinds, net.requested, strict=True)}
        hosts = {name: peers[name].ns for name in NATS}
        say(
            f"built namespaces {lab.prefix}-*: a hub, alice behind a port NAT, bob behind a "
            "full-cone NAT, dave and erin behind port NATs"
        )
        _start_hub(lab, hub)
        say(
            f"punchtrio hub on http://{HUB_HTTP[0]}:{HUB_HTTP[1]}, STUN on {PRIMARY[0]}:{PRIMARY[1]} + {ALTERNATE[0]}:{ALTERNATE[1]}"
        )
        report.peers = _detect(lab, hosts)
        for peer in report.peers:
            say(
                f"punchtrio nat: {peer.name} is behind a {peer.kind} NAT ({peer.mapping} mapping, {peer.filtering} filtering)"
            )
        start = time.monotonic()
        ups, events = _start_ups(lab, hosts, TUNNEL, Path(tmp))
        say("started `punchtrio up --hub ...` for alice and bob at once")
        try:
            report.time_to_tunnel_s = round(
                _ping(hosts["alice"], TUNNEL["bob"], start, list(ups.values())), 3
            )
        except DemoError as exc:
            reasons = "; ".join(
                f"{n}: {_failure(events[n], ups[n], Path(tmp, f'{n}.err'))}" for n in hosts
            )
            raise DemoError(f"{exc} ({reasons})") from None
        say(
            f"first ping alice -> bob through the tunnel {report.time_to_tunnel_s:.2f} s after starting both"
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(_connected(e) for e in events.values()):
            time.sleep(0.05)
        for peer in report.peers:
            connected = _connected(events[peer.name])
            if connected is not None:
                peer.path, peer.endpoint = connected["path"], connected["endpoint"]
                peer.elapsed_ms = connected["elapsed_ms"]
        out = _sh(hosts["alice"], "ping", "-n", "-q", "-c", "5", "-i", "0.2", TUNNEL["bob"])
        match = re.search(r"= [\d.]+/([\d.]+)/", out)
        report.ping_rtt_ms = float(match.group(1)) if match else None
        say(f"ping -c 5: {report.ping_rtt_ms} ms average round trip")
        _transfer(lab, hosts, report)
        say(f"TCP transfer alice -> bob: {report.transfer_bytes / 1e6:.0f} MB")
        _relay_act(net, {name: peers[name] for name in ACT2}, report.relay_act, Path(tmp), say)
    say("everything torn down (processes stopped, namespaces deleted)")
    return report


def _start_ups(
    lab: Lab, hosts: dict[str, Namespace], tunnel: dict[str, str], tmp: Path
) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, list[dict[str, Any]]]]:
    """Start ``punchtrio up --hub ... --json`` on both hosts at once, each reaching the other;
    return the processes and the lists their JSON events are collected into."""
    ups: dict[str, subprocess.Popen[bytes]] = {}
    events: dict[str, list[dict[str, Any]]] = {name: [] for name in hosts}
    names = list(hosts)
    argvs = {}
    for name in names:
        key = tmp / f"{name}.key"
        PrivateKey.generate().write(key)
        other = names[1] if name == names[0] else names[0]
        argvs[name] = [
            *PUNCHTRIO,
            "up",
            "--hub",
            f"http://{HUB_HTTP[0]}:{HUB_HTTP[1]}",
            "--name",
            name,
            "--key-file",
            str(key),
            "--address",
            f"{tunnel[name]}/24",
            "--peer",
            other,
            "--json",
        ]
    for name, ns in hosts.items():
        with (tmp / f"{name}.err").open("wb") as log:
            ups[name] = lab.spawn(ns, *argvs[name], stdout=subprocess.PIPE, stderr=log)
        threading.Thread(target=_collect, args=(ups[name], events[name]), daemon=True).start()
    return ups, events


def _relay_act(
    net: Network, peers: dict[str, Host], act: RelayAct, tmp: Path, say: Callable[[str], Any]
) -> None:
    """Act 2: relayed while the lab's internet drops the UDP between dave's and erin's NATs,
    direct once it lets it through."""
    hosts = {name: host.ns for name, host in peers.items()}
    dave, erin = peers["dave"], peers["erin"]
    with udp_blocked_between(net, dave.nat, erin.nat):
        say("act 2: a firewall on the internet drops all UDP between dave's and erin's NATs")
        start = time.monotonic()
        ups, events = _start_ups(net.lab, hosts, ACT2_TUNNEL, tmp)
        try:
            act.time_to_tunnel_s = round(
                _ping(hosts["dave"], ACT2_TUNNEL["erin"], start, list(ups.values())), 3
            )
        except DemoError as exc:
            reasons = "; ".join(
                f"{n}: {_failure(events[n], ups[n], Path(tmp, f'{n}.err'))}" for n in hosts
            )
            raise DemoError(f"act 2: {exc} ({reasons})") from None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(_connected(e) for e in events.values()):
            time.sleep(0.05)
        for name in hosts:
            connected = _connected(events[name]) or {}
            act.paths[name] = connected.get("path")
            act.relay[name] = connected.get("relay")
        say(
            f"act 2: dave and erin connected through the hub's relay "
            f"({', '.join(f'{n}: {act.relay[n]}' for n in hosts)}); first ping after "
            f"{act.time_to_tunnel_s:.2f} s"
        )
        time.sleep(3)
        # Timed from just before the rule goes: a repunch may land while nft is deleting it.
        opened = time.monotonic()
    say("act 2: the firewall rule is deleted; nobody restarts")

    def upgraded(name: str) -> dict[str, Any] | None:
        return next(
            (
                e
                for e in events[name]
                if e.get("event") == "path_changed" and e.get("to") == "direct"
            ),
            None,
        )

    while time.monotonic() < opened + UPGRADE_TIMEOUT and not all(map(upgraded, hosts)):
        time.sleep(0.05)
    if not all(map(upgraded, hosts)):
        raise DemoError(
            f"act 2: no path_changed to direct within {UPGRADE_TIMEOUT:.0f} s of the firewall opening"
        )
    act.upgrade_s = round(time.monotonic() - opened, 3)
    act.upgraded_to = dict.fromkeys(hosts, "direct")
    _sh(hosts["dave"], "ping", "-n", "-q", "-c", "1", "-w", "5", ACT2_TUNNEL["erin"])
    say(f"act 2: relay -> direct on both sides {act.upgrade_s:.2f} s after the firewall opened")


def _transfer(lab: Lab, hosts: dict[str, Namespace], report: DemoReport) -> None:
    receiver = lab.spawn(
        hosts["bob"],
        sys.executable,
        "-c",
        _RECEIVER,
        TUNNEL["bob"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert receiver.stdout is not None
    if receiver.stdout.readline().strip() != b"ready":
        raise DemoError("transfer: the receiver did not start")
    _sh(
        hosts["alice"],
        sys.executable,
        "-c",
        _SENDER,
        TUNNEL["bob"],
        str(TRANSFER_BYTES),
        timeout=60,
    )
    out, _ = receiver.communicate(timeout=30)
    total, seconds = out.split()
    report.transfer_bytes = int(total)
    report.transfer_s = round(float(seconds), 3)
    report.throughput_mbit_s = round(int(total) * 8 / max(float(seconds), 1e-6) / 1e6, 1)
