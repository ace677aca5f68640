"""A real ``punchtrio hub`` with a state directory, killed with SIGKILL in the middle of a burst of
registrations and started again: nothing acknowledged is lost, nothing captured replays, and no
other key can take a name in the gap."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import Endpoint, HubInfo, RegisterRequest, RequestSigner
from tests.conftest import require_root_and

pytestmark = pytest.mark.interop

PEERS = 300


def _start(state: Path, log: Path, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-m", "punchtrio.cli", "hub", "--listen", f"127.0.0.1:{port}",
        "--state-dir", str(state), "--rate", "0",
    ]  # fmt: skip
    with log.open("w") as sink:
        process = subprocess.Popen(command, stderr=sink, text=True)
    for _ in range(300):
        match = re.search(r"serving (http://\S+)", log.read_text())
        if match:
            return process, match[1]
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the hub did not start within 15 s")


def _body(key: PrivateKey, port: int) -> bytes:
    request = RegisterRequest(key.public_key(), (Endpoint.parse(f"192.0.2.1:{port}"),))
    return json.dumps(request.to_json()).encode()


# Requests cut off by the kill leave httpx response streams that are only closed by the GC.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_kill_9_mid_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    require_root_and()
    state = tmp_path / "state"
    process, url = _start(state, tmp_path / "first.log")
    port = int(url.rsplit(":", 1)[1])
    keys = [PrivateKey.generate() for _ in range(PEERS)]
    acknowledged: dict[int, int] = {}  # peer -> revision the hub answered
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            hub_key = HubInfo.from_json((await http.get("/v1/hub")).json()).public_key
            signers = [RequestSigner(key, hub_key) for key in keys]
            alice = signers[0]
            body = _body(keys[0], 1)
            first = await http.put(
                "/v1/peers/p0", content=body, headers=alice.sign("PUT", "/v1/peers/p0", body)
            )
            assert first.status_code == 201
            acknowledged[0] = first.json()["revision"]
            captured_put = alice.sign("PUT", "/v1/peers/p0", body)
            captured_delete = alice.sign("DELETE", "/v1/peers/p0")

            third = trio.Event()

            async def register(number: int) -> None:
                path = f"/v1/peers/p{number}"
                content = _body(keys[number], number + 1)
                try:
                    reply = await http.put(
                        path, content=content, headers=signers[number].sign("PUT", path, content)
                    )
                except httpx.TransportError:
                    return  # cut off by the kill: not acknowledged
                if reply.status_code in (200, 201):
                    acknowledged[number] = reply.json()["revision"]
                    if len(acknowledged) >= PEERS // 3:
                        third.set()

            async with trio.open_nursery() as nursery:
                for number in range(1, PEERS):
                    nursery.start_soon(register, number)
                await third.wait()  # kill it once a third is acknowledged
                process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert 1 < len(acknowledged) < PEERS, "the kill did not land mid-burst"

        process, url = _start(state, tmp_path / "second.log", port)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            info = HubInfo.from_json((await http.get("/v1/hub")).json())
            assert info.public_key == hub_key  # the key in the state directory
            for number, revision in acknowledged.items():
                path = f"/v1/peers/p{number}"
                reply = await http.get(path, headers=signers[number].sign("GET", path))
                assert reply.status_code == 200, (number, reply.text)
                assert reply.json()["revision"] == revision
                assert reply.json()["public_key"] == keys[number].public_key().to_base64()

            replayed = await http.put("/v1/peers/p0", content=body, headers=captured_put)
            assert replayed.status_code == 401
            assert "signed before the hub started" in replayed.json()["error"]
            deleted = await http.delete("/v1/peers/p0", headers=captured_delete)
            assert deleted.status_code == 401

            squatter = RequestSigner(PrivateKey.generate(), hub_key)
            squat = _body(squatter.private_key, 9)
            taken = await http.put(
                "/v1/peers/p0", content=squat, headers=squatter.sign("PUT", "/v1/peers/p0", squat)
            )
            assert taken.status_code == 409
            still = await http.get("/v1/peers/p0", headers=alice.sign("GET", "/v1/peers/p0"))
            assert still.json()["public_key"] == keys[0].public_key().to_base64()
        key_file = state / "hub.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)
