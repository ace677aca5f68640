"""``python -m labs``: list the NAT lab scenarios, or run one (as root)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from . import scenarios
from .netns import LabError
from .topology import cleanup


def _scenarios() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(scenarios.__path__):
        module = importlib.import_module(f"{scenarios.__name__}.{info.name}")
        if hasattr(module, "NAME"):  # the rest are building blocks (restart.py) shared with tests
            found[module.NAME] = module
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> int:
    """List scenarios (``list``) or run one (``run NAME``); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m labs", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the scenarios")
    run = sub.add_parser("run", help="run one scenario")
    run.add_argument("name")
    clean = sub.add_parser(
        "cleanup", help="delete the namespaces (and their processes) a killed lab left behind"
    )
    clean.add_argument("prefix", help="the lab's namespace prefix, e.g. pt1a2b")
    args = parser.parse_args(argv)
    if args.action == "cleanup":
        try:
            for name in cleanup(args.prefix):
                print(f"deleted {name}")
        except LabError as exc:
            print(f"labs: error: {exc}", file=sys.stderr)
            return 1
        return 0
    found = _scenarios()
    if args.action == "list":
        for name, module in found.items():
            print(f"{name:24} {module.DESCRIPTION}")
        return 0
    if args.name not in found:
        print(
            f"labs: error: no scenario {args.name!r} (see `python -m labs list`)", file=sys.stderr
        )
        return 2
    try:
        return int(found[args.name].run())
    except LabError as exc:
        print(f"labs: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
