"""A third-party tunnel backend plugs into `punchtrio up --tunnel NAME` through an entry point.

The backend below lives in a package made in a temporary directory (its code and a
``.dist-info`` with ``entry_points.txt``), found only through ``PYTHONPATH``: nothing in
punchtrio names it. It is a stand-in that needs no root: a UDP socket that counts what arrives
as the first peer's received bytes, so the test can see the data reach it and `up` report its
statistics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from punchtrio.tunnel import (
    ENTRY_POINT_GROUP,
    Tunnel,
    TunnelError,
    load_tunnel_backend,
    parse_wgquick,
    tunnel_backend_names,
)

ROOT = Path(__file__).resolve().parents[2]

BACKEND = '''
"""A stand-in tunnel backend: one UDP socket whose datagrams count as the first peer's rx bytes."""
import contextlib
import socket

import trio

from punchtrio.wireguard import PeerStats


class CountingTunnel:
    def __init__(self, name, sock, peers):
        self._name, self._sock, self._peers, self.received = name, sock, peers, 0

    @property
    def name(self):
        return self._name

    @property
    def listen_port(self):
        return self._sock.getsockname()[1]

    def peer_stats(self):
        return {
            key: PeerStats(key, None, self.received if i == 0 else 0, 0, None, 0, False)
            for i, key in enumerate(self._peers)
        }


@contextlib.asynccontextmanager
async def open_counting_tunnel(config, *, name):
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", config.interface.listen_port or 0))
    tunnel = CountingTunnel(name or "count0", sock, [p.public_key for p in config.peers])

    async def count():
        while True:
            tunnel.received += len(await sock.recv(65536))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count)
            yield tunnel
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
'''

KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PEER = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
CONFIG = f"""[Interface]
PrivateKey = {KEY}
ListenPort = 0

[Peer]
PublicKey = {PEER}
AllowedIPs = 10.9.0.2/32
"""


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Path]:
    """A package ``h3counting`` registering backend ``counting``; its directory on sys.path."""
    (tmp_path / "h3counting.py").write_text(BACKEND)
    info = tmp_path / "h3counting-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: h3counting\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ncounting = h3counting:open_counting_tunnel\n"
        "broken = h3counting_missing:open\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("h3counting", None)


def test_registered_backends_are_listed_after_the_built_in_ones(plugin: Path) -> None:
    assert tunnel_backend_names() == ("userspace", "wireguard-go", "broken", "counting")


async def test_a_registered_backend_opens_a_tunnel_and_closes_it(plugin: Path) -> None:
    backend = load_tunnel_backend("counting")
    async with backend(parse_wgquick(CONFIG), name="ct0") as tunnel:
        checked: Tunnel = tunnel  # the protocol is what punchtrio relies on
        assert checked.name == "ct0"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x" * 100, ("127.0.0.1", tunnel.listen_port))
        # a loopback datagram is queued before sendto returns; let the backend's reader run
        await trio.testing.wait_all_tasks_blocked()
        assert [s.rx_bytes for s in tunnel.peer_stats().values()] == [100]
        port = tunnel.listen_port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))  # the backend released its port


def test_unknown_and_broken_backends_raise_one_clear_error(plugin: Path) -> None:
    with pytest.raises(TunnelError, match=r"^unknown tunnel backend 'nope': choose one of user"):
        load_tunnel_backend("nope")
    with pytest.raises(
        TunnelError,
        match=r"^tunnel backend broken \(h3counting_missing:open\) cannot be loaded: "
        "ModuleNotFoundError",
    ):
        load_tunnel_backend("broken")


def _up(plugin: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT / "src")])}
    return subprocess.Popen(
        [sys.executable, "-m", "punchtrio.cli", "up", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(plugin),
    )


def test_up_runs_a_registered_backend_and_reports_its_stats(plugin: Path) -> None:
    config = plugin / "ct1.conf"
    config.write_text(CONFIG)
    proc = _up(plugin, "--config", str(config), "--tunnel", "counting", "--json")
    try:
        assert proc.stdout is not None
        up = json.loads(proc.stdout.readline())
        assert (up["event"], up["interface"], up["tunnel"]) == ("up", "ct1", "counting")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"y" * 321, ("127.0.0.1", up["listen_port"]))
        time.sleep(0.5)  # a real process: give its reader task a moment before the signal
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    (down,) = [json.loads(line) for line in out.splitlines()]
    assert down["event"] == "down"
    (stats,) = down["peers"]
    assert stats["rx_bytes"] == 321


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (
            ["--tunnel", "nope"],
            2,
            "punchtrio: error: --tunnel 'nope' is not a tunnel backend: choose one of "
            "userspace, wireguard-go, broken, counting\n",
        ),
        (
            ["--tunnel", "broken"],
            1,
            "punchtrio: error: tunnel backend broken (h3counting_missing:open) cannot be loaded: "
            "ModuleNotFoundError: No module named 'h3counting_missing'\n",
        ),
        (
            ["--tunnel", "counting", "--hub", "http://127.0.0.1:9", "--name", "a"],
            2,
            "punchtrio: error: --tunnel counting works with a wg-quick --config FILE only, "
            "not with --hub: with the hub, punchtrio steers WireGuard between its own UDP port "
            "and the tunnel, which only the userspace and wireguard-go backends support (see "
            "docs/tunnel.md)\n",
        ),
        (
            ["--tunnel", "wireguard-go", "--hub", "http://127.0.0.1:9", "--name", "a", "--config"],
            2,
            "punchtrio: error: --tunnel wireguard-go takes --hub or --config FILE, not both: a "
            "wg-quick file's static peers are added with --hub on the userspace tunnel only\n",
        ),
    ],
)
def test_bad_backend_choices_are_one_line(
    plugin: Path, args: list[str], status: int, message: str
) -> None:
    config = plugin / "ct2.conf"
    config.write_text(CONFIG)
    extra = [] if "--hub" in args else ["--config", str(config)]
    if args[-1] == "--config":
        args = [*args, str(config)]
    proc = _up(plugin, *extra, *args)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err, out) == (status, message, "")
