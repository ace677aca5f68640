"""The NAT matrix with real kernel NATs: `punchtrio hub` and two `punchtrio up --hub` per pair.

Each pair starts both `up` processes at once, pings the second one's tunnel address from the first
host through the tunnel, records the time to the first reply and the path each side reported, and
then stops both with SIGTERM, which must remove their TUN devices.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from labs.scenarios.punch_matrix import (
    MATRIX_SPECS,
    PAIRS,
    RELAY_PORT,
    PairResult,
    matrix_pairs,
    run_pair,
    running_pair,
    start_hub,
)
from labs.topology import Host, Network, build
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_root_and

pytestmark = pytest.mark.lab

EXPECTED_PATH = {
    "full/full": "direct",
    "port/port": "direct",
    "addr/sym": "direct",
    "full/sym": "direct",
    "same-nat": "lan",
    "port/sym": "relay",
    "sym/sym": "relay",
    "udp-blocked/full": "relay",
}
RELAY_TRANSPORT = {"port/sym": "hub/udp", "sym/sym": "hub/udp", "udp-blocked/full": "hub/tcp"}
BIRTHDAY_DIRECT = {"port/sym"}  # relayed first, direct once the birthday attempt hits
TIMES: dict[str, tuple[float | None, str | None, str | None]] = {}


@pytest.fixture(scope="module")
def matrix() -> Iterator[tuple[Network, dict[str, tuple[Host, Host]], Path]]:
    require_root_and("ip", "nft", "conntrack", "sysctl", "ss", "ping")
    with tempfile.TemporaryDirectory(prefix="pt-punch-") as tmp, build(MATRIX_SPECS) as net:
        start_hub(net, Path(tmp) / "hub.log")
        yield net, matrix_pairs(net), Path(tmp)
    for label, (seconds, a, b) in TIMES.items():
        took = "no reply" if seconds is None else f"{seconds:.2f} s"
        print(f"punch matrix: {label}: paths {a}/{b}, first ping after {took}")


def _tun_devices(host: Host) -> str:
    return host.ns.run("ip", "-o", "link", "show", "type", "tun")


@pytest.mark.parametrize("label", PAIRS)
def test_pair_pings_through_the_tunnel(
    matrix: tuple[Network, dict[str, tuple[Host, Host]], Path], label: str
) -> None:
    require_root_and("ip", "nft", "conntrack", "ping")
    net, pairs, workdir = matrix
    a, b = pairs[label]
    net.flush_conntrack()
    slug = label.replace("/", "-")
    result: PairResult = run_pair(net, slug, a, b, workdir)
    name_a, name_b = f"{slug}-a", f"{slug}-b"
    TIMES[label] = (result.seconds, result.path(name_a), result.path(name_b))
    assert result.seconds is not None, f"no ping reply: {result.stderr} {result.events}"
    for name, peer in ((name_a, name_b), (name_b, name_a)):
        connected = result.connected(name)
        assert connected is not None, f"{name} printed no peer_connected: {result.stderr[name]}"
        assert connected["peer"] == peer
        assert isinstance(connected["elapsed_ms"], float)
        assert result.returncodes[name] == 0, result.stderr[name]
        assert result.events[name][-1]["event"] == "down"
    if label == "same-nat":
        # Both sides talk over the shared LAN, never through the NAT (it does not hairpin).
        lan = a.nat.lan_net
        for name in (name_a, name_b):
            endpoint = str(result.connected(name)["endpoint"])  # type: ignore[index]
            assert ipaddress.ip_address(endpoint.rsplit(":", 1)[0]) in lan
        # Each side names the path by what it is, however it first learnt the address (a
        # peer-reflexive ping from the other often arrives before that side's own start).
        assert result.path(name_a) == result.path(name_b) == "lan"
    elif EXPECTED_PATH[label] == "relay":
        # The first path goes through the hub's relay, named in the event. Birthday punching
        # finds port/sym a direct path a moment later (tests/lab/test_hard_nat_lab.py follows
        # the upgrade); should it win the race on a side, that side's first path is direct.
        relayed = [name for name in (name_a, name_b) if result.path(name) == "relay"]
        first = {result.path(name) for name in (name_a, name_b)} - {"relay"}
        assert first <= ({"direct"} if label in BIRTHDAY_DIRECT else set()), first
        transports = {result.connected(name)["relay"] for name in relayed}  # type: ignore[index]
        if label == "udp-blocked/full":
            # The blocked side can only use TCP; the other side binds over UDP.
            assert transports == {"hub/tcp", "hub/udp"}, transports
        else:
            assert transports <= {RELAY_TRANSPORT[label]}, transports
        for name in relayed:
            assert result.connected(name)["endpoint"] in (  # type: ignore[index]
                f"203.0.113.1:{RELAY_PORT}",
            )
    else:
        assert result.path(name_a) == result.path(name_b) == EXPECTED_PATH[label]
        for host, name in ((b, name_a), (a, name_b)):
            endpoint = str(result.connected(name)["endpoint"])  # type: ignore[index]
            assert endpoint.startswith(host.nat.public_ip + ":")
    assert _tun_devices(a) == _tun_devices(b) == ""


def _scrape(host: Host) -> dict[str, float]:
    """The metrics of the ``up`` in ``host``'s namespace (its own loopback), parsed by
    prometheus-client: ``{'name{label="value"}': value}``, labels sorted."""
    fetch = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    argv = host.ns.exec(sys.executable, "-c", fetch, "http://127.0.0.1:9586/metrics")
    text = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            parsed[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return parsed


def test_up_serves_metrics_that_follow_the_traffic_and_logs_no_key(
    matrix: tuple[Network, dict[str, tuple[Host, Host]], Path],
) -> None:
    """A real ``punchtrio up -v --metrics 127.0.0.1:9586`` pair: the per-peer counters grow with
    a ping through the tunnel; neither side's debug log or events show its private key."""
    require_root_and("ip", "nft", "conntrack", "ping")
    net, pairs, workdir = matrix
    a, b = pairs["full/full"]
    net.flush_conntrack()
    extra = ("--metrics", "127.0.0.1:9586", "-v")
    with running_pair(net, "metrics", a, b, workdir, extra=extra) as live:
        assert live.result.seconds is not None, live.result.stderr
        first = _scrape(a)
        assert live.ping(5) >= 4
        later = _scrape(a)
    peer = 'peer="metrics-b"'
    assert first[f"punchtrio_peer_connected{{{peer}}}"] == 1
    assert first[f'punchtrio_peer_path{{path="direct",{peer}}}'] == 1
    assert first[f"punchtrio_peer_handshakes_total{{{peer}}}"] >= 1
    for counter in ("transmit_packets", "receive_packets"):
        name = f"punchtrio_peer_{counter}_total{{{peer}}}"
        assert later[name] >= first[name] + 4, (counter, first[name], later[name])
    name = f"punchtrio_peer_receive_bytes_total{{{peer}}}"
    assert later[name] >= first[name] + 4 * 84  # 4 replies of 84-byte IP packets, at least
    for name in live.names:
        assert live.result.returncodes[name] == 0, live.result.stderr[name]
        assert "debug:" in live.result.stderr[name]  # -v reached the logging
        key = (workdir / f"{name}.key").read_text().strip()
        events = json.dumps(live.result.events[name])
        assert key not in live.result.stderr[name]
        assert key not in events


def _demo_namespaces() -> set[str]:
    """The namespaces of any demo lab (their names start with ``ptd``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("ptd")}


def test_the_demo_runs_the_whole_story_in_a_real_lab() -> None:
    require_root_and("ip", "nft", "conntrack", "sysctl", "ping", "ss")
    before = _demo_namespaces()
    proc = subprocess.run(
        [sys.executable, "-m", "punchtrio.cli", "demo", "--lab", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["mode"] == "lab"
    kinds = {peer["name"]: peer["kind"] for peer in report["peers"]}
    assert kinds == {"alice": "port-restricted cone", "bob": "full cone"}
    assert [peer["path"] for peer in report["peers"]] == ["direct", "direct"]
    assert report["time_to_tunnel_s"] > 0
    assert report["ping_rtt_ms"] > 0
    assert report["transfer_bytes"] == 32 * 1024 * 1024
    assert report["throughput_mbit_s"] > 0
    # Act 2: a firewall between dave's and erin's NATs: relayed, then direct once it opens.
    act = report["relay_act"]
    assert act["paths"] == {"dave": "relay", "erin": "relay"}
    assert act["relay"] == {"dave": "hub/udp", "erin": "hub/udp"}
    assert act["upgraded_to"] == {"dave": "direct", "erin": "direct"}
    assert 0 < act["upgrade_s"] < 60
    assert _demo_namespaces() <= before  # every namespace the demo made is gone
