"""``python -m benchmarks [NAME...]``: run benchmarks, print them, update ``docs/benchmarks.md``."""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import sys
from pathlib import Path

import benchmarks

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str]) -> int:
    """Run the named benchmarks (all by default) and rewrite their sections of the doc."""
    modules = {}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        modules[module.NAME] = module
    chosen = argv or sorted(modules)
    unknown = [name for name in chosen if name not in modules]
    if unknown:
        print(f"benchmarks: no benchmark named {', '.join(unknown)}", file=sys.stderr)
        return 2
    sections = _read_sections()
    for name in chosen:
        print(f"== {name}", flush=True)
        text = modules[name].run().strip()
        print(text, flush=True)
        sections[name] = text
    _write_sections(sections)
    return 0


_MARK = "<!-- bench:"


def _read_sections() -> dict[str, str]:
    sections: dict[str, str] = {}
    if not DOC.exists():
        return sections
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith(_MARK):
            current = line[len(_MARK) :].rstrip("-> ").strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def _write_sections(sections: dict[str, str]) -> None:
    parts = [
        "# Benchmarks\n",
        "Written by `nox -s bench` (as root); each section compares punchtrio with a baseline",
        "measured in the same run, so read the ratios, not the absolute numbers.\n",
        f"Last machine: {_machine()}.\n",
    ]
    for name, text in sorted(sections.items()):
        parts.append(f"{_MARK} {name} -->\n{text.strip()}\n")
    DOC.write_text("\n".join(parts))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
