"""Addresses, routes, MTU and link state of an interface, through netlink (pyroute2).

pyroute2 is imported inside the functions: its package loads every netlink family it supports,
which costs a tenth of a second that commands not touching interfaces should not pay.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Iterable, Iterator

from ._tun import TunnelError

IFA_F_NODAD = 0x02
"""Address flag: skip IPv6 duplicate address detection (a point-to-point tunnel has no neighbours)."""

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def configure_interface(
    name: str,
    *,
    addresses: Iterable[IPInterface],
    routes: Iterable[IPNetwork],
    mtu: int,
) -> None:
    """Set ``mtu`` on interface ``name``, add ``addresses``, bring it up and route ``routes`` to it.

    IPv4 and IPv6 alike; IPv6 addresses skip duplicate address detection. A route that already
    exists (a prefix the kernel routes because of an address) is left as it is. Default routes
    (``/0``) are not installed: they would capture the tunnel's own UDP traffic. Raises
    :class:`TunnelError` naming what the kernel refused.
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise TunnelError(f"no interface named {name}")
        index = found[0]
        with _refused(f"set MTU {mtu} on {name}"):
            ipr.link("set", index=index, mtu=mtu)
        for address in addresses:
            with _refused(f"add address {address} to {name}"):
                ipr.addr(
                    "add",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                    flags=IFA_F_NODAD if address.version == 6 else 0,
                )
        with _refused(f"bring {name} up"):
            ipr.link("set", index=index, state="up")
        for network in routes:
            if network.prefixlen == 0:
                continue
            with _refused(f"add route {network} via {name}", ignore_exists=True):
                ipr.route(
                    "add",
                    dst=str(network.network_address),
                    dst_len=network.prefixlen,
                    family=socket.AF_INET6 if network.version == 6 else socket.AF_INET,
                    oif=index,
                )


@contextlib.contextmanager
def _refused(what: str, *, ignore_exists: bool = False) -> Iterator[None]:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except NetlinkError as exc:
        if ignore_exists and exc.code == errno.EEXIST:
            return
        raise TunnelError(f"cannot {what}: {exc.args[-1] if exc.args else exc}") from None
