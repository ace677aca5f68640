"""The hub's overlay-address policy, sans-IO: what one record may claim, and what the hub assigns.

:class:`AddressPolicy` holds the operator's choices (network prefixes, how many single addresses a
record may claim, which keys may claim subnet routes); :meth:`AddressPolicy.check` judges one
registration and :func:`assignment_candidates` derives the addresses the hub offers a key, in the
order it tries them against the store's overlap check. ``docs/rendezvous.md`` states the rules.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

from .._exceptions import PunchtrioError
from ..keys import PublicKey
from ._models import IPNetwork, RegisterRequest, ValidationError, check_network_prefixes

DEFAULT_MAX_ADDRESSES = 1
"""Single addresses (/32 or /128) one record may claim per IP version, by default."""

ASSIGN_ATTEMPTS = 8
"""Addresses the hub tries, in order, before it answers that it found no free one (409)."""

_PERSON = b"ptaddr-v1"


class ClaimRefusedError(PunchtrioError):
    """A registration claims allowed IPs this hub's policy does not grant (HTTP 403).

    The message is one line naming the prefix and the rule it breaks.
    """


@dataclass(frozen=True)
class AddressPolicy:
    """What one record may claim as allowed IPs, and where the hub assigns addresses from.

    ``prefixes``: the network prefixes (at most one IPv4 and one IPv6, see
    :func:`~punchtrio.rendezvous.check_network_prefixes`); a single address of a version with a
    prefix must lie inside it, and the hub assigns addresses from it. ``()`` (default): peers
    choose their own addresses. ``max_addresses``: single addresses (/32, /128) per record and IP
    version (1). ``route_keys``: keys that may also claim subnet routes (any shorter prefix),
    outside the network prefixes; no other key may. Raises :class:`ValueError` for bad values.
    """

    prefixes: tuple[IPNetwork, ...] = ()
    max_addresses: int = DEFAULT_MAX_ADDRESSES
    route_keys: frozenset[PublicKey] = field(default=frozenset())

    def __post_init__(self) -> None:
        try:
            check_network_prefixes(self.prefixes)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(self.max_addresses, bool) or not 1 <= self.max_addresses <= 64:
            raise ValueError("max_addresses must be from 1 to 64")

    def prefix_of(self, version: int) -> IPNetwork | None:
        """Return the network prefix of IP ``version`` (4 or 6), or ``None``."""
        for prefix in self.prefixes:
            if prefix.version == version:
                return prefix
        return None

    def check(self, request: RegisterRequest) -> tuple[IPNetwork, ...]:
        """Judge ``request``'s claims; return the prefixes to assign an address from.

        Raises :class:`ClaimRefusedError` for a claim the policy does not grant (too many single
        addresses of one version, a route from a key not in ``route_keys``, an address outside
        the network prefix or a route overlapping it), and :class:`ValidationError` for
        ``assign`` on a hub without prefixes.
        """
        singles = {4: 0, 6: 0}
        for network in request.allowed_ips:
            prefix = self.prefix_of(network.version)
            if network.prefixlen == network.max_prefixlen:
                singles[network.version] += 1
                if prefix is not None and not network.subnet_of(prefix):  # type: ignore[arg-type]
                    raise ClaimRefusedError(
                        f"allowed_ips: {network} is outside this hub's network prefix {prefix}"
                    )
                continue
            if request.public_key not in self.route_keys:
                raise ClaimRefusedError(
                    f"allowed_ips: {network} is a subnet route; this hub accepts routes only "
                    "from keys its operator allows (--allow-routes)"
                )
            if prefix is not None and network.overlaps(prefix):
                raise ClaimRefusedError(
                    f"allowed_ips: route {network} overlaps the network prefix {prefix}, "
                    "which is for peer addresses"
                )
        for version, count in singles.items():
            if count > self.max_addresses:
                size = "/32" if version == 4 else "/128"
                raise ClaimRefusedError(
                    f"allowed_ips: at most {self.max_addresses} {size} address"
                    f"{'es' if self.max_addresses > 1 else ''} per peer"
                )
        if not request.assign:
            return ()
        if not self.prefixes:
            raise ValidationError(
                "this hub assigns no addresses (it has no network prefix): choose your own"
            )
        return tuple(p for p in self.prefixes if singles[p.version] == 0)


def assignment_candidates(key: PublicKey, prefix: IPNetwork) -> Iterator[IPNetwork]:
    """Yield the single-address networks the hub offers ``key`` in ``prefix``, best first.

    Deterministic: the ``n``-th candidate is BLAKE2b-128 of the key, the prefix and ``n`` reduced
    to a host of ``prefix`` (never its first address, nor an IPv4 prefix's last), so one key gets
    the same address whenever its first choice is free. Endless; the caller stops.
    """
    first = int(prefix.network_address)
    size = prefix.num_addresses
    hosts = size - 2 if prefix.version == 4 else size - 1
    text = str(prefix).encode()
    counter = 0
    while True:
        digest = hashlib.blake2b(
            key.raw + text + counter.to_bytes(4, "big"), digest_size=16, person=_PERSON
        ).digest()
        address = ipaddress.ip_address(first + 1 + int.from_bytes(digest, "big") % hosts)
        yield ipaddress.ip_network(f"{address}/{prefix.max_prefixlen}")
        counter += 1


def prefix_hosts(prefix: IPNetwork, limit: int) -> list[IPNetwork]:
    """Return the addresses :func:`assignment_candidates` may offer in ``prefix``, in order, as
    single-address networks; at most ``limit + 1`` of them (enough to tell a prefix with more
    than ``limit`` hosts)."""
    first = int(prefix.network_address)
    hosts = prefix.num_addresses - (2 if prefix.version == 4 else 1)
    return [
        ipaddress.ip_network(f"{ipaddress.ip_address(first + n)}/{prefix.max_prefixlen}")
        for n in range(1, min(hosts, limit + 1) + 1)
    ]


def assigned_in(
    allowed_ips: tuple[IPNetwork, ...], prefix: IPNetwork
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """Return the first single address of ``allowed_ips`` inside ``prefix``, or ``None``."""
    for network in allowed_ips:
        if (
            network.version == prefix.version
            and network.prefixlen == network.max_prefixlen
            and network.subnet_of(prefix)  # type: ignore[arg-type]
        ):
            return network
    return None
