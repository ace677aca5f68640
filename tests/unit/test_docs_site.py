"""The documentation site's promises that `mkdocs build --strict` cannot check by itself.

The strict build (`nox -s lint`) fails on broken links, anchors, nav entries and API targets. These
tests need no MkDocs: the nav and `docs/` agree, every public package has its reference page, every
`punchtrio ...` command the user guides show parses with the real parser, the JSON sample of the
quickstart uses documented events, and the runnable examples print what their page says.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from punchtrio.cli._main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PUBLIC_PACKAGES = (
    "punchtrio",
    "punchtrio.connect",
    "punchtrio.relay",
    "punchtrio.punch",
    "punchtrio.stun",
    "punchtrio.rendezvous",
    "punchtrio.wireguard",
    "punchtrio.tunnel",
    "punchtrio.netsim",
    "punchtrio.natlab",
    "punchtrio.mux",
)
# The pages written for users (the Internals pages belong to each package's owners).
GUIDES = (
    "index.md",
    "quickstart.md",
    "deploy-hub.md",
    "service.md",
    "troubleshooting.md",
    "security.md",
    "nat-research.md",
    "docs-site.md",
    "packaging.md",
)
INTERNALS = (
    "architecture.md",
    "cli.md",
    "connect.md",
    "relay.md",
    "netsim.md",
    "rendezvous.md",
    "benchmarks.md",
    "lab.md",
    "punch.md",
    "stun.md",
    "wireguard.md",
    "tunnel.md",
)
SHELL_OPERATORS = {"&&", "||", "|", ";", "<", ">", ">>", "2>", "&"}


def _nav() -> list[tuple[int, str, str | None]]:
    """``(indent, title, page)`` for each nav line of mkdocs.yml (page None for a section)."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:\n") + 6 :]
    entries = []
    for line in nav.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            break  # the next top-level key
        match = re.fullmatch(r'(\s*)- (?:"([^"]+)"|([^:]+)):\s*(\S+\.md)?\s*', line)
        assert match is not None, f"unexpected nav line: {line!r}"
        entries.append((len(match[1]), match[2] or match[3], match[4]))
    return entries


def _section(title: str) -> set[str]:
    entries = _nav()
    start = next(i for i, (_, name, page) in enumerate(entries) if name == title and page is None)
    depth = entries[start][0]
    pages = set()
    for indent, _, page in entries[start + 1 :]:
        if indent <= depth:
            break
        if page is not None:
            pages.add(page)
    return pages


def test_every_page_is_in_the_nav_once_and_every_entry_exists() -> None:
    pages = [page for _, _, page in _nav() if page is not None]
    assert len(pages) == len(set(pages)), "a page is in the nav twice"
    on_disk = {
        str(path.relative_to(DOCS))
        for path in DOCS.rglob("*.md")
        if path.relative_to(DOCS).parts[0] != "hooks"
    }
    assert set(pages) == on_disk


def test_existing_package_pages_are_under_internals() -> None:
    assert set(INTERNALS) <= _section("Internals")
    assert {"docs-site.md", "packaging.md"} <= _section("Internals")
    assert set(GUIDES) - {"index.md", "quickstart.md", "docs-site.md", "packaging.md"} <= _section(
        "Guides"
    )


@pytest.mark.parametrize("package", PUBLIC_PACKAGES)
def test_each_public_package_has_a_reference_page(package: str) -> None:
    page = DOCS / "reference" / f"{package}.md"
    assert f"::: {package}\n" in page.read_text()
    assert f"reference/{package}.md" in _section("API reference")
    module = importlib.import_module(package)
    assert module.__all__, package  # mkdocstrings renders what __all__ exports
    # The reference leaves out a name without a docstring (show_if_no_docstring: false), so every
    # exported class and function needs its own (a dataclass's generated one does not count).
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = (obj.__doc__ or "").strip()
            assert doc, f"{package}.{name} has no docstring"
            assert not doc.startswith(f"{obj.__name__}("), f"{package}.{name}: generated docstring"


def _code_blocks(page: str, language: str) -> list[str]:
    text = (DOCS / page).read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _punchtrio_argvs(command_line: str) -> Iterator[list[str]]:
    """Every ``punchtrio`` invocation in one shell command line, as its argument list.

    A command is the first word of a segment between shell operators (after ``sudo`` and
    ``VAR=value`` words); ``sh -c '...'`` is looked into.
    """
    tokens = shlex.split(command_line, comments=True)
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token not in SHELL_OPERATORS:
            segment.append(token)
            continue
        words = list(segment)
        segment = []
        while words and (words[0] == "sudo" or re.fullmatch(r"[A-Z_]+=\S*", words[0])):
            words.pop(0)
        if not words:
            continue
        if words[0].endswith("sh") and "-c" in words[:-1]:
            yield from _punchtrio_argvs(words[words.index("-c") + 1])
        elif words[0] == "punchtrio" or words[0].endswith("/punchtrio"):
            yield words[1:]


def _documented_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for page in GUIDES:
        lines = []
        for block in _code_blocks(page, "sh"):
            lines += block.replace("\\\n", " ").splitlines()
        for block in _code_blocks(page, "ini"):  # systemd units: their Exec lines
            for line in block.replace("\\\n", " ").splitlines():
                if line.startswith(("ExecStart=", "ExecStartPre=")):
                    lines.append(line.split("=", 1)[1])
        for line in lines:
            commands += [(page, argv) for argv in _punchtrio_argvs(line)]
    return commands


def test_the_guides_show_every_user_command() -> None:
    shown = {argv[0] for _, argv in _documented_commands() if argv and argv[0][0] != "-"}
    assert {"keygen", "pubkey", "hub", "up", "nat", "demo", "stun-server"} <= shown


@pytest.mark.parametrize(
    ("page", "argv"),
    [
        pytest.param(page, argv, id=f"{page}: {' '.join(argv)[:50]}")
        for page, argv in _documented_commands()
    ],
)
def test_each_command_in_the_guides_parses(page: str, argv: list[str]) -> None:
    parser = build_parser()
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        try:
            parser.parse_args(argv)
            status = 0
        except SystemExit as exit_:  # --help exits 0; a wrong option exits 2
            status = int(exit_.code or 0)
    assert status == 0, f"{page}: punchtrio {' '.join(argv)}: {err.getvalue()}"


def test_the_quickstart_json_uses_documented_events_and_no_secret() -> None:
    (sample,) = _code_blocks("quickstart.md", "json")
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (DOCS / "cli.md").read_text(), re.M))
    events = [json.loads(line) for line in sample.splitlines()]
    assert events[0]["event"] == "up"
    assert events[-1]["event"] == "peer_connected"
    for event in events:
        assert event["event"] in documented, event["event"]
        assert "private" not in json.dumps(event)


def _example_and_output(page: str, marker: str) -> tuple[str, str]:
    text = (DOCS / page).read_text()
    found = re.search(
        rf"```python\n((?:(?!```).)*?{re.escape(marker)}.*?)```.*?```text\n(.*?)```", text, re.S
    )
    assert found is not None, marker
    return found[1], found[2]


@pytest.mark.parametrize("marker", ["PRESETS", "NatTable("])
def test_the_nat_research_examples_print_what_the_page_says(
    marker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = _example_and_output("nat-research.md", marker)
    exec(compile(code, f"nat-research.md ({marker})", "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out == output


@pytest.mark.parametrize("page", [*GUIDES, *(f"reference/{p}.md" for p in PUBLIC_PACKAGES)])
def test_the_user_pages_never_speak_of_issues(page: str) -> None:
    assert not re.search(r"\bissues?\b", (DOCS / page).read_text(), re.I)
