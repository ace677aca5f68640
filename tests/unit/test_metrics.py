"""Prometheus metrics: a connector's per-peer counters (netsim), the hub's metrics listener over
real HTTP (in-process), the listener address parser, and the one-line errors of ``--metrics``."""

from __future__ import annotations

import socket
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.cli._main import main
from punchtrio.connect import MemoryInterface, PeerConnected
from punchtrio.metrics import (
    MetricsServeError,
    connector_registry,
    hub_registry,
    parse_listen_address,
    render,
    serve_metrics,
)
from punchtrio.netsim import NatBehavior
from punchtrio.rendezvous import (
    Endpoint,
    HubAuth,
    HubConfig,
    HubCounters,
    HubInfo,
    MemoryStore,
    RegisterRequest,
    RequestSigner,
)
from punchtrio.rendezvous._serve import serve_hub
from tests.packets import ipv4

from .hub_harness import samples
from .test_connect_basic import INNER, build_world, connector_for, start_world


async def test_connector_metrics_follow_traffic_path_and_handshakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cone = NatBehavior.port_restricted_cone()
    world = build_world(cone, cone)
    with MemoryInterface("alice") as ia, MemoryInterface("bob") as ib:
        connectors = {
            "alice": connector_for(world, "alice", ia),
            "bob": connector_for(world, "bob", ib),
        }
        registry = connector_registry(connectors["alice"])
        before = samples(render(registry).decode())  # before run: peer states only
        assert before['punchtrio_peer_connected{peer="bob"}'] == 0
        assert not any(name.startswith("punchtrio_peer_receive_bytes") for name in before)
        async with world.net, trio.open_nursery() as nursery:
            await start_world(nursery, world, connectors)
            async for event in connectors["alice"].events:
                if isinstance(event, PeerConnected):
                    break
            first = samples(render(registry).decode())
            for n in range(20):
                await ia.send(ipv4(INNER["alice"], INNER["bob"], b"x" * 100 + bytes([n])))
                with trio.fail_after(5):
                    await ib.receive()
            later = samples(render(registry).decode())
            nursery.cancel_scope.cancel()
    assert first['punchtrio_peer_connected{peer="bob"}'] == 1
    assert first['punchtrio_peer_path{path="direct",peer="bob"}'] == 1
    assert first['punchtrio_peer_path{path="relay",peer="bob"}'] == 0
    assert first['punchtrio_peer_handshakes_total{peer="bob"}'] >= 1
    assert first['punchtrio_peer_last_handshake_seconds{peer="bob"}'] > 1.7e9
    assert first["punchtrio_probes_sent_total"] > 0
    sent = 'punchtrio_peer_transmit_packets_total{peer="bob"}'
    sent_bytes = 'punchtrio_peer_transmit_bytes_total{peer="bob"}'
    assert later[sent] >= first[sent] + 20
    assert later[sent_bytes] >= first[sent_bytes] + 20 * (100 + 20 + 32)  # payload, IP, WG
    assert later['punchtrio_dropped_total{layer="wireguard",reason="replay"}'] == 0
    assert 'punchtrio_dropped_total{layer="mux",reason="unknown"}' in later


async def test_hub_metrics_listener_serves_the_library_format_apart_from_the_api() -> None:
    key = PrivateKey.generate()
    counters = HubCounters()
    store = MemoryStore()
    config = HubConfig(key, rate=0.0, counters=counters)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_metrics, hub_registry(store, counters), ("127.0.0.1", 0))
        listeners = await nursery.start(partial(serve_hub, store=store), config, ("127.0.0.1", 0))
        async with httpx.AsyncClient(base_url=listeners.http[0], timeout=10) as http:
            before = samples((await http.get(url)).text)
            assert before["punchtrio_hub_peers"] == 0
            info = HubInfo.from_json((await http.get("/v1/hub")).json())
            peer = PrivateKey.generate()
            body = RegisterRequest(peer.public_key(), (Endpoint.parse("10.0.0.7:51820"),))
            auth = HubAuth(RequestSigner(peer, info.public_key))
            reply = await http.put("/v1/peers/alice", json=body.to_json(), auth=auth)
            assert reply.status_code == 201
            assert (await http.get("/metrics")).status_code == 404  # never on the API listener
            not_found = 'punchtrio_hub_requests_total{method="GET",route="other",status="404"}'
            for _ in range(100):  # the hub counts a request once its answer is sent
                scraped = await http.get(url)
                after = samples(scraped.text)
                if not_found in after:
                    break
                await trio.sleep(0.02)
            assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert (await http.get(url.replace("/metrics", "/other"))).status_code == 404
        nursery.cancel_scope.cancel()
    assert after["punchtrio_hub_peers"] == 1
    put = 'punchtrio_hub_requests_total{method="PUT",route="/v1/peers/{name}",status="201"}'
    assert after[put] == 1
    assert after['punchtrio_hub_requests_total{method="GET",route="other",status="404"}'] == 1


async def test_a_taken_metrics_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        registry = hub_registry(MemoryStore(), HubCounters())
        with pytest.raises(
            MetricsServeError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"
        ):
            await serve_metrics(registry, ("127.0.0.1", port))


def test_hub_metrics_port_in_use_is_one_line_and_starts_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(
            [
                "hub",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                f"127.0.0.1:{port}",
                "--store",
                "memory",
            ]
        )
    err = capsys.readouterr().err
    assert status == 3
    assert err.splitlines()[-1].startswith(
        f"punchtrio: error: cannot serve metrics on 127.0.0.1:{port}"
    )
    assert "serving http" not in err  # the API never started


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("9586", "is not IP:PORT"),
        ("localhost:9586", "is not a literal IP address"),
        ("::1:9586", "in brackets"),
        ("[127.0.0.1]:9586", "in brackets"),
        ("127.0.0.1:65536", "is not IP:PORT"),
        ("127.0.0.1:\uff19\uff15", "is not IP:PORT"),  # fullwidth digits
        ("224.0.0.1:9586", "multicast"),
    ],
)
def test_bad_metrics_addresses_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_listen_address(text)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_every_unicast_listen_address_parses_back(ip: object, port: int) -> None:
    text = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    if getattr(ip, "is_multicast", False):
        with pytest.raises(ValueError, match="multicast"):
            parse_listen_address(text)
    else:
        assert parse_listen_address(text) == (str(ip), port)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        ip, port = parse_listen_address(text)
    except ValueError:
        return
    assert 0 <= port <= 65535
    assert ip in text
