#!/usr/bin/env python3
"""Build BitMesh's OpenWrt 25.12 .apk packages without an OpenWrt SDK.

    python3 tools/apk.py [--out dist]

The same packages as tools/ipk.py (one source for their files, depends, conffiles and scripts:
`ipk.all_packages`), packed as OpenWrt's include/package-pack.mk packs them for apk-tools v3:
the package's own files plus /lib/apk/packages/<name>.{list,conffiles,conffiles_static}, the
post-install, post-upgrade and pre-deinstall scripts it composes from /lib/functions.sh's
default_postinst/default_prerm and the package's postinst/prerm, `apk mkpkg --info ...` with
`arch:noarch`; then `apk mkndx` writes the index packages.adb (`--sign KEY` signs it).

`apk` is apk-tools 3.0.2 built from ../shared/openwrt-userland/sources by tools/pkg-managers.sh.
Reproducible: every staged file's mtime is SOURCE_DATE_EPOCH (or the last commit time), owner 0:0.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ipk  # noqa: E402  (tools/ is not a package when run as a script)

ROOT = ipk.ROOT
BUILD_SCRIPT = ROOT / "tools" / "pkg-managers.sh"
META_DIR = "/lib/apk/packages"


def tools_prefix() -> Path:
    """Build (or reuse) apk-tools, opkg and usign; the prefix holding bin/{apk,opkg,usign}."""
    p = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"apk: tools/pkg-managers.sh failed: {p.stderr.strip()[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def filename(pkg: ipk.Package) -> str:
    return f"{pkg.name}-{pkg.version}.apk"


def _body(script: str) -> str:
    """Package/<name>/postinst or /prerm inlined after the default call (its #! line dropped)."""
    return "".join(ln + "\n" for ln in script.splitlines() if not ln.lstrip().startswith("#!"))


def post_install(pkg: ipk.Package) -> str:
    return ("#!/bin/sh\n"
            '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
            "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
            ". ${IPKG_INSTROOT}/lib/functions.sh\n"
            'export root="${IPKG_INSTROOT}"\n'
            f'export pkgname="{pkg.name}"\n'
            "add_group_and_user\n"
            "default_postinst\n" + _body(pkg.postinst))


def post_upgrade(pkg: ipk.Package) -> str:
    """post-install with PKG_UPGRADE=1 exported first (default_postinst then starts but does not
    enable: a service the owner disabled stays disabled)."""
    return "#!/bin/sh\nexport PKG_UPGRADE=1\n" + post_install(pkg).split("\n", 1)[1]


def pre_deinstall(pkg: ipk.Package) -> str:
    return ("#!/bin/sh\n"
            "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
            ". ${IPKG_INSTROOT}/lib/functions.sh\n"
            'export root="${IPKG_INSTROOT}"\n'
            f'export pkgname="{pkg.name}"\n'
            "default_prerm\n" + _body(pkg.prerm))


def meta_files(pkg: ipk.Package) -> list[ipk.Entry]:
    """/lib/apk/packages/<name>.list (default_postinst/prerm find the init scripts there) and,
    with conffiles, .conffiles and .conffiles_static (path and sha256 of the shipped default:
    sysupgrade tells a modified config from the default by it)."""
    out = [ipk.Entry(f"{META_DIR}/{pkg.name}.list", "".join(e.path + "\n" for e in pkg.files).encode(), 0o644)]
    if pkg.conffiles:
        data = {e.path: e.data for e in pkg.files}
        out.append(ipk.Entry(f"{META_DIR}/{pkg.name}.conffiles",
                             "".join(c + "\n" for c in pkg.conffiles).encode(), 0o644))
        out.append(ipk.Entry(f"{META_DIR}/{pkg.name}.conffiles_static",
                             "".join(f"{c} {hashlib.sha256(data[c]).hexdigest()}\n" for c in pkg.conffiles).encode(),
                             0o644))
    return out


def _one_line(text: str) -> str:
    return " ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())


def build_apk(pkg: ipk.Package, epoch: int, apk: Path, out: Path) -> Path:
    target = out / filename(pkg)
    with tempfile.TemporaryDirectory(prefix="bitmesh-apk-") as tmp:
        idir, adir = Path(tmp) / "idir", Path(tmp) / "adir"
        adir.mkdir()
        for e in [*pkg.files, *meta_files(pkg)]:
            f = idir / e.path.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(e.data)
            f.chmod(e.mode)
        scripts = {"post-install": post_install(pkg), "post-upgrade": post_upgrade(pkg),
                   "pre-deinstall": pre_deinstall(pkg)}
        for name, text in scripts.items():
            (adir / name).write_text(text)
        for dirpath, dirnames, filenames in os.walk(idir):
            for n in dirnames:
                os.chmod(Path(dirpath) / n, 0o755)
            for n in [*dirnames, *filenames, "."]:
                os.utime(Path(dirpath) / n, (epoch, epoch), follow_symlinks=False)
        argv = [str(apk), "mkpkg",
                "--info", f"name:{pkg.name}", "--info", f"version:{pkg.version}",
                "--info", f"description:{_one_line(pkg.description)}", "--info", "arch:noarch",
                "--info", f"license:{pkg.license}", "--info", f"origin:{pkg.source}",
                "--info", "maintainer:BitMesh developers",
                "--info", f"depends:{' '.join(pkg.depends)}"]
        for name in scripts:
            argv += ["--script", f"{name}:{adir / name}"]
        argv += ["--files", str(idir), "--output", str(target) + ".tmp"]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
        p = subprocess.run(argv, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"apk: mkpkg {pkg.name} failed: {p.stdout}{p.stderr}")
    os.replace(str(target) + ".tmp", target)
    return target


def mkndx(apk: Path, out: Path, files: list[Path], sign: Path | None = None) -> Path:
    """The feed index packages.adb over `files` (names relative to `out`), signed with `sign`."""
    argv = [str(apk), "mkndx", "--allow-untrusted", "--output", "packages.adb"]
    if sign:
        argv += ["--sign", str(sign)]
    p = subprocess.run([*argv, *sorted(f.name for f in files)], cwd=out, capture_output=True, text=True,
                       env={**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "0")})
    if p.returncode != 0:
        raise SystemExit(f"apk: mkndx failed: {p.stdout}{p.stderr}")
    return out / "packages.adb"


def build_all(out: Path, cache: Path, epoch: int | None = None, apk: Path | None = None) -> list[Path]:
    epoch = ipk.source_date_epoch() if epoch is None else epoch
    apk = apk or tools_prefix() / "bin" / "apk"
    out.mkdir(parents=True, exist_ok=True)
    written = [build_apk(pkg, epoch, apk, out) for pkg in ipk.all_packages(cache, epoch)]
    return [*written, mkndx(apk, out, written)]


def main(argv: list[str] | None = None) -> int:
    return ipk.command(build_all, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
