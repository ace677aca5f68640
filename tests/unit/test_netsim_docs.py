"""The example in docs/netsim.md runs and prints what the page says it prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "netsim.md"


def test_the_two_nat_example_prints_its_mapping_tables(capsys: pytest.CaptureFixture[str]) -> None:
    text = DOC.read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S)
    assert example is not None
    exec(compile(example[1], str(DOC), "exec"), {"__name__": "netsim_doc_example"})
    printed = capsys.readouterr().out.splitlines()
    documented = re.search(r"mapping tables:\n\n```\n(.*?)```", text, re.S)
    assert documented is not None
    for line in documented[1].splitlines():
        if line != "  ...":
            assert line in printed
