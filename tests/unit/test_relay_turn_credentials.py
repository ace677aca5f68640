"""TURN credentials (static, coturn REST) and RFC 7065 URIs."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import PunchtrioError
from punchtrio.relay import (
    TurnCredentials,
    TurnCredentialsError,
    TurnServer,
    TurnServerURI,
    TurnURIError,
    rest_credentials,
)


def test_credentials_repr_hides_the_password() -> None:
    credentials = TurnCredentials("alice", "hunter2-very-secret")
    assert "hunter2" not in repr(credentials)
    assert "hunter2" not in str(credentials)
    assert "alice" in repr(credentials)
    server = TurnServer(TurnServerURI.parse("turn:192.0.2.1"), credentials, 60)
    assert "hunter2" not in repr(server)


@pytest.mark.parametrize(
    ("username", "password"), [("", "p"), ("a\nb", "p"), ("x" * 513, "p"), ("u", "a\0b")]
)
def test_bad_credentials_are_refused(username: str, password: str) -> None:
    with pytest.raises(TurnCredentialsError):
        TurnCredentials(username, password)


def test_rest_credentials_follow_coturn() -> None:
    # coturn's scheme: username "<expiry>:<name>", password base64(HMAC-SHA1(secret, username)).
    credentials = rest_credentials(b"north", "alice", ttl=3600, now=1_700_000_000.7)
    assert credentials.username == "1700003600:alice"
    expected = hmac.new(b"north", b"1700003600:alice", hashlib.sha1).digest()
    assert credentials.password == base64.b64encode(expected).decode()
    # A vector computed independently: printf %s 1700003600:alice | openssl dgst -sha1 -hmac north -binary | base64
    assert credentials.password == "wjwSXO2ch1B6VaLTLMy2Avn5O9o="


@pytest.mark.parametrize(
    ("secret", "ttl", "now"), [(b"", 60, 0), (b"s", 0, 0), (b"s", float("inf"), 0), (b"s", 60, -1)]
)
def test_rest_credentials_refuse_bad_input(secret: bytes, ttl: float, now: float) -> None:
    with pytest.raises(TurnCredentialsError):
        rest_credentials(secret, "alice", ttl=ttl, now=now)


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "transport"),
    [
        ("turn:192.0.2.1", "turn", "192.0.2.1", 3478, "udp"),
        ("turn:192.0.2.1:3479?transport=udp", "turn", "192.0.2.1", 3479, "udp"),
        ("TURN:192.0.2.1?transport=TCP", "turn", "192.0.2.1", 3478, "tcp"),
        ("turns:turn.example.org", "turns", "turn.example.org", 5349, "tls"),
        ("turns:Turn.Example.ORG:443?transport=tcp", "turns", "turn.example.org", 443, "tls"),
        ("turn:[2001:DB8::1]:3478", "turn", "2001:db8::1", 3478, "udp"),
        ("turn:[2001:db8::1]", "turn", "2001:db8::1", 3478, "udp"),
        ("turn:localhost", "turn", "localhost", 3478, "udp"),
    ],
)
def test_uri_parsing(text: str, scheme: str, host: str, port: int, transport: str) -> None:
    uri = TurnServerURI.parse(text)
    assert (uri.scheme, uri.host, uri.port, uri.transport) == (scheme, host, port, transport)
    assert TurnServerURI.parse(str(uri)) == uri
    assert uri.secure == (scheme == "turns")


def test_uri_address_is_only_for_literal_ips() -> None:
    assert TurnServerURI.parse("turn:192.0.2.1:9").address == ("192.0.2.1", 9)
    assert TurnServerURI.parse("turn:turn.example.org").address is None
    assert (
        str(TurnServerURI.parse("turns:[2001:db8::1]")) == "turns:[2001:db8::1]:5349?transport=tcp"
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "stun:192.0.2.1",
        "turn:",
        "turn://192.0.2.1",
        "turn:user@192.0.2.1",
        "turn:192.0.2.1/path",
        "turn:192.0.2.1#frag",
        "turn:192.0.2.1:0",
        "turn:192.0.2.1:65536",
        "turn:192.0.2.1:+80",
        "turn:192.0.2.1:",
        "turn:192.0.2.1?transport=sctp",
        "turn:192.0.2.1?transport=udp&x=1",
        "turn:192.0.2.1?foo=bar",
        "turns:192.0.2.1?transport=udp",
        "turn:2001:db8::1",
        "turn:[192.0.2.1]",
        "turn:[2001:db8::1]x",
        "turn:[2001:db8::zz]",
        "turn:999.1.1.1",
        "turn:1.2.3",
        "turn:-bad.example",
        "turn:exa mple.org",
        "turn:ex_ample.org",
        "turn:" + "a" * 64 + ".org",
        "turn:192.0.2.1\n",
    ],
)
def test_bad_uris_are_refused(text: str) -> None:
    with pytest.raises(TurnURIError) as caught:
        TurnServerURI.parse(text)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PunchtrioError)
    assert "\n" not in str(caught.value)


def check_parse(text: str) -> None:
    try:
        uri = TurnServerURI.parse(text)
    except TurnURIError:
        return
    assert TurnServerURI.parse(str(uri)) == uri


@given(st.text(max_size=80))
def test_uri_parser_raises_only_turn_uri_error(text: str) -> None:
    check_parse(text)


@given(st.text(alphabet="turns:[]0123456789abcdef.?=&/@#%ptcpudp-", max_size=40))
def test_uri_parser_on_uri_like_text(text: str) -> None:
    check_parse(text)


@given(
    scheme=st.sampled_from(["turn", "turns"]),
    host=st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
        st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z][a-z0-9]{0,8}){0,3}", fullmatch=True),
    ),
    port=st.one_of(st.none(), st.integers(1, 65535)),
    tcp=st.booleans(),
)
def test_generated_uris_round_trip(scheme: str, host: str, port: int | None, tcp: bool) -> None:
    text = f"{scheme}:{host}" + (f":{port}" if port is not None else "")
    if tcp or scheme == "turn":
        text += "?transport=" + ("tcp" if tcp else "udp")
    uri = TurnServerURI.parse(text)
    assert uri.port == (port or (3478 if scheme == "turn" else 5349))
    assert uri.transport == ("tls" if scheme == "turns" else "tcp" if tcp else "udp")
    assert TurnServerURI.parse(str(uri)) == uri


def test_turn_server_json_round_trip_and_validation() -> None:
    server = TurnServer(
        TurnServerURI.parse("turn:192.0.2.1?transport=tcp"), TurnCredentials("1:a", "pw"), 3600
    )
    assert TurnServer.from_json(server.to_json()) == server
    bad: object
    for bad in (
        {},
        [],
        {**server.to_json(), "extra": 1},
        {**server.to_json(), "uri": "http://x"},
        {**server.to_json(), "ttl": -1},
        {**server.to_json(), "ttl": True},
        {**server.to_json(), "username": 5},
    ):
        with pytest.raises(TurnCredentialsError):
            TurnServer.from_json(bad)
