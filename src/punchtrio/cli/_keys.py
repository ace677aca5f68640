"""``punchtrio keygen`` and ``punchtrio pubkey``: keys exactly as ``wg genkey`` / ``wg pubkey``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..keys import PrivateKey
from ._main import UsageError


def register(subparsers: Any) -> None:
    """Add ``keygen`` and ``pubkey`` to the ``punchtrio`` parser."""
    keygen = subparsers.add_parser(
        "keygen",
        help="print a new private key (like `wg genkey`)",
        description="Print a new base64 private key, or write it to FILE with mode 0600.",
    )
    keygen.add_argument("--out", metavar="FILE", help="write the key to FILE (mode 0600)")
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
            key.write(args.out)
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror}") from None
    else:
        sys.stdout.write(key.to_base64() + "\n")
    return 0


def _pubkey(args: argparse.Namespace) -> int:
    key = PrivateKey.from_base64(sys.stdin.read(256))
    sys.stdout.write(key.public_key().to_base64() + "\n")
    return 0
