"""Debian's RFC 3489 ``stun`` client (package stun-client) against our server on loopback."""

from __future__ import annotations

import re
import shutil

import pytest
import trio

from punchtrio.stun import StunServer

pytestmark = pytest.mark.interop


def _require_stun_client() -> str:
    """Fail (never skip) when the ``stun`` binary is missing; it needs no root."""
    path = shutil.which("stun")
    if path is None:
        pytest.fail("missing from PATH: stun (Debian package stun-client; run scripts/bootstrap)")
    return path


async def test_debian_stun_client_parses_our_replies() -> None:
    stun = _require_stun_client()
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0), rate=None)
    async with trio.open_nursery() as nursery:
        primary, primary_alt_port, alt_primary_port, alternate = await nursery.start(server.serve)
        with trio.fail_after(60):
            done = await trio.run_process(
                [stun, f"{primary[0]}:{primary[1]}", "-v"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        nursery.cancel_scope.cancel()
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    # It read our MAPPED-ADDRESS, SOURCE-ADDRESS and CHANGED-ADDRESS...
    assert re.search(r"MappedAddress = 127\.0\.0\.1:\d+", out), out
    assert f"ChangedAddress = {alternate[0]}:{alternate[1]}" in out, out
    # ...saw each CHANGE-REQUEST answered from the right address...
    for source in (primary, alt_primary_port, primary_alt_port):
        assert f"SourceAddress = {source[0]}:{source[1]}" in out, out
    # ...and concluded there is no NAT on loopback, as punchtrio nat does.
    assert "test I = 1" in out, out
    assert "test II = 1" in out, out
    assert "Primary: Open" in out, out
    assert server.stats.malformed == 0
