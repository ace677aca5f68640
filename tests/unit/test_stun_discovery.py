"""RFC 5780 discovery against our server on loopback, plain and behind simulated NAT behaviours."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import trio

from punchtrio.stun import (
    ChangeRequest,
    NatDiscoveryError,
    Reply,
    ResponsePort,
    StunAlternateNoResponseError,
    StunNoAlternateError,
    StunNoResponseError,
    StunResponder,
    StunServer,
    StunUnreachableError,
    classify_filtering,
    classify_mapping,
    discover_nat,
    format_endpoint,
    parse_endpoint,
    parse_message,
)

CLI = [sys.executable, "-m", "punchtrio.cli"]
LOCAL = ("10.0.0.2", 5000)
M1 = ("198.51.100.1", 40000)
M2 = ("198.51.100.1", 40001)


def test_classify_mapping() -> None:
    assert classify_mapping(LOCAL, LOCAL, None, None) == "none"
    assert classify_mapping(LOCAL, M1, M1, None) == "endpoint-independent"
    assert classify_mapping(LOCAL, M1, M2, M2) == "address-dependent"
    assert classify_mapping(LOCAL, M1, M2, ("198.51.100.1", 40002)) == "address-and-port-dependent"


def test_classify_filtering() -> None:
    assert classify_filtering(True, True) == "endpoint-independent"
    assert classify_filtering(True, False) == "endpoint-independent"
    assert classify_filtering(False, True) == "address-dependent"
    assert classify_filtering(False, False) == "address-and-port-dependent"


def test_endpoint_text() -> None:
    assert parse_endpoint("stun.example:3478") == ("stun.example", 3478)
    assert parse_endpoint("[2001:db8::1]:3478") == ("2001:db8::1", 3478)
    assert format_endpoint(("2001:db8::1", 3478)) == "[2001:db8::1]:3478"
    for bad in ("host", ":3478", "host:port", "host:70000", "2001:db8::1:3478"):
        with pytest.raises(ValueError, match=r"HOST:PORT|port|brackets"):
            parse_endpoint(bad)


async def test_no_nat_on_loopback() -> None:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0), rate=None)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(server.serve)
        report = await discover_nat(endpoints[0], probe_timeout=2.0)
        nursery.cancel_scope.cancel()
    # RFC 5780 4.3: a mapped address equal to the local one means there is no NAT.
    assert report.mapping == "none"
    assert report.public_endpoint == report.local_endpoint
    assert report.filtering == "endpoint-independent"
    assert report.hairpinning is None
    assert report.port_preservation is True
    assert report.other_address == endpoints[3]
    assert report.to_json()["public_endpoint"] == format_endpoint(report.local_endpoint)


class FakeNat(StunResponder):
    """Our responder, pretending the client sits behind a NAT with the given behaviours.

    Mapped ports are shifted per server endpoint as the mapping behaviour dictates; replies to
    change requests are dropped as the filtering behaviour dictates; the alternate IP can be silent.
    """

    def __init__(self, mapping: str, filtering: str, *, silent_alternate: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), ("127.0.0.2", 0), rate=None)
        self.mapping, self.filtering, self.silent_alternate = mapping, filtering, silent_alternate

    def handle(
        self, data: bytes, local: tuple[str, int], remote: tuple[str, int], now: float
    ) -> Reply | None:
        if self.silent_alternate and local[0] == "127.0.0.2":
            return None
        change = parse_message(data).get(ChangeRequest)
        if change is not None:
            if change.change_ip and self.filtering != "endpoint-independent":
                return None
            if change.change_port and self.filtering == "address-and-port-dependent":
                return None
        index = self.local_endpoints.index(local)
        shift = {
            "endpoint-independent": 0,
            "address-dependent": index // 2,
            "address-and-port-dependent": index,
        }[self.mapping]
        mapped = (remote[0], 20000 + (remote[1] + shift) % 40000)
        reply = super().handle(data, local, mapped, now)
        return None if reply is None else replace(reply, destination=remote)


@pytest.mark.parametrize(
    ("mapping", "filtering"),
    [
        ("endpoint-independent", "endpoint-independent"),
        ("endpoint-independent", "address-dependent"),
        ("address-dependent", "address-and-port-dependent"),
        ("address-and-port-dependent", "address-and-port-dependent"),
    ],
)
async def test_discovery_against_simulated_nats(mapping: str, filtering: str) -> None:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0))
    server.responder = FakeNat(mapping, filtering)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(server.serve)
        report = await discover_nat(f"127.0.0.1:{endpoints[0][1]}", probe_timeout=0.6)
        nursery.cancel_scope.cancel()
    assert (report.mapping, report.filtering) == (mapping, filtering)
    assert report.public_endpoint != report.local_endpoint
    assert report.port_preservation is False
    # Nothing listens on the pretended public port, so nothing hairpins.
    assert report.hairpinning is False


class ExpiringMapping(StunResponder):
    """Our responder, pretending the NAT forgets a mapping after ``expiry`` idle seconds.

    A RESPONSE-PORT probe is how the lifetime test reaches the mapping from outside; each one that
    gets through refreshes the mapping, as a packet through a real NAT does.
    """

    def __init__(self, expiry: float | None) -> None:
        super().__init__(("127.0.0.1", 0), ("127.0.0.2", 0), rate=None)
        self.expiry = expiry
        self.last: float | None = None

    def handle(
        self, data: bytes, local: tuple[str, int], remote: tuple[str, int], now: float
    ) -> Reply | None:
        if parse_message(data).get(ResponsePort) is not None:
            if self.expiry is not None and self.last is not None and now - self.last > self.expiry:
                return None
            self.last = now
        return super().handle(data, local, remote, now)


@pytest.mark.parametrize(("expiry", "expected"), [(15.0, (10.0, 20.0)), (None, (20.0, None))])
async def test_mapping_lifetime(
    autojump_clock: trio.testing.MockClock,
    expiry: float | None,
    expected: tuple[float, float | None],
) -> None:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0))
    server.responder = ExpiringMapping(expiry)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(server.serve)
        # Half a minute allows the 10 s and 20 s idle periods.
        report = await discover_nat(endpoints[0], probe_timeout=2.0, lifetime=0.5)
        nursery.cancel_scope.cancel()
    assert report.mapping_lifetime == expected
    assert report.to_json()["mapping_lifetime"] == {
        "at_least_s": expected[0],
        "less_than_s": expected[1],
    }


async def test_silent_alternate_address() -> None:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0))
    server.responder = FakeNat(
        "endpoint-independent", "endpoint-independent", silent_alternate=True
    )
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(server.serve)
        with pytest.raises(StunAlternateNoResponseError, match=r"alternate address 127\.0\.0\.2"):
            await discover_nat(endpoints[0], probe_timeout=0.5)
        nursery.cancel_scope.cancel()


async def test_server_without_alternate_address() -> None:
    server = StunServer(("127.0.0.1", 0), rate=None)
    async with trio.open_nursery() as nursery:
        (primary,) = await nursery.start(server.serve)
        with pytest.raises(StunNoAlternateError, match="no alternate address"):
            await discover_nat(primary, probe_timeout=2.0)
        nursery.cancel_scope.cancel()


async def test_unreachable_server() -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
    with pytest.raises(StunUnreachableError, match="unreachable"):
        await discover_nat(closed, probe_timeout=2.0)


async def test_silent_server_means_udp_blocked(autojump_clock: trio.testing.MockClock) -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as swallower:
        swallower.bind(("127.0.0.1", 0))
        with pytest.raises(StunNoResponseError, match="UDP is blocked"):
            await discover_nat(swallower.getsockname(), probe_timeout=5.0)


async def test_bad_server_text() -> None:
    with pytest.raises(NatDiscoveryError, match="HOST:PORT"):
        await discover_nat("no-port-here")


# --- the command line, as a separate process -------------------------------------------------------


async def test_cli_nat_json_and_exit_codes() -> None:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0), rate=None)
    single = StunServer(("127.0.0.1", 0), rate=None)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(server.serve)
        (lone,) = await nursery.start(single.serve)
        done = await trio.run_process(
            [*CLI, "nat", "--stun", format_endpoint(endpoints[0]), "--json"],
            capture_stdout=True,
            capture_stderr=True,
        )
        report = json.loads(done.stdout)
        assert report["mapping"] == "none"
        assert report["filtering"] == "endpoint-independent"
        assert report["hairpinning"] is None
        assert report["port_preservation"] is True
        assert report["public_endpoint"].startswith("127.0.0.1:")

        text = await trio.run_process(
            [*CLI, "nat", "--stun", format_endpoint(endpoints[0])], capture_stdout=True
        )
        assert b"mapping:           none" in text.stdout

        failed = await trio.run_process(
            [*CLI, "nat", "--stun", format_endpoint(lone), "--timeout", "2"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert failed.returncode == 5
        lines = failed.stderr.decode().strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("punchtrio: error: STUN server 127.0.0.1:")
        nursery.cancel_scope.cancel()

    usage = await trio.run_process(
        [*CLI, "nat", "--stun", "nowhere"], capture_stderr=True, check=False
    )
    assert usage.returncode == 2


def test_cli_stun_server_runs_until_sigterm() -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [*CLI, "stun-server", "--primary", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"stun-server: listening on 127.0.0.1:{port}"
        with socket.socket(type=socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            request = bytes.fromhex("000100002112a442") + bytes(range(12))
            client.sendto(request, ("127.0.0.1", port))
            data, _ = client.recvfrom(2048)
        assert parse_message(data).transaction_id == int.from_bytes(bytes(range(12)), "big")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "1 received, 1 answered" in err
    assert "Traceback" not in err


def test_cli_stun_server_rejects_bad_addresses() -> None:
    bad = subprocess.run(
        [*CLI, "stun-server", "--primary", "127.0.0.1:3478", "--alternate", "127.0.0.1:3479"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 3
    assert bad.stderr.startswith("punchtrio: error: the alternate address must differ")
    name = subprocess.run(
        [*CLI, "stun-server", "--primary", "localhost:3478"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert name.returncode == 2
