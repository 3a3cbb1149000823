#!/usr/bin/env python3
"""Build BitMesh's three OpenWrt .ipk packages without an OpenWrt SDK.

    python3 tools/ipk.py [--out dist]

Writes bitmesh_<ver>_all.ipk, luci-app-bitmesh_<ver>_all.ipk and
python3-bitcoinlib_0.12.2-r1_all.ipk in OpenWrt's ipk format: a gzip'd tar (not an ar archive)
holding ./debian-binary, ./data.tar.gz and ./control.tar.gz, as OpenWrt's ipkg-build makes them.

Reproducible: every mtime is SOURCE_DATE_EPOCH (or the last git commit time), owner 0:0, entries
sorted, gzip headers carry mtime 0 and no file name; two builds give identical bytes.
The SDK feed in openwrt/package/bitmesh builds the same packages (and .apk on 25.12).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import io
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY_SITE = "/usr/lib/python3.11/site-packages"  # OpenWrt 24.10 ships Python 3.11
RELEASE = "1"

BITCOINLIB_VERSION = "0.12.2"
BITCOINLIB_SDIST = f"python-bitcoinlib-{BITCOINLIB_VERSION}.tar.gz"
# sha256 of the PyPI sdist; the same value is PKG_HASH in openwrt/package/bitmesh/python-bitcoinlib
BITCOINLIB_SHA256 = "c65ab61427c77c38d397bfc431f71d86fd355b453a536496ec3fcb41bd10087d"

# Files of the service package that may be shipped besides .py (portal pages, wallet JS, ...).
# Build-time folders inside the package tree: the wallet's npm project (its output is vendored
# into portal/static/vendor, which is shipped).
DEV_ONLY_DIRS = ("portal/wallet/",)
DATA_SUFFIXES = {".py", ".html", ".htm", ".js", ".mjs", ".css", ".svg", ".png", ".ico", ".txt", ".woff2", ".tpl"}
# Never ship runtime state: an HD seed, keys, ledgers, databases.
STATE_NAME_RE = re.compile(r"(seed|secret|private|\.key$|\.db$|\.sqlite|ledger\.(json|log|dat)|state\.json)", re.I)

POSTINST_HEADER = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
PRERM_HEADER = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
"""
# Same bodies as Package/bitmesh/postinst and /prerm in openwrt/package/bitmesh/bitmesh/Makefile.
BITMESH_POSTINST = """# live system only (not while building an image): enable and start; the service itself
# stays idle until bitmesh.main.enabled is 1. fw4 is never touched.
[ -n "${IPKG_INSTROOT}" ] || {
	/etc/init.d/bitmesh enable
	/etc/init.d/bitmesh start
}
exit 0
"""
BITMESH_PRERM = """# live system only: stop and disable; drop BitMesh's own nft table (never fw4's).
[ -n "${IPKG_INSTROOT}" ] || {
	/etc/init.d/bitmesh stop
	/etc/init.d/bitmesh disable
	nft delete table inet bitmesh 2>/dev/null
}
exit 0
"""
LUCI_POSTINST = """[ -n "${IPKG_INSTROOT}" ] || {
	rm -f /tmp/luci-indexcache /tmp/luci-indexcache.*
	/etc/init.d/rpcd reload 2>/dev/null
}
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
        ("Depends", ", ".join(pkg.depends)),
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
    return "".join(f"{k}: {v}\n" for k, v in fields)


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
    control.append(("./postinst", (POSTINST_HEADER + pkg.postinst).encode(), 0o755))
    control.append(("./prerm", (PRERM_HEADER + pkg.prerm).encode(), 0o755))
    control_tgz = _tar_gz(control, epoch)
    # outer order as ipkg-build writes it
    outer = [
        ("./debian-binary", b"2.0\n", 0o644),
        ("./data.tar.gz", data_tgz, 0o644),
        ("./control.tar.gz", control_tgz, 0o644),
    ]
    return _tar_gz(outer, epoch, sort=False)


# --- the three packages ---------------------------------------------------------------------------


def bitmesh_package(version: str) -> Package:
    pkg = Package(
        name="bitmesh",
        version=version,
        depends=["libc", "python3-light", "python3-ubus", "python3-paho-mqtt", "python3-bottle",
                 "nftables-json", "python3-bitcoinlib"],
        source="feeds/bitmesh/bitmesh",
        license="MIT",
        section="net",
        description="""Pay-as-you-go Wi-Fi for bitcoin
Turns the router into a hotspot that sells access over unidirectional bitcoin
payment channels: clients pay per MB and/or per minute, the router meters them
in nftables and settles on-chain when the session ends.""",
        conffiles=["/etc/config/bitmesh"],
        postinst=BITMESH_POSTINST,
        prerm=BITMESH_PRERM,
    )
    src = ROOT / "bitmesh"
    for f in _walk(src):
        rel = f.relative_to(src).as_posix()
        if f.suffix not in DATA_SUFFIXES or rel.startswith(DEV_ONLY_DIRS) or "/node_modules/" in f"/{rel}":
            continue
        if f.suffix != ".py" and STATE_NAME_RE.search(f.name):
            continue
        pkg.files.append(Entry(f"{PY_SITE}/bitmesh/{rel}", f.read_bytes(), 0o644))
    pkg.files += [
        Entry("/usr/bin/bitmesh", (ROOT / "files/usr/bin/bitmesh").read_bytes(), 0o755),
        Entry("/etc/init.d/bitmesh", (ROOT / "files/etc/init.d/bitmesh").read_bytes(), 0o755),
        # 0600 like OpenWrt's INSTALL_CONF: it may hold the Bitcoin Core RPC password
        Entry("/etc/config/bitmesh", (ROOT / "files/etc/config/bitmesh").read_bytes(), 0o600),
    ]
    return pkg


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
    """The `bitcoin/` package of python-bitcoinlib 0.12.2 (tests excluded), from the pinned PyPI sdist.

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
    files: dict[str, bytes] = {}
    if sdist.is_file():
        if _sha256(sdist) != BITCOINLIB_SHA256:
            raise SystemExit(f"ipk: {sdist} does not match the pinned sha256 {BITCOINLIB_SHA256}")
        prefix = f"python-bitcoinlib-{BITCOINLIB_VERSION}/"
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if not m.isfile() or not m.name.startswith(prefix + "bitcoin/"):
                    continue
                rel = m.name[len(prefix):]
                if rel.startswith("bitcoin/tests/") or "__pycache__" in rel or not rel.endswith(".py"):
                    continue
                f = tar.extractfile(m)
                assert f is not None
                files[rel] = f.read()
        return files
    try:
        dist = importlib.metadata.distribution("python-bitcoinlib")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is None or dist.version != BITCOINLIB_VERSION:
        raise SystemExit("ipk: cannot get python-bitcoinlib 0.12.2 (pip download failed, not installed here)")
    for p in dist.files or []:
        rel = p.as_posix()
        if rel.startswith("bitcoin/") and rel.endswith(".py") and not rel.startswith("bitcoin/tests/"):
            files[rel] = Path(dist.locate_file(p)).read_bytes()
    print("ipk: PyPI not reachable; using the installed python-bitcoinlib 0.12.2", file=sys.stderr)
    return files


def bitcoinlib_package(cache: Path) -> Package:
    pkg = Package(
        name="python3-bitcoinlib",
        version=f"{BITCOINLIB_VERSION}-r{RELEASE}",
        depends=["libc", "python3-light", "python3-ctypes", "libopenssl3"],
        source="feeds/bitmesh/python-bitcoinlib",
        license="LGPL-3.0-or-later",
        section="lang",
        description="""Python library for Bitcoin data structures and protocol
python-bitcoinlib 0.12.2 (the bitcoin package). It loads OpenSSL's libcrypto
through ctypes for ECDSA.""",
    )
    for rel, data in sorted(bitcoinlib_files(cache).items()):
        pkg.files.append(Entry(f"{PY_SITE}/{rel}", data, 0o644))
    return pkg


def build_all(out: Path, cache: Path, epoch: int | None = None) -> list[Path]:
    epoch = source_date_epoch() if epoch is None else epoch
    version = f"{bitmesh_version()}-r{RELEASE}"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for pkg in (bitmesh_package(version), luci_package(version), bitcoinlib_package(cache)):
        path = out / pkg.filename
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(build_ipk(pkg, epoch))
        tmp.replace(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "cache",
                    help="where the python-bitcoinlib sdist is kept (default build/cache)")
    args = ap.parse_args(argv)
    for path in build_all(args.out, args.cache):
        print(f"{path}  {path.stat().st_size} bytes  sha256 {_sha256(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
