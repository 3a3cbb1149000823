"""The bitmesh package on OpenWrt's own userland: what it ships runs from .pyc alone, and its
maintainer scripts do the right thing on a fresh install, an upgrade and a removal.

The packages' files are unpacked into an OpenWrt root (tests/support/owrt.py) with the control
files where opkg keeps them (/usr/lib/opkg/info/bitmesh.{list,postinst,prerm,postinst-pkg,...});
the scripts then run as opkg runs them (`/bin/sh -c "<info>/bitmesh.postinst configure"`, the old
prerm with `upgrade <version>` first, PKG_UPGRADE set) and as apk runs the post-upgrade script
OpenWrt's package-pack.mk composes, against OpenWrt's /lib/functions.sh, rc.common and a real
procd running the real service (chain unreachable, which it survives) in a private network
namespace, so its `table inet bitmesh` is real. The real opkg/apk installs are issue 12.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.owrt import OwrtRoot, wait_for
from tests.support.router import uci_config
from tools import ipk

pytestmark = pytest.mark.owrt

ROOT = Path(__file__).resolve().parent.parent
VERSION = f"{ipk.bitmesh_version()}-r{ipk.RELEASE}"
INFO = "/usr/lib/opkg/info"
LAN = "bmlan"
OPTIONS = {
    "enabled": 1,
    "interface": LAN,
    "network": "regtest",
    "chain_backend": "esplora",
    "esplora_url": "http://127.0.0.1:9/api",  # nothing listens: the service runs and retries
    "payout_address": "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080",
    "state_dir": "/etc/bitmesh",
    "portal_port": 8088,
}


@pytest.fixture(scope="module")
def packages() -> dict[str, ipk.Package]:
    pkgs = ipk.all_packages(ROOT / "build" / "cache")
    return {p.name: p for p in pkgs}


@contextlib.contextmanager
def lan_namespace(prefix: str, address: str) -> Iterator[str]:
    """A network namespace with a LAN device (`LAN`, a veth, at `address`/24) for a router root;
    deleted afterwards."""
    name = f"{prefix}{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["link", "set", "lo", "up"], ["link", "add", LAN, "type", "veth", "peer", "name", LAN + "p"],
                     ["addr", "add", f"{address}/24", "dev", LAN], ["link", "set", LAN, "up"],
                     ["link", "set", LAN + "p", "up"]):
            subprocess.run(["ip", "-n", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns():
    with lan_namespace("bmpkg", "10.77.0.1") as name:
        yield name


def _control(pkg: ipk.Package) -> dict[str, str]:
    """The control files opkg keeps in /usr/lib/opkg/info/<name>.<file> after unpacking."""
    out = {"list": "".join(e.path + "\n" for e in pkg.files), "control": ipk.control_text(pkg, 0, 0),
           "postinst": ipk.POSTINST, "prerm": ipk.PRERM}
    if pkg.conffiles:
        out["conffiles"] = "".join(c + "\n" for c in pkg.conffiles)
    if pkg.postinst:
        out["postinst-pkg"] = pkg.postinst
    if pkg.prerm:
        out["prerm-pkg"] = pkg.prerm
    return out


def stage_installed(root: OwrtRoot, pkg: ipk.Package) -> None:
    root.install_package(pkg.files)
    for name, text in _control(pkg).items():
        root.stage(f"{INFO}/{pkg.name}.{name}", text, 0o755 if name.endswith(("inst", "rm", "-pkg")) else 0o644)


def opkg_script(root: OwrtRoot, pkg: str, script: str, *args: str, upgrade: bool, instroot: str | None = None):
    """A maintainer script as opkg-lede runs it (pkg_run_script: PKG_ROOT, PKG_UPGRADE, sh -c)."""
    env = {"PKG_ROOT": instroot or "/", "PKG_UPGRADE": "1" if upgrade else "0"}
    if instroot:
        env["IPKG_INSTROOT"] = instroot
    p = root.run(["/bin/sh", "-c", " ".join([f"{instroot or ''}{INFO}/{pkg}.{script}", *args])], env=env,
                 text=True, timeout=60)
    assert p.returncode == 0, f"{script} {args}: {p.stdout}{p.stderr}"
    return p


def apk_post_upgrade(pkg: ipk.Package) -> str:
    """The post-upgrade script OpenWrt's include/package-pack.mk writes for apk: PKG_UPGRADE=1,
    then default_postinst, then Package/<name>/postinst inline (its #! line dropped)."""
    body = "\n".join(ln for ln in pkg.postinst.splitlines() if not ln.lstrip().startswith("#!"))
    return ("#!/bin/sh\nexport PKG_UPGRADE=1\n"
            '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
            '[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n'
            ". ${IPKG_INSTROOT}/lib/functions.sh\n"
            'export root="${IPKG_INSTROOT}"\n'
            f'export pkgname="{pkg.name}"\n'
            "add_group_and_user\ndefault_postinst\n" + body + "\n")


class Router:
    def __init__(self, root: OwrtRoot):
        self.root = root

    def instance(self) -> dict:
        p = self.root.ubus("call", "service", "list", json.dumps({"name": "bitmesh"}))
        service = json.loads(p.stdout or "{}").get("bitmesh") or {}
        return service.get("instances", {}).get("bitmesh") or {}

    def pid(self) -> int | None:
        inst = self.instance()
        return int(inst["pid"]) if inst.get("running") else None

    def enabled(self) -> bool:
        return self.root.run(["/etc/init.d/bitmesh", "enabled"]).returncode == 0

    def table(self) -> bool:
        return self.root.run(["nft", "list", "table", "inet", "bitmesh"]).returncode == 0

    def wait_serving(self) -> int:
        pid = wait_for(self.pid, 20, "the bitmesh instance")
        wait_for(self.table, 20, "table inet bitmesh")
        return pid


def _start(tmp: Path, netns: str, packages: dict[str, ipk.Package], options: dict) -> Router:
    root = OwrtRoot(tmp / "root", netns=netns)
    stage_installed(root, packages["python3-bitcoinlib"])
    stage_installed(root, packages["bitmesh"])
    root.stage("/etc/config/bitmesh", uci_config(options), 0o600)
    root.start()
    root.start_procd()
    return Router(root)


def test_installed_tree_runs_from_pyc_only(tmp_path, packages):
    """The .pyc the packages ship load on OpenWrt 24.10's Python (3.11, as here) with no .py next
    to them: every module imports, `bitmesh serve --help` starts."""
    with OwrtRoot(tmp_path / "root") as root:
        for name in ("bitmesh", "python3-bitcoinlib"):
            for e in packages[name].files:
                root.write(e.path, e.data, e.mode)
        code = ("import bitcoin.core.key, importlib, pkgutil, bitmesh, bitmesh.cli\n"
                "mods = [m.name for m in pkgutil.walk_packages(bitmesh.__path__, 'bitmesh.')]\n"
                "for m in mods: importlib.import_module(m)\n"
                "print(bitmesh.cli.__file__, bitcoin.core.key.__file__, len(mods))\n")
        p = root.run(["python3", "-c", code], text=True)
        assert p.returncode == 0, p.stderr
        cli, key, count = p.stdout.split()
        assert cli == f"{ipk.PY_SITE}/bitmesh/cli.pyc" and key == f"{ipk.PY_SITE}/bitcoin/core/key.pyc"
        assert int(count) >= 20
        assert root.run(["sh", "-c", f"find {ipk.PY_SITE}/bitmesh {ipk.PY_SITE}/bitcoin -name '*.py' | grep ."]
                        ).returncode == 1
        started = time.monotonic()
        p = root.run(["/usr/bin/bitmesh", "serve", "--help"], text=True)
        assert p.returncode == 0 and "--config" in p.stdout, p.stderr
        print(f"bitmesh serve --help from .pyc: {time.monotonic() - started:.2f} s")


def test_fresh_install_upgrade_and_removal_on_a_live_router(tmp_path, netns, packages):
    pkg = packages["bitmesh"]
    router = _start(tmp_path, netns, packages, OPTIONS)
    try:
        # fresh install (opkg): enabled at boot and started
        opkg_script(router.root, "bitmesh", "postinst", "configure", upgrade=False)
        assert router.enabled()
        first = router.wait_serving()

        # upgrade of a running service (opkg): the old prerm `upgrade`, new files, the new
        # postinst. Restarted with the new code, still enabled, and no script drops the table:
        # only the service's own stop/start touches it.
        trace = opkg_script(router.root, "bitmesh", "prerm", "upgrade", VERSION, upgrade=True)
        assert "nft" not in trace.stdout + trace.stderr
        assert router.enabled()
        wait_for(lambda: router.pid() is None, 20, "the old instance to stop (default_prerm)")
        opkg_script(router.root, "bitmesh", "postinst", "configure", upgrade=True)
        second = router.wait_serving()
        assert second != first and router.enabled()

        # upgrade with apk (no pre-deinstall on an upgrade): post-upgrade restarts the running
        # old process so the new code runs
        router.root.write("/tmp/bitmesh.post-upgrade", apk_post_upgrade(pkg), 0o755)
        router.root.write(f"/lib/apk/packages/{pkg.name}.list", "".join(e.path + "\n" for e in pkg.files))
        p = router.root.run(["/tmp/bitmesh.post-upgrade"], text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        wait_for(lambda: router.pid() not in (None, second), 20, "a new instance")
        router.wait_serving()
        assert router.enabled()
        router.root.run(["rm", f"/lib/apk/packages/{pkg.name}.list"])

        # the owner disabled it (not started at boot); an upgrade keeps it disabled
        assert router.root.run(["/etc/init.d/bitmesh", "disable"]).returncode == 0
        opkg_script(router.root, "bitmesh", "prerm", "upgrade", VERSION, upgrade=True)
        wait_for(lambda: router.pid() is None, 20, "the old instance to stop (default_prerm)")
        opkg_script(router.root, "bitmesh", "postinst", "configure", upgrade=True)
        assert not router.enabled()

        # removal: stopped, disabled, BitMesh's table gone
        router.wait_serving()
        opkg_script(router.root, "bitmesh", "prerm", "remove", upgrade=False)
        wait_for(lambda: router.pid() is None, 10, "the instance to stop")
        assert not router.enabled() and not router.table()
    finally:
        router.root.stop()


def test_image_build_leaves_the_running_system_alone(tmp_path, netns, packages):
    """IPKG_INSTROOT set (an image being built): the scripts act on that root only. The live
    root's running service, its enabled state and its table stay as they are."""
    router = _start(tmp_path, netns, packages, OPTIONS)
    try:
        opkg_script(router.root, "bitmesh", "postinst", "configure", upgrade=False)
        pid = router.wait_serving()
        image = "/tmp/image-root"
        for e in packages["bitmesh"].files:
            router.root.write(f"{image}{e.path}", e.data, e.mode)
        for name, text in _control(packages["bitmesh"]).items():
            router.root.write(f"{image}{INFO}/bitmesh.{name}", text, 0o755)
        for src in ("/lib/functions.sh", "/etc/rc.common"):
            router.root.run(["sh", "-c", f"mkdir -p {image}$(dirname {src}) && cp -a {src} {image}{src}"])
        router.root.run(["sh", "-c", f"mkdir -p {image}/lib/functions && cp -a /lib/functions/. {image}/lib/functions/"
                                     f" && mkdir -p {image}/etc/rc.d"])

        opkg_script(router.root, "bitmesh", "postinst", "configure", upgrade=False, instroot=image)
        # the image gets its boot link; the live system is untouched
        assert router.root.run(["sh", "-c", f"ls {image}/etc/rc.d/S*bitmesh"]).returncode == 0
        opkg_script(router.root, "bitmesh", "prerm", "remove", upgrade=False, instroot=image)
        assert router.root.run(["sh", "-c", f"ls {image}/etc/rc.d/ | grep bitmesh"]).returncode == 1
        assert router.pid() == pid and router.enabled() and router.table()
    finally:
        router.root.stop()


def test_keep_d_names_the_state_for_sysupgrade(tmp_path, packages):
    """sysupgrade keeps what `find $(sed ... /lib/upgrade/keep.d/*)` lists (its list_static_conffiles):
    the seed and the journal under state_dir."""
    with OwrtRoot(tmp_path / "root") as root:
        for e in packages["bitmesh"].files:
            if e.path.startswith("/lib/upgrade/"):
                root.write(e.path, e.data, e.mode)
        root.write("/etc/bitmesh/seed", b"\0" * 32, 0o600)
        root.write("/etc/bitmesh/channels.journal", b"{}\n", 0o600)
        p = root.run(["sh", "-c", "find $(sed -ne '/^[[:space:]]*$/d; /^#/d; p' /lib/upgrade/keep.d/* 2>/dev/null) "
                                  "\\( -type f -o -type l \\) 2>/dev/null"], text=True)
        assert sorted(p.stdout.split()) == ["/etc/bitmesh/channels.journal", "/etc/bitmesh/seed"]
