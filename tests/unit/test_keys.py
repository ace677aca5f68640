from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio import InvalidKeyError, PrivateKey, PublicKey
from punchtrio.cli import main
from punchtrio.keys import clamp

# RFC 7748 section 6.1: Alice's private scalar and public key.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_rfc7748_public_key() -> None:
    assert PrivateKey(ALICE_PRIVATE).public_key().raw == ALICE_PUBLIC


def test_generate_is_clamped_and_round_trips() -> None:
    key = PrivateKey.generate()
    assert key.raw == clamp(key.raw)
    assert PrivateKey.from_base64(key.to_base64()) == key
    assert "hidden" in repr(key)
    assert key.to_base64() not in repr(key)


@given(st.binary(min_size=32, max_size=32))
def test_clamp_sets_the_rfc7748_bits(secret: bytes) -> None:
    clamped = clamp(secret)
    assert clamped[0] & 7 == 0
    assert clamped[31] & 0x80 == 0
    assert clamped[31] & 0x40 == 0x40
    assert clamped[1:31] == secret[1:31]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "32 bytes"),
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(31)).decode(), "32 bytes"),
        (base64.b64encode(bytes(33)).decode(), "32 bytes"),
        (base64.b64encode(bytes(32)).decode(), "all zero"),
    ],
)
def test_malformed_keys_are_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidKeyError, match=reason):
        PrivateKey.from_base64(text)
    with pytest.raises(InvalidKeyError, match=reason):
        PublicKey.from_base64(text)


def test_write_creates_0600(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("old")
    path.chmod(0o644)
    key = PrivateKey.generate()
    key.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PrivateKey.from_file(path) == key


def test_cli_keygen_pubkey(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["keygen"]) == 0
    private = capsys.readouterr().out
    assert len(private) == 45
    assert private.endswith("=\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(private))
    assert main(["pubkey"]) == 0
    assert (
        capsys.readouterr().out.strip() == PrivateKey.from_base64(private).public_key().to_base64()
    )


def test_cli_keygen_out_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    assert main(["keygen", "--out", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    PrivateKey.from_file(path)


@pytest.mark.parametrize("stdin", ["", "garbage\n", base64.b64encode(bytes(32)).decode() + "\n"])
def test_cli_pubkey_bad_input_is_one_line(stdin: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "punchtrio.cli", "pubkey"],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("punchtrio: error: private key")


def test_cli_keygen_unwritable_out_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--out", str(tmp_path / "missing" / "key")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("punchtrio: error: cannot write ")
