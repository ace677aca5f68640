"""``punchtrio hub --workers``: the refusals, and the supervisor's restart and stop policy.

The supervisor forks, so each policy test runs it in a fresh interpreter (a subprocess) with
workers that act out a crash or a failed start; real hubs on Redis are in
tests/interop/test_hub_replicas.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from punchtrio.cli._main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "2"], "--workers 2 needs --redis URL: the sqlite store"),
        (["--workers", "3", "--store", "memory"], "--workers 3 needs --redis URL: the memory"),
        (["--workers", "0"], "--workers must be from 1 to 256"),
        (["--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--relay", "127.0.0.1:0"],
         "--relay with --workers needs a port (not 0)"),
        (["--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--stun", "127.0.0.1:0"],
         "--stun cannot be combined with --workers"),
        (["--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--metrics", "127.0.0.1:0"],
         "--metrics cannot be combined with --workers"),
    ],
)  # fmt: skip
def test_workers_refuse_what_they_cannot_share(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hub", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("punchtrio: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_a_taken_port_is_one_line_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [
            sys.executable, "-m", "punchtrio.cli", "hub", "--workers", "2",
            "--redis", "redis://127.0.0.1:1/0", "--listen", f"127.0.0.1:{port}",
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [
        f"punchtrio: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def _supervise(tmp_path: Path, worker_body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        """
        import logging, os, signal, sys, time
        from pathlib import Path
        from punchtrio.cli import _hub_workers
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        _hub_workers.FIRST_BACKOFF = 0.01
        _hub_workers.STARTUP_SECONDS = 0.5
        here = Path(sys.argv[1])
        def worker(index):
            runs = here / f"runs-{index}"
            runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
            n = len(runs.read_text())
        """
    ) + textwrap.indent(textwrap.dedent(worker_body), "    ")
    script += "\nsys.exit(_hub_workers.run_workers(2, worker))\n"
    return subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_crashed_worker_is_restarted_and_a_signal_stops_all(tmp_path: Path) -> None:
    proc = _supervise(
        tmp_path,
        """
        if index == 0 and n <= 2:
            time.sleep(0.6)  # past its start: a crash, not a failed start
            os.kill(os.getpid(), signal.SIGKILL)
        if index == 0:
            os.kill(os.getppid(), signal.SIGTERM)  # the operator stops the hub
        time.sleep(30)
        return 0
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs-0").read_text() == "xxx"  # two crashes, two restarts
    assert (tmp_path / "runs-1").read_text() == "x"  # the other worker ran on untouched
    assert proc.stderr.count("was killed by signal 9; restarting it") == 2


def test_a_worker_failing_at_its_start_stops_the_hub_with_its_status(tmp_path: Path) -> None:
    proc = _supervise(
        tmp_path,
        """
        if index == 1:
            return 3  # e.g. the store is unreachable: it would fail again
        time.sleep(30)
        return 0
        """,
    )
    assert proc.returncode == 3, proc.stderr
    assert "worker 1 exited with status 3 at its start; stopping" in proc.stderr
    assert (tmp_path / "runs-1").read_text() == "x"  # not restarted
