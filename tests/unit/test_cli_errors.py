"""The CLI's error policy: one line and an exit status, whatever raised the error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import pytest

from punchtrio import PunchtrioError
from punchtrio.cli import _main

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


class _Coded(PunchtrioError):
    exit_code = 8


def _command(raise_it: Callable[[], object]) -> Callable[[], argparse.ArgumentParser]:
    def build() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser()
        parser.set_defaults(run=lambda args: raise_it())
        return parser

    return build


def _boom(exc: BaseException) -> Callable[[], object]:
    def raise_it() -> object:
        raise exc

    return raise_it


@pytest.mark.parametrize(
    ("exc", "status", "line"),
    [
        (_Coded("punch: no path to bob"), 8, "punchtrio: error: punch: no path to bob\n"),
        (_main.UsageError("bad flag"), 2, "punchtrio: error: bad flag\n"),
        (
            ExceptionGroup("nursery", [_Coded("register: refused")]),
            8,
            "punchtrio: error: register: refused\n",
        ),
        (
            BaseExceptionGroup("outer", [ExceptionGroup("inner", [_main.UsageError("x:3: bad")])]),
            2,
            "punchtrio: error: x:3: bad\n",
        ),
    ],
)
def test_errors_are_one_line_even_from_a_nursery(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    status: int,
    line: str,
) -> None:
    monkeypatch.setattr(_main, "build_parser", _command(_boom(exc)))
    assert _main.main([]) == status
    assert capsys.readouterr().err == line


def test_a_group_of_several_errors_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    group = ExceptionGroup("two", [_Coded("a"), _Coded("b")])
    monkeypatch.setattr(_main, "build_parser", _command(_boom(group)))
    with pytest.raises(ExceptionGroup):
        _main.main([])
