"""Which OpenWrt 24.10 package ships each Python standard-library module, and which of them a
body of code needs.

OpenWrt splits CPython 3.11 into python3-base, python3-light and a dozen subpackages. The data
below is their file lists as OpenWrt defines them (openwrt/packages, branch openwrt-24.10):
  - lang/python/python3/files/python3-package-<name>.mk: each `Py3BasePackage` lists the paths
    of one subpackage (PYTHON3_SO_SUFFIX is cpython-311-*.so, written here as lib-dynload/NAME);
  - lang/python/python3/Makefile: python3-light is all of /usr/lib/python3.11 minus those paths
    and minus idlelib, tkinter, turtledemo, webbrowser.py, _osx_support.py and
    distutils/cygwinccompiler.py; python3-base (encodings, os.py, site.py ...) comes with
    python3-light, so both count as python3-light here.
Paths are relative to /usr/lib/python3.11; a trailing / is a whole folder.

`stdlib_needs(paths)` walks code with `ast`: every import of the code itself (lazy ones inside
functions too), then, through the standard library, only the imports a module makes
unconditionally at its top level (what must load for the import to succeed; an optional
`try: import _hashlib` is not a need, as OpenWrt's own python3-find-stdlib-depends.sh also
leaves hashlib out of python3-openssl). Where a module is a C extension, the same lists say
which package ships lib-dynload/<name>.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
import sysconfig
from collections.abc import Iterable
from functools import cache
from pathlib import Path

LIGHT = "python3-light"

SUBPACKAGES: dict[str, tuple[str, ...]] = {
    "python3-asyncio": ("asyncio/",),
    "python3-cgi": ("cgi.py",),
    "python3-cgitb": ("cgitb.py",),
    "python3-codecs": ("lib-dynload/_codecs_cn", "lib-dynload/_codecs_hk", "lib-dynload/_codecs_iso2022",
                       "lib-dynload/_codecs_jp", "lib-dynload/_codecs_kr", "lib-dynload/_codecs_tw",
                       "lib-dynload/unicodedata"),
    "python3-ctypes": ("ctypes/", "lib-dynload/_ctypes"),
    "python3-dbm": ("dbm/", "lib-dynload/_dbm", "lib-dynload/_gdbm"),
    "python3-decimal": ("decimal.py", "lib-dynload/_decimal"),
    "python3-dev": ("config-3.11/",),
    "python3-distutils": ("distutils/",),
    "python3-email": ("email/",),
    "python3-lib2to3": ("lib2to3/",),
    "python3-logging": ("logging/",),
    "python3-lzma": ("lzma.py", "lib-dynload/_lzma"),
    "python3-multiprocessing": ("multiprocessing/", "lib-dynload/_multiprocessing"),
    "python3-ncurses": ("curses/", "lib-dynload/_curses", "lib-dynload/_curses_panel"),
    "python3-openssl": ("lib-dynload/_hashlib", "lib-dynload/_ssl"),
    "python3-pydoc": ("doctest.py", "pydoc.py", "pydoc_data/"),
    "python3-readline": ("lib-dynload/readline",),
    "python3-sqlite3": ("sqlite3/", "lib-dynload/_sqlite3"),
    "python3-unittest": ("unittest/",),
    "python3-urllib": ("urllib/",),
    "python3-uuid": ("uuid.py", "lib-dynload/_uuid"),
    "python3-venv": ("ensurepip/", "venv/"),
    "python3-webbrowser": ("webbrowser.py",),
    "python3-xml": ("xml/", "xmlrpc/", "lib-dynload/_elementtree", "lib-dynload/pyexpat"),
}
# In no package at all: python3-light's filespec drops them and no subpackage takes them.
NOWHERE = ("idlelib/", "tkinter/", "turtledemo/", "_osx_support.py", "distutils/cygwinccompiler.py")

# Python packages from the OpenWrt feeds (or this feed) by the top-level module they provide.
FEED_MODULES = {
    "bitcoin": "python3-bitcoinlib",
    "bottle": "python3-bottle",
    "paho": "python3-paho-mqtt",
    "ubus": "python3-ubus",
    "uci": "python3-uci",
}


class NotOnOpenWrt(Exception):
    """A module OpenWrt's python3 does not ship in any package."""


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def module_file(name: str) -> str:
    """Where OpenWrt keeps module `name`, relative to /usr/lib/python3.11: `email/utils.py`,
    `ssl.py`, or `lib-dynload/_ssl` for a C extension (whether this interpreter has it built in
    or as a shared object; OpenWrt builds all but the core ones as shared objects)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(name)
    origin = spec.origin or ""
    if origin in ("built-in", "frozen") or origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return f"lib-dynload/{name.rsplit('.', 1)[-1]}"
    return Path(origin).relative_to(_stdlib_dir()).as_posix()


def _matches(path: str, entry: str) -> bool:
    return path.startswith(entry) if entry.endswith("/") else path == entry


def package_of(name: str) -> str:
    """The OpenWrt package that ships stdlib module `name`."""
    path = module_file(name)
    for package, entries in SUBPACKAGES.items():
        if any(_matches(path, e) for e in entries):
            return package
    if any(_matches(path, e) for e in NOWHERE):
        raise NotOnOpenWrt(name)
    return LIGHT


def is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """Module names an import statement loads (`from a import b` loads a.b if b is a module)."""
    if isinstance(node, ast.Import):
        return [n for alias in node.names for n in _with_parents(alias.name)]
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    if not base:
        return []
    out = _with_parents(base)
    if is_stdlib(base):  # find_spec of a submodule imports its parent: never run third-party code
        out += [f"{base}.{a.name}" for a in node.names if a.name != "*" and _is_module(f"{base}.{a.name}")]
    return out


def imports_anywhere(source: bytes, package: str = "") -> set[str]:
    """Every module a file of our code imports, wherever the import statement is."""
    return {m for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Import | ast.ImportFrom) for m in _imported(node, package)}


@cache
def required_by(name: str) -> frozenset[str]:
    """The stdlib modules module `name` imports unconditionally at its top level."""
    path = module_file(name)
    if path.startswith("lib-dynload/"):
        return frozenset()
    package = name if path.endswith("/__init__.py") else name.rpartition(".")[0]
    tree = ast.parse((_stdlib_dir() / path).read_bytes())
    out = {m for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
           for m in _imported(node, package)}
    return frozenset(m for m in out if is_stdlib(m) and m != "__future__")


def stdlib_closure(modules: Iterable[str]) -> set[str]:
    todo = [m for m in modules if is_stdlib(m) and m != "__future__"]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [n for n in required_by(m) if n not in seen]
    return seen


def code_imports(files: Iterable[tuple[str, bytes]]) -> set[str]:
    """(module name of the file, source) pairs -> every module they import."""
    out: set[str] = set()
    for modname, source in files:
        package = modname if modname.endswith(".__init__") else modname.rpartition(".")[0]
        out |= imports_anywhere(source, package.removesuffix(".__init__"))
    return out


def stdlib_packages(modules: Iterable[str]) -> set[str]:
    """The OpenWrt python3 packages (python3-light included) that ship these stdlib modules and
    everything they need."""
    return {LIGHT} | {package_of(m) for m in stdlib_closure(modules)}


def feed_packages(modules: Iterable[str], own: Iterable[str] = ()) -> set[str]:
    """Feed packages for the non-stdlib top-level modules; `own` names our own packages."""
    out = set()
    for m in modules:
        top = m.split(".")[0]
        if is_stdlib(top) or top in own:
            continue
        if top not in FEED_MODULES:
            raise KeyError(f"no OpenWrt package known for module {top!r}")
        out.add(FEED_MODULES[top])
    return out
