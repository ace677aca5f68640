"""The client side against a real ``punchtrio hub`` process on loopback (Hypercorn, real sockets):
the operator commands, and a hub killed and restarted while a client waits."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import Backoff, Endpoint, EndpointType, HubClient, PeerNotFoundError

pytestmark = pytest.mark.interop

PUNCHTRIO = [sys.executable, "-m", "punchtrio.cli"]
EP_A = Endpoint.parse("198.51.100.7:51820", EndpointType.SRFLX)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class HubProcess:
    """``punchtrio hub`` on 127.0.0.1:``port``; a fresh key at every start, as after a crash."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *PUNCHTRIO,
                "hub",
                "--store",
                "memory",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--ttl",
                "60",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(200):
            if self.process.poll() is not None:
                assert self.process.stderr is not None
                pytest.fail(f"punchtrio hub exited: {self.process.stderr.read().decode()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail("punchtrio hub did not answer /healthz within 10 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


@pytest.fixture
def hub() -> Iterator[HubProcess]:
    process = HubProcess(free_port())
    process.start()
    try:
        yield process
    finally:
        process.kill()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PUNCHTRIO, *args], capture_output=True, text=True, timeout=60, check=False
    )


def key_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.key"
    PrivateKey.generate().write(path)
    return path


def test_register_and_lookup_through_the_cli(hub: HubProcess, tmp_path: Path) -> None:
    alice, mallory = key_file(tmp_path, "alice"), key_file(tmp_path, "mallory")
    done = cli(
        "register", "--hub", hub.url, "--name", "alice", "--key-file", str(alice),
        "--endpoint", "srflx:198.51.100.7:51820", "--endpoint", "192.168.1.5:51820",
        "--allowed-ip", "10.0.0.1/32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stored = json.loads(done.stdout)
    public = PrivateKey.from_file(alice).public_key().to_base64()
    assert stored["public_key"] == public
    assert stored["endpoints"] == [
        {"type": "srflx", "address": "198.51.100.7:51820"},
        {"type": "host", "address": "192.168.1.5:51820"},
    ]

    found = cli("lookup", "--hub", hub.url, "--name", "alice", "--key-file", str(mallory))
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["revision"] == stored["revision"]

    hijack = cli(
        "register", "--hub", hub.url, "--name", "alice", "--key-file", str(mallory),
        "--endpoint", "203.0.113.66:1",
    )  # fmt: skip
    assert hijack.returncode == 4
    assert hijack.stderr.strip() == "punchtrio: error: name is registered to another key"
    assert hijack.stdout == ""

    missing = cli("lookup", "--hub", hub.url, "--name", "bob", "--key-file", str(mallory))
    assert missing.returncode == 3
    assert missing.stderr.strip() == "punchtrio: error: no such peer: bob"


async def test_hub_killed_and_restarted_while_a_client_waits(
    hub: HubProcess, tmp_path: Path
) -> None:
    bob_key = key_file(tmp_path, "bob")
    result: list[Any] = []
    with trio.fail_after(120):
        async with HubClient(
            hub.url, PrivateKey.generate(), "alice", backoff=Backoff(0.2, 2.0), wait=20
        ) as alice:
            await alice.register([EP_A], ["10.0.0.1/32"])

            async def wait() -> None:
                result.append(await alice.wait_for_peer("bob"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.sleep(1)
                hub.kill()
                await trio.sleep(2)  # the wait's connection is gone; alice retries
                await trio.to_thread.run_sync(hub.start)  # an empty hub with a new key
                observer = HubClient(hub.url, PrivateKey.generate(), "observer")
                while True:  # alice registers again by herself
                    try:
                        found = await observer.lookup("alice")
                        break
                    except PeerNotFoundError:
                        await trio.sleep(0.2)
                await observer.aclose()
                assert found.public_key == alice.public_key
                assert result == []
                done = await trio.run_process(
                    [*PUNCHTRIO, "register", "--hub", hub.url, "--name", "bob",
                     "--key-file", str(bob_key), "--endpoint", "203.0.113.9:40000"],
                    capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
    assert result[0].public_key == PrivateKey.from_file(bob_key).public_key()
    assert [e.address for e in result[0].endpoints] == ["203.0.113.9:40000"]
