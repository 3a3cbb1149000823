"""The real opkg and apk on a live router (IPKG_INSTROOT unset): install, upgrade and remove the
bitmesh package while OpenWrt's procd runs the service, in an OpenWrt root (tests/support/owrt.py)
inside a private network namespace, so the maintainer scripts' /etc/init.d calls reach a real
procd and the service's `table inet bitmesh` is real.

The previous release is the version-bumped copy of tests/test_pkg_install.py (0.0.9-r1).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.owrt import OwrtRoot, userland, wait_for, why_no_userland
from tests.support.router import uci_config
from tests.test_package_owrt import OPTIONS, Router, lan_namespace
from tests.test_pkg_install import OLD_VERSION, apk_feed, ipk_feed, pm_tools, releases_of
from tools import ipk

pytestmark = [pytest.mark.owrt, pytest.mark.netns]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tools() -> Path:
    if userland() is None:
        pytest.skip(why_no_userland())
    return pm_tools()


@pytest.fixture(scope="module")
def releases() -> dict[str, list[ipk.Package]]:
    return releases_of(ipk.all_packages(ROOT / "build" / "cache"))


@pytest.fixture
def netns():
    with lan_namespace("bmpkl", "10.78.0.1") as name:
        yield name


class LiveOpkg:
    new_default = "/etc/config/bitmesh-opkg"

    def __init__(self, root: OwrtRoot, tools: Path):
        self.root, self.bin = root, tools / "opkg"

    def feed(self, name: str, pkgs: list[ipk.Package]) -> str:
        ipk_feed(pkgs, self.root.tmp / name)
        return f"/tmp/{name}"  # where the root sees it (/tmp inside is root.tmp)

    def run(self, feed: str, *args: str) -> subprocess.CompletedProcess:
        self.root.write("/etc/opkg-test.conf", f"dest root /\nlists_dir ext /var/opkg-lists\n"
                        f"src bitmesh file://{feed}\narch all 100\narch noarch 200\n")
        conf = ["-f", "/etc/opkg-test.conf"]
        p = self.root.run([str(self.bin), *conf, "update"], text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        return self.root.run([str(self.bin), *conf, *args], text=True, timeout=120)

    def install(self, feed: str, name: str) -> subprocess.CompletedProcess:
        return self.run(feed, "install", name)

    def upgrade(self, feed: str, name: str) -> subprocess.CompletedProcess:
        return self.run(feed, "upgrade", name)

    def remove(self, feed: str, name: str) -> subprocess.CompletedProcess:
        return self.run(feed, "remove", name)

    def version(self, name: str) -> str | None:
        p = self.root.run([str(self.bin), "-f", "/etc/opkg-test.conf", "list-installed", name], text=True)
        line = p.stdout.strip()
        return line.split(" - ")[1] if line else None


class LiveApk:
    new_default = "/etc/config/bitmesh.apk-new"

    def __init__(self, root: OwrtRoot, tools: Path):
        self.root, self.bin = root, tools / "apk"
        self.initialised = False

    def feed(self, name: str, pkgs: list[ipk.Package]) -> str:
        apk_feed(self.bin, pkgs, self.root.tmp / name)
        return f"/tmp/{name}"

    def run(self, feed: str, *args: str) -> subprocess.CompletedProcess:
        # as on the router: scripts run (chrooted into /), IPKG_INSTROOT unset
        argv = [str(self.bin), "--allow-untrusted", "--no-cache", "--repositories-file", "/dev/null",
                "-X", f"{feed}/packages.adb", "--no-interactive"]
        if not self.initialised:
            argv.append("--initdb")
            self.initialised = True
        return self.root.run([*argv, *args], text=True, timeout=120)

    def install(self, feed: str, name: str) -> subprocess.CompletedProcess:
        return self.run(feed, "add", name)

    def upgrade(self, feed: str, name: str) -> subprocess.CompletedProcess:
        return self.run(feed, "upgrade", name)

    def remove(self, feed: str, name: str) -> subprocess.CompletedProcess:
        return self.run(feed, "del", name)

    def version(self, name: str) -> str | None:
        p = self.root.run([str(self.bin), "--no-cache", "--repositories-file", "/dev/null", "list", "--installed",
                           name], text=True)
        line = p.stdout.strip()
        return line.split(" ", 1)[0][len(name) + 1:] if line else None


@pytest.mark.parametrize("manager", [LiveOpkg, LiveApk], ids=["opkg", "apk"])
def test_install_upgrade_remove_on_a_live_router(tmp_path, netns, tools, releases, manager):
    root = OwrtRoot(tmp_path / "root", netns=netns)
    pm = manager(root, tools)
    old = pm.feed("feed-old", releases["old"] + releases["stubs"])
    new = pm.feed("feed-new", releases["new"] + releases["stubs"])
    bitmesh = releases["new"][1]
    router = Router(root)
    root.start()
    try:
        root.start_procd()
        # fresh install of the previous release: enabled at boot; the shipped config keeps it off
        p = pm.install(old, "bitmesh")
        assert p.returncode == 0, p.stdout + p.stderr
        assert pm.version("bitmesh") == OLD_VERSION
        assert router.enabled() and router.pid() is None

        # the owner configures it: it runs, keeps its seed and journal in /etc/bitmesh
        owners = uci_config(OPTIONS)
        root.write("/etc/config/bitmesh", owners, 0o600)
        assert root.run(["/etc/init.d/bitmesh", "restart"]).returncode == 0
        first = router.wait_serving()
        state = root.run(["sh", "-c", "cd /etc/bitmesh && ls -A && md5sum seed"], text=True)
        assert state.returncode == 0 and state.stdout.strip(), state.stderr

        # the owner disables it at boot (it keeps running); then upgrades
        assert root.run(["/etc/init.d/bitmesh", "disable"]).returncode == 0
        p = pm.upgrade(new, "bitmesh")
        assert p.returncode == 0, p.stdout + p.stderr
        assert pm.version("bitmesh") == bitmesh.version
        assert root.host_path("/etc/config/bitmesh").read_text() == owners
        shipped = next(e.data for e in bitmesh.files if e.path == "/etc/config/bitmesh")
        assert root.host_path(pm.new_default).read_bytes() == shipped
        assert not router.enabled()  # still disabled at boot
        # running the new code: a new process (opkg: the old prerm stopped it, the new postinst
        # starts it; apk: post-upgrade restarts it, there is no pre-deinstall on an upgrade)
        wait_for(lambda: router.pid() not in (None, first), 30, "a new instance")
        router.wait_serving()
        after = root.run(["sh", "-c", "cd /etc/bitmesh && ls -A && md5sum seed"], text=True)
        assert after.stdout == state.stdout  # the seed and the journal are where they were

        # removal: stopped, not enabled, BitMesh's table gone, the owner's config kept
        p = pm.remove(new, "bitmesh")
        assert p.returncode == 0, p.stdout + p.stderr
        assert pm.version("bitmesh") is None
        wait_for(lambda: router.pid() is None, 20, "the instance to stop")
        assert not router.table()
        assert root.run(["test", "-e", "/usr/bin/bitmesh"]).returncode == 1
        assert root.run(["test", "-e", "/etc/init.d/bitmesh"]).returncode == 1
        assert root.host_path("/etc/config/bitmesh").read_text() == owners
    finally:
        root.stop()
