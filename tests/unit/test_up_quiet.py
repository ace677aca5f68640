"""`punchtrio up --hub -q`: no progress view and no info lines on stderr, only warnings and errors;
without ``-q`` the same run shows both (so the check can fail)."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import pytest

from punchtrio.cli import _up
from punchtrio.cli._main import main

from .test_up_cli import _args

EVENTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("up", {"name": "alice", "interface": "tun7", "listen_port": 51820}),
    ("stage_started", {"stage": "wait", "peer": "bob"}),
    ("peer_found", {"peer": "bob", "public_key": "x", "revision": 1, "endpoints": []}),
    (
        "peer_connected",
        {"peer": "bob", "path": "direct", "endpoint": "198.51.100.2:40000", "elapsed_ms": 12.0},
    ),
    ("down", {"interface": "tun7", "peers": []}),
)


def _run(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
) -> tuple[str, str]:
    """``main(up ...)`` with a ``serve_up`` that reports :data:`EVENTS` and logs one info line
    and one warning; return (stdout, stderr)."""

    async def fake(plan: _up.UpPlan, report: Any) -> None:
        for event, fields in EVENTS:
            report(event, fields)
        logging.getLogger("punchtrio.up").info("metrics on http://127.0.0.1:9586/metrics")
        logging.getLogger("punchtrio.connect").warning("the hub is unreachable; retrying")

    monkeypatch.setattr(_up, "serve_up", fake)
    assert main(_args(tmp_path, *extra)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_without_q_the_progress_and_info_lines_are_shown(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, err = _run(tmp_path, monkeypatch, capsys)
    assert out == ""
    assert "tunnel tun7 up" in err
    assert "connected to bob" in err
    assert "metrics on http://127.0.0.1:9586/metrics" in err
    assert "the hub is unreachable; retrying" in err


@pytest.mark.parametrize("extra", [["-q"], ["--quiet"], ["-q", "--log-format", "json"]])
def test_q_leaves_only_warnings_on_stderr(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
) -> None:
    out, err = _run(tmp_path, monkeypatch, capsys, *extra)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert "the hub is unreachable; retrying" in lines[0]
    assert "warning" in lines[0].lower()
    for hidden in ("tun7", "bob", "metrics on", "✓", "…"):
        assert hidden not in err


def test_q_with_json_keeps_the_events_on_stdout(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, err = _run(tmp_path, monkeypatch, capsys, "-q", "--json")
    assert [line.split('"event": "')[1].split('"')[0] for line in out.splitlines()] == [
        event for event, _ in EVENTS
    ]
    (line,) = err.splitlines()
    assert "the hub is unreachable; retrying" in line
