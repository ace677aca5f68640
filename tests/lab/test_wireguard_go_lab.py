"""`punchtrio up --tunnel wireguard-go` behind a real port-restricted cone NAT of the kernel lab.

The backend runs on a host behind the NAT with a wg-quick file naming a public peer (punchtrio's
userspace tunnel in the lab's public namespace, which has no endpoint for us and learns the NAT's
mapping from our handshake). A persistent keepalive holds the mapping; pings go both ways, and the
public side's ``wg show`` shows the handshake from the NAT's public address.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
from labs.topology import build
from labs.wireguard import PYTHON, genkey, ping, start_punchtrio, wg_show, write_config

from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

BINARIES = ("ip", "nft", "conntrack", "sysctl", "ping", "wireguard-go", "wg")
PORT = 51820


def test_backend_behind_a_nat_reaches_a_public_peer_both_ways() -> None:
    require_root_and(*BINARIES)
    (a_private, a_public), (b_private, b_public) = genkey(), genkey()
    with tempfile.TemporaryDirectory(prefix="pt-wggo-") as tmp, build(["port"]) as net:
        host = net.requested[0].hosts[0]
        nat = net.requested[0]
        behind = write_config(
            Path(tmp) / "a.conf",
            private_key=a_private,
            addresses=["10.77.0.1/24"],
            peer_public=b_public,
            allowed_ips="10.77.0.2/32",
            endpoint=f"{net.hub.primary_ip}:{PORT}",
            listen_port=PORT,
            extra="",
        )
        with behind.open("a") as f:
            f.write("PersistentKeepalive = 5\n")
        public = write_config(
            Path(tmp) / "b.conf",
            private_key=b_private,
            addresses=["10.77.0.2/24"],
            peer_public=a_public,
            allowed_ips="10.77.0.1/32",
            listen_port=PORT,
        )
        ifa, ifb = f"{net.lab.prefix}ga", f"{net.lab.prefix}gb"
        b = start_punchtrio(net.lab, net.hub.ns, public, ifb)
        argv = [PYTHON, "-m", "punchtrio.cli", "up", "--tunnel", "wireguard-go"]
        a = start_punchtrio(net.lab, host.ns, behind, ifa, argv=argv)
        try:
            assert ping(host.ns, "10.77.0.2", count=3)[0] == 3
            # the public side never had our address: it learnt the NAT's mapping
            endpoint = wg_show(net.hub.ns, ifb, "endpoints").split()[-1]
            assert endpoint.startswith(f"{nat.public_ip}:")
            deadline = time.monotonic() + 10
            while ping(net.hub.ns, "10.77.0.1", count=1)[0] != 1:
                assert time.monotonic() < deadline, "the public side cannot reach us"
            handshake = int(wg_show(host.ns, ifa, "latest-handshakes").split()[-1])
            assert handshake > 0
        finally:
            assert a.stop() == 0
            b.stop()
        assert ifa not in host.ns.run("ip", "-o", "link", "show")
        assert not Path(f"/var/run/wireguard/{ifa}.sock").exists()
