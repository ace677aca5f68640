"""Through coturn, with real kernel NATs: pairs no punch can join connect over TURN.

The hub runs no relay of its own here; it advertises a real coturn (``turnserver`` in the hub
namespace, on the hub's alternate address, UDP and TCP) and mints coturn REST credentials for its
registered peers (``--turn URI --turn-secret-file F``). The ``punchtrio up`` processes need no
TURN flags: each allocates a relayed address (over TCP when its network drops UDP), publishes it,
and the tunnel runs relay to relay.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs.scenarios.punch_matrix import (
    TURN_PORT,
    TURN_TLS_PORT,
    run_pair,
    running_pair,
    start_coturn,
    start_hub,
)
from labs.topology import Host, NatSpec, Network, build

from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

CREDENTIAL_TTL = 60
"""Seconds the hub's TURN credentials last here (its minimum): the renewal test outlives them."""
SECRET = "lab-turn-secret-0123456789"


@pytest.fixture(scope="module")
def turn_lab() -> Iterator[tuple[Network, Path]]:
    require_root_and("ip", "nft", "conntrack", "ss", "ping", "turnserver", "wireguard-go", "wg")
    specs = ["sym", "sym", "port", NatSpec("full", block_udp=True)]
    with tempfile.TemporaryDirectory(prefix="pt-turn-") as tmp, build(specs) as net:
        work = Path(tmp)
        uris, _ = start_coturn(net, work, SECRET)
        secret_file = work / "turn.secret"
        secret_file.write_text(SECRET + "\n")
        start_hub(
            net,
            work / "hub.log",
            relay=False,
            turn=uris,
            turn_secret_file=secret_file,
            turn_ttl=CREDENTIAL_TTL,
        )
        yield net, work


def _pairs(net: Network) -> dict[str, tuple[Host, Host]]:
    sym1, sym2, port, blocked = (nat.hosts[0] for nat in net.requested)
    return {"sym/sym": (sym1, sym2), "port/sym": (port, sym2), "udp-blocked/sym": (blocked, sym1)}


@pytest.mark.parametrize("label", ["sym/sym", "port/sym", "udp-blocked/sym"])
def test_pairs_no_punch_joins_connect_through_coturn(
    turn_lab: tuple[Network, Path], label: str
) -> None:
    net, work = turn_lab
    net.flush_conntrack()
    a, b = _pairs(net)[label]
    slug = label.replace("/", "-")
    result = run_pair(net, slug, a, b, work)
    assert result.seconds is not None, f"no ping reply: {result.stderr} {result.events}"
    uri = f"turn:{net.hub.alternate_ip}:{TURN_PORT}?transport="
    for name, host in ((f"{slug}-a", a), (f"{slug}-b", b)):
        connected = result.connected(name)
        assert connected is not None, result.stderr[name]
        assert connected["path"] == "relay"
        transport = "tcp" if host.nat.block_udp else "udp"
        assert connected.get("relay") == uri + transport, connected
        assert connected["endpoint"] == f"{net.hub.alternate_ip}:{TURN_PORT}"
        assert result.returncodes[name] == 0, result.stderr[name]
        # Credentials never reach the output.
        text = " ".join(str(event) for event in result.events[name]) + result.stderr[name]
        assert SECRET not in text
        assert "password" not in text


def test_wireguard_go_relays_through_coturn(turn_lab: tuple[Network, Path]) -> None:
    # `up --tunnel wireguard-go`: TURN ChannelData is unwrapped by punchtrio and handed to
    # wireguard-go through a loopback proxy, which is the endpoint `wg show` names.
    net, work = turn_lab
    net.flush_conntrack()
    sym1, sym2, _, _ = (nat.hosts[0] for nat in net.requested)
    ifaces = (f"{net.lab.prefix}tga", f"{net.lab.prefix}tgb")
    extra = ("--tunnel", "wireguard-go")
    with running_pair(net, "tgo", sym1, sym2, work, interfaces=ifaces, extra=extra) as pair:
        assert pair.result.seconds is not None, pair.result.stderr
        connected = pair.result.connected("tgo-a")
        assert connected is not None, pair.result.stderr
        assert connected["path"] == "relay"
        assert connected.get("relay") == f"turn:{net.hub.alternate_ip}:{TURN_PORT}?transport=udp"
        shown = subprocess.run(
            sym1.ns.exec("wg", "show", ifaces[0], "endpoints"),
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout.split()[-1].startswith("127.0.0.1:"), shown.stdout
        final = sym2.ns.exec("ping", "-n", "-q", "-c", "3", "-w", "10", "10.99.0.1")
        assert subprocess.run(final, capture_output=True, check=False).returncode == 0
    for name, code in pair.result.returncodes.items():
        assert code == 0, pair.result.stderr[name]


def test_a_relayed_tunnel_outlives_its_turn_credentials(turn_lab: tuple[Network, Path]) -> None:
    # The hub's credentials last 60 s; the connector fetches new ones half-way, which makes a
    # new allocation (a new relayed address) that it publishes, and the peer follows it.
    net, work = turn_lab
    net.flush_conntrack()
    sym1, sym2, _, _ = (nat.hosts[0] for nat in net.requested)
    with running_pair(net, "renew", sym1, sym2, work) as pair:
        assert pair.result.seconds is not None, pair.result.stderr
        deadline = time.monotonic() + 2.5 * CREDENTIAL_TTL
        lost = 0
        while time.monotonic() < deadline:
            argv = sym1.ns.exec("ping", "-n", "-q", "-c", "1", "-w", "2", "10.99.0.2")
            lost += subprocess.run(argv, capture_output=True, check=False).returncode != 0
            time.sleep(3)
        # A rotation costs a few seconds at most (the peer refetches records every minute).
        assert lost <= 8, f"{lost} pings lost over {2.5 * CREDENTIAL_TTL:.0f} s"
        final = sym1.ns.exec("ping", "-n", "-q", "-c", "3", "-w", "10", "10.99.0.2")
        assert subprocess.run(final, capture_output=True, check=False).returncode == 0
    for name, code in pair.result.returncodes.items():
        assert code == 0, pair.result.stderr[name]


def test_a_network_that_drops_udp_reaches_turn_over_tls() -> None:
    """The hub advertises coturn over UDP and over TLS only (no TCP): the peer whose network
    drops UDP allocates over TLS, verifying coturn's certificate with ``--hub-ca``; the other
    allocates over UDP, and the pair pings relay to relay."""
    require_root_and("ip", "nft", "conntrack", "ss", "ping", "turnserver", "openssl")
    specs = ["sym", NatSpec("full", block_udp=True)]
    with tempfile.TemporaryDirectory(prefix="pt-turns-") as tmp, build(specs) as net:
        work = Path(tmp)
        uris, _ = start_coturn(net, work, SECRET, tls=True)
        udp, _tcp, tls = uris
        secret_file = work / "turn.secret"
        secret_file.write_text(SECRET + "\n")
        start_hub(net, work / "hub.log", relay=False, turn=[udp, tls], turn_secret_file=secret_file)
        sym, blocked = (nat.hosts[0] for nat in net.requested)
        ca = ("--hub-ca", str(work / "turn.crt"))
        with running_pair(net, "tls", blocked, sym, work, extra=ca) as pair:
            assert pair.result.seconds is not None, pair.result.stderr
            expected = {
                "tls-a": f"turns:{net.hub.alternate_ip}:{TURN_TLS_PORT}?transport=tcp",
                "tls-b": udp,
            }
            for name, relay in expected.items():
                connected = pair.result.connected(name)
                assert connected is not None, (name, pair.events[name])
                assert (connected["path"], connected.get("relay")) == ("relay", relay), connected
            assert pair.ping(3) == 3
        assert pair.result.returncodes == {"tls-a": 0, "tls-b": 0}, pair.result.stderr
