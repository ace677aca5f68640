"""An in-process hub for tests: the ASGI app behind ``httpx.ASGITransport``, on Trio's clock.

The hub's wall clock is ``BASE + trio.current_time()``, so under ``autojump_clock`` record expiry,
signature windows and long polls all follow the fake clock; requests are signed at that same time.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from punchtrio import PrivateKey
from punchtrio.metrics import hub_registry, render
from punchtrio.rendezvous import (
    Endpoint,
    EndpointType,
    HubConfig,
    HubCounters,
    MemoryStore,
    NetworkSecret,
    RegisterRequest,
    RequestSigner,
    StoreLimits,
    create_app,
    parse_allowed_ip,
)

BASE = 1_800_000_000.0


def hub_clock() -> float:
    return BASE + trio.current_time()


class ClockAuth(httpx.Auth):
    """Signs like ``HubAuth`` but at the hub's (fake) time."""

    requires_request_body = True

    def __init__(self, signer: RequestSigner) -> None:
        self.signer = signer

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("ascii")
        request.headers.update(
            self.signer.sign(request.method, target, request.content, now=hub_clock())
        )
        yield request


class Peer:
    """A key (and optional network secret) talking to the hub."""

    def __init__(
        self, hub: Hub, network: NetworkSecret | None = None, key: PrivateKey | None = None
    ) -> None:
        self.hub = hub
        self.key = key or PrivateKey.generate()
        self.signer = RequestSigner(self.key, hub.key.public_key(), network)
        self.auth = ClockAuth(self.signer)

    def body(self, endpoints: list[str] | None = None, allowed: list[str] | None = None) -> Any:
        request = RegisterRequest(
            self.key.public_key(),
            tuple(
                Endpoint.parse(e, EndpointType.HOST) for e in (endpoints or ["192.0.2.10:51820"])
            ),
            tuple(parse_allowed_ip(a) for a in (allowed or [])),
        )
        return request.to_json()

    async def put(self, name: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        payload = self.body() if body is None else body
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await self.hub.http.put(
            f"/v1/peers/{name}", content=content, auth=self.auth, **kwargs
        )

    async def get(self, name: str, **params: Any) -> httpx.Response:
        return await self.hub.http.get(
            f"/v1/peers/{name}", params=params or None, auth=self.auth, timeout=None
        )

    async def delete(self, name: str) -> httpx.Response:
        return await self.hub.http.delete(f"/v1/peers/{name}", auth=self.auth)

    async def send(self, to: str, sender: str, data: str) -> httpx.Response:
        return await self.hub.http.post(
            f"/v1/peers/{to}/messages", json={"from": sender, "data": data}, auth=self.auth
        )

    async def receive(self, name: str, **params: Any) -> httpx.Response:
        return await self.hub.http.get(
            f"/v1/peers/{name}/messages", params=params or None, auth=self.auth, timeout=None
        )


class Hub:
    """The hub app and an httpx client bound to it; use as ``async with Hub() as hub``."""

    def __init__(
        self,
        *,
        networks: tuple[NetworkSecret, ...] = (),
        limits: StoreLimits | None = None,
        **config: Any,
    ) -> None:
        self.key = PrivateKey.generate()
        config.setdefault("rate", 0.0)
        self.counters = HubCounters()
        config.setdefault("counters", self.counters)
        self.config = HubConfig(self.key, networks, **config)
        self.store = MemoryStore(limits, clock=hub_clock)
        self.app = create_app(self.config, self.store, clock=hub_clock)
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(self.app), base_url="http://hub.test"
        )

    def peer(self, network: NetworkSecret | None = None, key: PrivateKey | None = None) -> Peer:
        return Peer(self, network, key)

    def scrape(self, *collectors: Collector) -> dict[str, float]:
        """What ``punchtrio hub --metrics`` would serve now, with ``collectors`` (the relay's),
        parsed: ``{'name{label="value",...}': value}``, labels sorted by name."""
        registry = hub_registry(self.store, self.counters)
        for collector in collectors:
            registry.register(collector)
        return samples(render(registry).decode())

    async def __aenter__(self) -> Hub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()


def samples(text: str) -> dict[str, float]:
    """Prometheus text parsed by prometheus-client: ``{'name{a="1",b="2"}': value}``."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            parsed[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return parsed
