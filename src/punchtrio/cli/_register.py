"""``punchtrio register`` and ``punchtrio lookup``: one request to a rendezvous hub, JSON out."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from ..keys import InvalidKeyError, PrivateKey, PublicKey
from ..rendezvous import (
    Endpoint,
    EndpointType,
    HubClient,
    InvalidNetworkSecretError,
    NetworkSecret,
    PeerRecord,
    ValidationError,
    parse_allowed_ip,
    validate_name,
)
from ._main import UsageError

_TYPES = {t.value: t for t in EndpointType}


def register(subparsers: Any) -> None:
    """Add ``register`` and ``lookup`` to the ``punchtrio`` parser."""
    reg = subparsers.add_parser(
        "register",
        help="register this peer at a rendezvous hub once and print the stored record",
        description=(
            "Register NAME with the public key of --key-file at the hub, print the record the hub "
            "stored as JSON and exit 0. A refusal prints the hub's reason and exits 4. The record "
            "lives for the hub's TTL (see docs/rendezvous-client.md)."
        ),
    )
    _common(reg)
    reg.add_argument(
        "--endpoint",
        metavar="[TYPE:]IP:PORT",
        action="append",
        default=[],
        help="a candidate endpoint; TYPE is host (default), srflx or relay; IPv6 as [IP]:PORT",
    )
    reg.add_argument(
        "--allowed-ip",
        metavar="CIDR",
        action="append",
        default=[],
        help="an allowed-IP prefix in canonical form, such as 10.0.0.2/32 (repeatable)",
    )
    reg.set_defaults(run=_register)

    look = subparsers.add_parser(
        "lookup",
        help="print a peer's record from a rendezvous hub",
        description=(
            "Print the record of peer NAME as JSON and exit 0; if the hub has no such peer (or it "
            "is in another network) say so and exit 3."
        ),
    )
    _common(look)
    look.set_defaults(run=_lookup)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub", metavar="URL", required=True, help="hub URL, http(s)://HOST:PORT")
    parser.add_argument("--name", metavar="NAME", required=True, help="peer name")
    parser.add_argument(
        "--key-file",
        metavar="FILE",
        required=True,
        help="this peer's WireGuard private key (it signs the request)",
    )
    parser.add_argument(
        "--network-secret-file", metavar="FILE", help="the network secret, if the hub has networks"
    )
    parser.add_argument(
        "--hub-key", metavar="BASE64", help="refuse a hub whose public key is not this one"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per request attempt (10)"
    )


def _client(args: argparse.Namespace, name: str) -> HubClient:
    try:
        key = PrivateKey.from_file(args.key_file)
        hub_key = None if args.hub_key is None else PublicKey.from_base64(args.hub_key)
    except InvalidKeyError as exc:
        raise UsageError(str(exc)) from None
    try:
        secret = (
            None
            if args.network_secret_file is None
            else NetworkSecret.from_file(args.network_secret_file)
        )
    except InvalidNetworkSecretError as exc:
        raise UsageError(str(exc)) from None
    if not (args.timeout > 0 and args.timeout < 3600):
        raise UsageError("--timeout must be a number of seconds between 0 and 3600")
    try:
        return HubClient(
            args.hub,
            key,
            name,
            network_secret=secret,
            hub_public_key=hub_key,
            timeout=args.timeout,
            attempts=3,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _name(text: str, option: str) -> str:
    try:
        return validate_name(text, what=option)
    except ValidationError as exc:
        raise UsageError(str(exc)) from None


def _endpoint(text: str) -> Endpoint:
    kind, sep, rest = text.partition(":")
    kind_type = _TYPES.get(kind) if sep else None
    try:
        if kind_type is not None:
            return Endpoint.parse(rest, kind_type)
        return Endpoint.parse(text, EndpointType.HOST)
    except ValidationError as exc:
        raise UsageError(f"--endpoint {text}: {exc}") from None


def _print(record: PeerRecord) -> None:
    sys.stdout.write(json.dumps(record.to_json(), indent=2) + "\n")


def _register(args: argparse.Namespace) -> int:
    name = _name(args.name, "--name")
    endpoints = [_endpoint(text) for text in args.endpoint]
    try:
        allowed = [parse_allowed_ip(text, what="--allowed-ip") for text in args.allowed_ip]
    except ValidationError as exc:
        raise UsageError(str(exc)) from None
    client = _client(args, name)

    async def main() -> PeerRecord:
        try:
            return await client.register(endpoints, allowed)
        finally:
            await client.aclose()

    _print(trio.run(main))
    return 0


def _lookup(args: argparse.Namespace) -> int:
    name = _name(args.name, "--name")
    client = _client(args, name)

    async def main() -> PeerRecord:
        try:
            return await client.lookup(name)
        finally:
            await client.aclose()

    _print(trio.run(main))
    return 0
