"""The hub's TURN support: ``turn`` in GET /v1/hub, minted REST credentials, the CLI flags."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from pathlib import Path

import httpx
import pytest

from punchtrio import PrivateKey
from punchtrio.cli import _hub
from punchtrio.cli._main import build_parser, main
from punchtrio.relay import TurnServerURI
from punchtrio.rendezvous import (
    HubClient,
    HubInfo,
    NotRegisteredError,
    ValidationError,
)
from tests.unit.hub_harness import Hub, hub_clock

SECRET = b"coturn static auth secret"
URIS = (
    TurnServerURI.parse("turn:192.0.2.1:3478?transport=udp"),
    TurnServerURI.parse("turns:turn.example.org"),
)


def turn_hub() -> Hub:
    return Hub(turn=URIS, turn_secret=SECRET, turn_ttl=1800.0)


async def test_hub_info_advertises_turn_uris_and_old_json_stays_valid() -> None:
    async with turn_hub() as hub:
        response = await hub.http.get("/v1/hub")
    body = response.json()
    assert body["turn"] == [
        "turn:192.0.2.1:3478?transport=udp",
        "turns:turn.example.org:5349?transport=tcp",
    ]
    assert HubInfo.from_json(body).turn == URIS
    assert SECRET.decode() not in response.text
    old = {key: value for key, value in body.items() if key != "turn"}
    assert HubInfo.from_json(old).turn == ()
    async with Hub() as plain:
        assert "turn" not in (await plain.http.get("/v1/hub")).json()


@pytest.mark.parametrize("turn", [["http://x"], "turn:192.0.2.1", [1], ["turn:192.0.2.1"] * 9])
def test_hub_info_refuses_bad_turn_lists(turn: object) -> None:
    info = HubInfo(PrivateKey.generate().public_key(), (), 1, 1, 1, 1, False).to_json()
    with pytest.raises(ValidationError):
        HubInfo.from_json({**info, "turn": turn})


async def test_registered_peers_get_rest_credentials() -> None:
    async with turn_hub() as hub:
        alice = hub.peer()
        assert (await alice.put("alice")).status_code == 201
        response = await hub.http.get("/v1/peers/alice/turn", auth=alice.auth)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        servers = response.json()["servers"]
        assert [s["uri"] for s in servers] == [str(uri) for uri in URIS]
        username = servers[0]["username"]
        expiry, name = username.split(":")
        assert name == "alice"
        assert int(expiry) == pytest.approx(hub_clock() + 1800, abs=5)
        expected = base64.b64encode(
            hmac.new(SECRET, username.encode(), hashlib.sha1).digest()
        ).decode()
        assert servers[0]["password"] == expected
        assert servers[0]["ttl"] == 1800.0
        # Unsigned, another key's name, an unknown name: no credentials.
        assert (await hub.http.get("/v1/peers/alice/turn")).status_code == 401
        mallory = hub.peer()
        assert (await hub.http.get("/v1/peers/alice/turn", auth=mallory.auth)).status_code == 404
        assert (await hub.http.get("/v1/peers/bob/turn", auth=alice.auth)).status_code == 404
        metrics = hub.scrape()
        turn = (
            'punchtrio_hub_requests_total{method="GET",route="/v1/peers/{name}/turn",status="200"}'
        )
        assert metrics[turn] == 1


async def test_a_hub_without_turn_answers_404() -> None:
    async with Hub() as hub:
        alice = hub.peer()
        await alice.put("alice")
        response = await hub.http.get("/v1/peers/alice/turn", auth=alice.auth)
        assert response.status_code == 404
        assert "no TURN" in response.json()["error"]


async def test_turn_without_a_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="turn_secret"):
        Hub(turn=URIS)


async def test_hub_config_repr_hides_the_secret() -> None:
    hub = turn_hub()
    assert SECRET.decode() not in repr(hub.config)


async def test_hub_client_turn_servers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with turn_hub() as hub:
        client = HubClient(
            "http://hub.test",
            PrivateKey.generate(),
            "alice",
            transport=httpx.ASGITransport(hub.app),
            clock=hub_clock,
        )
        with pytest.raises(NotRegisteredError):
            await client.turn_servers()
        await client.register()
        servers = await client.turn_servers()
        assert [s.uri for s in servers] == list(URIS)
        assert servers[0].credentials.username.endswith(":alice")
        assert servers[0].ttl == 1800.0
        password = servers[0].credentials.password
        assert password not in repr(servers)
        assert password not in caplog.text
        await client.aclose()
    async with Hub() as plain:
        client = HubClient(
            "http://hub.test",
            PrivateKey.generate(),
            "bob",
            transport=httpx.ASGITransport(plain.app),
            clock=hub_clock,
        )
        await client.register()
        assert await client.turn_servers() == ()
        await client.aclose()


def test_cli_turn_options_reach_the_config(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    args = build_parser().parse_args(
        [
            "hub",
            "--turn", "turn:192.0.2.1?transport=tcp",
            "--turn", "turns:turn.example.org:443",
            "--turn-secret-file", str(tmp_path / "secret"),
            "--turn-ttl", "7200",
        ]
    )  # fmt: skip
    config, _ = _hub.build_config(args)
    assert [str(u) for u in config.turn] == [
        "turn:192.0.2.1:3478?transport=tcp",
        "turns:turn.example.org:443?transport=tcp",
    ]
    assert config.turn_secret == b"s3cret"
    assert config.turn_ttl == 7200.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--turn", "stun:192.0.2.1"], "--turn: "),
        (["--turn", "turn:192.0.2.1:0"], "--turn: TURN URI port"),
        (["--turn", "turn:192.0.2.1"], "--turn needs --turn-secret-file"),
        (["--turn-secret-file", "SECRET"], "--turn-secret-file needs at least one --turn"),
        (["--turn", "turn:192.0.2.1", "--turn-secret-file", "/nonexistent"], "cannot read"),
        (["--turn", "turn:192.0.2.1", "--turn-secret-file", "EMPTY"], "one non-empty line"),
        (
            ["--turn", "turn:192.0.2.1", "--turn-secret-file", "SECRET", "--turn-ttl", "1"],
            "--turn-ttl must be",
        ),
    ],
)
def test_bad_turn_options_exit_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret").write_text("do-not-print-me\n")
    (tmp_path / "empty").write_text("\n")
    paths = {"SECRET": str(tmp_path / "secret"), "EMPTY": str(tmp_path / "empty")}
    status = main(["hub", *(paths.get(arg, arg) for arg in argv)])
    err = capsys.readouterr().err
    assert status != 0
    assert err.startswith("punchtrio: error: ")
    assert err.count("\n") == 1
    assert message in err
    assert "do-not-print-me" not in err


def test_turn_field_is_omitted_when_empty() -> None:
    info = HubInfo(PrivateKey.generate().public_key(), (), 1, 1, 1, 1, False)
    assert "turn" not in json.dumps(info.to_json())
