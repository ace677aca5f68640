"""``punchtrio keygen`` and ``punchtrio pubkey``: keys exactly as ``wg genkey`` / ``wg pubkey``."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any

from ..keys import PrivateKey
from ._main import UsageError


def register(subparsers: Any) -> None:
    """Add ``keygen`` and ``pubkey`` to the ``punchtrio`` parser."""
    keygen = subparsers.add_parser(
        "keygen",
        help="print a new private key (like `wg genkey`)",
        description=(
            "Print a new base64 private key, or write it to FILE with mode 0600. Like `wg genkey`, "
            "warns on stderr when stdout is a file that others may read; never replaces an "
            "existing FILE unless --force is given."
        ),
    )
    keygen.add_argument("--out", metavar="FILE", help="write the key to FILE (mode 0600)")
    keygen.add_argument(
        "--force",
        action="store_true",
        help="replace FILE if it exists (it is left as is otherwise)",
    )
    keygen.set_defaults(run=_keygen)

    pubkey = subparsers.add_parser(
        "pubkey",
        help="read a private key on stdin, print its public key (like `wg pubkey`)",
        description="Read a base64 private key on stdin and print its base64 public key.",
    )
    pubkey.set_defaults(run=_pubkey)


def _keygen(args: argparse.Namespace) -> int:
    key = PrivateKey.generate()
    if args.out:
        try:
            if args.force:
                key.write(args.out)
            else:
                _write_new(args.out, key)
        except FileExistsError:
            raise UsageError(
                f"{args.out} exists; not replacing a key file (pass --force to replace it)"
            ) from None
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror}") from None
    else:
        if _stdout_is_world_accessible_file():
            print(
                "punchtrio: warning: writing a private key to a file others can read; "
                "run `umask 077` first, or use --out FILE (mode 0600)",
                file=sys.stderr,
            )
        sys.stdout.write(key.to_base64() + "\n")
    return 0


def _write_new(path: str, key: PrivateKey) -> None:
    """Create ``path`` (mode 0600) and write ``key`` to it; :class:`FileExistsError` if it exists.

    ``O_EXCL`` makes "does it exist" and "create it" one step, so a file that appears in between
    is never overwritten, and a symbolic link at ``path`` (even a dangling one) is refused too.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits away, never added any: make it exact
        os.write(fd, (key.to_base64() + "\n").encode("ascii"))
    finally:
        os.close(fd)


def _stdout_is_world_accessible_file() -> bool:
    """Whether stdout is a regular file with any permission bit for others (as ``wg genkey``).

    A terminal, a pipe or a stream without a descriptor is never warned about: only a regular file
    keeps the key after the command ends.
    """
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return stat.S_ISREG(mode) and bool(mode & stat.S_IRWXO)


def _pubkey(args: argparse.Namespace) -> int:
    key = PrivateKey.from_base64(sys.stdin.read(256))
    sys.stdout.write(key.public_key().to_base64() + "\n")
    return 0
