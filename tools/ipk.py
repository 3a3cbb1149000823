#!/usr/bin/env python3
"""Build BitMesh's OpenWrt .ipk packages without an OpenWrt SDK.

    python3 tools/ipk.py [--out dist]

Writes bitmesh_<ver>_all.ipk, luci-app-bitmesh_<ver>_all.ipk, python3-bitcoinlib_0.12.2-r1_all.ipk
and, as OpenWrt's Py3Package does, bitmesh-src and python3-bitcoinlib-src (the .py files; the
packages themselves carry compiled .pyc only), in OpenWrt's ipk format: a gzip'd tar (not an ar
archive) holding ./debian-binary, ./data.tar.gz and ./control.tar.gz, as ipkg-build makes them.

Reproducible: every mtime is SOURCE_DATE_EPOCH (or the last git commit time), owner 0:0, entries
sorted, gzip headers carry mtime 0 and no file name; two builds give identical bytes.
The SDK feed in openwrt/package/bitmesh builds the same packages (and .apk on 25.12).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY_SITE = "/usr/lib/python3.11/site-packages"  # OpenWrt 24.10 ships Python 3.11
RELEASE = "1"

BITCOINLIB_VERSION = "0.12.2"
BITCOINLIB_SDIST = f"python-bitcoinlib-{BITCOINLIB_VERSION}.tar.gz"
# sha256 of the PyPI sdist; the same value is PKG_HASH in openwrt/package/bitmesh/python-bitcoinlib
BITCOINLIB_SHA256 = "c65ab61427c77c38d397bfc431f71d86fd355b453a536496ec3fcb41bd10087d"

# The service package ships everything under bitmesh/ (modules, portal pages, vendored JS with the
# licence files next to it) except the wallet's npm project, which only builds portal/static/vendor.
# The SDK Makefile (openwrt/package/bitmesh/bitmesh) removes the same folder.
DEV_ONLY_DIRS = ("portal/wallet/",)
# Never ship runtime state: an HD seed, keys, ledgers, databases. A build with one refuses.
STATE_NAME_RE = re.compile(r"(seed|secret|private|\.key$|\.db$|\.sqlite|ledger\.(json|log|dat)|\.journal$)", re.I)

# Dependencies by the modules the code imports (tools/owrt_python3.py derives the python3-*
# stdlib packages; tests/test_package_depends.py checks these lists against the code). Same
# order and names as DEPENDS in the SDK Makefiles. python3-openssl: the default esplora_url is
# https://, and urllib only imports ssl where it exists.
BITMESH_DEPENDS = ["python3-light", "python3-ctypes", "python3-email", "python3-logging", "python3-openssl",
                   "python3-urllib", "python3-bitcoinlib", "python3-bottle", "python3-paho-mqtt", "python3-ubus",
                   "python3-uci", "nftables-json"]
BITCOINLIB_DEPENDS = ["python3-light", "python3-ctypes", "python3-decimal", "python3-email", "python3-urllib",
                      "libopenssl3"]

# Control scripts as OpenWrt's package-pack.mk writes them for an .ipk: postinst and prerm call
# default_postinst/default_prerm from /lib/functions.sh (which enable/start or stop/disable the
# package's init scripts, and leave the enabled state alone on an upgrade, PKG_UPGRADE=1), and
# those source the package's own Package/<name>/postinst and /prerm, shipped as postinst-pkg
# and prerm-pkg.
POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
PRERM = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
"""
# Package/bitmesh/postinst and /prerm: byte for byte the same in openwrt/package/bitmesh/bitmesh/
# Makefile (tests/test_sdk_makefiles.py checks it). default_postinst already enables the service
# on a fresh install only and starts it; default_prerm stops it and disables it on removal only.
# With opkg the old prerm stopped the service before an upgrade; apk runs no pre-deinstall on
# an upgrade, so the old process would keep running the old code: restart it (the new process
# restores paid clients' grants from the journal). The table is dropped on removal only.
BITMESH_POSTINST = """#!/bin/sh
# live system only; an image build (IPKG_INSTROOT set) must not touch the running system
[ -n "${IPKG_INSTROOT}" ] && exit 0
if [ "${PKG_UPGRADE}" = "1" ] && /etc/init.d/bitmesh running; then
	/etc/init.d/bitmesh restart
fi
exit 0
"""
BITMESH_PRERM = """#!/bin/sh
# live system only; on an upgrade keep the table: paid clients keep their access
[ -n "${IPKG_INSTROOT}" ] && exit 0
[ "${PKG_UPGRADE}" = "1" ] && exit 0
/etc/init.d/bitmesh stop
/etc/init.d/bitmesh disable
# BitMesh's own table only (never fw4's)
nft delete table inet bitmesh 2>/dev/null
exit 0
"""
LUCI_POSTINST = """#!/bin/sh
[ -n "${IPKG_INSTROOT}" ] && exit 0
rm -f /tmp/luci-indexcache /tmp/luci-indexcache.*
/etc/init.d/rpcd reload 2>/dev/null
exit 0
"""


@dataclass
class Entry:
    path: str  # absolute install path, e.g. /usr/bin/bitmesh
    data: bytes
    mode: int


@dataclass
class Package:
    name: str
    version: str
    depends: list[str]
    source: str
    license: str
    section: str
    description: str
    files: list[Entry] = field(default_factory=list)
    conffiles: list[str] = field(default_factory=list)
    postinst: str = ""
    prerm: str = ""

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_all.ipk"


def source_date_epoch() -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 1_700_000_000  # no git: any fixed value keeps builds reproducible


def bitmesh_version() -> str:
    text = (ROOT / "bitmesh" / "__init__.py").read_text()
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise SystemExit("ipk: no __version__ in bitmesh/__init__.py")
    return m.group(1)


def _file_mode(src: Path) -> int:
    return 0o755 if src.stat().st_mode & 0o111 else 0o644


def _walk(base: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append(Path(dirpath) / name)
    return out


# --- tar/gzip, reproducible -----------------------------------------------------------------------


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def _tarinfo(name: str, mtime: int, mode: int, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = mode
    info.size = size
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _tar_gz(members: list[tuple[str, bytes | None, int]], mtime: int, sort: bool = True) -> bytes:
    """members: (./relative path, bytes or None for a directory, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, mode in sorted(members, key=lambda m: m[0]) if sort else members:
            if data is None:
                tar.addfile(_tarinfo(name, mtime, mode, is_dir=True))
            else:
                tar.addfile(_tarinfo(name, mtime, mode, len(data)), io.BytesIO(data))
    return _gzip(buf.getvalue())


def _data_members(files: list[Entry]) -> list[tuple[str, bytes | None, int]]:
    dirs = {"."}
    members: list[tuple[str, bytes | None, int]] = []
    for e in files:
        rel = "." + e.path
        parent = os.path.dirname(rel)
        while parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
        members.append((rel, e.data, e.mode))
    members += [(d + "/" if d != "." else "./", None, 0o755) for d in dirs]
    return members


def control_text(pkg: Package, installed_size: int, epoch: int) -> str:
    desc_lines = pkg.description.strip().splitlines()
    desc = desc_lines[0] + "".join("\n " + (ln.strip() or ".") for ln in desc_lines[1:])
    fields = [
        ("Package", pkg.name),
        ("Version", pkg.version),
        ("Depends", ", ".join(pkg.depends)),  # left out when empty: opkg-lede crashes on "Depends: "
        ("Source", pkg.source),
        ("SourceName", pkg.source.rsplit("/", 1)[-1]),
        ("License", pkg.license),
        ("Section", pkg.section),
        ("SourceDateEpoch", str(epoch)),
        ("Maintainer", "BitMesh developers"),
        ("Architecture", "all"),
        ("Installed-Size", str(installed_size)),
        ("Description", desc),
    ]
    return "".join(f"{k}: {v}\n" for k, v in fields if v or k != "Depends")


def build_ipk(pkg: Package, epoch: int) -> bytes:
    paths = [e.path for e in pkg.files]
    if len(paths) != len(set(paths)):
        raise SystemExit(f"ipk: duplicate paths in {pkg.name}")
    data_tgz = _tar_gz(_data_members(pkg.files), epoch)
    installed_size = sum(len(e.data) for e in pkg.files)
    control: list[tuple[str, bytes | None, int]] = [
        ("./", None, 0o755),
        ("./control", control_text(pkg, installed_size, epoch).encode(), 0o644),
    ]
    if pkg.conffiles:
        control.append(("./conffiles", "".join(c + "\n" for c in pkg.conffiles).encode(), 0o644))
    control += [("./postinst", POSTINST.encode(), 0o755), ("./prerm", PRERM.encode(), 0o755)]
    if pkg.postinst:
        control.append(("./postinst-pkg", pkg.postinst.encode(), 0o755))
    if pkg.prerm:
        control.append(("./prerm-pkg", pkg.prerm.encode(), 0o755))
    control_tgz = _tar_gz(control, epoch)
    # outer order as ipkg-build writes it
    outer = [
        ("./debian-binary", b"2.0\n", 0o644),
        ("./data.tar.gz", data_tgz, 0o644),
        ("./control.tar.gz", control_tgz, 0o644),
    ]
    return _tar_gz(outer, epoch, sort=False)


# --- compiling Python as OpenWrt's Py3Package does ----------------------------------------------


def python311() -> str:
    """A CPython 3.11 (OpenWrt 24.10's python3): the .pyc format is per minor version."""
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which("python3.11")
    if not found:
        raise SystemExit("ipk: py311_missing: CPython 3.11 is needed to compile for OpenWrt 24.10")
    return found


@cache
def _compile_tree(files: tuple[tuple[str, bytes], ...], epoch: int) -> tuple[tuple[str, bytes], ...]:
    """Python3/CompileAll of lang/python/python3-package.mk on the package's files:
    `python3 -m compileall -r 20 -b -d / IDIR` with PYTHONHASHSEED=SOURCE_DATE_EPOCH (frozenset
    constants are marshalled in hash order) and SOURCE_DATE_EPOCH set, so each .pyc carries a
    checked source hash instead of a timestamp; then every .py is deleted (DeleteSourceFiles)."""
    with tempfile.TemporaryDirectory(prefix="bitmesh-ipk-") as tmp:
        idir = Path(tmp)
        for path, data in files:
            target = idir / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": str(epoch),
               "SOURCE_DATE_EPOCH": str(epoch)}
        subprocess.run([python311(), "-m", "compileall", "-q", "-r", "20", "-b", "-d", "/", str(idir)],
                       env=env, check=True, capture_output=True)
        return tuple((path[:-3] + ".pyc", (idir / path.lstrip("/")).with_suffix(".pyc").read_bytes())
                     for path, _ in files)


def py3_split(entries: list[Entry], epoch: int) -> tuple[list[Entry], list[Entry]]:
    """(package, -src package) from an installed tree, as Py3Package builds <name> and <name>-src:
    the package has every file with .py replaced by .pyc (legacy layout, next to where the .py
    was: there is no .py for a __pycache__ entry to be checked against); -src has the .py only."""
    sources = [e for e in entries if e.path.endswith(".py")]
    compiled = _compile_tree(tuple((e.path, e.data) for e in sources), epoch)
    main = [e for e in entries if not e.path.endswith(".py")] + [Entry(p, d, 0o644) for p, d in compiled]
    return sorted(main, key=lambda e: e.path), sources


# --- the packages ---------------------------------------------------------------------------------


def _bitmesh_tree() -> list[Entry]:
    """What the SDK's Build/Install and Py3Package/bitmesh/install put into the package, before
    compiling: bitmesh/ into site-packages, the command, init script, config and keep.d list."""
    src = ROOT / "bitmesh"
    out = []
    for f in _walk(src):
        rel = f.relative_to(src).as_posix()
        if rel.startswith(DEV_ONLY_DIRS) or f.suffix == ".pyc":
            continue
        if f.suffix != ".py" and STATE_NAME_RE.search(f.name):
            raise SystemExit(f"ipk: state_in_tree: {f} looks like runtime state; it must not be packaged")
        out.append(Entry(f"{PY_SITE}/bitmesh/{rel}", f.read_bytes(), 0o644))
    out += [
        Entry("/usr/bin/bitmesh", (ROOT / "files/usr/bin/bitmesh").read_bytes(), 0o755),
        Entry("/etc/init.d/bitmesh", (ROOT / "files/etc/init.d/bitmesh").read_bytes(), 0o755),
        # 0600 like OpenWrt's INSTALL_CONF: it may hold the Bitcoin Core RPC password
        Entry("/etc/config/bitmesh", (ROOT / "files/etc/config/bitmesh").read_bytes(), 0o600),
        # sysupgrade keeps what these lines name: the seed and the journal (state_dir)
        Entry("/lib/upgrade/keep.d/bitmesh", (ROOT / "files/lib/upgrade/keep.d/bitmesh").read_bytes(), 0o644),
    ]
    return out


_BITMESH_DESCRIPTION = """Pay-as-you-go Wi-Fi for bitcoin
Turns the router into a hotspot that sells access over unidirectional bitcoin
payment channels: clients pay per MB and/or per minute, the router meters them
in nftables and settles on-chain when the session ends."""


def bitmesh_packages(version: str, epoch: int | None = None) -> tuple[Package, Package]:
    """bitmesh (compiled) and bitmesh-src (its .py files), as Py3Package builds them."""
    epoch = source_date_epoch() if epoch is None else epoch
    main, sources = py3_split(_bitmesh_tree(), epoch)
    pkg = Package(
        name="bitmesh",
        version=version,
        depends=["libc", *BITMESH_DEPENDS],
        source="feeds/bitmesh/bitmesh",
        license="MIT",
        section="net",
        description=_BITMESH_DESCRIPTION,
        files=main,
        conffiles=["/etc/config/bitmesh"],
        postinst=BITMESH_POSTINST,
        prerm=BITMESH_PRERM,
    )
    src = Package(name="bitmesh-src", version=version, depends=["libc"], source=pkg.source, license=pkg.license,
                  section=pkg.section, files=sources,
                  description=_BITMESH_DESCRIPTION + "\nThis package contains the Python source files for bitmesh.")
    return pkg, src


def bitmesh_package(version: str, epoch: int | None = None) -> Package:
    """The service package as a router installs it: .pyc, no .py (see bitmesh_packages)."""
    return bitmesh_packages(version, epoch)[0]


def luci_package(version: str) -> Package:
    pkg = Package(
        name="luci-app-bitmesh",
        version=version,
        depends=["libc", "luci-base", "bitmesh"],
        source="feeds/bitmesh/luci-app-bitmesh",
        license="MIT",
        section="luci",
        description="LuCI support for BitMesh\n"
        "Settings (prices, limits, payout address) and status (clients, channels, earnings).",
        postinst=LUCI_POSTINST,
    )
    base = ROOT / "luci-app-bitmesh"
    for sub, prefix in (("htdocs", "/www"), ("root", "")):
        for f in _walk(base / sub):
            rel = f.relative_to(base / sub).as_posix()
            pkg.files.append(Entry(f"{prefix}/{rel}", f.read_bytes(), _file_mode(f)))
    return pkg


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bitcoinlib_files(cache: Path) -> dict[str, bytes]:
    """From the pinned PyPI sdist of python-bitcoinlib 0.12.2: the `bitcoin/` package (tests
    excluded, as the SDK Makefile's filespec does) and LICENSE, PKG-INFO, top_level.txt.

    The sdist is fetched once with pip into `cache` and checked against BITCOINLIB_SHA256. Without
    a registry, the identical installed copy is used if this interpreter has exactly 0.12.2.
    """
    sdist = cache / BITCOINLIB_SDIST
    if not (sdist.is_file() and _sha256(sdist) == BITCOINLIB_SHA256):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", f"python-bitcoinlib=={BITCOINLIB_VERSION}", "-d", str(cache)],
            capture_output=True, check=False,
        )
    if not sdist.is_file():
        raise SystemExit("ipk: cannot get the python-bitcoinlib 0.12.2 sdist (pip download failed)")
    if _sha256(sdist) != BITCOINLIB_SHA256:
        raise SystemExit(f"ipk: {sdist} does not match the pinned sha256 {BITCOINLIB_SHA256}")
    prefix = f"python-bitcoinlib-{BITCOINLIB_VERSION}/"
    wanted = {"LICENSE": "LICENSE", "PKG-INFO": "PKG-INFO",
              "python_bitcoinlib.egg-info/top_level.txt": "top_level.txt"}
    files: dict[str, bytes] = {}
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
            if not m.isfile() or not rel:
                continue
            if rel in wanted:
                key = wanted[rel]
            elif rel.startswith("bitcoin/") and rel.endswith(".py") and not rel.startswith("bitcoin/tests/"):
                key = rel
            else:
                continue
            f = tar.extractfile(m)
            assert f is not None
            files[key] = f.read()
    return files


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def bitcoinlib_tree(cache: Path) -> list[Entry]:
    """site-packages as the SDK's Py3Build leaves it (the wheel installed by python-installer):
    the `bitcoin` package and python_bitcoinlib-0.12.2.dist-info with METADATA, LICENSE (the
    licence text goes where a wheel keeps it), top_level.txt, WHEEL and RECORD."""
    files = bitcoinlib_files(cache)
    info = f"python_bitcoinlib-{BITCOINLIB_VERSION}.dist-info"
    tree = {rel: data for rel, data in files.items() if rel.startswith("bitcoin/")}
    tree[f"{info}/METADATA"] = files["PKG-INFO"]
    tree[f"{info}/LICENSE"] = files["LICENSE"]
    tree[f"{info}/top_level.txt"] = files["top_level.txt"]
    tree[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: bitmesh tools/ipk.py\nRoot-Is-Purelib: true\n"
                             b"Tag: py3-none-any\n")
    record = "".join(f"{rel},{_record_hash(data)},{len(data)}\n" for rel, data in sorted(tree.items()))
    tree[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    return [Entry(f"{PY_SITE}/{rel}", data, 0o644) for rel, data in sorted(tree.items())]


_BITCOINLIB_DESCRIPTION = """Python library for Bitcoin data structures and protocol
python-bitcoinlib 0.12.2 (the bitcoin package). It loads OpenSSL's libcrypto
through ctypes for ECDSA."""


def bitcoinlib_packages(cache: Path, epoch: int | None = None) -> tuple[Package, Package]:
    epoch = source_date_epoch() if epoch is None else epoch
    main, sources = py3_split(bitcoinlib_tree(cache), epoch)
    pkg = Package(
        name="python3-bitcoinlib",
        version=f"{BITCOINLIB_VERSION}-r{RELEASE}",
        depends=["libc", *BITCOINLIB_DEPENDS],
        source="feeds/bitmesh/python-bitcoinlib",
        license="LGPL-3.0-or-later",
        section="lang",
        description=_BITCOINLIB_DESCRIPTION,
        files=main,
    )
    src = Package(name="python3-bitcoinlib-src", version=pkg.version, depends=["libc"], source=pkg.source,
                  license=pkg.license, section=pkg.section, files=sources,
                  description=_BITCOINLIB_DESCRIPTION
                  + "\nThis package contains the Python source files for python3-bitcoinlib.")
    return pkg, src


def bitcoinlib_package(cache: Path, epoch: int | None = None) -> Package:
    return bitcoinlib_packages(cache, epoch)[0]


def all_packages(cache: Path, epoch: int | None = None) -> list[Package]:
    epoch = source_date_epoch() if epoch is None else epoch
    version = f"{bitmesh_version()}-r{RELEASE}"
    return [*bitmesh_packages(version, epoch), luci_package(version), *bitcoinlib_packages(cache, epoch)]


def build_all(out: Path, cache: Path, epoch: int | None = None) -> list[Path]:
    epoch = source_date_epoch() if epoch is None else epoch
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for pkg in all_packages(cache, epoch):
        path = out / pkg.filename
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(build_ipk(pkg, epoch))
        tmp.replace(path)
        written.append(path)
    return written


def command(build, description: str, argv: list[str] | None = None) -> int:
    """The command line of a package builder (`build(out, cache)` -> the files it wrote): this
    one's and tools/apk.py's."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "cache",
                    help="where the python-bitcoinlib sdist is kept (default build/cache)")
    args = ap.parse_args(argv)
    for path in build(args.out, args.cache):
        print(f"{path}  {path.stat().st_size} bytes  sha256 {_sha256(path)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command(build_all, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
