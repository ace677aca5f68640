"""``punchtrio up --config FILE``: the command line of ``up`` as a TOML file.

One key per long option, spelled as the option without its dashes (``key-file``,
``listen-port``), with the option's value: a string, an integer for numbers, ``true`` for a
switch (``no-relay = true``), an array of strings for an option that may be repeated
(``peer = ["bob", "carol"]``). Options given on the command line win over the file. Relative
``FILE`` paths are taken from the file's directory. Inside the TOML file, ``config`` names a
wg-quick file whose peers are added, as ``--config`` does on the command line.

``--config`` tells the two kinds of file apart by their first section: a file whose first
non-comment line is ``[Interface]`` or ``[Peer]`` is a wg-quick file; anything else is TOML.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ._main import UsageError

MAX_CONFIG_BYTES = 1 << 20
"""Largest ``--config`` file read, in bytes."""

_WGQUICK_SECTIONS = ("[interface]", "[peer]")


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """One long option of a command as a configuration key: ``dest`` (the argparse attribute),
    ``kind`` (``"flag"``, ``"list"``, ``"int"``, ``"float"`` or ``"str"``), ``choices`` (or
    ``None``) and whether the value is a ``path`` (the option's metavar is ``FILE``)."""

    dest: str
    kind: str
    choices: tuple[str, ...] | None = None
    path: bool = False


def config_options(parser: argparse.ArgumentParser) -> dict[str, ConfigOption]:
    """Return the configuration keys of ``parser``'s long options (``--help`` left out)."""
    options: dict[str, ConfigOption] = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            kind = "flag"
        elif isinstance(action, argparse._AppendAction):
            kind = "list"
        elif action.type is int:
            kind = "int"
        elif action.type is float:
            kind = "float"
        else:
            kind = "str"
        choices = tuple(str(c) for c in action.choices) if action.choices else None
        options[long[0][2:]] = ConfigOption(action.dest, kind, choices, action.metavar == "FILE")
    return options


def is_wgquick(text: str) -> bool:
    """Whether ``text`` is a wg-quick file: its first line that is neither blank nor a comment
    opens an ``[Interface]`` or ``[Peer]`` section (case-insensitive, as wg-quick reads it)."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return stripped.replace(" ", "").lower().startswith(_WGQUICK_SECTIONS)
    return False


def parse_up_config(
    text: str, options: Mapping[str, ConfigOption], *, source: str, base: Path
) -> dict[str, Any]:
    """Parse a TOML configuration into ``{dest: value}`` for ``options``.

    Values are checked against each option's kind; ``path`` values are joined to ``base`` unless
    absolute. ``source`` names the file in errors. Raises
    :class:`~punchtrio.cli._main.UsageError` naming the key (or the TOML error's line and
    column) for anything else; a false switch counts as not given.
    """
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in table.items():
        option = options.get(key)
        if option is None:
            raise UsageError(
                f"{source}: unknown key {key[:40]!r} (keys are the long options of "
                f"'punchtrio up' without dashes, e.g. hub, name, key-file, peer)"
            )
        values[option.dest] = _checked(key, value, option, source, base)
    return {dest: value for dest, value in values.items() if value is not False}


def _checked(key: str, value: object, option: ConfigOption, source: str, base: Path) -> Any:
    where = f"{source}: {key}"
    if option.kind == "flag":
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false")
        return value
    if option.kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f'{where} must be an array of strings, e.g. {key} = ["..."]')
        return [_string(v, where, option, base) for v in value]
    if option.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where} must be an integer")
        return value
    if option.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise UsageError(f"{where} must be a string")
    return _string(value, where, option, base)


def _string(value: str, where: str, option: ConfigOption, base: Path) -> str:
    if "\0" in value:
        raise UsageError(f"{where} must not contain NUL")
    if option.choices is not None and value not in option.choices:
        raise UsageError(f"{where} must be one of {', '.join(option.choices)}")
    if option.path and value and not os.path.isabs(value):
        return str(base / value)
    return value


def read_config_text(path: str) -> str:
    """Return the text of ``--config`` ``path``; raise :class:`UsageError` if it cannot be read,
    is larger than :data:`MAX_CONFIG_BYTES` or is not UTF-8."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not UTF-8 text") from None


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """If ``args.config`` is a TOML file, fill ``args`` from it in place.

    An option keeps its command-line value when it differs from the parser's default. ``config``
    becomes the file's ``config`` key (a wg-quick file) or ``None``. A wg-quick ``--config`` is
    left alone. Raises :class:`UsageError` as :func:`parse_up_config` does, and for a TOML file
    whose ``config`` is another TOML file.
    """
    path = getattr(args, "config", None)
    if not path:
        return
    text = read_config_text(path)
    if is_wgquick(text):
        return
    options = config_options(parser)
    values = parse_up_config(text, options, source=path, base=Path(path).resolve().parent)
    args.config = None
    for dest, value in values.items():
        if dest == "config" or getattr(args, dest, None) == parser.get_default(dest):
            setattr(args, dest, value)
    nested = args.config
    if nested and not is_wgquick(read_config_text(nested)):
        raise UsageError(f"{path}: config must name a wg-quick file ([Interface] ...), not TOML")
