"""The lab leaves nothing behind: namespaces, interfaces, nftables state and processes."""

from __future__ import annotations

import secrets
import subprocess

import pytest
from labs.netns import Lab, LabError, leftover_namespaces, run
from labs.topology import NatSpec, build, cleanup

from tests.conftest import require_root_and
from tests.lab.conftest import LAB_BINARIES

pytestmark = pytest.mark.lab


class _Boom(Exception):
    pass


def _root_state(prefix: str) -> tuple[list[str], str, str]:
    links = [line for line in run(["ip", "-o", "link"]).splitlines() if prefix in line]
    return links, run(["nft", "list", "ruleset"]), run(["ip", "netns", "list"])


def test_teardown_after_a_failing_body_leaves_nothing() -> None:
    require_root_and(*LAB_BINARIES)
    prefix = "pt" + secrets.token_hex(2)
    links_before, nft_before, _ = _root_state(prefix)
    nat_rules: list[str] = []
    sleepers: list[subprocess.Popen[bytes]] = []

    def failing_test_body() -> None:
        with build(["addr", NatSpec("sym", hosts=2, hairpin=True)], prefix=prefix) as net:
            sleepers.append(net.lab.spawn(net.hosts[0].ns, "sleep", "600"))
            nat_rules.extend(nat.ns.run("nft", "list", "ruleset") for nat in net.nats)
            assert len(leftover_namespaces(prefix)) == 2 + 2 + 3  # wan, hub, NATs, hosts
            raise _Boom

    with pytest.raises(_Boom):
        failing_test_body()
    assert all("table ip ptnat" in rules for rules in nat_rules)
    assert sleepers[0].poll() is not None
    assert leftover_namespaces(prefix) == []
    # nftables tables and conntrack live in the deleted namespaces; the root namespace is untouched.
    assert _root_state(prefix)[:2] == (links_before, nft_before)


def test_a_failed_build_tears_down_what_it_made() -> None:
    require_root_and(*LAB_BINARIES)
    prefix = "pt" + secrets.token_hex(2)
    squatter = f"{prefix}-nat1"
    run(["ip", "netns", "add", squatter])  # so the build fails after wan and hub exist
    try:
        with pytest.raises(LabError, match="nat1"), build(["full"], prefix=prefix):
            pytest.fail("the build should have failed")
        assert leftover_namespaces(prefix) == [squatter]
    finally:
        run(["ip", "netns", "del", squatter], check=False)


def test_cleanup_removes_leftovers_of_a_killed_run() -> None:
    require_root_and(*LAB_BINARIES)
    prefix = "pt" + secrets.token_hex(2)
    crashed = Lab(prefix=prefix)  # never closed, as if its process had been killed
    ns = crashed.namespace("nat1")
    crashed.namespace("h1")
    sleeper = subprocess.Popen(ns.exec("sleep", "600"))
    try:
        assert sorted(cleanup(prefix)) == [f"{prefix}-h1", f"{prefix}-nat1"]
        assert sleeper.wait(timeout=5) != 0
        assert leftover_namespaces(prefix) == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        crashed.close()
