"""The packages installed, upgraded and removed by the real package managers: opkg-lede (24.10,
.ipk) and apk-tools 3.0.2 (25.12, .apk), both built from OpenWrt's sources by
tools/pkg-managers.sh, into offline roots as OpenWrt's image build does (IPKG_INSTROOT set, the
maintainer scripts run against the root's own /lib/functions.sh and /etc/rc.common).

The feed holds our packages and stubs for OpenWrt's own, named as OpenWrt's feeds name them
(FEED_NAMES, written out here, not derived from our Depends): a misspelt or unknown dependency
finds no package and the install fails.

The previous release is a version-bumped copy (0.0.9-r1, built from today's tree by the same
code, with a different default /etc/config/bitmesh so the conffile logic has something to do).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.owrt import userland, why_no_userland
from tools import apk as apktool
from tools import ipk

pytestmark = pytest.mark.owrt

ROOT = Path(__file__).resolve().parent.parent
OLD_VERSION = "0.0.9-r1"
# OpenWrt 24.10/25.12 feed package names our packages may depend on (packages, luci and base feeds)
FEED_NAMES = ("libc", "libopenssl3", "python3-light", "python3-ctypes", "python3-decimal", "python3-email",
              "python3-logging", "python3-openssl", "python3-urllib", "python3-bottle", "python3-paho-mqtt",
              "python3-ubus", "python3-uci", "nftables-json", "luci-base")
OURS = ("python3-bitcoinlib", "bitmesh", "luci-app-bitmesh")
# OpenWrt's shell library the maintainer scripts source, from the built userland skeleton
SHELL_LIB = ("lib/functions.sh", "lib/functions", "lib/config", "etc/rc.common", "usr/share/libubox")


def pm_tools() -> Path:
    """bin/ of apk, opkg and usign (tools/pkg-managers.sh builds them once); without the source
    tarballs the tests skip and say why, as the other owrt tests do (CI counts a skip as a failure)."""
    try:
        return apktool.tools_prefix() / "bin"
    except SystemExit as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tools() -> Path:
    return pm_tools()


@pytest.fixture(scope="module")
def shell_lib() -> Path:
    prefix = userland()
    if prefix is None:
        pytest.skip(why_no_userland())
    return prefix


def stub(name: str) -> ipk.Package:
    return ipk.Package(name=name, version="1.0-r1", depends=[], source=f"feeds/stub/{name}", license="MIT",
                       section="stub", description=f"stand-in for OpenWrt's {name}",
                       files=[ipk.Entry(f"/usr/share/stub/{name}", name.encode(), 0o644)])


def _old(pkg: ipk.Package) -> ipk.Package:
    """The previous release: same files, older version, another shipped default config."""
    files = [replace(e, data=e.data + b"\n# 0.0.9 default\n") if e.path in pkg.conffiles else e for e in pkg.files]
    return replace(pkg, version=OLD_VERSION, files=files)


@pytest.fixture(scope="module")
def releases() -> dict[str, list[ipk.Package]]:
    return releases_of(ipk.all_packages(ROOT / "build" / "cache"))


def opkg_index(pkgs: list[ipk.Package], feed: Path) -> None:
    """Packages as opkg-make-index writes it: the control fields plus Filename, Size, SHA256sum."""
    out = []
    for p in pkgs:
        f = feed / p.filename
        data = f.read_bytes()
        out.append(ipk.control_text(p, sum(len(e.data) for e in p.files), 0)
                   + f"Filename: {f.name}\nSize: {len(data)}\nSHA256sum: {hashlib.sha256(data).hexdigest()}\n")
    (feed / "Packages").write_text("\n".join(out))


def ipk_feed(pkgs: list[ipk.Package], feed: Path) -> Path:
    feed.mkdir(parents=True, exist_ok=True)
    for p in pkgs:
        (feed / p.filename).write_bytes(ipk.build_ipk(p, 0))
    opkg_index(pkgs, feed)
    return feed


def apk_feed(apk: Path, pkgs: list[ipk.Package], feed: Path, sign: Path | None = None) -> Path:
    feed.mkdir(parents=True, exist_ok=True)
    files = [apktool.build_apk(p, 0, apk, feed) for p in pkgs]
    apktool.mkndx(apk, feed, files, sign)
    return feed


def releases_of(pkgs: list[ipk.Package]) -> dict[str, list[ipk.Package]]:
    by_name = {p.name: p for p in pkgs}
    new = [by_name[n] for n in OURS]
    return {"new": new, "old": [_old(p) if p.name != "python3-bitcoinlib" else p for p in new],
            "stubs": [stub(n) for n in FEED_NAMES]}


class Opkg:
    name = "opkg"
    new_default = "/etc/config/bitmesh-opkg"

    def __init__(self, tools: Path, root: Path, work: Path):
        self.bin, self.root, self.work = tools / "opkg", root, work
        (root / "usr/lib/opkg").mkdir(parents=True, exist_ok=True)

    def feed(self, name: str, pkgs: list[ipk.Package]) -> Path:
        return ipk_feed(pkgs, self.work / f"ipk-{name}")

    def _conf(self, feed: Path) -> Path:
        conf = self.work / "opkg.conf"
        conf.write_text(f"dest root /\nlists_dir ext /var/opkg-lists\nsrc bitmesh file://{feed}\n"
                        "arch all 100\narch noarch 200\n")
        return conf

    def run(self, feed: Path, *args: str) -> subprocess.CompletedProcess:
        conf = self._conf(feed)
        env = {**os.environ, "IPKG_INSTROOT": str(self.root)}
        base = [str(self.bin), "-f", str(conf), "--offline-root", str(self.root)]
        p = subprocess.run([*base, "update"], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        return subprocess.run([*base, "--force-postinstall", *args], capture_output=True, text=True, env=env)

    def install(self, feed: Path, *names: str) -> subprocess.CompletedProcess:
        return self.run(feed, "install", *names)

    def upgrade(self, feed: Path, *names: str) -> subprocess.CompletedProcess:
        return self.run(feed, "upgrade", *names)

    def remove(self, feed: Path, *names: str) -> subprocess.CompletedProcess:
        return self.run(feed, "remove", "--autoremove", *names)

    def installed(self) -> dict[str, str]:
        status = self.root / "usr/lib/opkg/status"
        out, name = {}, None
        for line in (status.read_text().splitlines() if status.exists() else []):
            if line.startswith("Package: "):
                name = line.split(": ", 1)[1]
            elif line.startswith("Version: ") and name:
                out[name] = line.split(": ", 1)[1]
        return out


class Apk:
    name = "apk"
    new_default = "/etc/config/bitmesh.apk-new"

    def __init__(self, tools: Path, root: Path, work: Path):
        self.bin, self.root, self.work = tools / "apk", root, work
        self.initialised = False

    def feed(self, name: str, pkgs: list[ipk.Package]) -> Path:
        return apk_feed(self.bin, pkgs, self.work / f"apk-{name}")

    def run(self, feed: Path, *args: str) -> subprocess.CompletedProcess:
        # as OpenWrt's image build runs it: no chroot, the environment (IPKG_INSTROOT) kept
        argv = [str(self.bin), "--root", str(self.root), "--allow-untrusted", "--no-cache",
                "--repositories-file", "/dev/null", "-X", str(feed / "packages.adb"),
                "--force-no-chroot", "--preserve-env", "--no-interactive"]
        if not self.initialised:
            argv.append("--initdb")
            self.initialised = True
        env = {**os.environ, "IPKG_INSTROOT": str(self.root)}
        return subprocess.run([*argv, *args], capture_output=True, text=True, env=env)

    def install(self, feed: Path, *names: str) -> subprocess.CompletedProcess:
        return self.run(feed, "add", *names)

    def upgrade(self, feed: Path, *names: str) -> subprocess.CompletedProcess:
        return self.run(feed, "upgrade", *names)

    def remove(self, feed: Path, *names: str) -> subprocess.CompletedProcess:
        return self.run(feed, "del", *names)

    def installed(self) -> dict[str, str]:
        if not (self.root / "lib/apk/db/installed").exists():
            return {}
        p = subprocess.run([str(self.bin), "--root", str(self.root), "--no-cache", "--repositories-file",
                            "/dev/null", "list", "--installed"], capture_output=True, text=True)
        out = {}
        for line in p.stdout.splitlines():  # "name-version arch {origin} (license) [installed]"
            nv = line.split(" ", 1)[0]
            parts = nv.rsplit("-", 2)
            out[parts[0]] = f"{parts[1]}-{parts[2]}"
        return out


@pytest.fixture(params=[Opkg, Apk], ids=["opkg", "apk"])
def pm(request, tmp_path, tools, shell_lib):
    root = tmp_path / "root"
    root.mkdir()
    for rel in SHELL_LIB:  # the image's base-files: what the scripts source
        subprocess.run(["cp", "-a", "--parents", rel, str(root)], cwd=shell_lib, check=True)
    (root / "etc/rc.d").mkdir(parents=True)
    (root / "tmp/lock").mkdir(parents=True)
    (root / "var").symlink_to("tmp")  # as on OpenWrt
    return request.param(tools, root, tmp_path)


def _our_files(rel: list[ipk.Package]) -> list[str]:
    return [e.path for p in rel for e in p.files]


def test_fresh_install_of_the_service_and_luci_app(pm, releases):
    feed = pm.feed("new", releases["new"] + releases["stubs"])
    p = pm.install(feed, "luci-app-bitmesh")
    assert p.returncode == 0, p.stdout + p.stderr
    installed = pm.installed()
    for pkg in releases["new"]:
        assert installed.get(pkg.name) == pkg.version, installed
    for path in _our_files(releases["new"]):
        assert (pm.root / path.lstrip("/")).is_file(), path
    assert (pm.root / "etc/config/bitmesh").stat().st_mode & 0o777 == 0o600
    # default_postinst ran inside the image: the service starts at boot
    assert sorted(f.name for f in (pm.root / "etc/rc.d").iterdir()) == ["K10bitmesh", "S95bitmesh"]


@pytest.mark.parametrize("missing", ["python3-ubus", "nftables-json"])
def test_a_missing_dependency_is_refused_and_nothing_is_installed(pm, releases, missing):
    feed = pm.feed("partial", releases["new"] + [s for s in releases["stubs"] if s.name != missing])
    p = pm.install(feed, "bitmesh")
    assert p.returncode != 0
    assert missing in p.stdout + p.stderr
    assert not set(pm.installed()) & {*OURS, *FEED_NAMES}
    assert not (pm.root / "usr/bin/bitmesh").exists() and not (pm.root / "etc/config/bitmesh").exists()


def test_upgrade_keeps_the_owners_config_and_state(pm, releases):
    old = pm.feed("old", releases["old"] + releases["stubs"])
    p = pm.install(old, "luci-app-bitmesh")
    assert p.returncode == 0, p.stdout + p.stderr
    assert pm.installed()["bitmesh"] == OLD_VERSION
    config = pm.root / "etc/config/bitmesh"
    owners = config.read_bytes().replace(b"option enabled '0'", b"option enabled '1'") + b"# mine\n"
    config.write_bytes(owners)
    state = pm.root / "etc/bitmesh"
    state.mkdir()
    (state / "ledger.log").write_bytes(b"paid clients' journal")

    new = pm.feed("new", releases["new"] + releases["stubs"])
    p = pm.upgrade(new, "bitmesh", "luci-app-bitmesh")
    assert p.returncode == 0, p.stdout + p.stderr
    installed = pm.installed()
    assert installed["bitmesh"] == installed["luci-app-bitmesh"] == releases["new"][1].version
    assert config.read_bytes() == owners
    shipped = next(e.data for e in releases["new"][1].files if e.path == "/etc/config/bitmesh")
    assert (pm.root / pm.new_default.lstrip("/")).read_bytes() == shipped
    assert (state / "ledger.log").read_bytes() == b"paid clients' journal"
    # the new files are in place (a new .pyc, not the old)
    cli = next(e for e in releases["new"][1].files if e.path.endswith("/bitmesh/cli.pyc"))
    assert (pm.root / cli.path.lstrip("/")).read_bytes() == cli.data


def _tree(root: Path) -> set[str]:
    """Every file, link and folder under root, except the package managers' own databases."""
    state = ("usr/lib/opkg", "lib/apk/db", "etc/apk", "tmp", "var")
    paths = {p.relative_to(root).as_posix() for p in root.rglob("*")}
    return {p for p in paths if not p.startswith(state) and p != "lib/apk"}


def test_remove_keeps_a_modified_config_and_nothing_else(pm, releases):
    """Removing what the owner installed takes our packages and the dependencies they pulled in
    (apk by its world, opkg with --autoremove) and leaves only the owner's modified config."""
    baseline = _tree(pm.root)
    feed = pm.feed("new", releases["new"] + releases["stubs"])
    assert pm.install(feed, "luci-app-bitmesh").returncode == 0
    assert (pm.root / "etc/rc.d/S95bitmesh").is_symlink()
    config = pm.root / "etc/config/bitmesh"
    config.write_bytes(config.read_bytes() + b"# mine\n")
    p = pm.remove(feed, "luci-app-bitmesh", "bitmesh")
    assert p.returncode == 0, p.stdout + p.stderr
    assert pm.installed() == {}
    assert config.read_bytes().endswith(b"# mine\n")
    # default_prerm ran inside the image: the boot links are gone with everything else
    left = sorted(_tree(pm.root) - baseline)
    files = [p for p in left if (pm.root / p).is_symlink() or not (pm.root / p).is_dir()]
    assert files == ["etc/config/bitmesh"], files
    if pm.name == "apk":  # apk also removes the folders it made; opkg-lede leaves them, empty
        assert left == ["etc/config", "etc/config/bitmesh"], left
