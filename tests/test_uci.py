"""UCI parsing on real file syntax, and validation of the bitmesh settings."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bitmesh import uci
from bitmesh.config import Settings, load_settings
from bitmesh.errors import ConfigError

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


def test_parse_sections_options_lists_quotes_comments():
    pkg = uci.parse(SAMPLE)
    assert pkg.name == "bitmesh"
    assert [(s.type, s.name) for s in pkg.sections] == [("bitmesh", "main"), ("peer", None), ("peer", None)]
    main = pkg.section("main")
    assert main.options["enabled"] == "1"
    assert main.options["portal_title"] == 'Caf"e \\ Wi-Fi'
    assert main.options["portal_text"] == 'single $quoted "text" \\n stays literal'
    assert main.options["glued"] == "abc"
    assert main.options["hash"] == "value#not-a-comment"
    assert main.options["interface"] == "guest"  # a repeated named section is merged
    assert main.lists["walled_garden_host"] == ["mempool.space", "blockstream.info", "10.0.0.1"]
    peers = pkg.sections_of("peer")
    assert [p.index for p in peers] == [0, 1] and all(p.anonymous for p in peers)
    assert peers[1].options["name"] == "second line\ncontinues here"
    assert main.values()["walled_garden_host"] == ["mempool.space", "blockstream.info", "10.0.0.1"]


def test_option_and_list_replace_each_other_like_libuci():
    pkg = uci.parse("config t 's'\n\toption a x\n\tlist a y\n\tlist b 1\n\toption b 2\n")
    s = pkg.section("s")
    assert s.lists == {"a": ["x", "y"]} and s.options == {"b": "2"}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("option a b\n", "outside"),
        ("config t 's'\n\toption a 'unterminated\n", "single quote"),
        ('config t \'s\'\n\toption a "unterminated\n', "double quote"),
        ("config t 's'\n\toption 'bad-name' x\n", "invalid option name"),
        ("config t 'bad name'\n", "invalid section name"),
        ("config t 's'\n\toption a\n", "takes a name and one value"),
        ("config t 's'\n\toption a b c\n", "takes a name and one value"),
        ("config t 's'\n\tbogus a b\n", "unknown keyword"),
    ],
)
def test_syntax_errors_name_the_line(text, fragment):
    with pytest.raises(ConfigError) as e:
        uci.parse(text)
    assert fragment in str(e.value) and re.search(r"line \d+", str(e.value))
    assert e.value.code == "config_invalid"


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
    # the shipped file states every option, with the same values as the dataclass defaults
    assert set(main.values()) | {"walled_garden_host"} == {f.name for f in dataclasses.fields(Settings)}
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
    ("portal_title", "", "empty"),
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
