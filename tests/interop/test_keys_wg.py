"""Our keys against the real `wg` tool."""

from __future__ import annotations

import subprocess

import pytest

from punchtrio import PrivateKey
from tests.conftest import require_root_and

pytestmark = pytest.mark.interop


def _wg(*argv: str, stdin: str = "") -> str:
    return subprocess.run(
        ["wg", *argv], input=stdin, capture_output=True, text=True, check=True
    ).stdout


def test_pubkey_matches_wg_both_ways() -> None:
    require_root_and("wg")
    for _ in range(20):
        ours = PrivateKey.generate()
        assert _wg("pubkey", stdin=ours.to_base64() + "\n").strip() == str(ours.public_key())
        theirs = _wg("genkey").strip()
        expected = _wg("pubkey", stdin=theirs + "\n").strip()
        assert str(PrivateKey.from_base64(theirs).public_key()) == expected
