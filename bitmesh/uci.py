"""UCI configuration files (/etc/config/*) read through libuci, the parser every OpenWrt tool uses.

The binding is python3-uci (PyPI `pyuci`, built against libuci): what the service reads is exactly
what `uci show`, LuCI and the init script's `config_load` read, down to libuci's own rules (a `#`
inside an unquoted word starts a comment, `option a ''` removes the option, `option a` with no
value sets nothing). Only committed configuration is read: changes LuCI has staged but not
applied (libuci's delta files in /tmp/.uci) do not count.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bitmesh.errors import ConfigError

_PACKAGE_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # a UCI package name: the file name in the config dir
_NO_DELTAS = "/nonexistent/bitmesh-uci-deltas"  # libuci's save dir: none, committed values only


@dataclass
class UciSection:
    type: str
    name: str  # libuci names anonymous sections cfgXXXXXX
    values: dict[str, str | list[str]] = field(default_factory=dict)  # options, lists as lists


@dataclass
class UciPackage:
    name: str
    sections: list[UciSection] = field(default_factory=list)

    def section(self, name: str) -> UciSection | None:
        return next((s for s in self.sections if s.name == name), None)

    def sections_of(self, type_: str) -> list[UciSection]:
        return [s for s in self.sections if s.type == type_]


def load(path: str | Path) -> UciPackage:
    """The package in the UCI file at `path` (its name is the file name, as /etc/config/NAME)."""
    p = Path(path)
    if not _PACKAGE_RE.match(p.name):
        raise ConfigError(f"{p}: a UCI config file is named like its package (letters, digits, _ and -)")
    if not p.is_file():
        raise ConfigError(f"cannot read {p}: no such file")
    try:
        import uci  # python3-uci
    except ImportError as e:
        raise ConfigError(f"cannot read {p}: python3-uci is not installed ({e})") from None
    try:
        with uci.Uci(confdir=str(p.parent), savedir=_NO_DELTAS) as ctx:
            everything = ctx.get_all(p.name)
            sections = [UciSection(ctx.get(p.name, name), name, _values(options))
                        for name, options in everything.items()]
    except uci.UciException:
        raise ConfigError(f"{p}: {_parse_error(p)}") from None
    return UciPackage(p.name, sections)


def _values(options: dict) -> dict[str, str | list[str]]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _parse_error(p: Path) -> str:
    """libuci's own words for a file it refuses (the binding only says "invalid input"): the
    `uci` command line's message, which names the line, where that tool is installed."""
    tool = shutil.which("uci")
    if tool:
        try:
            out = subprocess.run([tool, "-c", str(p.parent), "-P", _NO_DELTAS, "show", p.name],
                                 capture_output=True, text=True, timeout=10)
            m = re.search(r"Parse error \((.*?)\) at line (\d+)", out.stderr)
            if m:
                return f"parse error at line {m.group(2)}: {m.group(1)}"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "libuci cannot parse this file (`uci show` names the line)"
