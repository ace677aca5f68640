"""The peers of one network as the hub lists them (``GET /v1/peers``), and the listing's tag.

A listing names every live record of the signer's network with its revision and remaining
lifetime; its :attr:`PeerListing.tag` is a digest of the ``(name, revision)`` pairs, so a
watcher long-polls with ``since=<tag>`` and the hub answers as soon as a peer joins, changes or
leaves (deleted or expired). A refresh that changes nothing keeps the tag.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._models import ValidationError, _check_seconds, _exact_keys, validate_name

MAX_LISTED_PEERS = 1024
"""Most peers in one listing (the first by name); a larger network sets ``truncated``."""

TAG_PATTERN = re.compile(r"[0-9a-f]{32}")
"""A listing tag: 32 lowercase hex digits (matched with ``fullmatch``)."""


def listing_tag(peers: Iterable[tuple[str, int]]) -> str:
    """Return the tag of a listing of ``(name, revision)`` pairs (any order): 32 hex digits."""
    digest = hashlib.blake2s(digest_size=16, person=b"ptlist1")
    for name, revision in sorted(peers):
        digest.update(f"{name} {revision}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ListedPeer:
    """One entry of a listing: the peer's ``name``, record ``revision`` and ``expires_in``
    (seconds the record lives unless refreshed). Raises :class:`ValidationError` when invalid."""

    name: str
    revision: int
    expires_in: float

    def __post_init__(self) -> None:
        validate_name(self.name)
        if isinstance(self.revision, bool) or not isinstance(self.revision, int):
            raise ValidationError("revision must be a positive integer")
        if self.revision < 1:
            raise ValidationError("revision must be a positive integer")
        _check_seconds(self.expires_in, "expires_in")

    def to_json(self) -> dict[str, Any]:
        """Return ``{"name", "revision", "expires_in"}`` (``expires_in`` to milliseconds)."""
        return {
            "name": self.name,
            "revision": self.revision,
            "expires_in": round(self.expires_in, 3),
        }

    @classmethod
    def from_json(cls, obj: object) -> ListedPeer:
        """Parse one entry. Raises :class:`ValidationError`."""
        fields = _exact_keys(obj, "peer", required=("name", "revision", "expires_in"))
        return cls(
            validate_name(fields["name"]),
            fields["revision"],  # type: ignore[arg-type]
            fields["expires_in"],  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class PeerListing:
    """The peers of one network: ``peers`` sorted by name, unique; ``truncated`` when the network
    holds more than :data:`MAX_LISTED_PEERS`; ``tag`` names this content (:func:`listing_tag`).

    JSON: ``{"peers": [...], "tag": "...", "truncated": false}``. Construction checks that the
    tag matches the peers, so a listing can be trusted to be what its tag says. Raises
    :class:`ValidationError`.
    """

    peers: tuple[ListedPeer, ...]
    truncated: bool = False
    tag: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.peers, tuple) or not all(
            isinstance(p, ListedPeer) for p in self.peers
        ):
            raise ValidationError("peers must be a tuple of ListedPeer")
        if len(self.peers) > MAX_LISTED_PEERS:
            raise ValidationError(f"peers: at most {MAX_LISTED_PEERS} entries")
        names = [p.name for p in self.peers]
        if names != sorted(set(names)):
            raise ValidationError("peers must be sorted by name, each name once")
        if not isinstance(self.truncated, bool):
            raise ValidationError("truncated must be true or false")
        tag = listing_tag((p.name, p.revision) for p in self.peers)
        if self.tag == "":
            object.__setattr__(self, "tag", tag)
        elif self.tag != tag:
            raise ValidationError("tag does not match the peers")

    @classmethod
    def of(cls, peers: Iterable[tuple[str, int, float]], *, truncated: bool = False) -> PeerListing:
        """Return the listing of ``(name, revision, expires_in)`` triples (any order)."""
        entries = sorted((ListedPeer(n, r, e) for n, r, e in peers), key=lambda p: p.name)
        return cls(tuple(entries), truncated)

    @property
    def names(self) -> frozenset[str]:
        """Every listed name."""
        return frozenset(p.name for p in self.peers)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object of this listing."""
        return {
            "peers": [p.to_json() for p in self.peers],
            "tag": self.tag,
            "truncated": self.truncated,
        }

    @classmethod
    def from_json(cls, obj: object) -> PeerListing:
        """Parse a listing as the hub returns it. Raises :class:`ValidationError`."""
        fields = _exact_keys(obj, "listing", required=("peers", "tag", "truncated"))
        peers = fields["peers"]
        if not isinstance(peers, list) or len(peers) > MAX_LISTED_PEERS:
            raise ValidationError(f"peers must be a list of at most {MAX_LISTED_PEERS} entries")
        tag = fields["tag"]
        if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
            raise ValidationError("tag must be 32 lowercase hex digits")
        return cls(
            tuple(ListedPeer.from_json(p) for p in peers),
            fields["truncated"],  # type: ignore[arg-type]
            tag,
        )
