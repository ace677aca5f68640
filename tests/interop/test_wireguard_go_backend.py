"""`punchtrio up --tunnel wireguard-go`: a real wireguard-go process configured over UAPI.

Each test runs real processes in network namespaces: the backend against plain wireguard-go and
against punchtrio's userspace tunnel, and checks that SIGTERM, a killed wireguard-go and start-up
failures leave no process, interface or UAPI socket behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs.netns import Lab, Namespace
from labs.wireguard import (
    OVERLAY,
    PYTHON,
    ROOT,
    UDP_PORT,
    UNDERLAY,
    Pair,
    genkey,
    make_pair,
    ping,
    start_punchtrio,
    start_wireguard_go,
    wg_show,
    write_config,
)

from tests.conftest import require_root_and

pytestmark = [pytest.mark.root, pytest.mark.interop]

UP_WGGO = [PYTHON, "-m", "punchtrio.cli", "up", "--tunnel", "wireguard-go"]
SOCKETS = Path("/var/run/wireguard")


@pytest.fixture
def pair() -> Iterator[Pair]:
    require_root_and("wireguard-go", "wg", "ip", "ping", "ss")
    with Lab() as lab:
        yield make_pair(lab)


def _links(ns: Namespace) -> list[str]:
    return [link["ifname"] for link in json.loads(ns.run("ip", "-j", "link", "show"))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive: only our own children can be zombies, and wireguard-go is not ours
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def _assert_nothing_left(ns: Namespace, ifname: str, pid: int | None) -> None:
    assert ifname not in _links(ns)
    assert not (SOCKETS / f"{ifname}.sock").exists()
    assert f":{UDP_PORT} " not in ns.run("ss", "-H", "-uln") + " "
    if pid is not None:
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"wireguard-go (pid {pid}) outlived punchtrio up"


def _handshake_time(ns: Namespace, ifname: str) -> int:
    line = wg_show(ns, ifname, "latest-handshakes").strip()
    return int(line.split()[-1]) if line else 0


def _backend_config(tmp_path: Path, private: str, peer_public: str) -> Path:
    return write_config(
        tmp_path / "a.conf",
        private_key=private,
        addresses=[f"{OVERLAY[0]}/24"],
        peer_public=peer_public,
        allowed_ips=f"{OVERLAY[1]}/32",
        endpoint=f"{UNDERLAY[1]}:{UDP_PORT}",
        extra="MTU = 1400",
    )


def test_backend_pings_plain_wireguard_go_and_sigterm_leaves_nothing(
    pair: Pair, tmp_path: Path
) -> None:
    a_private, a_public = genkey()
    b_private, b_public = genkey()
    start_wireguard_go(
        pair.lab,
        pair.b,
        "h3wgb0",
        private_key=b_private,
        address=f"{OVERLAY[1]}/24",
        peer_public=a_public,
        allowed_ips=f"{OVERLAY[0]}/32",
    )
    config = _backend_config(tmp_path, a_private, b_public)
    peer = start_punchtrio(pair.lab, pair.a, config, "h3wga0", argv=UP_WGGO)
    up = peer.seen[-1]
    try:
        assert up["tunnel"] == "wireguard-go"
        assert up["listen_port"] == UDP_PORT
        (link,) = json.loads(pair.a.run("ip", "-j", "addr", "show", "dev", "h3wga0"))
        assert link["mtu"] == 1400
        assert (OVERLAY[0], 24) in {(x["local"], x["prefixlen"]) for x in link["addr_info"]}
        received, _ = ping(pair.a, OVERLAY[1], count=3)
        assert received == 3
        assert _handshake_time(pair.a, "h3wga0") > 0  # wg show reads wireguard-go itself
        assert _handshake_time(pair.b, "h3wgb0") > 0
        assert peer.proc.poll() is None
        peer.proc.send_signal(signal.SIGTERM)
        assert peer.proc.wait(timeout=10) == 0
    finally:
        peer.stop()
    down = [e for e in peer.seen if e["event"] == "down"]
    assert len(down) == 1
    (stats,) = down[0]["peers"]
    assert stats["rx_bytes"] > 0
    assert stats["tx_bytes"] > 0
    assert stats["last_handshake"] is not None
    assert stats["endpoint"] == f"{UNDERLAY[1]}:{UDP_PORT}"
    _assert_nothing_left(pair.a, "h3wga0", up["pid"])


def test_backend_and_userspace_tunnel_ping_each_other(pair: Pair, tmp_path: Path) -> None:
    a_private, a_public = genkey()
    b_private, b_public = genkey()
    config_a = _backend_config(tmp_path, a_private, b_public)
    config_b = write_config(
        tmp_path / "b.conf",
        private_key=b_private,
        addresses=[f"{OVERLAY[1]}/24"],
        peer_public=a_public,
        allowed_ips=f"{OVERLAY[0]}/32",
    )
    b = start_punchtrio(pair.lab, pair.b, config_b, "h3ptb1")
    try:
        a = start_punchtrio(pair.lab, pair.a, config_a, "h3wga1", argv=UP_WGGO)
        try:
            assert ping(pair.a, OVERLAY[1], count=3)[0] == 3
            assert ping(pair.b, OVERLAY[0], count=3)[0] == 3
            assert _handshake_time(pair.a, "h3wga1") > 0
        finally:
            assert a.stop() == 0
        assert ping(pair.b, OVERLAY[0], count=1)[0] == 0  # the backend's side is really gone
    finally:
        b.stop()
    _assert_nothing_left(pair.a, "h3wga1", a.seen[0]["pid"])


def test_killed_wireguard_go_is_restarted_and_the_tunnel_recovers(
    pair: Pair, tmp_path: Path
) -> None:
    a_private, a_public = genkey()
    b_private, b_public = genkey()
    start_wireguard_go(
        pair.lab,
        pair.b,
        "h3wgb2",
        private_key=b_private,
        address=f"{OVERLAY[1]}/24",
        peer_public=a_public,
        allowed_ips=f"{OVERLAY[0]}/32",
    )
    peer = start_punchtrio(
        pair.lab, pair.a, _backend_config(tmp_path, a_private, b_public), "h3wga2", argv=UP_WGGO
    )
    try:
        assert ping(pair.a, OVERLAY[1], count=2)[0] == 2
        first = peer.seen[-1]["pid"]
        os.kill(first, signal.SIGKILL)
        again = peer.wait_for("up", timeout=20)
        assert again["pid"] != first
        assert not _alive(first)
        deadline = time.monotonic() + 15
        while ping(pair.a, OVERLAY[1], count=1)[0] != 1:
            assert time.monotonic() < deadline, "the tunnel did not recover"
        assert [e["event"] for e in peer.seen].count("wireguard_go_exited") == 1
        peer.proc.send_signal(signal.SIGTERM)
        assert peer.proc.wait(timeout=10) == 0
    finally:
        peer.stop()
    _assert_nothing_left(pair.a, "h3wga2", again["pid"])


CANCEL_SCRIPT = """
import sys, trio
from punchtrio.tunnel import load_wgquick, open_wireguard_go_tunnel

async def main(config, name, delays):
    for delay in delays:
        with trio.move_on_after(delay):
            async with open_wireguard_go_tunnel(load_wgquick(config), name=name):
                print("up", flush=True)
                await trio.sleep_forever()
        print("cancelled", delay, flush=True)

trio.run(main, sys.argv[1], sys.argv[2], [float(d) for d in sys.argv[3:]])
"""


def test_cancellation_at_any_point_of_start_up_leaves_nothing(pair: Pair, tmp_path: Path) -> None:
    a_private, _ = genkey()
    _, b_public = genkey()
    config = _backend_config(tmp_path, a_private, b_public)
    delays = ["0", "0.005", "0.02", "0.05", "0.1", "0.3", "1.5"]
    result = subprocess.run(
        pair.a.exec(PYTHON, "-c", CANCEL_SCRIPT, str(config), "h3wga5", *delays),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("cancelled")] == [
        f"cancelled {float(d)}" for d in delays
    ]
    assert "up" in lines  # the longest delays reached a running tunnel
    assert lines.index("up") > 0  # and the shortest were cancelled before it
    assert not [line for line in _processes() if "h3wga5" in line]
    _assert_nothing_left(pair.a, "h3wga5", None)


def _up(ns: Namespace, config: Path, ifname: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.exec(*UP_WGGO, "--config", str(config), "--interface", ifname),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        check=False,
    )


def test_port_in_use_fails_half_way_and_leaves_nothing(pair: Pair, tmp_path: Path) -> None:
    a_private, _ = genkey()
    _, b_public = genkey()
    holder = subprocess.Popen(
        pair.a.exec(
            PYTHON,
            "-c",
            "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            f"s.bind(('0.0.0.0',{UDP_PORT}));print('bound',flush=True);sys.stdin.read()",
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "bound"
        result = _up(pair.a, _backend_config(tmp_path, a_private, b_public), "h3wga3")
        assert result.returncode == 1
        assert result.stderr == (
            "punchtrio: error: wireguard-go refused the configuration: listen port "
            f"{UDP_PORT}: Address already in use\n"
        )
        assert "h3wga3" not in _links(pair.a)
        assert not (SOCKETS / "h3wga3.sock").exists()
        assert not [line for line in _processes() if "h3wga3" in line]
    finally:
        holder.communicate(timeout=10)


def _processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith("wireguard-go")]


def test_interface_name_taken_is_one_line_and_leaves_the_other_interface(
    pair: Pair, tmp_path: Path
) -> None:
    a_private, _ = genkey()
    _, b_public = genkey()
    pair.a.run("ip", "link", "add", "h3wga4", "type", "veth", "peer", "name", "h3wga4p")
    result = _up(pair.a, _backend_config(tmp_path, a_private, b_public), "h3wga4")
    assert result.returncode == 1
    assert result.stderr == (
        "punchtrio: error: interface h3wga4 exists already: choose another --interface\n"
    )
    assert "h3wga4" in _links(pair.a)  # not ours: left alone
    assert not (SOCKETS / "h3wga4.sock").exists()


def test_missing_wireguard_go_is_one_line_with_the_fix(pair: Pair, tmp_path: Path) -> None:
    a_private, _ = genkey()
    _, b_public = genkey()
    config = _backend_config(tmp_path, a_private, b_public)
    result = subprocess.run(
        pair.a.exec("env", "PATH=/nonexistent", *UP_WGGO, "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "punchtrio: error: wireguard-go not found: install it (Debian: apt-get install "
        "wireguard-go) or use --tunnel userspace\n"
    )
    assert _links(pair.a) == ["lo", "va"]
