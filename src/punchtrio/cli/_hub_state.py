"""The hub's state directory: one hub process at a time, its key (0600) and its SQLite database."""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .. import PunchtrioError
from ..keys import InvalidKeyError, PrivateKey

ROOT_STATE_DIR = Path("/var/lib/punchtrio/hub")
"""Where ``punchtrio hub`` keeps its state when run as root without ``--state-dir``."""

KEY_FILE = "hub.key"
"""The hub's static key inside the state directory (created 0600 at the first start)."""

DATABASE_FILE = "hub.sqlite3"
"""The SQLite store inside the state directory (with its ``-wal`` and ``-shm`` files)."""

LOCK_FILE = "lock"
"""Locked (``flock``) by the hub that uses the directory; holds its process id."""


class HubStateError(PunchtrioError):
    """The state directory cannot be used: unwritable, invalid key, or taken by another hub."""

    exit_code = 3


def default_state_dir() -> Path:
    """Return the default state directory: :data:`ROOT_STATE_DIR` for root, else
    ``$XDG_STATE_HOME/punchtrio/hub`` (``~/.local/state/punchtrio/hub``)."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "punchtrio" / "hub"


@dataclass
class HubState:
    """An opened state directory: held locked until :meth:`close` (or the process ends)."""

    directory: Path
    lock_fd: int

    @property
    def database(self) -> Path:
        """The SQLite database's path."""
        return self.directory / DATABASE_FILE

    def key(self) -> PrivateKey:
        """Return the hub key kept in the directory, made (0600) if there is none yet.

        Raises :class:`HubStateError` if the file exists but is not a key, or cannot be written.
        """
        path = self.directory / KEY_FILE
        try:
            return PrivateKey.from_file(path)
        except InvalidKeyError as exc:
            if path.exists():
                raise HubStateError(str(exc)) from None
        key = PrivateKey.generate()
        partial = path.with_name(KEY_FILE + ".new")
        try:
            key.write(partial)
            os.replace(partial, path)  # never a half-written key under the real name
        except OSError as exc:
            raise HubStateError(f"cannot write the hub key {path}: {exc.strerror}") from None
        return key

    def close(self) -> None:
        """Release the directory for another hub process."""
        os.close(self.lock_fd)


def open_state(directory: str | os.PathLike[str]) -> HubState:
    """Create ``directory`` (0700) if needed and lock it for this process.

    Raises :class:`HubStateError` naming the directory when it cannot be created or written, or
    when another running hub holds it (with that hub's process id).
    """
    path = Path(directory)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise HubStateError(
            f"cannot use the state directory {path}: {exc.strerror}; "
            "give a writable --state-dir, or --store memory to keep no state"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise HubStateError(
            f"another punchtrio hub (pid {holder or '?'}) uses the state directory {path}; "
            "give each hub its own --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return HubState(path, fd)
