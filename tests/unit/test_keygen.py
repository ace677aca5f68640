"""``punchtrio keygen``: the world-readable warning (as ``wg genkey``) and no silent overwrite."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from punchtrio import PrivateKey
from punchtrio.cli import main

WARNING = "punchtrio: warning: writing a private key to a file others can read"


def _keygen_to_stdout_file(path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``punchtrio keygen > path`` in a real process, so stdout is the file itself."""
    with path.open("a") as out:
        return subprocess.run(
            [sys.executable, "-m", "punchtrio.cli", "keygen"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )


def _keygen_in_process(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """``main(["keygen"])`` with stdout a real file (it has a descriptor, as after ``>``)."""
    with path.open("a") as out:
        monkeypatch.setattr(sys, "stdout", out)
        status = main(["keygen"])
        monkeypatch.undo()
    return status


def test_stdout_redirected_to_a_world_readable_file_warns(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.touch()
    path.chmod(0o644)
    proc = _keygen_to_stdout_file(path)
    assert proc.returncode == 0
    assert proc.stderr.startswith(WARNING)
    assert proc.stderr.count("\n") == 1
    key = PrivateKey.from_file(path)  # the key is still written, as `wg genkey` does
    assert key.to_base64() not in proc.stderr


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o601, 0o666])
def test_a_file_others_can_access_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    path = tmp_path / "key"
    path.touch()
    path.chmod(mode)
    assert _keygen_in_process(path, monkeypatch) == 0
    err = capsys.readouterr().err
    assert err.startswith(WARNING)
    assert err.count("\n") == 1
    PrivateKey.from_file(path)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660, 0o400 | 0o200])
def test_a_file_only_owner_and_group_can_access_is_silent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    path = tmp_path / "key"
    path.touch()
    path.chmod(mode)
    assert _keygen_in_process(path, monkeypatch) == 0
    assert capsys.readouterr().err == ""
    PrivateKey.from_file(path)


def test_stdout_to_a_pipe_is_silent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as reader:
        with os.fdopen(write_end, "w") as writer:
            monkeypatch.setattr(sys, "stdout", writer)
            assert main(["keygen"]) == 0
            monkeypatch.undo()
        assert capsys.readouterr().err == ""
        PrivateKey.from_base64(reader.read())


def test_stdout_without_a_descriptor_is_silent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["keygen"]) == 0
    assert capsys.readouterr().err == ""
    PrivateKey.from_base64(out.getvalue())


def test_out_refuses_to_replace_an_existing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "alice.key"
    old = PrivateKey.generate()
    old.write(path)
    before = path.stat()
    assert main(["keygen", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"punchtrio: error: {path} exists")
    assert "--force" in err
    assert PrivateKey.from_file(path) == old
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_mode) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_mode,
    )


def test_out_refuses_any_existing_file_even_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("")
    assert main(["keygen", "--out", str(path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert path.read_text() == ""


def test_out_refuses_a_symlink_even_dangling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "key"
    link.symlink_to(target)
    assert main(["keygen", "--out", str(link)]) == 2
    assert "exists" in capsys.readouterr().err
    assert not target.exists()


def test_force_replaces_and_makes_the_file_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "alice.key"
    old = PrivateKey.generate()
    old.write(path)
    path.chmod(0o644)
    assert main(["keygen", "--out", str(path), "--force"]) == 0
    assert capsys.readouterr().err == ""
    assert PrivateKey.from_file(path) != old
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_new_out_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "k"
    previous = os.umask(0o000)
    try:
        assert main(["keygen", "--out", str(path)]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    PrivateKey.from_file(path)


def test_refusal_through_the_real_command_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("keep me\n")
    proc = subprocess.run(
        [sys.executable, "-m", "punchtrio.cli", "keygen", "--out", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("punchtrio: error: ")
    assert path.read_text() == "keep me\n"
