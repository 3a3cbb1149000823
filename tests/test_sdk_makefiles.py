"""The SDK feed (openwrt/package/bitmesh) and `make ipk` ship the same packages.

The feed Makefiles' own recipes (Build/Prepare, Build/Install, Package/<name>/install and the
postinst/prerm texts) run under real GNU make against minimal stand-ins of the SDK's rules.mk,
package.mk, python3-package.mk and luci.mk (tests/support/sdk_standin), on a tree laid out as the
fetched release is; the installed trees must equal the .ipk data file for file, mode for mode,
byte for byte (the .pyc too: both compile with OpenWrt's compileall flags).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import ipk

ROOT = Path(__file__).resolve().parent.parent
FEED = ROOT / "openwrt" / "package" / "bitmesh"
STANDIN = ROOT / "tests" / "support" / "sdk_standin"
EPOCH = 1_700_000_000
VERSION = f"{ipk.bitmesh_version()}-r{ipk.RELEASE}"


def _release_tree(dest: Path) -> Path:
    """The repository's folders the packages are built from, as the release tarball holds them."""
    for name in ("bitmesh", "files", "luci-app-bitmesh"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _make(pkg_dir: Path, work: Path, *goals: str) -> str:
    top = work / "top"
    (top / "feeds/packages/lang/python").mkdir(parents=True, exist_ok=True)
    (top / "feeds/luci").mkdir(parents=True, exist_ok=True)
    shutil.copy(STANDIN / "rules.mk", top / "rules.mk")
    shutil.copy(STANDIN / "python3-package.mk", top / "feeds/packages/lang/python/python3-package.mk")
    shutil.copy(STANDIN / "luci.mk", top / "feeds/luci/luci.mk")
    argv = ["make", "-s", "-C", str(pkg_dir), "-f", "Makefile", "-f", str(STANDIN / "targets.mk"),
            f"TOPDIR={top}", f"INCLUDE_DIR={STANDIN}", f"PKG_BUILD_DIR={work / 'src'}", f"IDIR={work / 'idir'}",
            f"SOURCE_DATE_EPOCH={EPOCH}", f"HOST_PYTHON3_BIN={ipk.python311()}", *goals]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _tree(base: Path) -> dict[str, tuple[int, bytes]]:
    return {"/" + p.relative_to(base).as_posix(): (p.stat().st_mode & 0o7777, p.read_bytes())
            for p in sorted(base.rglob("*")) if p.is_file()}


def _entries(pkg: ipk.Package) -> dict[str, tuple[int, bytes]]:
    return {e.path: (e.mode, e.data) for e in pkg.files}


@pytest.fixture(scope="module")
def bitmesh_sdk(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("sdk-bitmesh")
    _release_tree(work / "src")
    out = _make(FEED / "bitmesh", work, "build", "install-bitmesh", "install-bitmesh-src", "script-postinst",
                "script-prerm", "depends-bitmesh")
    return work / "idir", out


def test_bitmesh_sdk_install_equals_make_ipk(bitmesh_sdk):
    idir, _ = bitmesh_sdk
    pkg, src = ipk.bitmesh_packages(VERSION, EPOCH)
    for name, built in (("bitmesh", pkg), ("bitmesh-src", src)):
        sdk, ours = _tree(idir / name), _entries(built)
        assert sorted(sdk) == sorted(ours), (name, set(sdk) ^ set(ours))
        for path in sdk:
            assert sdk[path] == ours[path], (name, path, oct(sdk[path][0]), oct(ours[path][0]))
    # what the list holds: compiled modules, no source, and the licences of the vendored JS
    assert not [p for p in _entries(pkg) if p.endswith(".py")]
    assert f"{ipk.PY_SITE}/bitmesh/portal/static/vendor/qr/LICENSE-MIT" in _entries(pkg)


def test_bitmesh_scripts_and_depends_are_the_same_as_make_ipk(bitmesh_sdk):
    idir, out = bitmesh_sdk
    assert (idir / "postinst").read_text() == ipk.BITMESH_POSTINST
    assert (idir / "prerm").read_text() == ipk.BITMESH_PRERM
    depends = [d.lstrip("+") for d in out.split()]
    assert depends == ipk.BITMESH_DEPENDS


def test_luci_sdk_install_equals_make_ipk(tmp_path):
    _release_tree(tmp_path / "src")
    out = _make(FEED / "luci-app-bitmesh", tmp_path, "prepare", "install-luci-app-bitmesh",
                "depends-luci-app-bitmesh")
    assert _tree(tmp_path / "idir" / "luci-app-bitmesh") == _entries(ipk.luci_package(VERSION))
    assert [d.lstrip("+") for d in out.split()] == ["luci-base", "bitmesh"]


def _var(makefile: Path, name: str) -> str | None:
    m = re.search(rf"^{re.escape(name)}\s*:?=\s*(.*)$", makefile.read_text(), re.M)
    return m.group(1).strip() if m else None


@pytest.mark.parametrize("package", ["bitmesh", "luci-app-bitmesh"])
def test_our_packages_fetch_a_source_not_the_checkout(package):
    makefile = FEED / package / "Makefile"
    text = makefile.read_text()
    assert _var(makefile, "PKG_SOURCE_PROTO") == "git"
    assert _var(makefile, "PKG_SOURCE_URL").startswith("https://")
    assert _var(makefile, "PKG_SOURCE_VERSION") == "v$(PKG_VERSION)"
    # skip: a Makefile cannot hold the hash of a tree that contains it (said in the Makefile)
    assert _var(makefile, "PKG_MIRROR_HASH") == "skip" and "cannot carry the hash" in (
        FEED / "bitmesh" / "Makefile").read_text()
    assert "BITMESH_SRC" not in text and "../../.." not in text and "CURDIR" not in text
    assert not [p for p in (FEED / package).iterdir() if p.is_symlink()]


def test_bitcoinlib_makefile_matches_make_ipk():
    makefile = FEED / "python-bitcoinlib" / "Makefile"
    assert _var(makefile, "PKG_HASH") == ipk.BITCOINLIB_SHA256
    assert _var(makefile, "PKG_VERSION") == ipk.BITCOINLIB_VERSION
    deps = re.search(r"^\s+DEPENDS:=(.*)$", makefile.read_text(), re.M).group(1).split()
    # libopenssl is packaged as libopenssl3 (its ABI version) on 24.10
    assert [d.lstrip("+").replace("libopenssl", "libopenssl3") for d in deps] == ipk.BITCOINLIB_DEPENDS
    assert "-|$(PYTHON3_PKG_DIR)/bitcoin/tests" in makefile.read_text()
    assert "$(eval $(call BuildPackage,python3-bitcoinlib-src))" in makefile.read_text()


def test_make_is_gnu_make():
    out = subprocess.run(["make", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("GNU Make"), out
    assert sys.version_info[:2] == (3, 11) or shutil.which("python3.11")
