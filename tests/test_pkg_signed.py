"""A signed feed, as an owner adds the project's feed and key: keys made here (usign for opkg,
an openssl EC key for apk), the index signed (Packages.sig; `apk mkndx --sign`), then the real
opkg and apk refuse the feed without the key (or with a tampered index) and install with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.owrt import userland, why_no_userland
from tests.test_pkg_install import FEED_NAMES, SHELL_LIB, apk_feed, ipk_feed, pm_tools, releases_of
from tools import ipk

pytestmark = pytest.mark.owrt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tools() -> Path:
    return pm_tools()


@pytest.fixture(scope="module")
def releases() -> dict[str, list[ipk.Package]]:
    return releases_of(ipk.all_packages(ROOT / "build" / "cache"))


@pytest.fixture
def root(tmp_path) -> Path:
    prefix = userland()
    if prefix is None:
        pytest.skip(why_no_userland())
    root = tmp_path / "root"
    root.mkdir()
    for rel in SHELL_LIB:
        subprocess.run(["cp", "-a", "--parents", rel, str(root)], cwd=prefix, check=True)
    (root / "etc/rc.d").mkdir(parents=True)
    (root / "tmp/lock").mkdir(parents=True)
    (root / "var").symlink_to("tmp")
    (root / "usr/lib/opkg").mkdir(parents=True)
    return root


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


# --- opkg: usign --------------------------------------------------------------------------------


def _opkg(tools: Path, root: Path, work: Path, feed: Path, *args: str) -> subprocess.CompletedProcess:
    # opkg-key verify as OpenWrt ships it (usign against /etc/opkg/keys), on the offline root
    verify = work / "opkg-key"
    verify.write_text(f'#!/bin/sh\n[ "$1" = verify ] || exit 1\n'
                      f'exec {tools / "usign"} -V -P {root}/etc/opkg/keys -q -x "$2" -m "$3"\n')
    verify.chmod(0o755)
    conf = work / "opkg.conf"
    conf.write_text(f"dest root /\nlists_dir ext /var/opkg-lists\nsrc bitmesh file://{feed}\n"
                    f"arch all 100\narch noarch 200\noption check_signature 1\noption verify_program {verify}\n")
    env = {**os.environ, "IPKG_INSTROOT": str(root)}
    base = [tools / "opkg", "-f", conf, "--offline-root", root]
    update = _run([*base, "update"], env=env)
    p = _run([*base, "--force-postinstall", *args], env=env)
    return subprocess.CompletedProcess(p.args, p.returncode, update.stdout + p.stdout, update.stderr + p.stderr)


def test_opkg_checks_the_feeds_usign_signature(tools, root, tmp_path, releases):
    sec, pub = tmp_path / "key.sec", tmp_path / "key.pub"
    assert _run([tools / "usign", "-G", "-s", sec, "-p", pub, "-c", "BitMesh feed"]).returncode == 0
    feed = ipk_feed(releases["new"] + releases["stubs"], tmp_path / "feed")
    assert _run([tools / "usign", "-S", "-m", feed / "Packages", "-s", sec]).returncode == 0
    assert (feed / "Packages.sig").is_file()

    # the router does not know the key: the list is thrown away, nothing installs
    p = _opkg(tools, root, tmp_path, feed, "install", "bitmesh")
    assert p.returncode != 0 and "Signature check failed" in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (root / "usr/bin/bitmesh").exists()

    # the owner adds the key as `opkg-key add key.pub` does: /etc/opkg/keys/<fingerprint>
    fingerprint = _run([tools / "usign", "-F", "-p", pub]).stdout.strip()
    assert len(fingerprint) == 16
    (root / "etc/opkg/keys").mkdir(parents=True)
    shutil.copy(pub, root / "etc/opkg/keys" / fingerprint)
    p = _opkg(tools, root, tmp_path, feed, "install", "bitmesh")
    assert p.returncode == 0 and "Signature check passed" in p.stdout, p.stdout + p.stderr
    assert (root / "usr/bin/bitmesh").is_file()


def test_opkg_refuses_a_tampered_index(tools, root, tmp_path, releases):
    sec, pub = tmp_path / "key.sec", tmp_path / "key.pub"
    assert _run([tools / "usign", "-G", "-s", sec, "-p", pub]).returncode == 0
    feed = ipk_feed(releases["new"] + releases["stubs"], tmp_path / "feed")
    assert _run([tools / "usign", "-S", "-m", feed / "Packages", "-s", sec]).returncode == 0
    fingerprint = _run([tools / "usign", "-F", "-p", pub]).stdout.strip()
    (root / "etc/opkg/keys").mkdir(parents=True)
    shutil.copy(pub, root / "etc/opkg/keys" / fingerprint)
    # someone on the path drops a dependency from the signed index
    text = (feed / "Packages").read_text()
    (feed / "Packages").write_text(text.replace(", nftables-json", ""))
    p = _opkg(tools, root, tmp_path, feed, "install", "bitmesh")
    assert p.returncode != 0 and "Signature check failed" in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (root / "usr/bin/bitmesh").exists()


# --- apk: mkndx --sign ----------------------------------------------------------------------------


def _apk(tools: Path, root: Path, feed: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [tools / "apk", "--root", root, "--initdb", "--no-cache", "--repositories-file", "/dev/null",
            "-X", feed / "packages.adb", "--force-no-chroot", "--preserve-env", "--no-interactive", *args]
    return _run(argv, env={**os.environ, "IPKG_INSTROOT": str(root)})


def test_apk_checks_the_index_signature(tools, root, tmp_path, releases):
    key, pub = tmp_path / "bitmesh-feed.pem", tmp_path / "bitmesh-feed.pub.pem"
    assert _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key]).returncode == 0
    assert _run(["openssl", "ec", "-in", key, "-pubout", "-out", pub]).returncode == 0
    feed = apk_feed(tools / "apk", releases["new"] + releases["stubs"], tmp_path / "feed", sign=key)

    # no key on the router: the index is untrusted, nothing installs
    p = _apk(tools, root, feed, "add", "bitmesh")
    assert p.returncode != 0 and "UNTRUSTED" in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (root / "usr/bin/bitmesh").exists()

    # another key (not the feed's) does not help either
    other = tmp_path / "other.pem"
    _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", other])
    (root / "etc/apk/keys").mkdir(parents=True, exist_ok=True)
    (root / "etc/apk/keys/other.pem").write_text(_run(["openssl", "ec", "-in", other, "-pubout"]).stdout)
    p = _apk(tools, root, feed, "add", "bitmesh")
    assert p.returncode != 0 and "UNTRUSTED" in p.stdout + p.stderr, p.stdout + p.stderr

    # the owner adds the feed's public key to /etc/apk/keys
    shutil.copy(pub, root / "etc/apk/keys" / pub.name)
    p = _apk(tools, root, feed, "add", "bitmesh")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (root / "usr/bin/bitmesh").is_file()
    assert set(FEED_NAMES) - {"luci-base"} <= {
        ln.split(" ", 1)[0].rsplit("-", 2)[0]
        for ln in _run([tools / "apk", "--root", root, "--no-cache", "--repositories-file", "/dev/null", "list",
                        "--installed"]).stdout.splitlines()}
