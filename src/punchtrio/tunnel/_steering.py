"""Kernel steering: WireGuard datagrams on the shared UDP port go to wireguard-go's own port.

punchtrio's connector owns UDP port P, the port whose NAT mapping was punched: STUN, punch probes
and relay frames arrive there, and so must the peer's WireGuard messages. wireguard-go cannot
share a port (it sets neither ``SO_REUSEADDR`` nor ``SO_REUSEPORT``: binding its port again, or
handing it a port we still hold, was measured to fail with ``EADDRINUSE``; see docs/tunnel.md,
"The wireguard-go backend"), so it listens on another port Q and two stateless nftables rules,
in one ``table inet`` (IPv4 and IPv6), make the wire see only P:

- ``prerouting``, priority ``raw``: a datagram to P on one of this host's addresses whose payload
  starts with a WireGuard message type (1-4) followed by three zero bytes is not tracked and its
  destination port becomes Q;
- ``output``, priority ``raw``: a datagram from Q that leaves by any interface but ``lo`` is not
  tracked and its source port becomes P. Loopback traffic from Q keeps its port, because
  punchtrio's relay proxy talks to wireguard-go at ``127.0.0.1:Q``.

Everything else sent to P (STUN, probes, relay frames) still reaches punchtrio's socket.
Design decision: the first rule also requires ``fib daddr type local``, because without it a
host that forwards packets (a router, a container host) rewrote WireGuard passing through to
port P of another machine, a measured failure (``tests/interop/test_steering.py``). The
rules are stateless (``notrack``), so no conntrack entry remembers a translation and nothing needs
flushing when they go.

:func:`steering_ruleset` is the pure part (the ``nft -f`` script); :func:`steer_wireguard` is the
short shell that loads it with ``nft`` and deletes the table again. :func:`steering_table_name`
derives one table name per interface, so two tunnels in one namespace never share a table.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator

from ._tun import TunnelError

NFT_TIMEOUT = 10.0
"""Seconds one ``nft`` command may take before :func:`steer_wireguard` gives up with an error."""

_TABLE_PREFIX = "punchtrio_steer_"
_TABLE_NAME_MAX = 255  # NFT_NAME_MAXLEN is 256 bytes including the terminating NUL
# Only tables in punchtrio's own name space: the script replaces whatever table has the name, and
# a bare word may be an nft keyword (``counter``, ``ip``), which nft refuses as a table name.
_TABLE_NAME = re.compile(r"punchtrio_[A-Za-z0-9_]*")
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# A WireGuard message starts with its type (1 initiation, 2 response, 3 cookie reply, 4 data)
# and three reserved zero bytes: the first 32 payload bits, big-endian, as nft compares them.
_WIREGUARD_HEADS = "0x01000000, 0x02000000, 0x03000000, 0x04000000"
_NFT_MISSING = (
    "nft not found: install nftables (Debian: apt-get install nftables) to steer WireGuard "
    "to wireguard-go's port"
)


def steering_table_name(interface: str) -> str:
    """Return the nftables table name that steers WireGuard for ``interface``.

    The name is ``punchtrio_steer_`` followed by the interface name, in which letters and digits
    stay, ``_`` becomes ``__`` and every other character becomes ``_`` plus the lowercase hex of
    each of its UTF-8 bytes (``wg-0`` gives ``punchtrio_steer_wg_2d0``). It is deterministic and
    distinct interface names give distinct tables. Raises :class:`ValueError` if ``interface``
    is empty or so long that the name would exceed nftables' 255 characters.
    """
    if not interface:
        raise ValueError("an interface name is needed to name its steering table")
    parts: list[str] = []
    for byte in interface.encode("utf-8", "surrogatepass"):
        if byte in _PLAIN:
            parts.append(chr(byte))
        elif byte == ord("_"):
            parts.append("__")
        else:
            parts.append(f"_{byte:02x}")
    name = _TABLE_PREFIX + "".join(parts)
    if len(name) > _TABLE_NAME_MAX:
        raise ValueError(
            f"interface name {interface!r} is too long for an nftables table name "
            f"({len(name)} > {_TABLE_NAME_MAX} characters)"
        )
    return name


def _check_table(table: str) -> None:
    if len(table) > _TABLE_NAME_MAX or _TABLE_NAME.fullmatch(table) is None:
        raise ValueError(
            f"invalid steering table name {table!r}: use 'punchtrio_' followed by letters, "
            f"digits and '_', at most {_TABLE_NAME_MAX} characters (see steering_table_name)"
        )


def _check_port(what: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be a UDP port number 1-65535, not {port!r}")


def steering_ruleset(*, table: str, shared_port: int, wireguard_port: int) -> str:
    """Return the ``nft -f`` script that (re)creates ``table inet TABLE`` with the steering rules.

    ``shared_port`` is P, the punched port punchtrio's socket owns; ``wireguard_port`` is Q, the
    port wireguard-go listens on. The script first creates an empty table of that name and
    deletes it, then defines it in full, all in one transaction: a table left by a killed run is
    replaced, and nothing is half-loaded if nft refuses. Pure: runs nothing.

    Raises :class:`ValueError` if a port is outside 1-65535, the two ports are equal, or
    ``table`` is not ``punchtrio_`` followed by letters, digits and ``_`` (at most 255
    characters; :func:`steering_table_name` always gives such a name). Design decision: only
    names starting ``punchtrio_`` are accepted, because the script replaces any table of that
    name and so must never be pointed at someone else's rules.
    """
    _check_table(table)
    _check_port("shared_port", shared_port)
    _check_port("wireguard_port", wireguard_port)
    if shared_port == wireguard_port:
        raise ValueError(f"shared_port and wireguard_port must differ, both are {shared_port}")
    return (
        f"table inet {table} {{}}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority raw; policy accept;\n"
        f"\t\tudp dport {shared_port} fib daddr type local @th,64,32 {{ {_WIREGUARD_HEADS} }} "
        f"notrack udp dport set {wireguard_port}\n"
        "\t}\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority raw; policy accept;\n"
        f'\t\toifname != "lo" udp sport {wireguard_port} notrack udp sport set {shared_port}\n'
        "\t}\n"
        "}\n"
    )


def _nft_error(action: str, stderr: str) -> TunnelError:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # nft prints the failing line and a ^^^ marker after the message: the first line is the cause.
    cause = lines[0] if lines else "no message"
    if "Operation not permitted" in stderr:
        cause += " (steering needs root or CAP_NET_ADMIN)"
    return TunnelError(f"nft could not {action}: {cause}")


def _run_nft(script: str, *, action: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise TunnelError(_NFT_MISSING)
    try:
        proc = subprocess.run(
            [nft, "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise TunnelError(_NFT_MISSING) from None
    except subprocess.TimeoutExpired:
        raise TunnelError(f"nft could not {action}: no answer within {NFT_TIMEOUT:g} s") from None
    except OSError as exc:
        raise TunnelError(f"nft could not {action}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        raise _nft_error(action, proc.stderr)


@contextlib.contextmanager
def steer_wireguard(*, shared_port: int, wireguard_port: int, table: str) -> Iterator[None]:
    """Steer WireGuard datagrams between ``shared_port`` (P) and ``wireguard_port`` (Q) while open.

    Entering runs ``nft -f -`` with :func:`steering_ruleset` (replacing a stale table of the same
    name); leaving, always (also on an exception or cancellation), deletes ``table inet TABLE``,
    and a table already gone is fine. Both run synchronously (milliseconds) in the calling
    process's network namespace. Yields nothing.

    Raises :class:`ValueError` for bad arguments (see :func:`steering_ruleset`) and
    :class:`~punchtrio.tunnel.TunnelError` with one line naming the cause when ``nft`` is
    missing, refuses (for example without root or ``CAP_NET_ADMIN``), or takes longer than
    :data:`NFT_TIMEOUT` seconds; a failure on entry leaves no table behind.
    """
    script = steering_ruleset(table=table, shared_port=shared_port, wireguard_port=wireguard_port)
    _run_nft(script, action=f"create table inet {table}")
    try:
        yield
    finally:
        # Create-then-delete in one transaction: deleting succeeds whether or not the table is
        # still there (someone may have flushed the ruleset), so "already gone" is no error.
        _run_nft(
            f"table inet {table} {{}}\ndelete table inet {table}\n",
            action=f"delete table inet {table}",
        )
