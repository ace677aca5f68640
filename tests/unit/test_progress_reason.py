"""The progress view names the reasons: of a retried peer failure, of a relayed peer's missing
direct path."""

import io

from rich.console import Console

from punchtrio.cli._progress import ProgressView
from punchtrio.cli._up import describe
from punchtrio.connect import DirectPathFailed


def test_a_retried_failure_shows_its_reason_and_the_retry() -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=200))
    reason = "bob did not appear at the rendezvous within 120 s"
    view("peer_failed", {"peer": "bob", "stage": "wait", "reason": reason, "retry_in": 2.0})
    assert reason in out.getvalue()
    assert "2 s" in out.getvalue()


def test_a_final_failure_leaves_its_reason_to_the_error_line() -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=200))
    view(
        "peer_failed", {"peer": "bob", "stage": "punch", "reason": "no path [x]", "retry_in": None}
    )
    assert "bob failed at the punch stage" in out.getvalue()
    assert "no path" not in out.getvalue()


def test_a_retried_failure_s_reason_keeps_its_brackets() -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=200))
    reason = "handshake with [fd00::2]:51820 timed out"
    view("peer_failed", {"peer": "bob", "stage": "handshake", "reason": reason, "retry_in": 4.0})
    assert f"{reason}; retrying in 4 s" in out.getvalue()


def test_a_relayed_peer_shows_why_no_direct_path_answered() -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=300))
    reason = "both NATs map per destination so not even birthday probing reaches a direct path"
    name, fields = describe(DirectPathFailed("bob", reason, 2.0))
    assert (name, fields) == (
        "direct_path_failed",
        {"peer": "bob", "reason": reason, "retry_in": 2.0},
    )
    view(name, fields)
    assert out.getvalue().strip() == (
        f"! bob stays on the relay, no direct path answered: {reason}; trying again in 2 s "
        "and then less often"
    )
