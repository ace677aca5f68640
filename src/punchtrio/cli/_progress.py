"""How ``punchtrio up`` and ``punchtrio demo`` show what happens: JSON lines, or a rich progress view.

Both reporters take ``(event, fields)``: ``event`` is a snake_case name (``"stage_started"``,
``"peer_connected"``, ``"up"``...), ``fields`` plain JSON values.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from ._logs import timestamp

if TYPE_CHECKING:  # rich is imported by ProgressView itself: ``--json`` runs start faster without
    from rich.console import Console
    from rich.status import Status

_STAGE_TEXT = {
    "stun": "asking STUN for our public address",
    "register": "registering at the hub",
    "wait": "waiting for {peer} at the hub",
    "punch": "punching through to {peer}",
    "handshake": "WireGuard handshake with {peer}",
    "established": "tunnel to {peer} established",
}


class JsonLines:
    """Write each event as one JSON object per line and flush: ``{"event": name, "time": T,
    **fields}``, ``T`` the moment it was written, RFC 3339 UTC with milliseconds
    (``"2025-06-01T12:00:00.123Z"``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(json.dumps({"event": event, "time": timestamp(), **fields}) + "\n")
        stream.flush()

    def close(self) -> None:
        """Nothing to tear down (kept for the reporter interface)."""


class ProgressView:
    """A human view of the pipeline on ``console`` (default: stderr).

    On a terminal the current stage spins and each finished step is printed with a check mark;
    elsewhere (a pipe, a log file) the same steps are plain lines. Call :meth:`close` at the end.
    """

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True, highlight=False)
        self._status: Status | None = None
        if self.console.is_terminal:
            self._status = self.console.status("starting", spinner="dots")
            self._status.start()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        line = self._line(event, _escaped(fields))
        if event == "stage_started":
            text = _STAGE_TEXT.get(str(fields.get("stage")), "{peer}").format(
                peer=fields.get("peer") or "peer"
            )
            if self._status is not None:
                self._status.update(text)
            else:
                self.console.print(f"… {text}", markup=False)
        elif line is not None:
            self.console.print(line)

    def _line(self, event: str, fields: dict[str, Any]) -> str | None:
        if event == "up":
            return f"[green]✓[/] tunnel {fields.get('interface')} up, UDP port {fields.get('listen_port')}"
        if event == "candidates_gathered":
            found = ", ".join(str(c) for c in fields.get("candidates", []))
            varies = fields.get("mapping_varies")
            nat = {True: "per destination", False: "independent of destination", None: "unknown"}[
                varies
            ]
            return f"[green]✓[/] candidates: {found or 'none'} (NAT mapping {nat})"
        if event == "registered":
            return "[green]✓[/] registered at the hub"
        if event == "peer_found":
            return f"[green]✓[/] found {fields.get('peer')} at the hub"
        if event == "path_chosen":
            return (
                f"[green]✓[/] path to {fields.get('peer')}: {fields.get('path')} via "
                f"{fields.get('endpoint')} ({fields.get('rtt_ms', 0):.1f} ms)"
            )
        if event == "peer_connected":
            return (
                f"[bold green]✓ connected to {fields.get('peer')}[/] ({fields.get('path')}, "
                f"{fields.get('endpoint')}) after {fields.get('elapsed_ms', 0):.0f} ms; Ctrl-C to stop"
            )
        if event == "path_changed":
            via = f" ({fields['relay']})" if fields.get("relay") else ""
            return (
                f"[green]✓[/] path to {fields.get('peer')}: {fields.get('from')} → "
                f"{fields.get('to')} via {fields.get('endpoint')}{via}"
            )
        if event == "direct_path_failed":
            return (
                f"[yellow]![/] {fields.get('peer')} stays on the relay, no direct path answered: "
                f"{fields.get('reason')}; trying again in {float(fields.get('retry_in', 0)):.0f} s "
                "and then less often"
            )
        if event == "path_lost":
            return f"[yellow]![/] lost the path to {fields.get('peer')}; probing again"
        if event == "peer_failed":
            failed = f"[red]✗[/] {fields.get('peer')} failed at the {fields.get('stage')} stage"
            retry = fields.get("retry_in")
            if retry is None:  # final: the CLI's one-line error follows, only mark the peer here
                return failed
            return f"{failed}: {fields.get('reason')}; retrying in {float(retry):.0f} s"
        if event == "peer_removed":
            return f"[yellow]-[/] removed {fields.get('peer')}: {fields.get('reason')}"
        if event == "down":
            return f"[green]✓[/] tunnel {fields.get('interface')} down"
        if event in ("uapi_unavailable", "control_unavailable"):
            what = "wg show" if event == "uapi_unavailable" else "punchtrio status"
            return f"[yellow]![/] no {what} for this tunnel: {fields.get('reason')}"
        return None

    def close(self) -> None:
        """Stop the spinner (idempotent)."""
        if self._status is not None:
            self._status.stop()
            self._status = None


def _escaped(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with their text escaped for rich markup: ``[fd00::2]:51820`` is an endpoint,
    not a markup tag (unescaped, rich would print ``:51820``)."""
    from rich.markup import escape

    def one(value: Any) -> Any:
        if isinstance(value, str):
            return escape(value)
        if isinstance(value, list):
            return [one(item) for item in value]
        return value

    return {key: one(value) for key, value in fields.items()}
