"""Depends of the packages, derived from what the shipped code imports.

The stdlib part comes from OpenWrt's own split of python3 (tools/owrt_python3.py: the file lists
of python3-light and its subpackages): the Depends must name exactly the packages that ship the
modules the code needs, no fewer (a router with python3-light alone would fail at import) and no
more. Modules from the feeds map to their packages (python3-bottle, python3-ubus, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools import ipk, owrt_python3
from tools.owrt_python3 import code_imports, feed_packages, package_of, stdlib_packages

ROOT = Path(__file__).resolve().parent.parent
SITE = ipk.PY_SITE + "/"


def _modules(files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """(dotted module name, source) of every .py of a package (paths relative to site-packages)."""
    return [(rel[:-3].replace("/", "."), data) for rel, data in sorted(files.items()) if rel.endswith(".py")]


@pytest.fixture(scope="module")
def sources() -> dict[str, list[tuple[str, bytes]]]:
    # the service's modules as the package ships them (its -src twin holds them as .py)
    bitmesh = {e.path[len(SITE):]: e.data for e in ipk.bitmesh_packages("0-r1", 1)[1].files}
    assert bitmesh == {f"bitmesh/{p.relative_to(ROOT / 'bitmesh').as_posix()}": p.read_bytes()
                       for p in (ROOT / "bitmesh").rglob("*.py") if "__pycache__" not in p.parts}
    return {"bitmesh": _modules(bitmesh), "bitcoin": _modules(ipk.bitcoinlib_files(ROOT / "build" / "cache"))}


def _depends(pkg: ipk.Package) -> set[str]:
    return set(pkg.depends) - {"libc"}


def test_the_mapping_reads_openwrt_file_lists():
    # spot checks against the python3-package-*.mk lists: a folder, a .py, a C extension
    assert package_of("email.utils") == "python3-email"
    assert package_of("logging.handlers") == "python3-logging"
    assert package_of("urllib.request") == "python3-urllib"
    assert package_of("_ssl") == "python3-openssl" and package_of("ssl") == "python3-light"
    assert package_of("ctypes") == "python3-ctypes" and package_of("_ctypes") == "python3-ctypes"
    assert package_of("http.client") == "python3-light" and package_of("json") == "python3-light"
    with pytest.raises(owrt_python3.NotOnOpenWrt):
        package_of("tkinter")
    # ssl needs _ssl (python3-openssl); http.client needs email, but ssl only if it exists
    assert "_ssl" in owrt_python3.stdlib_closure(["ssl"])
    closure = owrt_python3.stdlib_closure(["http.client"])
    assert "email.parser" in closure and "ssl" not in closure


def test_bitmesh_depends_are_exactly_what_its_code_needs(sources):
    imported = code_imports(sources["bitmesh"])
    assert "logging" in imported and "urllib.request" in imported
    # urllib imports ssl only where it exists; the default esplora_url is https://
    config = (ROOT / "files/etc/config/bitmesh").read_text()
    assert re.search(r"option esplora_url 'https://", config)
    needed = stdlib_packages(imported | {"ssl"})
    feeds = feed_packages(imported, own=["bitmesh"])
    declared = _depends(ipk.bitmesh_package("0-r1", 1))
    python3 = {d for d in declared if d in owrt_python3.SUBPACKAGES or d == owrt_python3.LIGHT}
    assert python3 == needed
    assert feeds <= declared, feeds - declared
    # declared for what is not a Python import: the nft binary with JSON output, MQTT (config
    # options) and libuci's binding (the config reader)
    assert declared - needed - feeds <= {"nftables-json", "python3-paho-mqtt", "python3-uci", "python3-ubus",
                                         "python3-bottle", "python3-bitcoinlib"}
    assert {"nftables-json", "python3-uci", "python3-paho-mqtt"} <= declared


def test_bitcoinlib_depends_are_exactly_what_its_code_needs(sources):
    imported = code_imports(sources["bitcoin"])
    assert "ctypes" in imported
    declared = _depends(ipk.bitcoinlib_package(ROOT / "build" / "cache"))
    assert {d for d in declared if d.startswith("python3-")} == stdlib_packages(imported)
    assert feed_packages(imported, own=["bitcoin"]) == set()
    assert "libopenssl3" in declared  # bitcoin.core.key loads libcrypto through ctypes
