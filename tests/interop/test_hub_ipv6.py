"""The real hub on both families: ``punchtrio hub --listen 127.0.0.1:0 --listen [::1]:0`` with
STUN on both, reached by HubClient and by STUN over each; and ``punchtrio nat``'s IPv6 inbound
test against our STUN server with an IPv6 alternate address, in a network namespace."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from labs.netns import Lab, Namespace

from punchtrio import PrivateKey, format_endpoint
from punchtrio.rendezvous import Endpoint, HubClient, HubInfo, StunAddress
from punchtrio.stun import StunNoAlternateError, discover_ipv6, discover_nat
from tests.conftest import require_root_and

pytestmark = pytest.mark.interop

PUNCHTRIO = [sys.executable, "-m", "punchtrio.cli"]


class DualHub:
    def __init__(self, urls: list[str], stun: list[tuple[str, int]]) -> None:
        self.urls = urls
        self.stun = stun


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[DualHub]:
    require_root_and("ip")
    command = [
        *PUNCHTRIO, "hub", "--store", "memory", "--rate", "0",
        "--listen", "127.0.0.1:0", "--listen", "[::1]:0",
        "--stun", "127.0.0.1:0", "--stun", "[::1]:0",
    ]  # fmt: skip
    log = tmp_path / "hub.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stderr=sink, text=True)
    try:
        urls: list[str] = []
        stun: list[tuple[str, int]] = []
        for _ in range(300):
            text = log.read_text()
            urls = re.findall(r"serving (http://\S+)", text)
            stun = [(ip, int(port)) for ip, port in re.findall(r"STUN on (\S+) port (\d+)", text)]
            if len(urls) == 2 and len(stun) == 2:
                break
            assert process.poll() is None, f"the hub exited early: {text}"
            time.sleep(0.05)
        assert len(urls) == 2, f"the hub did not listen on both families within 15 s: {text}"
        yield DualHub(urls, stun)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(10) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def test_hub_client_and_stun_over_each_family(hub: DualHub) -> None:
    assert [url.rsplit(":", 1)[0] for url in hub.urls] == ["http://127.0.0.1", "http://[::1]"]
    assert [ip for ip, _ in hub.stun] == ["127.0.0.1", "::1"]
    async with httpx.AsyncClient(base_url=hub.urls[1], timeout=10) as http:
        info = HubInfo.from_json((await http.get("/v1/hub")).json())
    assert info.stun == (
        StunAddress(None, hub.stun[0][1], family=4),
        StunAddress(None, hub.stun[1][1], family=6),
    )
    ipv4_url, ipv6_url = hub.urls
    async with HubClient(ipv4_url, PrivateKey.generate(), "alice", watch=False) as alice:
        await alice.register([Endpoint.parse("192.0.2.7:51820")])
        async with HubClient(ipv6_url, PrivateKey.generate(), "bob", watch=False) as bob:
            await bob.register([Endpoint.parse("[2001:db8::7]:51820")])
            # Each finds the other, registered over the other family.
            found = await bob.lookup("alice")
            assert [e.address for e in found.endpoints] == ["192.0.2.7:51820"]
            found = await alice.lookup("bob")
            assert [e.address for e in found.endpoints] == ["[2001:db8::7]:51820"]
    # STUN over each family: the reflexive address is our own (no NAT on loopback).
    v6 = await discover_ipv6(hub.stun[1], probe_timeout=3)
    assert v6.tested, v6.reason
    assert v6.public_endpoint is not None
    assert v6.public_endpoint[0] == "::1"
    assert v6.translation == "none"
    # Over IPv4 the server answers (mapping test I passes); it has no alternate address to go on.
    with pytest.raises(StunNoAlternateError, match=r"STUN server 127\.0\.0\.1:\d+ has no alt"):
        await discover_nat(hub.stun[0], probe_timeout=2)


def _ipv6_stun_lab(lab: Lab) -> Namespace:
    ns = lab.namespace("v6")
    for address in ("2001:db8::1/128", "2001:db8::2/128"):
        ns.run("ip", "-6", "addr", "add", address, "dev", "lo", "nodad")
    lab.spawn(
        ns,
        *PUNCHTRIO, "stun-server", "--primary", "[2001:db8::1]:3478",
        "--alternate", "[2001:db8::2]:3479", "--rate", "0",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while "[2001:db8::2]:3479" not in ns.run("ss", "-H", "-uln"):
        assert time.monotonic() < deadline, "the STUN server did not listen within 15 s"
        time.sleep(0.05)
    return ns


def _nat(ns: Namespace) -> dict[str, object]:
    done = ns.run(*PUNCHTRIO, "nat", "--stun", "[2001:db8::1]:3478", "--json", "--timeout", "2")
    report = json.loads(done)
    ipv6 = report["ipv6"]
    assert isinstance(ipv6, dict)
    return ipv6


def test_nat_tests_ipv6_inbound_with_an_alternate_address() -> None:
    require_root_and("ip", "ss", "nft")
    with Lab() as lab:
        ns = _ipv6_stun_lab(lab)
        open_path = _nat(ns)
        assert open_path["tested"] is True, open_path
        assert open_path["translation"] == "none"
        assert open_path["filtering"] == "endpoint-independent"
        assert open_path["unsolicited_inbound"] is True
        assert str(open_path["public_endpoint"]).startswith("[2001:db8::1]:")
        # A firewall that drops what comes from the alternate IP: inbound from an address we
        # never sent to no longer gets in.
        ns.run(
            "nft",
            "add table ip6 f; add chain ip6 f in { type filter hook input priority 0; }; "
            "add rule ip6 f in ip6 saddr 2001:db8::2 drop",
        )
        filtered = _nat(ns)
        assert filtered["filtering"] == "address-dependent", filtered
        assert filtered["unsolicited_inbound"] is False
        assert format_endpoint(("2001:db8::1", 3478)) == filtered["server"]
