"""Wire models and request signing: round trips, strictness (hypothesis), the MAC's coverage."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio import PrivateKey
from punchtrio.rendezvous import (
    HEADER_KEY,
    HEADER_MAC,
    HEADER_NETWORK,
    HEADER_NONCE,
    HEADER_TIME,
    AuthenticationError,
    Endpoint,
    EndpointType,
    HubInfo,
    InvalidNetworkSecretError,
    NetworkSecret,
    PeerRecord,
    RegisterRequest,
    RequestSigner,
    RequestVerifier,
    SignalMessage,
    StunAddress,
    ValidationError,
    error_reason,
    parse_address,
    parse_allowed_ip,
    validate_name,
)
from punchtrio.rendezvous._models import check_disjoint, parse_json

HUB = PrivateKey.from_base64("QDuBQfDY6nzhhbW/kMbqoGAkdOWJVgMaKcpKE6cy6l8=")
PEER = PrivateKey.from_base64("yHfwCk5i46vAMWHyofkaj0h4cZEN9EOf2SjaLBdDvUg=")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=60),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)

global_ipv4 = st.integers(min_value=1 << 24, max_value=(223 << 24) - 1).map(ipaddress.IPv4Address)
global_ipv6 = st.integers(min_value=0x2001_0DB8 << 96, max_value=(0x2001_0DB9 << 96) - 1).map(
    ipaddress.IPv6Address
)
endpoints = st.builds(
    Endpoint,
    st.sampled_from(EndpointType),
    (global_ipv4 | global_ipv6).filter(lambda ip: not (ip.is_loopback or ip.is_link_local)),
    st.integers(min_value=1, max_value=65535),
)
prefixes = st.builds(
    lambda third, length: ipaddress.ip_network(f"10.{third}.0.0/{length}", strict=False),
    st.integers(0, 255),
    st.integers(16, 32),
)
keys = (
    st.binary(min_size=32, max_size=32)
    .filter(lambda b: any(b))
    .map(lambda raw: PrivateKey(raw).public_key())
)


def _disjoint(networks: list[ipaddress.IPv4Network]) -> tuple[ipaddress.IPv4Network, ...]:
    chosen: list[ipaddress.IPv4Network] = []
    for network in networks:
        if not any(network.overlaps(other) for other in chosen):
            chosen.append(network)
    return tuple(chosen)


register_requests = st.builds(
    RegisterRequest,
    keys,
    st.lists(endpoints, max_size=16, unique=True).map(tuple),
    st.lists(prefixes, max_size=64).map(_disjoint),
)


@given(register_requests)
def test_register_request_round_trips_through_json(request: RegisterRequest) -> None:
    wire = json.dumps(request.to_json()).encode()
    assert RegisterRequest.from_json(parse_json(wire)) == request


@given(register_requests, st.integers(1, 2**53), st.floats(0, 1e6))
def test_peer_record_round_trips(request: RegisterRequest, revision: int, ttl: float) -> None:
    record = PeerRecord(
        "peer-1", request.public_key, request.endpoints, request.allowed_ips, revision, ttl
    )
    parsed = PeerRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert parsed.endpoints == record.endpoints
    assert parsed.allowed_ips == record.allowed_ips
    assert parsed.revision == revision
    assert parsed.expires_in == pytest.approx(ttl, abs=0.001)


@given(json_values)
def test_register_request_parser_raises_only_validation_errors(value: object) -> None:
    message = ""
    try:
        RegisterRequest.from_json(value)
    except ValidationError as exc:
        message = str(exc)
    assert "\n" not in message


@given(json_values)
def test_every_model_parser_raises_only_validation_errors(value: object) -> None:
    for parser in (
        PeerRecord.from_json,
        SignalMessage.from_json,
        HubInfo.from_json,
        Endpoint.from_json,
        StunAddress.from_json,
    ):
        try:
            parser(value)
        except ValidationError:
            pass


@given(st.binary(max_size=300))
def test_parse_json_raises_only_validation_errors(body: bytes) -> None:
    try:
        parse_json(body)
    except ValidationError:
        pass


@given(st.text(max_size=80))
def test_parse_address_and_allowed_ip_raise_only_validation_errors(text: str) -> None:
    for parser in (parse_address, parse_allowed_ip, validate_name, Endpoint.parse):
        try:
            parser(text)
        except ValidationError:
            pass


@given(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True))
def test_every_name_of_the_pattern_is_valid(name: str) -> None:
    assert validate_name(name) == name


@given(st.text(max_size=70).filter(lambda t: not t.isascii() or t != t.lower() or t[:1] in "._-"))
def test_names_off_the_pattern_are_refused(name: str) -> None:
    if re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
        return
    with pytest.raises(ValidationError):
        validate_name(name)


@given(endpoints)
def test_endpoint_text_round_trips(endpoint: Endpoint) -> None:
    assert Endpoint.parse(endpoint.address, endpoint.type) == endpoint


@given(st.lists(prefixes, min_size=2, max_size=10))
def test_check_disjoint_matches_pairwise_overlap(networks: list[ipaddress.IPv4Network]) -> None:
    overlapping = any(a.overlaps(b) for i, a in enumerate(networks) for b in networks[i + 1 :])
    if overlapping:
        with pytest.raises(ValidationError):
            check_disjoint(networks)
    else:
        check_disjoint(networks)


def test_signal_message_limits() -> None:
    assert SignalMessage("alice", "x" * 2048).to_json() == {"from": "alice", "data": "x" * 2048}
    with pytest.raises(ValidationError):
        SignalMessage("alice", "x" * 2049)
    with pytest.raises(ValidationError):
        SignalMessage("alice", "\ud800")


def test_hub_info_refuses_another_api_version() -> None:
    info = HubInfo(HUB.public_key(), (StunAddress(None, 3478),), 300, 60, 60, 1.5, False)
    body = info.to_json()
    assert HubInfo.from_json(body) == info
    with pytest.raises(ValidationError, match="API 2"):
        HubInfo.from_json(body | {"api": 2})


def test_error_reason_never_raises() -> None:
    assert error_reason(b'{"error": "no such peer"}', 404) == "no such peer"
    assert error_reason(b"<html>", 502) == "HTTP 502"
    assert error_reason(b'{"error": "a\\nb\\u001b[31m"}', 400) == "ab[31m"
    assert error_reason(b'{"error": 5}', 400) == "HTTP 400"


# signing


def _verify(headers: dict[str, str], *, body: bytes = b"{}", target: str = "/v1/peers/a") -> object:
    verifier = RequestVerifier(HUB)
    return verifier.verify("PUT", target, body, headers, now=1_800_000_000)


def test_signature_vector_is_stable() -> None:
    signer = RequestSigner(PEER, HUB.public_key())
    headers = signer.sign("PUT", "/v1/peers/a", b"{}", now=1_800_000_000, nonce=bytes(16))
    assert headers[HEADER_KEY] == PEER.public_key().to_base64()
    assert headers[HEADER_TIME] == "1800000000"
    assert headers[HEADER_NONCE] == "AAAAAAAAAAAAAAAAAAAAAA"
    assert HEADER_NETWORK not in headers
    verified = _verify(headers)
    assert verified.public_key == PEER.public_key()  # type: ignore[attr-defined]
    # Same inputs, same MAC: the scheme is deterministic given the nonce.
    again = signer.sign("PUT", "/v1/peers/a", b"{}", now=1_800_000_000, nonce=bytes(16))
    assert again[HEADER_MAC] == headers[HEADER_MAC]


@given(st.binary(max_size=64), st.text(max_size=20), st.binary(min_size=16, max_size=16))
@settings(max_examples=50)
def test_any_change_to_a_signed_request_fails(body: bytes, suffix: str, nonce: bytes) -> None:
    signer = RequestSigner(PEER, HUB.public_key())
    headers = signer.sign("PUT", "/v1/peers/a", b"{}", now=1_800_000_000, nonce=nonce)
    target = "/v1/peers/a" + suffix
    if body == b"{}" and not suffix:
        return
    with pytest.raises(AuthenticationError, match="authentication failed"):
        _verify(headers, body=body, target=target)


def test_network_secret_is_part_of_the_mac() -> None:
    red = NetworkSecret(b"0123456789abcdef")
    verifier = RequestVerifier(HUB, (red,))
    headers = RequestSigner(PEER, HUB.public_key(), red).sign("GET", "/x", now=1e9)
    assert verifier.verify("GET", "/x", b"", headers, now=1e9).network_id == red.network_id
    forged = RequestSigner(PEER, HUB.public_key()).sign("GET", "/x", now=1e9)
    forged[HEADER_NETWORK] = red.network_id
    with pytest.raises(AuthenticationError):
        verifier.verify("GET", "/x", b"", forged, now=1e9)
    assert verifier.network_required
    assert "0123" not in repr(red)


def test_network_secret_length_and_file(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(InvalidNetworkSecretError):
        NetworkSecret(b"short")
    path = tmp_path / "secret"  # type: ignore[operator]
    path.write_bytes(b"  a secret of enough length \n")
    assert NetworkSecret.from_file(path).raw == b"a secret of enough length"
    with pytest.raises(InvalidNetworkSecretError, match="cannot read"):
        NetworkSecret.from_file(tmp_path / "missing")  # type: ignore[operator]


def test_low_order_peer_key_is_refused() -> None:
    low_order = base64.b64encode(bytes([1]) + bytes(31)).decode()
    headers = RequestSigner(PEER, HUB.public_key()).sign("GET", "/x", now=1e9)
    headers[HEADER_KEY] = low_order
    with pytest.raises(AuthenticationError, match="authentication failed"):
        RequestVerifier(HUB).verify("GET", "/x", b"", headers, now=1e9)


def test_hub_auth_signs_what_httpx_sends() -> None:
    import httpx

    from punchtrio.rendezvous import HubAuth

    signer = RequestSigner(PEER, HUB.public_key())
    request = httpx.Request("GET", "http://hub:7777/v1/peers/bob?wait=30&since=7")
    signed = next(HubAuth(signer).auth_flow(request))
    verified = RequestVerifier(HUB).verify(
        "GET", "/v1/peers/bob?wait=30&since=7", b"", signed.headers, now=time.time()
    )
    assert verified.public_key == PEER.public_key()
