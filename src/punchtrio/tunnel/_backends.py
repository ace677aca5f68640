"""Tunnel backends by name: the built-in ones and those other packages register.

A backend is any callable ``backend(config, *, name)`` returning an async context manager that
yields a running :class:`~punchtrio.tunnel.Tunnel` and removes everything when left
(:class:`TunnelBackend`). ``punchtrio up --config FILE --tunnel NAME`` runs the backend ``NAME``.
Another package adds one without touching punchtrio by declaring an entry point in the group
:data:`ENTRY_POINT_GROUP`::

    [project.entry-points."punchtrio.tunnel_backends"]
    my-backend = "my_package.tunnel:open_my_tunnel"
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ._interface import Tunnel
from ._tun import TunnelError
from ._userspace import open_userspace_tunnel
from ._wgquick import WgQuickConfig
from ._wireguard_go import open_wireguard_go_tunnel

ENTRY_POINT_GROUP = "punchtrio.tunnel_backends"
"""The entry-point group other packages register tunnel backends in."""

BUILTIN_BACKENDS = ("userspace", "wireguard-go")
"""The backends punchtrio ships: its own WireGuard over a TUN device, and wireguard-go."""


class TunnelBackend(Protocol):
    """Opens a tunnel from a wg-quick configuration: ``async with backend(config, name=name)``.

    ``name`` is the interface name (``""``: the backend picks one). The context manager yields a
    running :class:`~punchtrio.tunnel.Tunnel`; leaving it (normally, by an exception or by
    cancellation) must remove what the backend created. Errors the user can fix should be
    :class:`~punchtrio.tunnel.TunnelError` (``punchtrio up`` prints them as one line).
    """

    def __call__(
        self, config: WgQuickConfig, *, name: str
    ) -> AbstractAsyncContextManager[Tunnel]: ...


@contextlib.asynccontextmanager
async def _userspace(config: WgQuickConfig, *, name: str) -> AsyncIterator[Tunnel]:
    async with open_userspace_tunnel(config, name=name) as tunnel:
        yield tunnel


def tunnel_backend_names() -> tuple[str, ...]:
    """Return the built-in backends' names, then those registered by installed packages."""
    registered = sorted(
        entry.name
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if entry.name not in BUILTIN_BACKENDS
    )
    return (*BUILTIN_BACKENDS, *registered)


def load_tunnel_backend(name: str) -> TunnelBackend:
    """Return the backend called ``name`` (built-in, else from :data:`ENTRY_POINT_GROUP`).

    Raises :class:`TunnelError` naming the known backends for an unknown name, or the cause when
    a registered backend cannot be imported.
    """
    if name == "userspace":
        return _userspace
    if name == "wireguard-go":
        return open_wireguard_go_tunnel
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            try:
                loaded: TunnelBackend = entry.load()
            except Exception as exc:  # a third party's import error: one line, not a traceback
                raise TunnelError(
                    f"tunnel backend {name} ({entry.value}) cannot be loaded: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            return loaded
    raise TunnelError(
        f"unknown tunnel backend {name[:40]!r}: choose one of {', '.join(tunnel_backend_names())}"
    )
