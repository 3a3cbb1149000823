"""tools/ipk.py: OpenWrt ipk layout, control fields, modes, contents, reproducibility."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = "./usr/lib/python3.11/site-packages"
VERSION = "0.1.0-r1"
NAMES = {
    "bitmesh": f"bitmesh_{VERSION}_all.ipk",
    "bitmesh-src": f"bitmesh-src_{VERSION}_all.ipk",
    "luci": f"luci-app-bitmesh_{VERSION}_all.ipk",
    "bitcoinlib": "python3-bitcoinlib_0.12.2-r1_all.ipk",
    "bitcoinlib-src": "python3-bitcoinlib-src_0.12.2-r1_all.ipk",
}


def _build(out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "ipk.py"), "--out", str(out)], check=True,
                   capture_output=True, cwd=ROOT)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("ipk-a"), tmp_path_factory.mktemp("ipk-b")
    _build(a)
    _build(b)
    return a, b


class Ipk:
    def __init__(self, path: Path):
        self.outer = tarfile.open(path, mode="r:gz")  # gzip'd tar, not ar: raises otherwise
        self.members = [m.name for m in self.outer.getmembers()]
        self.debian_binary = self.outer.extractfile("./debian-binary").read()
        self.control_tar = tarfile.open(fileobj=io.BytesIO(self.outer.extractfile("./control.tar.gz").read()))
        self.data_tar = tarfile.open(fileobj=io.BytesIO(self.outer.extractfile("./data.tar.gz").read()))
        self.data = {m.name: m for m in self.data_tar.getmembers()}

    def control_file(self, name: str) -> str:
        return self.control_tar.extractfile(f"./{name}").read().decode()

    def fields(self) -> dict[str, str]:
        out = {}
        for line in self.control_file("control").splitlines():
            if not line.startswith(" "):
                k, _, v = line.partition(": ")
                out[k] = v
        return out

    def read(self, name: str) -> bytes:
        return self.data_tar.extractfile(name).read()


def test_two_builds_are_byte_identical(builds):
    a, b = builds
    assert sorted(p.name for p in a.iterdir()) == sorted(NAMES.values())
    for name in NAMES.values():
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("key", sorted(NAMES))
def test_outer_layout_and_reproducible_metadata(builds, key):
    path = builds[0] / NAMES[key]
    assert path.read_bytes()[:2] == b"\x1f\x8b" and path.read_bytes()[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    ipk = Ipk(path)
    assert ipk.members == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    assert ipk.debian_binary == b"2.0\n"
    for tar in (ipk.outer, ipk.control_tar, ipk.data_tar):
        infos = tar.getmembers()
        assert all(m.uid == 0 and m.gid == 0 for m in infos)
        assert len({m.mtime for m in infos}) == 1
    names = [m.name for m in ipk.data_tar.getmembers()]
    assert names == sorted(names)
    for m in ipk.data_tar.getmembers():
        if m.isdir():
            assert m.mode == 0o755, m.name
    fields = ipk.fields()
    for f in ("Package", "Version", "Depends", "Source", "SourceName", "License", "Section", "Architecture",
              "Installed-Size", "Description"):
        assert fields.get(f), f
    assert fields["Architecture"] == "all"
    assert int(fields["Installed-Size"]) == sum(m.size for m in ipk.data_tar.getmembers() if m.isfile())
    assert path.name == f"{fields['Package']}_{fields['Version']}_all.ipk"


def test_bitmesh_package(builds):
    ipk = Ipk(builds[0] / NAMES["bitmesh"])
    fields = ipk.fields()
    deps = [d.strip() for d in fields["Depends"].split(",")]
    for dep in ("python3-light", "python3-logging", "python3-email", "python3-urllib", "python3-openssl",
                "python3-ubus", "python3-uci", "python3-paho-mqtt", "python3-bottle", "nftables-json",
                "python3-bitcoinlib"):
        assert dep in deps
    assert ipk.control_file("conffiles").splitlines() == ["/etc/config/bitmesh"]
    # OpenWrt's layout: postinst/prerm call default_postinst/default_prerm, which source the
    # package's own scripts, postinst-pkg and prerm-pkg
    assert "default_postinst $0 $@" in ipk.control_file("postinst")
    assert "default_prerm $0 $@" in ipk.control_file("prerm")
    postinst, prerm = ipk.control_file("postinst-pkg"), ipk.control_file("prerm-pkg")
    assert "IPKG_INSTROOT" in postinst and "PKG_UPGRADE" in postinst and "PKG_UPGRADE" in prerm
    commands = [ln for ln in (postinst + prerm).splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in commands if "fw4" in ln or "firewall" in ln]  # fw4 is left alone
    for script in ("postinst", "prerm", "postinst-pkg", "prerm-pkg"):
        assert ipk.control_tar.getmember(f"./{script}").mode == 0o755
        subprocess.run(["sh", "-n"], input=ipk.control_file(script), text=True, check=True)

    assert ipk.data["./etc/init.d/bitmesh"].mode == 0o755
    assert ipk.data["./usr/bin/bitmesh"].mode == 0o755
    assert ipk.data["./etc/config/bitmesh"].mode == 0o600  # may hold the RPC password
    assert ipk.read("./etc/init.d/bitmesh") == (ROOT / "files/etc/init.d/bitmesh").read_bytes()
    assert ipk.read("./etc/config/bitmesh") == (ROOT / "files/etc/config/bitmesh").read_bytes()
    # sysupgrade keeps state_dir (seed and journal): one path per line, as sysupgrade reads keep.d
    keep = [ln for ln in ipk.read("./lib/upgrade/keep.d/bitmesh").decode().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert keep == ["/etc/bitmesh/"]

    # every module of the service is inside, compiled (checked-hash .pyc, no timestamp), no .py
    modules = sorted(p for p in (ROOT / "bitmesh").rglob("*.py") if "__pycache__" not in p.parts)
    assert len(modules) > 5
    for p in modules:
        name = f"{SITE}/bitmesh/{p.relative_to(ROOT / 'bitmesh').as_posix()}c"
        assert name in ipk.data, name
        pyc = ipk.read(name)
        assert pyc[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(pyc[4:8], "little") == 0b11
        assert pyc[8:16] == importlib.util.source_hash(p.read_bytes())
        assert ipk.data[name].mode == 0o644
    assert not [n for n in ipk.data if n.endswith(".py") or "__pycache__" in n]
    # the vendored JS with its licence texts, next to it
    vendor = ROOT / "bitmesh/portal/static/vendor"
    for lib in sorted(d for d in vendor.iterdir() if d.is_dir()):
        licences = [f for f in lib.iterdir() if f.name.startswith("LICENSE")]
        assert licences, lib
        for f in licences:
            assert ipk.read(f"{SITE}/bitmesh/portal/static/vendor/{lib.name}/{f.name}") == f.read_bytes()
    assert not [n for n in ipk.data if "/portal/wallet/" in n]
    # no seed, key or runtime state: nothing under the state dir, no seed-like files
    assert not [n for n in ipk.data if n.startswith("./etc/bitmesh")]
    assert not [n for n in ipk.data if "seed" in n.rsplit("/", 1)[-1].lower() and not n.endswith(".pyc")]


def test_bitmesh_src_package_has_the_sources(builds):
    ipk = Ipk(builds[0] / NAMES["bitmesh-src"])
    files = {n for n, m in ipk.data.items() if m.isfile()}
    modules = {f"{SITE}/bitmesh/{p.relative_to(ROOT / 'bitmesh').as_posix()}" for p in (ROOT / "bitmesh").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert files == modules
    assert ipk.fields()["Package"] == "bitmesh-src"


def test_luci_package(builds):
    ipk = Ipk(builds[0] / NAMES["luci"])
    fields = ipk.fields()
    assert fields["Package"] == "luci-app-bitmesh"
    assert "luci-base" in fields["Depends"] and "bitmesh" in fields["Depends"].split(", ")
    src = ROOT / "luci-app-bitmesh"
    expected = {f"./{p.relative_to(src / 'root').as_posix()}" for p in (src / "root").rglob("*") if p.is_file()}
    if (src / "htdocs").is_dir():
        expected |= {f"./www/{p.relative_to(src / 'htdocs').as_posix()}" for p in (src / "htdocs").rglob("*")
                     if p.is_file()}
    files = {n for n, m in ipk.data.items() if m.isfile()}
    assert files == expected
    assert "./usr/share/rpcd/acl.d/luci-app-bitmesh.json" in files
    assert "./usr/share/luci/menu.d/luci-app-bitmesh.json" in files


def test_bitcoinlib_package(builds):
    ipk = Ipk(builds[0] / NAMES["bitcoinlib"])
    fields = ipk.fields()
    assert fields["Package"] == "python3-bitcoinlib" and fields["Version"] == "0.12.2-r1"
    deps = fields["Depends"].split(", ")
    assert "python3-light" in deps and "python3-ctypes" in deps and any(d.startswith("libopenssl") for d in deps)
    import bitcoin.core.key  # the pinned 0.12.2 in this venv: same bytes as the sdist

    key = ipk.read(f"{SITE}/bitcoin/core/key.pyc")
    assert key[8:16] == importlib.util.source_hash(Path(bitcoin.core.key.__file__).read_bytes())
    assert f"{SITE}/bitcoin/__init__.pyc" in ipk.data
    assert not [n for n in ipk.data if "/bitcoin/tests" in n or n.endswith(".py")]
    # the LGPL text, where the installed wheel keeps it, with the metadata that names it
    info = f"{SITE}/python_bitcoinlib-0.12.2.dist-info"
    assert b"GNU LESSER GENERAL PUBLIC LICENSE" in ipk.read(f"{info}/LICENSE")
    assert b"Name: python-bitcoinlib" in ipk.read(f"{info}/METADATA")
    src = Ipk(builds[0] / NAMES["bitcoinlib-src"])
    assert src.read(f"{SITE}/bitcoin/core/key.py") == Path(bitcoin.core.key.__file__).read_bytes()
