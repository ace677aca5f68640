"""The hub's ASGI app as other ASGI servers import it (``benchmarks._asgi_target:app``), for
``benchmarks/asgi_servers.py``.

The app is built at import from ``PUNCHTRIO_BENCH_HUB_KEY`` (the hub's key file) on the memory
store, with ``--rate 0`` and a one-hour TTL as in ``benchmarks/hub.py``. With
``PUNCHTRIO_BENCH_ANYIO=1`` the three Trio calls of the request handlers
(``trio.move_on_after`` for the body timeout, ``trio.open_nursery`` for long polls,
``trio.current_time`` for the rate limit) are served by their AnyIO equivalents, so the app runs
on asyncio servers: benchmark only, the measure of what that abstraction would allow.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import anyio

import punchtrio.rendezvous._hub as hub_module
from punchtrio import PrivateKey
from punchtrio.rendezvous import HubConfig, create_app

if os.environ.get("PUNCHTRIO_BENCH_ANYIO") == "1":
    hub_module.trio = types.SimpleNamespace(  # type: ignore[attr-defined,assignment]
        move_on_after=anyio.move_on_after,
        open_nursery=anyio.create_task_group,
        current_time=anyio.current_time,
    )

app = create_app(
    HubConfig(
        PrivateKey.from_file(Path(os.environ["PUNCHTRIO_BENCH_HUB_KEY"])), rate=0.0, ttl=3600.0
    )
)
