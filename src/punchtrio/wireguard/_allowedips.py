"""Cryptokey routing table: longest-prefix match from IP address to peer, IPv4 and IPv6."""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

from ._config import ConfigError, IPNetwork

T = TypeVar("T")

_CACHE_LIMIT = 8192


class AllowedIPs(Generic[T]):
    """Maps prefixes to values; :meth:`lookup` returns the value of the longest matching prefix.

    Each prefix length has its own dict keyed by the address shifted right to that length, so a
    lookup costs one dict probe per distinct length in use (longest first). Results are cached per
    address (the cache is bounded and cleared whenever the table changes).
    """

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, dict[int, T]]] = {32: {}, 128: {}}
        self._lengths: dict[int, list[int]] = {32: [], 128: []}
        self.cache: dict[bytes, T | None] = {}
        """Lookups already answered, by packed address; hot paths may probe it before
        :meth:`lookup`. The same dict object lives as long as the table (it is cleared, never
        replaced)."""

    def insert(self, network: IPNetwork, value: T) -> None:
        """Route ``network`` to ``value``. Raises :class:`ConfigError` if another value has it."""
        bits = network.max_prefixlen
        plen = network.prefixlen
        key = int(network.network_address) >> (bits - plen)
        table = self._tables[bits].setdefault(plen, {})
        owner = table.get(key)
        if owner is not None and owner is not value:
            raise ConfigError(f"allowed IP {network} already belongs to another peer")
        table[key] = value
        self._lengths[bits] = sorted((n for n, t in self._tables[bits].items() if t), reverse=True)
        self.cache.clear()

    def remove(self, network: IPNetwork) -> None:
        """Forget ``network`` (no error if absent)."""
        bits = network.max_prefixlen
        plen = network.prefixlen
        table = self._tables[bits].get(plen)
        if table is not None:
            table.pop(int(network.network_address) >> (bits - plen), None)
            self._lengths[bits] = sorted(
                (n for n, t in self._tables[bits].items() if t), reverse=True
            )
        self.cache.clear()

    def lookup(self, address: bytes) -> T | None:
        """Return the value for a packed 4- or 16-byte address, or ``None`` if nothing matches."""
        if address in self.cache:
            return self.cache[address]
        bits = len(address) * 8
        value: T | None = None
        if bits in self._tables:
            number = int.from_bytes(address, "big")
            tables = self._tables[bits]
            for plen in self._lengths[bits]:
                value = tables[plen].get(number >> (bits - plen))
                if value is not None:
                    break
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache.clear()
        self.cache[address] = value
        return value

    def networks(self) -> list[tuple[IPNetwork, T]]:
        """Return every (network, value) pair, longest prefixes first."""
        out: list[tuple[IPNetwork, T]] = []
        for bits, tables in self._tables.items():
            for plen in self._lengths[bits]:
                for key, value in tables[plen].items():
                    addr = key << (bits - plen)
                    net: IPNetwork
                    if bits == 32:
                        net = ipaddress.IPv4Network((addr, plen))
                    else:
                        net = ipaddress.IPv6Network((addr, plen))
                    out.append((net, value))
        return out
