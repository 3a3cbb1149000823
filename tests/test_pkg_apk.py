"""tools/apk.py (`make apk`): OpenWrt 25.12 .apk files packed by apk-tools' own `apk mkpkg`,
reproducible, with the metadata, scripts and conffile lists OpenWrt's package-pack.mk writes, and
the same files and depends as the .ipk (one source: tools/ipk.py's packages)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.test_pkg_install import pm_tools
from tools import apk as apktool
from tools import ipk

pytestmark = pytest.mark.owrt

ROOT = Path(__file__).resolve().parent.parent
VERSION = f"{ipk.bitmesh_version()}-r{ipk.RELEASE}"
FILES = [f"bitmesh-{VERSION}.apk", f"bitmesh-src-{VERSION}.apk", f"luci-app-bitmesh-{VERSION}.apk",
         "python3-bitcoinlib-0.12.2-r1.apk", "python3-bitcoinlib-src-0.12.2-r1.apk", "packages.adb"]


@pytest.fixture(scope="module")
def tools() -> Path:
    return pm_tools()


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tools) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("apk-a"), tmp_path_factory.mktemp("apk-b")
    for out in (a, b):
        p = subprocess.run([sys.executable, str(ROOT / "tools" / "apk.py"), "--out", str(out)], capture_output=True,
                           text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr
    return a, b


def dump(tools: Path, path: Path) -> str:
    p = subprocess.run([str(tools / "apk"), "adbdump", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def info(text: str) -> dict[str, str | list[str]]:
    """The `info:` block of `apk adbdump`: scalar fields and the depends list."""
    block = text.split("\ninfo:\n", 1)[1].split("\npaths:", 1)[0]
    out: dict[str, str | list[str]] = {}
    for m in re.finditer(r"^  ([a-z-]+): ?(.*)$", block, re.M):
        out[m.group(1)] = m.group(2)
    out["depends"] = re.findall(r"^    - (\S+)$", block.split("depends:", 1)[1], re.M) if "depends:" in block else []
    return out


def scripts(text: str) -> dict[str, str]:
    block = text.split("\nscripts:\n", 1)[1]
    out: dict[str, str] = {}
    for m in re.finditer(r"^  ([a-z-]+): \|\n((?:    .*\n|\n)*)", block, re.M):
        out[m.group(1)] = "".join(ln[4:] + "\n" for ln in m.group(2).rstrip("\n").split("\n"))
    return out


def test_two_builds_are_byte_identical(builds):
    a, b = builds
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_metadata_as_openwrt_packs_it(builds, tools):
    pkgs = {p.name: p for p in ipk.all_packages(ROOT / "build" / "cache")}
    for name in ("bitmesh", "luci-app-bitmesh", "python3-bitcoinlib"):
        pkg = pkgs[name]
        text = dump(tools, builds[0] / apktool.filename(pkg))
        fields = info(text)
        assert fields["name"] == name and fields["version"] == pkg.version
        assert fields["arch"] == "noarch"  # PKGARCH all
        assert fields["license"] == pkg.license and fields["origin"] == pkg.source
        assert sorted(fields["depends"]) == sorted(pkg.depends)  # the .ipk's Depends, one source
        got = scripts(text)
        assert set(got) == {"post-install", "post-upgrade", "pre-deinstall"}
        # default_postinst/default_prerm from /lib/functions.sh with this package's name, then
        # the package's own postinst/prerm; post-upgrade says it is an upgrade first
        assert f'export pkgname="{name}"\nadd_group_and_user\ndefault_postinst\n' in got["post-install"]
        assert got["post-upgrade"].startswith("#!/bin/sh\nexport PKG_UPGRADE=1\n")
        assert got["post-upgrade"].split("\n", 2)[2] == got["post-install"].split("\n", 1)[1]
        assert f'export pkgname="{name}"\ndefault_prerm\n' in got["pre-deinstall"]
    bitmesh = scripts(dump(tools, builds[0] / apktool.filename(pkgs["bitmesh"])))
    assert "/etc/init.d/bitmesh restart" in bitmesh["post-install"]
    assert "nft delete table inet bitmesh" in bitmesh["pre-deinstall"]


def test_same_files_as_the_ipk_plus_openwrts_lists(builds, tools, tmp_path):
    pkg = ipk.bitmesh_package(VERSION)
    dest = tmp_path / "x"
    dest.mkdir()
    p = subprocess.run([str(tools / "apk"), "extract", "--allow-untrusted", "--destination", str(dest),
                        str(builds[0] / f"bitmesh-{VERSION}.apk")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = {"/" + f.relative_to(dest).as_posix(): f for f in dest.rglob("*") if f.is_file()}
    meta = {"/lib/apk/packages/bitmesh.list", "/lib/apk/packages/bitmesh.conffiles",
            "/lib/apk/packages/bitmesh.conffiles_static"}
    assert set(got) == {e.path for e in pkg.files} | meta
    # byte for byte what the .ipk carries
    outer = tarfile.open(fileobj=io.BytesIO(ipk.build_ipk(pkg, 0)))
    data = tarfile.open(fileobj=io.BytesIO(outer.extractfile("./data.tar.gz").read()))
    for m in data.getmembers():
        if m.isfile():
            assert got[m.name[1:]].read_bytes() == data.extractfile(m).read(), m.name
            assert got[m.name[1:]].stat().st_mode & 0o777 == m.mode, m.name
    # default_postinst/prerm find the init script in the list; sysupgrade the conffile's default
    assert "/etc/init.d/bitmesh\n" in got["/lib/apk/packages/bitmesh.list"].read_text()
    assert got["/lib/apk/packages/bitmesh.conffiles"].read_text() == "/etc/config/bitmesh\n"
    path, digest = got["/lib/apk/packages/bitmesh.conffiles_static"].read_text().split()
    assert path == "/etc/config/bitmesh" and len(digest) == 64


def test_the_index_lists_every_package(builds, tools):
    text = dump(tools, builds[0] / "packages.adb")
    names = re.findall(r"^  - name: (\S+)$", text, re.M)
    assert sorted(names) == sorted(["bitmesh", "bitmesh-src", "luci-app-bitmesh", "python3-bitcoinlib",
                                    "python3-bitcoinlib-src"])
