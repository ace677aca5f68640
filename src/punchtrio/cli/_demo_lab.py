"""The root half of ``punchtrio demo``: a small real NAT lab in network namespaces.

It lives in the package (the repository's ``labs/`` is not installed) and builds only what the
demo needs, with a random prefix ``ptd`` + 4 hex digits::

    wan (bridge br0, 203.0.113.0/24) -- hub: 203.0.113.1 + .2 (punchtrio hub, STUN on both,
       |                                         its relay on 203.0.113.1:7778)
       |-- nat1 203.0.113.11, port-restricted cone -- alice 10.1.0.11
       |-- nat2 203.0.113.12, full cone            -- bob   10.2.0.11
       |-- nat3 203.0.113.13, port-restricted cone -- dave  10.3.0.11
       `-- nat4 203.0.113.14, port-restricted cone -- erin  10.4.0.11

Then ``punchtrio nat`` on alice and bob, two ``punchtrio up --hub --json`` started at once, ping
and a TCP transfer through the tunnel. In the second act a firewall rule in nat3 drops the UDP
between nat3 and nat4: dave and erin connect through the hub's relay; the rule is deleted, and
both move to the direct path by themselves. Every process is stopped and every namespace deleted afterwards,
also on errors and Ctrl-C (:class:`punchtrio._netns.Lab` does that). A failed lab command becomes a
:class:`~punchtrio.cli._demo.DemoError` at :func:`run_lab_demo`.
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

from .._netns import Lab, LabError, Namespace
from ..keys import PrivateKey
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
_BLOCK = """table ip ptblock {
  chain forward {
    type filter hook forward priority filter; policy accept;
    meta l4proto udp ip daddr 203.0.113.14 drop
    meta l4proto udp ip saddr 203.0.113.14 drop
  }
}
"""
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


def _ruleset(kind: str) -> str:
    """nftables for a ``port`` (conntrack filters replies) or ``full`` (any inbound datagram to a
    mapped port is forwarded) NAT; unsolicited UDP to the NAT itself is dropped silently."""
    full = kind == "full"
    mapping = "map mapping { type inet_service : ipv4_addr . inet_service; flags dynamic, timeout; timeout 180s; }"
    dnat = 'iifname "wan0" udp dport @mapping dnat ip to udp dport map @mapping'
    record = (
        'oifname "wan0" meta l4proto udp ct direction original update @mapping '
        "{ udp sport : ct original ip saddr . ct original proto-src }"
    )
    return f"""\
table ip ptdemo {{
  {mapping if full else ""}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {dnat if full else ""}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }}
  chain record {{
    type filter hook postrouting priority srcnat + 10; policy accept;
    {record if full else ""}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    meta l4proto udp drop
  }}
}}
"""


def _build(lab: Lab) -> tuple[Namespace, dict[str, Namespace], dict[str, Namespace]]:
    wan = lab.namespace("wan")
    with contextlib.suppress(LabError):  # only present with br_netfilter loaded
        _sh(wan, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0")
    _sh(wan, "ip", "link", "add", "br0", "type", "bridge")
    _sh(wan, "ip", "link", "set", "br0", "up")
    hub = lab.namespace("hub")
    lab.veth(hub, "wan0", wan, "hub")
    _sh(wan, "ip", "link", "set", "hub", "master", "br0")
    for address in (PRIMARY[0], ALTERNATE[0]):
        _sh(hub, "ip", "addr", "add", f"{address}/24", "dev", "wan0")
    hosts = {}
    for number, (name, kind) in enumerate({**NATS, **ACT2}.items(), start=1):
        nat = lab.namespace(f"nat{number}")
        _sh(nat, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        lab.veth(nat, "wan0", wan, f"nat{number}")
        _sh(wan, "ip", "link", "set", f"nat{number}", "master", "br0")
        _sh(nat, "ip", "addr", "add", f"203.0.113.{10 + number}/24", "dev", "wan0")
        host = lab.namespace(name)
        lab.veth(host, "eth0", nat, "lan0")
        _sh(nat, "ip", "addr", "add", f"10.{number}.0.1/24", "dev", "lan0")
        _sh(host, "ip", "addr", "add", f"10.{number}.0.11/24", "dev", "eth0")
        _sh(host, "ip", "route", "add", "default", "via", f"10.{number}.0.1")
        _sh(nat, "nft", "-f", "-", input=_ruleset(kind))
        hosts[name] = host
    act2 = {name: hosts.pop(name) for name in ACT2}
    return hub, hosts, act2


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


def _failure(events: list[dict[str, Any]], proc: subprocess.Popen[bytes]) -> str:
    failed = next((e for e in events if e.get("event") == "peer_failed"), None)
    if failed is not None:
        return f"{failed['stage']}: {failed['reason']}"
    return f"exit {proc.returncode}"


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
    lab = Lab(prefix="ptd" + secrets.token_hex(2), stop_timeout=STOP_TIMEOUT)
    with lab, tempfile.TemporaryDirectory(prefix="ptd-") as tmp:
        hub, hosts, act2 = _build(lab)
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
            reasons = "; ".join(f"{n}: {_failure(events[n], ups[n])}" for n in hosts)
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
        _relay_act(lab, act2, report.relay_act, Path(tmp), say)
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
        ups[name] = lab.spawn(ns, *argvs[name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=_collect, args=(ups[name], events[name]), daemon=True).start()
    return ups, events


def _relay_act(
    lab: Lab, hosts: dict[str, Namespace], act: RelayAct, tmp: Path, say: Callable[[str], Any]
) -> None:
    """Act 2: relayed while a firewall drops the UDP between nat3 and nat4, direct once it opens."""
    firewall = Namespace(f"{lab.prefix}-nat3")  # dave's NAT, made by _build
    _sh(firewall, "nft", "-f", "-", input=_BLOCK)
    say("act 2: a firewall in dave's NAT drops all UDP to and from erin's NAT")
    start = time.monotonic()
    ups, events = _start_ups(lab, hosts, ACT2_TUNNEL, tmp)
    act.time_to_tunnel_s = round(
        _ping(hosts["dave"], ACT2_TUNNEL["erin"], start, list(ups.values())), 3
    )
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
    _sh(firewall, "nft", "delete", "table", "ip", "ptblock")
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
