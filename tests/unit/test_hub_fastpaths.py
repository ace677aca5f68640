"""The hub's fast paths give the same answers as the checked ways they replace.

Parsing a registration builds the model without running its checks a second time, stored records
become wire records without re-validation, ``/metrics`` labels routes without regexes, and a body is
read straight from ASGI messages (skipped when HTTP/1 framing says there is none).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    HubConfig,
    MemoryStore,
    PeerRecord,
    RegisterRequest,
    RequestSigner,
    ValidationError,
    create_app,
)
from punchtrio.rendezvous._hub import _route_label

from .hub_harness import Hub, hub_clock

KEY = PrivateKey.from_base64("yHfwCk5i46vAMWHyofkaj0h4cZEN9EOf2SjaLBdDvUg=").public_key()

# Addresses and prefixes from every class the rules treat differently.
_ADDRESSES = [
    "192.0.2.1",
    "198.51.100.7",
    "10.0.0.1",
    "0.0.0.0",
    "127.0.0.1",
    "224.0.0.1",
    "169.254.1.1",
    "240.0.0.1",
    "255.255.255.255",
    "[2001:db8::1]",
    "[::1]",
    "[::ffff:192.0.2.1]",
    "[fe80::1]",
    "[ff02::1]",
    "example.com",
]
_PREFIXES = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.3/32",
    "10.1.2.0/24",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "0.0.0.0/1",
    "128.0.0.0/1",
    "127.0.0.0/8",
    "10.1.2.3/24",
    "fd00::/8",
    "fd00::1/128",
    "2001:db8::/32",
    "::/0",
    "FD00::1/128",
    "10.1.2.3",
]
endpoint_json = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["host", "srflx", "relay", "other"]),
        "address": st.builds(
            lambda a, p: f"{a}:{p}", st.sampled_from(_ADDRESSES), st.sampled_from([0, 1, 51820])
        ),
    }
)
register_json = st.fixed_dictionaries(
    {
        "public_key": st.sampled_from([KEY.to_base64(), "A" * 43 + "=", "short"]),
        "endpoints": st.lists(endpoint_json, max_size=4),
        "allowed_ips": st.lists(st.sampled_from(_PREFIXES), max_size=4),
    }
)


@given(register_json)
@settings(max_examples=300)
def test_parsed_registration_passes_the_full_checks(obj: dict[str, object]) -> None:
    try:
        parsed = RegisterRequest.from_json(obj)
    except ValidationError:
        return
    # The checking constructor accepts exactly what parsing built, so skipping it lost nothing.
    assert RegisterRequest(parsed.public_key, parsed.endpoints, parsed.allowed_ips) == parsed
    assert RegisterRequest.from_json(parsed.to_json()) == parsed


async def test_stored_record_is_a_valid_wire_record() -> None:
    store = MemoryStore(clock=lambda: 1000.0)
    body = {
        "public_key": KEY.to_base64(),
        "endpoints": [
            {"type": "srflx", "address": "198.51.100.7:40000"},
            {"type": "host", "address": "[2001:db8::7]:51820"},
        ],
        "allowed_ips": ["10.1.2.3/32", "fd00::7/128"],
    }
    peer, _ = await store.put("", "alice", RegisterRequest.from_json(body), 60.0)
    for now in (1000.0, 1059.9996, 2000.0):
        record = peer.to_record(now)
        checked = PeerRecord(
            "alice", KEY, peer.endpoints, peer.allowed_ips, peer.revision, max(0.0, 1060.0 - now)
        )
        assert record == checked
        wire = json.loads(json.dumps(record.to_json()))
        assert PeerRecord.from_json(wire).to_json() == record.to_json()


_OLD_ROUTES = (
    (re.compile(r"/v1/peers"), "/v1/peers"),
    (re.compile(r"/v1/peers/[^/]+"), "/v1/peers/{name}"),
    (re.compile(r"/v1/peers/[^/]+/messages"), "/v1/peers/{name}/messages"),
    (re.compile(r"/v1/peers/[^/]+/turn"), "/v1/peers/{name}/turn"),
    (re.compile(r"/v1/hub"), "/v1/hub"),
    (re.compile(r"/healthz"), "/healthz"),
)


def _regex_label(path: str) -> str:
    for pattern, label in _OLD_ROUTES:
        if pattern.fullmatch(path):
            return label
    return "other"


segments = st.sampled_from(
    ["", "v1", "peers", "alice", "messages", "turn", "hub", "healthz", "metrics", "x"]
)


@given(st.lists(segments, max_size=5), st.booleans())
@example(["v1", "peers"], False)  # the listing
@example(["v1", "peers", "alice", "turn"], False)
@settings(max_examples=300)
def test_route_label_matches_the_route_patterns(parts: list[str], trailing: bool) -> None:
    path = "/" + "/".join(parts) + ("/" if trailing else "")
    assert _route_label(path) == _regex_label(path)


@pytest.mark.parametrize(
    "path",
    ["/v1/peers/a", "/v1/peers/a/messages", "/v1/peers//messages", "/v1/peers/", "/v1/peers/a/b"],
)
def test_route_label_edge_cases(path: str) -> None:
    assert _route_label(path) == _regex_label(path)


async def test_a_body_on_a_get_is_read_and_signed() -> None:
    async with Hub() as hub:
        alice = hub.peer()
        assert (await alice.put("alice")).status_code == 201
        answer = await hub.http.request("GET", "/v1/peers/alice", content=b"{}", auth=alice.auth)
        assert answer.status_code == 200
        # The MAC covers the body: signing an empty body and sending one is refused.
        headers = alice.signer.sign("GET", "/v1/peers/alice", b"", now=hub_clock())
        forged = await hub.http.request("GET", "/v1/peers/alice", content=b"{}", headers=headers)
        assert forged.status_code == 401


def _scope(method: str, path: str, headers: dict[str, str], version: str) -> dict[str, object]:
    return {
        "type": "http",
        "http_version": version,
        "asgi": {"version": "3.0"},
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("192.0.2.9", 5000),
        "server": ("192.0.2.1", 7777),
    }


@pytest.mark.parametrize("version", ["2", "1.1"])
async def test_unframed_body_is_read_in_chunks_over_http2(version: str) -> None:
    """HTTP/2 needs no Content-Length: the body is read from its chunks; over HTTP/1.1 the same
    request has no body by its framing, so the signature over the body fails."""
    hub_key = PrivateKey.generate()
    app = create_app(HubConfig(hub_key, rate=0.0))
    peer = PrivateKey.generate()
    body = json.dumps(
        {
            "public_key": peer.public_key().to_base64(),
            "endpoints": [{"type": "host", "address": "192.0.2.7:51820"}],
            "allowed_ips": [str(ipaddress.ip_network("10.7.0.1/32"))],
        }
    ).encode()
    headers = RequestSigner(peer, hub_key.public_key()).sign(
        "PUT", "/v1/peers/carol", body, now=time.time()
    )
    messages = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:], "more_body": False},
    ]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(_scope("PUT", "/v1/peers/carol", headers, version), receive, send)
    status = sent[0]["status"]
    assert status == (201 if version == "2" else 401)
