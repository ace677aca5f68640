"""The Debian `wg` tool against a real punchtrio userspace tunnel, through its UAPI socket.

Our tunnel (`punchtrio up --config`) runs in namespace ``a``, wireguard-go in ``b`` as its peer;
`wg show`, `wg showconf` and `wg set` talk to ``/var/run/wireguard/IFACE.sock`` as they do to
wireguard-go's. ``punchtrio status --json IFACE`` reads the same tunnel's control socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from labs.netns import Lab
from labs.wireguard import (
    OVERLAY,
    PYTHON,
    UDP_PORT,
    UNDERLAY,
    genkey,
    make_pair,
    ping,
    start_punchtrio,
    start_wireguard_go,
)

from tests.conftest import require_root_and

pytestmark = [pytest.mark.interop, pytest.mark.root]


def _wg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["wg", *args], capture_output=True, text=True, check=check, timeout=10)


def test_wg_show_showconf_and_set_work_on_our_interface(tmp_path: Path) -> None:
    require_root_and("wireguard-go", "wg", "ip", "ping")
    our_private, our_public = genkey()
    their_private, their_public = genkey()
    with Lab() as lab:
        pair = make_pair(lab)
        ours_if, theirs_if = f"{lab.prefix}pt", f"{lab.prefix}wg"
        start_wireguard_go(
            lab,
            pair.b,
            theirs_if,
            private_key=their_private,
            address=f"{OVERLAY[1]}/24",
            peer_public=our_public,
            allowed_ips=f"{OVERLAY[0]}/32",
            endpoint=f"{UNDERLAY[0]}:{UDP_PORT}",
        )
        config = tmp_path / f"{ours_if}.conf"
        config.write_text(
            f"[Interface]\nPrivateKey = {our_private}\nAddress = {OVERLAY[0]}/24\n"
            f"ListenPort = {UDP_PORT}\n[Peer]\nPublicKey = {their_public}\n"
            f"AllowedIPs = {OVERLAY[1]}/32\nEndpoint = {UNDERLAY[1]}:{UDP_PORT}\n"
        )
        os.chmod(config, 0o600)
        ours = start_punchtrio(lab, pair.a, config, ours_if)
        sock = Path("/var/run/wireguard") / f"{ours_if}.sock"
        try:
            assert ping(pair.a, OVERLAY[1], count=2)[0] >= 1
            # wg show: the interface and its peer, with a handshake and bytes both ways.
            shown = _wg("show", ours_if).stdout
            assert f"public key: {our_public}" in shown
            assert f"peer: {their_public}" in shown
            assert f"endpoint: {UNDERLAY[1]}:{UDP_PORT}" in shown
            assert f"allowed ips: {OVERLAY[1]}/32" in shown
            assert "latest handshake:" in shown
            handshake = _wg("show", ours_if, "latest-handshakes").stdout.split()
            assert handshake[0] == their_public
            assert abs(int(handshake[1]) - time.time()) < 60
            rx, tx = map(int, _wg("show", ours_if, "transfer").stdout.split()[1:3])
            assert rx > 0
            assert tx > 0
            assert ours_if in _wg("show", "interfaces").stdout.split()
            # wg showconf: a configuration wg setconf accepts, with our private key.
            conf = _wg("showconf", ours_if).stdout
            assert f"PrivateKey = {our_private}" in conf
            assert f"ListenPort = {UDP_PORT}" in conf
            # wg set: applied to the running device; the tunnel keeps working.
            _wg("set", ours_if, "peer", their_public, "persistent-keepalive", "25")
            keepalive = _wg("show", ours_if, "persistent-keepalive").stdout.split()
            assert keepalive == [their_public, "25"]
            assert ping(pair.a, OVERLAY[1], count=2)[0] >= 1
            # Refused whole, with the errno's message: a new listen port.
            refused = _wg("set", ours_if, "listen-port", "4242", check=False)
            assert refused.returncode != 0
            assert "Operation not supported" in refused.stderr
            assert _wg("show", ours_if, "listen-port").stdout.strip() == str(UDP_PORT)
            # wg setconf with the showconf output changes nothing and keeps the session.
            saved = tmp_path / "saved.conf"
            saved.write_text(conf)
            _wg("setconf", ours_if, str(saved))
            assert ping(pair.a, OVERLAY[1], count=2)[0] >= 1
            # The control socket answers punchtrio status for the same tunnel.
            status = subprocess.run(
                [PYTHON, "-m", "punchtrio.cli", "status", "--json", ours_if],
                capture_output=True,
                text=True,
                check=True,
                timeout=20,
            )
            (peer,) = json.loads(status.stdout)["peers"]
            assert peer["public_key"] == their_public
            assert peer["connected"]
            assert peer["endpoint"] == f"{UNDERLAY[1]}:{UDP_PORT}"
            assert peer["rx_bytes"] > 0
            assert sock.exists()
            assert oct(sock.stat().st_mode & 0o777) == "0o600"
        finally:
            assert ours.stop() == 0
        assert not sock.exists()
        assert not (Path("/run/punchtrio") / f"{ours_if}.ctl").exists()
