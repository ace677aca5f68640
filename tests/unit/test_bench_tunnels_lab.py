"""The tunnels-lab benchmark judges its goals from the measured numbers and reports failed rows."""

from __future__ import annotations

from benchmarks.tunnels_lab import Row, report

PLAIN = Row([(100.0, 200.0, 1.0, 0.5), (300.0, 200.0, 3.0, 0.5)], {"direct/direct"})


def _goals(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("- ")]


def test_goals_follow_the_ratios() -> None:
    rows = {
        "plain": PLAIN,  # medians: 200, 200 Mbit/s; 2.0, 0.5 ms
        "userspace": Row([(280.0, 300.0, 2.4, 0.5)], {"direct/direct"}),  # 1.4x, 1.5x; 1.2x, 1.0x
        "backend": Row([(190.0, 200.0, 2.0, 0.53)], {"direct/direct"}),  # 0.95x, 1.0x; 1.0x, 1.06x
    }
    goals = _goals(report(rows, 2, 10))
    assert goals[0].endswith("1.40x, 1.50x: met")
    assert goals[1].endswith("1.20x, 1.00x: met")
    assert goals[2].endswith("0.95x, 1.00x: met")
    assert goals[3].endswith("1.00x, 1.06x: not met")


def test_a_failed_row_prints_its_reason_and_misses_its_goals() -> None:
    rows = {
        "plain": PLAIN,
        "userspace": Row([(100.0, 100.0, 5.0, 5.0)], {"direct/direct"}, ["failed: boom"]),
        "backend": Row(failures=["failed: punchtrio: error: no", "failed: again"]),
    }
    text = report(rows, 2, 10)
    assert "| direct/direct (1 of 2 rounds failed: boom) | 100 | 0.50x |" in text
    assert "| failed: punchtrio: error: no (2 of 2 rounds failed) |" in text
    goals = _goals(text)
    assert goals[0].endswith("0.50x, 0.50x: not met")
    assert goals[1].endswith("2.50x, 10.00x: not met")
    assert goals[2].endswith("not met (no measurement)")
    assert goals[3].endswith("not met (no measurement)")
