"""A reader for UCI configuration files (/etc/config/*), stdlib only.

libuci is not available off the router, and the service must validate its config on plain Linux
too, so this parses the file syntax itself, following libuci's parser:

- statements: ``package NAME``, ``config TYPE [NAME]``, ``option NAME VALUE``, ``list NAME VALUE``;
- a token is unquoted, 'single-quoted' (literal, no escapes), "double-quoted" (backslash escapes
  the next character) or several of those glued together (``'a'"b"c`` is ``abc``);
- quoted strings may span lines; outside quotes a backslash escapes the next character (a
  backslash at the end of a line joins the next one, as libuci does);
- ``#`` at the start of a token starts a comment that runs to the end of the line;
- a named section that appears twice is merged (later options win), like libuci's merge;
- ``list`` appends; an ``option`` replaces a list of the same name and vice versa.

Errors raise ConfigError with the line number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bitmesh.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_TYPE_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class UciSection:
    type: str
    name: str | None  # None for an anonymous section
    index: int  # position in the file (0-based), as in @type[index] addressing
    options: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)

    @property
    def anonymous(self) -> bool:
        return self.name is None

    def get(self, option: str, default: str | None = None) -> str | None:
        return self.options.get(option, default)

    def values(self) -> dict[str, str | list[str]]:
        """Options and lists together (lists as Python lists), as a service reads them."""
        merged: dict[str, str | list[str]] = dict(self.options)
        merged.update({k: list(v) for k, v in self.lists.items()})
        return merged


@dataclass
class UciPackage:
    name: str | None
    sections: list[UciSection] = field(default_factory=list)

    def section(self, name: str) -> UciSection | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def sections_of(self, type_: str) -> list[UciSection]:
        return [s for s in self.sections if s.type == type_]


@dataclass
class _Token:
    text: str
    line: int


def _tokenize(text: str) -> list[list[_Token]]:
    """Split into statements (one per logical line), each a list of tokens."""
    statements: list[list[_Token]] = []
    current: list[_Token] = []
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            if current:
                statements.append(current)
                current = []
            line += 1
            i += 1
            continue
        if c in " \t\r\f\v":
            i += 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        # a token: glued pieces of unquoted / single / double-quoted text
        start_line = line
        buf: list[str] = []
        while i < n and text[i] not in " \t\r\f\v\n":
            c = text[i]
            if c == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise ConfigError(f"line {start_line}: unterminated single quote")
                piece = text[i + 1 : end]
                line += piece.count("\n")
                buf.append(piece)
                i = end + 1
            elif c == '"':
                i += 1
                while True:
                    if i >= n:
                        raise ConfigError(f"line {start_line}: unterminated double quote")
                    c = text[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\" and i + 1 < n:
                        nxt = text[i + 1]
                        if nxt == "\n":
                            line += 1
                        else:
                            buf.append(nxt)
                        i += 2
                        continue
                    if c == "\n":
                        line += 1
                    buf.append(c)
                    i += 1
            elif c == "\\":
                if i + 1 < n and text[i + 1] == "\n":  # libuci: backslash-newline joins lines
                    line += 1
                elif i + 1 < n and text[i + 1] == "\r" and text[i + 2 : i + 3] == "\n":
                    line += 1
                    i += 1
                elif i + 1 < n:
                    buf.append(text[i + 1])
                i += 2
            else:
                buf.append(c)
                i += 1
        current.append(_Token("".join(buf), start_line))
    if current:
        statements.append(current)
    return statements


def parse(text: str) -> UciPackage:
    """Parse the text of one UCI file."""
    pkg = UciPackage(name=None)
    section: UciSection | None = None
    for stmt in _tokenize(text):
        keyword, args, line = stmt[0].text, [t.text for t in stmt[1:]], stmt[0].line
        if keyword == "package":
            if len(args) != 1:
                raise ConfigError(f"line {line}: 'package' takes one name")
            pkg.name = args[0]
        elif keyword == "config":
            if not 1 <= len(args) <= 2:
                raise ConfigError(f"line {line}: 'config' takes a type and an optional name")
            type_ = args[0]
            if not _TYPE_RE.match(type_):
                raise ConfigError(f"line {line}: invalid section type {type_!r}")
            name = args[1] if len(args) == 2 and args[1] != "" else None
            if name is not None and not _NAME_RE.match(name):
                raise ConfigError(f"line {line}: invalid section name {name!r}")
            existing = pkg.section(name) if name is not None else None
            if existing is not None:
                existing.type = type_
                section = existing
            else:
                index = sum(1 for s in pkg.sections if s.type == type_)
                section = UciSection(type=type_, name=name, index=index)
                pkg.sections.append(section)
        elif keyword in ("option", "list"):
            if section is None:
                raise ConfigError(f"line {line}: '{keyword}' outside of a 'config' section")
            if len(args) != 2:
                raise ConfigError(f"line {line}: '{keyword}' takes a name and one value")
            opt, value = args
            if not _NAME_RE.match(opt):
                raise ConfigError(f"line {line}: invalid option name {opt!r}")
            if keyword == "option":
                section.lists.pop(opt, None)
                section.options[opt] = value
            else:
                items = section.lists.setdefault(opt, [])
                if opt in section.options:  # libuci turns an option into a list
                    items.append(section.options.pop(opt))
                items.append(value)
        else:
            raise ConfigError(f"line {line}: unknown keyword {keyword!r}")
    return pkg


def load(path: str | Path) -> UciPackage:
    """Parse a UCI file; the package name defaults to the file name, as for /etc/config/NAME."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not UTF-8 text") from None
    pkg = parse(text)
    if pkg.name is None:
        pkg.name = p.name
    return pkg
