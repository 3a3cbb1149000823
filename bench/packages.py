"""Package sizes: what the bitmesh package takes on the router once installed.

`packages.installed_kb`: the bitmesh package installed by the real apk-tools 3.0.2 (OpenWrt 25.12,
tools/pkg-managers.sh) into an empty root, the bytes of every file it put there (/lib/apk/packages/
bitmesh.list: modules as .pyc, portal pages and vendored JS, init script, config), in KiB. The
same for luci-app-bitmesh and python3-bitcoinlib, and the download sizes of the .ipk and .apk.
Deterministic (a reproducible build), so one run is the figure.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from tools import apk as apktool
from tools import ipk

ROOT = Path(__file__).resolve().parent.parent
OURS = ("bitmesh", "luci-app-bitmesh", "python3-bitcoinlib")


def _stub(name: str) -> ipk.Package:
    return ipk.Package(name=name, version="1.0-r1", depends=[], source=f"feeds/stub/{name}", license="MIT",
                       section="stub", description="stand-in", files=[])


def run() -> dict:
    try:
        apk = apktool.tools_prefix() / "bin" / "apk"
    except SystemExit as e:
        return {"packages.error": str(e)}
    pkgs = {p.name: p for p in ipk.all_packages(ROOT / "build" / "cache")}
    deps = sorted({d for n in OURS for d in pkgs[n].depends} - set(OURS))
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bitmesh-bench-pkg-") as tmp:
        feed, root = Path(tmp) / "feed", Path(tmp) / "root"
        feed.mkdir()
        root.mkdir()
        files = [apktool.build_apk(p, 0, apk, feed) for p in [*(pkgs[n] for n in OURS), *map(_stub, deps)]]
        apktool.mkndx(apk, feed, files)
        p = subprocess.run([str(apk), "--root", str(root), "--initdb", "--allow-untrusted", "--no-cache",
                            "--repositories-file", "/dev/null", "-X", str(feed / "packages.adb"), "--no-scripts",
                            "--no-interactive", "add", *OURS], capture_output=True, text=True)
        if p.returncode != 0:
            return {"packages.error": f"apk add: {p.stdout}{p.stderr}"[-500:]}
        for name in OURS:
            listed = (root / f"lib/apk/packages/{name}.list").read_text().split()
            listed += [e.path for e in apktool.meta_files(pkgs[name])]  # the list itself, conffiles
            size = sum(os.lstat(root / f.lstrip("/")).st_size for f in listed)
            key = "installed_kb" if name == "bitmesh" else f"{name.replace('-', '_')}_installed_kb"
            out[f"packages.{key}"] = round(size / 1024, 1)
            out[f"packages.{name.replace('-', '_')}_apk_kb"] = round((feed / apktool.filename(pkgs[name])).stat()
                                                                     .st_size / 1024, 1)
            out[f"packages.{name.replace('-', '_')}_ipk_kb"] = round(len(ipk.build_ipk(pkgs[name], 0)) / 1024, 1)
    return out
