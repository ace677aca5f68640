"""What `open_connector` raises and when its events end: one error of the project's own types,
never an exception group, and an event stream that ends when nothing can progress."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from punchtrio import PrivateKey, PunchtrioError
from punchtrio.connect import (
    ConnectEvent,
    MemoryInterface,
    PeerFailed,
    TunnelConfig,
    open_connector,
)
from punchtrio.rendezvous import MemoryHub
from punchtrio.tunnel import TunnelError

KEY = PrivateKey(bytes(range(1, 33)))


def _closed_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_port_in_use_is_one_tunnel_error_naming_the_fix() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken, MemoryInterface() as iface:
        taken.bind(("", 0))
        port = taken.getsockname()[1]
        hub = MemoryHub().peer("alice", KEY.public_key())
        with pytest.raises(TunnelError) as raised:
            async with open_connector(
                "alice", KEY, hub, TunnelConfig("10.99.0.1/24", listen_port=port), interface=iface
            ):
                pytest.fail("the connector ran on a port in use")
    assert isinstance(raised.value, PunchtrioError)  # not a group, not a bare OSError
    assert str(raised.value) == (
        f"UDP port {port} is already in use (another `punchtrio up` or WireGuard?): stop it "
        "or choose another port (listen_port=, --listen-port)"
    )


async def test_an_error_in_the_block_leaves_as_itself() -> None:
    with MemoryInterface() as iface:
        hub = MemoryHub().peer("alice", KEY.public_key())
        with pytest.raises(KeyError):
            async with open_connector("alice", KEY, hub, "10.99.0.1/24", interface=iface):
                raise KeyError("mine")


def test_ctrl_c_in_the_block_is_a_keyboard_interrupt_and_unregisters() -> None:
    """Ctrl-C while the caller reads events (a KeyboardInterrupt in the block) leaves as a
    KeyboardInterrupt, never inside an exception group, after the record is deleted."""
    hub = MemoryHub()
    registered: list[int] = []

    async def main() -> None:
        with MemoryInterface() as iface:
            alice = hub.peer("alice", KEY.public_key())
            async with open_connector(
                "alice", KEY, alice, "10.99.0.1/24", interface=iface, peers=["bob"]
            ) as connector:
                async for _ in connector.events:
                    if hub.records():  # registered: now Ctrl-C
                        registered.append(len(hub.records()))
                        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    assert registered == [1]
    assert hub.records() == ()


async def test_an_unreachable_hub_ends_the_events_after_saying_why() -> None:
    url = f"http://127.0.0.1:{_closed_tcp_port()}"
    seen: list[ConnectEvent] = []
    with MemoryInterface() as iface, trio.move_on_after(60) as timeout:
        async with open_connector(
            "alice",
            KEY,
            url,
            TunnelConfig("10.99.0.1/24", listen_port=0),
            interface=iface,
            peers=["bob"],
            stun_servers=[],
        ) as connector:
            async for event in connector.events:  # ends by itself: no one can connect
                seen.append(event)
    assert not timeout.cancelled_caught, seen
    failed = [e for e in seen if isinstance(e, PeerFailed)]
    assert [(f.peer, f.stage, f.retry_in) for f in failed] == [("bob", "register", None)]
    assert failed[0].reason.startswith(
        f"the rendezvous refused or could not be reached: cannot reach the hub at {url}"
    )


async def test_events_end_when_every_peer_failed_with_retries_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = MemoryHub()
    seen: list[ConnectEvent] = []
    with MemoryInterface() as iface, trio.move_on_after(600) as timeout:
        async with open_connector(
            "alice",
            KEY,
            hub.peer("alice", KEY.public_key()),
            TunnelConfig("10.99.0.1/24", listen_port=0),
            interface=iface,
            peers=["bob", "carol"],
            wait_timeout=20,
            retry_backoff=None,
        ) as connector:
            async for event in connector.events:
                seen.append(event)
    assert not timeout.cancelled_caught
    failed = sorted((e.peer, e.stage) for e in seen if isinstance(e, PeerFailed))
    assert failed == [("bob", "wait"), ("carol", "wait")]
    assert isinstance(seen[-1], PeerFailed)


async def test_events_go_on_while_a_failed_peer_will_be_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = MemoryHub()
    seen: list[ConnectEvent] = []
    with MemoryInterface() as iface:
        async with open_connector(
            "alice",
            KEY,
            hub.peer("alice", KEY.public_key()),
            TunnelConfig("10.99.0.1/24", listen_port=0),
            interface=iface,
            peers=["bob"],
            wait_timeout=20,
        ) as connector:
            with trio.move_on_after(100) as timeout:
                async for event in connector.events:
                    seen.append(event)
    assert timeout.cancelled_caught  # the stream stayed open: the retries go on
    retries = [e.retry_in for e in seen if isinstance(e, PeerFailed)]
    assert retries[:3] == [2.0, 4.0, 8.0]
