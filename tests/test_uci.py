"""UCI files read through libuci (the python3-uci binding), checked against OpenWrt's own `uci`
command line, and validation of the bitmesh settings."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest
import uci as pyuci  # python3-uci, built against OpenWrt's libuci

from bitmesh import uci
from bitmesh.config import Settings, load_settings
from bitmesh.errors import ConfigError
from tests.support.owrt import userland

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "files" / "etc" / "config" / "bitmesh"
ADDR = "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"  # BIP173 mainnet P2WPKH
SECRET = "s3cr3t-Pa55w0rd"

SAMPLE = r"""
# a comment line
package 'bitmesh'

config bitmesh 'main'   # trailing comment
	option enabled 1
	option portal_title "Caf\"e \\ Wi-Fi"
	option portal_text 'single $quoted "text" \n stays literal'
	option network "main"
	option glued 'a'"b"c
	list walled_garden_host 'mempool.space'
	list walled_garden_host "blockstream.info"
	list walled_garden_host 10.0.0.1
	option hash value#not-a-comment

config peer
	option name 'first'

config peer
	option name "second line
continues here"

config bitmesh 'main'
	option interface 'guest'
"""


def _uci_show(path: Path) -> dict[str, str]:
    """What OpenWrt's own `uci` command line (built from source) prints for the file."""
    tool = userland() / "usr" / "bin" / "uci"
    out = subprocess.run([str(tool), "-c", str(path.parent), "show", path.name], capture_output=True, text=True,
                         check=True).stdout
    entries = re.split(rf"\n(?={re.escape(path.name)}\.)", out.rstrip("\n"))  # values may span lines
    return dict(entry.split("=", 1) for entry in entries)


def _as_uci_show(pkg: uci.UciPackage) -> dict[str, str]:
    """The same package in `uci show`'s notation."""
    def quoted(v: str) -> str:
        return "'" + v.replace("'", "'\\''") + "'"

    out = {}
    for s in pkg.sections:
        out[f"{pkg.name}.{s.name}"] = s.type
        for k, v in s.values.items():
            out[f"{pkg.name}.{s.name}.{k}"] = " ".join(map(quoted, v)) if isinstance(v, list) else quoted(v)
    return out


@pytest.mark.owrt
def test_the_service_reads_what_libuci_and_the_uci_command_read(tmp_path):
    path = _write(tmp_path, SAMPLE)
    pkg = uci.load(path)
    assert _as_uci_show(pkg) == {k.replace("@peer[0]", pkg.sections[1].name).replace("@peer[1]",
                                 pkg.sections[2].name): v for k, v in _uci_show(path).items()}
    main = pkg.section("main")
    assert [(s.type, s.name == "main") for s in pkg.sections] == [("bitmesh", True), ("peer", False), ("peer", False)]
    assert main.values["portal_title"] == 'Caf"e \\ Wi-Fi'
    assert main.values["glued"] == "abc"
    assert main.values["interface"] == "guest"  # a repeated named section is merged
    assert main.values["walled_garden_host"] == ["mempool.space", "blockstream.info", "10.0.0.1"]


@pytest.mark.owrt
@pytest.mark.parametrize("line, value", [
    ("option payout_address bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4#x", ADDR),  # '#' in a word: a comment
    ("option payout_address 'bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4#x'", ADDR + "#x"),
    ("option portal_title ''", None),  # an empty value sets nothing: the default applies
    ("option portal_title", None),  # no value: sets nothing
], ids=["hash-in-word", "hash-quoted", "empty", "no-value"])
def test_libuci_rules_the_hand_parser_got_wrong(tmp_path, line, value):
    path = _write(tmp_path, f"config bitmesh 'main'\n\t{line}\n")
    name = line.split()[1]
    assert uci.load(path).section("main").values.get(name) == value
    shown = _uci_show(path).get(f"bitmesh.main.{name}")
    assert (shown.strip("'") if shown else None) == value
    if value is None:
        assert load_settings(path).portal_title == Settings().portal_title


def test_option_and_list_replace_each_other_like_libuci(tmp_path):
    s = uci.load(_write(tmp_path, "config t 's'\n\toption a x\n\tlist a y\n\tlist b 1\n\toption b 2\n")).section("s")
    assert s.values == {"a": ["x", "y"], "b": "2"}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("option a b\n", "parse error at line 1"),
        ("config t 's'\n\toption a 'unterminated\n", "parse error at line 2"),
        ("config t 's'\n\toption a b c\n", "parse error at line 2"),
        ("config t 's'\n\tbogus a b\n", "parse error at line 2"),
    ],
)
def test_a_file_libuci_refuses_is_a_config_error(tmp_path, monkeypatch, text, fragment):
    """The message names the line where OpenWrt's `uci` tool is installed (on a router: always)."""
    monkeypatch.setenv("PATH", f"{userland() / 'usr' / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(ConfigError) as e:
        uci.load(_write(tmp_path, text))
    assert fragment in str(e.value), str(e.value)
    assert e.value.code == "config_invalid"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="libuci cannot parse"):
        uci.load(_write(tmp_path, text))


def test_only_committed_values_count(tmp_path):
    """LuCI stages changes as libuci deltas in /tmp/.uci until Save & Apply: the service ignores them."""
    path = _write(tmp_path, f"config bitmesh 'main'\n\toption payout_address '{ADDR}'\n")
    with pyuci.Uci(confdir=str(tmp_path), savedir=str(tmp_path / "deltas")) as staging:
        staging.set("bitmesh", "main", "payout_address", "staged")
        staging.save("bitmesh")
    assert (tmp_path / "deltas" / "bitmesh").exists()
    assert uci.load(path).section("main").values["payout_address"] == ADDR


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bitmesh"
    p.write_text(text)
    return p


def _shipped_with(tmp_path: Path, **opts: str) -> Path:
    text = SHIPPED.read_text()
    for k, v in opts.items():
        text, n = re.subn(rf"^(\s*option {k}) '.*'$", lambda m, v=v: f"{m.group(1)} '{v}'", text, flags=re.M)
        if n == 0:
            text += f"\toption {k} '{v}'\n"
    return _write(tmp_path, text)


def test_shipped_config_parses_and_needs_a_payout_address_to_be_enabled(tmp_path):
    pkg = uci.load(SHIPPED)
    main = pkg.section("main")
    assert main is not None and main.type == "bitmesh"
    assert not load_settings(SHIPPED).enabled  # off, no address yet: valid, nothing starts
    with pytest.raises(ConfigError, match="payout_address: required"):
        load_settings(_shipped_with(tmp_path, enabled=1))
    s = load_settings(_shipped_with(tmp_path, payout_address=ADDR))
    defaults = Settings()
    # the shipped file states every option, with the same values as the dataclass defaults (libuci
    # drops the ones set to '')
    stated = set(re.findall(r"^\s*#?\s*(?:option|list) (\w+)", SHIPPED.read_text(), re.M))
    assert stated == {f.name for f in dataclasses.fields(Settings)}
    # exactly the options whose default is empty text or an empty list
    assert set(stated) - set(main.values) == {f.name for f in dataclasses.fields(Settings)
                                              if getattr(defaults, f.name) in ("", ())}
    assert {"walled_garden", "core_rpc_password", "payout_address"} <= set(stated) - set(main.values)
    assert dataclasses.replace(s, payout_address="") == defaults
    assert s.enabled is False and s.mqtt_enabled is False and s.payout_address == ADDR


def test_typed_values(tmp_path):
    s = load_settings(_write(tmp_path, f"""
config bitmesh 'main'
	option enabled 'yes'
	option network 'regtest-bcoin'
	option payout_address '{ADDR}'
	option network 'main'
	option price_sat_per_mb '0'
	option price_sat_per_minute '5'
	option chain_backend 'core'
	option core_rpc_password '{SECRET}'
	option mqtt_enabled 'on'
	option mqtt_broker '[::1]:1883'
	list walled_garden_host 'Mempool.Space'
"""))
    assert s.enabled is True and s.mqtt_enabled is True
    assert s.price_sat_per_mb == 0 and s.price_sat_per_minute == 5
    assert s.walled_garden_host == ("mempool.space",)
    assert s.mqtt_host_port == ("::1", 1883)
    assert s.core_rpc_password == SECRET


BAD = [
    ("enabled", "maybe", "boolean"),
    ("interface", "lan; rm -rf /", "interface"),
    ("network", "mainnet", "one of"),
    ("price_sat_per_mb", "-1", "whole number"),
    ("price_sat_per_minute", "1.5", "whole number"),
    ("prepay_step_sat", "0", "> 0"),
    ("min_deposit_sat", "100", "dust"),
    ("max_deposit_sat", "4000", "min_deposit_sat"),
    ("expiry_blocks", "abc", "whole number"),
    ("settle_margin_blocks", "144", "< expiry_blocks"),
    ("zero_conf_max_sat", "-5", "whole number"),
    ("min_conf", "0", "between 1 and 100"),
    ("chain_backend", "electrum", "one of"),
    ("esplora_url", "ftp://example.org/api", "http"),
    ("core_rpc_url", "file:///etc/passwd", "http"),
    ("payout_address", "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx", "not a valid address"),
    ("state_dir", "relative/dir", "absolute path"),
    ("portal_port", "70000", "65535"),
    ("portal_title", "   ", "empty"),
    ("walled_garden_host", "http://x.org/", "host name"),
    ("mqtt_broker", "localhost", "host:port"),
    ("mqtt_topic_prefix", "bit/#", "wildcards"),
]


@pytest.mark.parametrize("option, value, fragment", BAD, ids=[b[0] for b in BAD])
def test_each_bad_value_names_the_option(tmp_path, option, value, fragment):
    opts = {"payout_address": ADDR, "mqtt_enabled": "1", option: value}
    with pytest.raises(ConfigError) as e:
        load_settings(_shipped_with(tmp_path, **opts))
    assert str(e.value).startswith(f"{option}:"), str(e.value)
    assert fragment in str(e.value)
    assert e.value.code == "config_invalid"


def test_cross_field_rules():
    base = {"payout_address": ADDR}
    with pytest.raises(ConfigError, match="price_sat_per_mb: at least one"):
        Settings.from_dict(base | {"price_sat_per_mb": 0, "price_sat_per_minute": "0"})
    with pytest.raises(ConfigError, match="esplora_url: required"):
        Settings.from_dict(base | {"esplora_url": ""})
    with pytest.raises(ConfigError, match="core_rpc_url: required"):
        Settings.from_dict(base | {"chain_backend": "core", "core_rpc_url": ""})
    with pytest.raises(ConfigError, match="price_sat_per_mib: unknown option"):
        Settings.from_dict(base | {"price_sat_per_mib": "1"})
    with pytest.raises(ConfigError, match="enabled: expected one value"):
        Settings.from_dict(base | {"enabled": ["1", "0"]})
    # the same address is fine on its own network only
    regtest_addr = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
    regtest = Settings.from_dict({"network": "regtest", "payout_address": regtest_addr})
    assert regtest.network == "regtest"
    s = Settings.from_dict(base)
    assert s.replace(price_sat_per_mb=7).price_sat_per_mb == 7
    with pytest.raises(ConfigError, match="max_deposit_sat"):
        s.replace(max_deposit_sat=1000)


def test_missing_section_and_file(tmp_path):
    with pytest.raises(ConfigError, match="no 'config bitmesh"):
        load_settings(_write(tmp_path, "config other 'x'\n\toption a b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent")


def test_password_never_leaks(tmp_path):
    s = Settings.from_dict({"payout_address": ADDR, "core_rpc_password": SECRET, "core_rpc_user": "alice"})
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert "alice" in repr(s)
    assert SECRET not in str(s.public_dict()) and "core_rpc_password" not in s.public_dict()
    # a password in the URL is refused without echoing the URL
    with pytest.raises(ConfigError) as e:
        Settings.from_dict({"payout_address": ADDR, "core_rpc_url": f"http://alice:{SECRET}@127.0.0.1:8332"})
    assert SECRET not in str(e.value) and str(e.value).startswith("core_rpc_url:")
    # a bad password value is refused without echoing it
    with pytest.raises(ConfigError) as e:
        Settings.from_dict({"payout_address": ADDR, "core_rpc_password": SECRET + "\x01"})
    assert SECRET not in str(e.value) and str(e.value).startswith("core_rpc_password:")
    # an error about another option, in a file holding the password, does not carry it
    path = _shipped_with(tmp_path, payout_address=ADDR, core_rpc_password=SECRET, min_conf="x")
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert SECRET not in str(e.value) and SECRET not in repr(e.value.to_json())
