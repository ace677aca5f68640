"""The custom backend example of ``docs/rendezvous-client.md`` runs and satisfies the interface."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    Endpoint,
    PeerNotFoundError,
    PeerRecord,
    Rendezvous,
    RendezvousRefusedError,
    SignallingNotSupportedError,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "rendezvous-client.md"


def example_backend() -> Any:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (code,) = [block for block in blocks if "class StaticRendezvous" in block]
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["StaticRendezvous"]


async def test_static_backend_example(autojump_clock: trio.abc.Clock) -> None:
    static = example_backend()
    alice_key, bob_key = PrivateKey.generate().public_key(), PrivateKey.generate().public_key()
    table = {
        "alice": PeerRecord("alice", alice_key, (Endpoint.parse("192.0.2.1:51820"),), (), 1, 0),
        "bob": PeerRecord("bob", bob_key, (Endpoint.parse("192.0.2.2:51820"),), (), 1, 0),
    }
    alice = static("alice", alice_key, table)
    assert isinstance(alice, Rendezvous)
    assert (await alice.register()).name == "alice"
    with pytest.raises(RendezvousRefusedError):
        await static("alice", bob_key, table).register()
    assert (await alice.wait_for_peer("bob")).public_key == bob_key
    assert (await alice.lookup("bob")).public_key == bob_key
    with pytest.raises(PeerNotFoundError):
        await alice.lookup("carol")
    with trio.move_on_after(3600) as scope:
        await alice.wait_for_peer("carol")
    assert scope.cancelled_caught
    with pytest.raises(SignallingNotSupportedError):
        await alice.send_signal("bob", "hi")
    await alice.unregister()
    await alice.aclose()
