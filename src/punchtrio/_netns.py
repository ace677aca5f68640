"""Network namespaces and veth pairs that are always torn down, even after a failed run.

The one home of these primitives: ``punchtrio demo`` builds its root lab with them, and the
repository's ``labs.netns`` re-exports them for the lab scenarios, tests and benchmarks. Standard
library only, so importing it costs nothing at start-up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._exceptions import PunchtrioError


class LabError(PunchtrioError):
    """A lab command failed or timed out, or the machine lacks what the lab needs (root, a binary)."""


def require_root() -> None:
    """Raise :class:`LabError` unless running as root."""
    if os.geteuid() != 0:
        raise LabError("the NAT lab needs root (network namespaces, nftables)")


def require_binaries(*names: str) -> None:
    """Raise :class:`LabError` naming every binary in ``names`` that is not on PATH."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise LabError(f"missing from PATH: {', '.join(missing)} (run scripts/bootstrap)")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = None,
) -> str:
    """Run a command and return its stdout.

    ``timeout`` is in seconds (default: none). Raises :class:`LabError` with the command's stderr
    if it exits non-zero (unless ``check`` is false) or does not finish within ``timeout``.
    """
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, input=input, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: no exit within {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Namespace:
    """One network namespace; ``exec`` builds argv that runs a command inside it."""

    name: str

    def exec(self, *argv: str) -> list[str]:
        """Return ``argv`` prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Run ``argv`` inside this namespace; see :func:`run` (same options, same errors)."""
        return run(self.exec(*argv), check=check, input=input, timeout=timeout)

    def popen(self, *argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this namespace; ``kwargs`` go to :class:`subprocess.Popen`."""
        return subprocess.Popen(self.exec(*argv), **kwargs)  # type: ignore[call-overload, no-any-return]


@dataclass
class Lab:
    """A set of namespaces with a common prefix, all deleted by :meth:`close`.

    Use it as a context manager (entering raises :class:`LabError` unless root). Names are short
    (``ip`` limits interface names to 15 bytes); the prefix (default ``pt`` + 4 random hex digits)
    keeps parallel or leftover labs apart. ``stop_timeout`` is how long, in seconds (default 5),
    :meth:`close` waits for each spawned process after SIGTERM before it sends SIGKILL.
    """

    prefix: str = field(default_factory=lambda: "pt" + secrets.token_hex(2))
    namespaces: list[Namespace] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stop_timeout: float = 5

    def namespace(self, role: str) -> Namespace:
        """Create the namespace ``<prefix>-<role>`` with loopback up and return it.

        Raises :class:`LabError` if ``ip`` fails (for example, the name exists already).
        """
        ns = Namespace(f"{self.prefix}-{role}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def veth(self, a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
        """Create a veth pair with end ``a_if`` in ``a`` and ``b_if`` in ``b``, both up.

        Raises :class:`LabError` if ``ip`` fails.
        """
        tmp_a, tmp_b = (
            f"{self.prefix}{secrets.token_hex(3)}",
            f"{self.prefix}{secrets.token_hex(3)}",
        )
        run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        run(["ip", "link", "set", tmp_a, "netns", a.name, "name", a_if])
        run(["ip", "link", "set", tmp_b, "netns", b.name, "name", b_if])
        a.run("ip", "link", "set", a_if, "up")
        b.run("ip", "link", "set", b_if, "up")

    def spawn(self, ns: Namespace, *argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in ``ns`` that :meth:`close` stops; ``kwargs`` go to ``Popen``."""
        proc = ns.popen(*argv, **kwargs)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        """Stop every spawned process, close its pipes and delete every namespace (and so their
        interfaces, nftables tables and conntrack state). Safe to call twice."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):  # stdin to a dead process: broken pipe
                        stream.close()
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns.name], check=False)
        self.processes.clear()
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        require_root()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def leftover_namespaces(prefix: str = "pt") -> list[str]:
    """Return the names of existing namespaces that start with ``prefix``."""
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]
