"""The LuCI app's files against the service they drive, checked without running LuCI: every ubus
method a view declares is one of the service's `luci.bitmesh` methods with the same arguments
and is granted by the rpcd ACL, which grants nothing else; the settings form covers exactly the
UCI config's options with the service's defaults and limits; the menu points at the views; every
view is valid JavaScript and every JSON file parses.

What the views do on LuCI 24.10 for real (login, saving, Status, a read-only login, and the form's
validation against the service's) is tested in Chromium by tests/test_luci_owrt.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
from pathlib import Path

import pytest

from bitmesh import __version__, config
from bitmesh.control import Control
from bitmesh.ubus_object import LUCI_OBJECT, METHODS, SESSION_ARGUMENT, signatures

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "luci-app-bitmesh"
VIEWS = APP / "htdocs" / "luci-static" / "resources" / "view"
SETTINGS_JS = VIEWS / "bitmesh" / "settings.js"
ACL = APP / "root" / "usr" / "share" / "rpcd" / "acl.d" / "luci-app-bitmesh.json"
MENU = APP / "root" / "usr" / "share" / "luci" / "menu.d" / "luci-app-bitmesh.json"
UCI_CONFIG = ROOT / "files" / "etc" / "config" / "bitmesh"
READ_ONLY = {"status", "clients", "channels", "earnings", "fleet"}
ACTIONS = {"kick", "close_channel"}


def _views() -> list[Path]:
    return sorted(VIEWS.rglob("*.js"))


def _balanced(source: str, start: int) -> str:
    """The {...} object literal opening at source[start], nested braces included (quoted
    strings are skipped; declarations hold no comments or regexes)."""
    depth, quote = 0, None
    for i in range(start, len(source)):
        ch = source[i]
        if quote:
            if ch == "\\":
                continue
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return source[start : i + 1]
    raise AssertionError(f"unbalanced braces after offset {start}")


def declared_calls() -> dict[tuple[str, str], list[str]]:
    """(object, method) -> params of every ubus call the views declare: rpc.declare({...}) with
    literal object and method, or status.js's declare('method', [params]) helper (whose object is
    the view's OBJECT constant)."""
    calls: dict[tuple[str, str], list[str]] = {}

    def add(key: tuple[str, str], params: list[str]) -> None:
        assert key not in calls, f"{key} declared twice"
        calls[key] = params

    for view in _views():
        source = view.read_text()
        constant = re.search(r"^var OBJECT = '([^']+)';", source, re.M)
        for m in re.finditer(r"rpc\.declare\(\s*(?=\{)", source):
            body = _balanced(source, m.end())
            obj = re.search(r"\bobject:\s*(?:'([^']+)'|(OBJECT))", body)
            method = re.search(r"\bmethod:\s*(?:'([^']+)'|(method))", body)
            assert obj and method, f"{view.name}: rpc.declare without object/method: {body}"
            if method.group(2):  # the helper: its calls are collected below
                assert obj.group(2) and constant, f"{view.name}: a declare helper needs var OBJECT"
                continue
            params = re.search(r"\bparams:\s*\[([^\]]*)\]", body)
            add((obj.group(1) or constant.group(1), method.group(1)),
                re.findall(r"'([^']+)'", params.group(1)) if params else [])
        for m in re.finditer(r"\bdeclare\('(\w+)'(?:,\s*\[([^\]]*)\])?\)", source):
            assert constant, f"{view.name}: declare() without var OBJECT"
            add((constant.group(1), m.group(1)), re.findall(r"'([^']+)'", m.group(2) or ""))
    return calls


def test_views_exist_and_are_valid_javascript(tmp_path):
    names = {p.relative_to(VIEWS).as_posix() for p in _views()}
    assert names == {"bitmesh/settings.js", "bitmesh/status.js", "bitmesh/fleet.js"}
    for view in _views():
        source = view.read_text()
        assert source.startswith("'use strict';")
        assert "return view.extend(" in source
        # A LuCI view is a classic script that LuCI compiles as the body of a function (it
        # ends in a top-level `return view.extend({...})`). `node --check` refuses a top-level
        # `return` ("Illegal return statement"), so check the source wrapped in a function,
        # the way LuCI runs it.
        wrapped = tmp_path / view.name
        wrapped.write_text(f"(function() {{\n{source}\n}});\n")
        run = subprocess.run(["node", "--check", str(wrapped)], capture_output=True, text=True)
        assert run.returncode == 0, f"{view.name}: {run.stderr}"


def test_declared_methods_are_the_services_and_the_acl_grants_exactly_them():
    calls = declared_calls()
    # LuCI's object: uhttpd adds ubus_rpc_session to every call, which `bitmesh` refuses
    assert {obj for obj, _ in calls} == {LUCI_OBJECT} == {"luci.bitmesh"}
    declared = {method for _, method in calls}
    assert declared == READ_ONLY | ACTIONS

    registered = signatures(with_session=True)
    for (_, method), params in calls.items():
        assert method in METHODS, f"the service has no ubus method {method}"
        assert params == list(METHODS[method]), f"{method}: view passes {params}, service takes {list(METHODS[method])}"
        assert set(registered[method]) == {*params, SESSION_ARGUMENT}

    acl = json.loads(ACL.read_text())
    assert set(acl) == {"luci-app-bitmesh"}
    grants = acl["luci-app-bitmesh"]
    assert set(grants) == {"description", "read", "write"}
    # nothing but ubus on LuCI's bitmesh object and uci on the bitmesh config, plus reading the
    # `wireless` config the Settings page loads to say whether the gated Wi-Fi uses OWE (no file,
    # no cgi-io, no other ubus object, not the CLI's `bitmesh`)
    loaded = {name for view in _views() for name in re.findall(r"\buci\.load\('(\w+)'\)", view.read_text())}
    assert loaded == {"bitmesh", "wireless"}
    assert grants["read"]["uci"] == sorted(loaded) and grants["write"]["uci"] == ["bitmesh"]
    granted: dict[str, set[str]] = {}
    for kind in ("read", "write"):
        assert set(grants[kind]) == {"ubus", "uci"}, f"{kind}: {sorted(grants[kind])}"
        assert set(grants[kind]["ubus"]) == {LUCI_OBJECT}
        methods = grants[kind]["ubus"][LUCI_OBJECT]
        assert len(methods) == len(set(methods)), f"{kind}: a method listed twice"
        granted[kind] = set(methods)
    # exactly what the views use: reading under read, acting under write
    assert granted["read"] | granted["write"] == declared
    assert granted["read"] == READ_ONLY
    assert granted["write"] == ACTIONS
    # `reload` is for scripts (procd's SIGHUP does it for LuCI): the service has it, LuCI may not
    assert "reload" in METHODS and "reload" not in granted["read"] | granted["write"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_ubus_method_is_a_control_method_with_the_same_arguments(method):
    fn = getattr(Control, method, None)
    assert fn is not None and inspect.isfunction(fn), f"Control has no method {method}"
    assert list(inspect.signature(fn).parameters)[1:] == list(METHODS[method])
    assert all(isinstance(t, str) for t in METHODS[method].values())


def _config_options() -> set[str]:
    """Every `option NAME` / `list NAME` of the shipped config, commented-out examples too."""
    names = set()
    for line in UCI_CONFIG.read_text().splitlines():
        m = re.match(r"\s*#?\s*(?:option|list)\s+(\w+)\s", line)
        if m:
            names.add(m.group(1))
    return names


def _form_options(source: str) -> list[str]:
    found = re.findall(r"\bs\.taboption\('\w+',\s*(?:form|widgets)\.\w+,\s*'(\w+)'", source)
    found += re.findall(r"\bs\.option\((?:form|widgets)\.\w+,\s*'(\w+)'", source)
    return found


def _option_block(source: str, name: str) -> str:
    """The settings.js lines that set up option `name` (up to the next option)."""
    block = source[source.index(f"'{name}'") :]
    return block[: block.index("s.taboption(")] if "s.taboption(" in block else block


def test_settings_form_covers_exactly_the_config_options():
    source = SETTINGS_JS.read_text()
    assert "new form.Map('bitmesh'" in source
    assert "m.section(form.NamedSection, 'main', 'bitmesh')" in source
    assert (config.SECTION_TYPE, config.SECTION_NAME) == ("bitmesh", "main")
    options = _form_options(source)
    assert len(options) == len(set(options)), "an option appears twice in the form"
    assert set(options) == _config_options()
    # ... and the config has exactly the service's options
    assert _config_options() == {f.name for f in dataclasses.fields(config.Settings)}

    def widget(name: str) -> str:
        return re.search(rf"(\w+\.\w+),\s*'{name}'", source).group(1)

    assert widget("enabled") == "form.Flag"
    assert widget("walled_garden_host") == "form.DynamicList"
    assert widget("walled_garden") == "form.DynamicList"
    # the RPC password field is masked
    assert "o.password = true;" in _option_block(source, "core_rpc_password")
    # every option shown for one choice only keeps its value while hidden (LuCI removes it on
    # save otherwise); tests/test_luci_owrt.py saves the form to see it
    for name in options:
        block = _option_block(source, name)
        assert ("o.depends(" in block) == ("o.retain = true;" in block), name


def test_settings_defaults_and_limits_are_the_services():
    source = SETTINGS_JS.read_text()
    defaults = json.loads(re.search(r"var DEFAULTS = (\{.*?\});", source, re.S).group(1))
    service = config.Settings()
    assert defaults and {k: getattr(service, k) for k in defaults} == defaults
    assert int(re.search(r"var MAX_SAT = (\d+);", source).group(1)) == config.MAX_SAT
    assert int(re.search(r"var DUST_SAT = (\d+);", source).group(1)) == config.DUST_SAT


def test_zero_conf_total_cap_is_a_form_option_validated_as_the_service_does():
    """The total 0-conf cap (issue 9): the same whole-number range as the per-channel cap, its
    default the service's, and the service refuses what the form refuses."""
    source = SETTINGS_JS.read_text()
    block = _option_block(source, "zero_conf_total_max_sat")
    assert "s.taboption('channels', form.Value, 'zero_conf_total_max_sat'" in source
    assert "o.validate = whole(0, MAX_SAT);" in block and "DEFAULTS.zero_conf_total_max_sat" in block
    assert config.Settings().zero_conf_total_max_sat == 100_000
    assert "option zero_conf_total_max_sat '100000'" in UCI_CONFIG.read_text()
    for bad in ("-1", "x", str(config.MAX_SAT + 1)):
        with pytest.raises(config.ConfigError, match="zero_conf_total_max_sat"):
            config.Settings.from_dict({"zero_conf_total_max_sat": bad})
    assert config.Settings.from_dict({"zero_conf_total_max_sat": "0"}).zero_conf_total_max_sat == 0
    # emptied in the form (the option removed): five channels at the per-channel cap, as the form says
    assert "Empty: five times the per-channel cap." in block
    assert config.Settings.from_dict({"zero_conf_max_sat": "30000"}).zero_conf_total_max_sat == 150_000


GARDEN_CASES = [
    "mempool.space:443", "10.0.0.1:80", "[2001:db8::1]:443", "[::ffff:10.0.0.1]:8333", "a.b:65535", "a.b:0443",
    "mempool.space", "mempool.space:", "mempool.space:0", "mempool.space:65536", "2001:db8::1:443",
    "[2001:db8::1]", "[bad_host]:80", "bad_host:80", "a..b:80", ":443", "[1:2:3:4:5:6:7:8:9]:443",
    "http://mempool.space:443", "mempool.space:443/api", "host:4x3", "",
]


def test_walled_garden_is_host_port_validated_by_the_form_as_by_the_service():
    """`walled_garden` (issue 10): a list of host:port, IPv6 in brackets; the form's validator
    (settings.js isHostPort, run here in node) accepts exactly what the service accepts, and
    `walled_garden_host` stays valid as host:443."""
    source = SETTINGS_JS.read_text()
    block = _option_block(source, "walled_garden")
    assert "isHostPort(value)" in block and "o.placeholder = 'mempool.space:443';" in block
    assert "#list walled_garden 'mempool.space:443'" in UCI_CONFIG.read_text()
    helpers = source[source.index("var LABEL = "):source.index("// What another option of this form")]
    script = helpers + f"console.log(JSON.stringify({json.dumps(GARDEN_CASES)}.map(isHostPort)));"
    run = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True)
    form = dict(zip(GARDEN_CASES, json.loads(run.stdout), strict=True))
    for value in GARDEN_CASES:
        try:
            config.Settings.from_dict({"walled_garden": [value]})
            service = True
        except config.ConfigError as e:
            assert str(e).startswith("walled_garden:") and e.code == "config_invalid"
            service = False
        assert form[value] == service, f"{value!r}: form {form[value]}, service {service}"
    assert sum(form.values()) == 6
    s = config.Settings.from_dict({"walled_garden": ["Mempool.Space:443", "[2001:DB8::1]:80", "10.0.0.1:8333"],
                                   "walled_garden_host": ["blockstream.info", "mempool.space"]})
    assert s.walled_garden == ("mempool.space:443", "[2001:db8::1]:80", "10.0.0.1:8333")
    assert s.garden == (("mempool.space", 443), ("2001:db8::1", 80), ("10.0.0.1", 8333), ("blockstream.info", 443))
    assert config.Settings.from_dict({"walled_garden": "a.b:1"}).garden == (("a.b", 1),)  # one UCI option


WIFI_CASES = {  # `option encryption` -> what the Settings page makes of it
    "owe": "owe", "sae": "key", "sae-mixed": "key", "psk2+ccmp": "key", "psk-mixed": "key", "wpa2": "key",
    "wpa3": "key", "none": "open", "": "open", "wep-open": "open",
}


def _wifi_helpers() -> str:
    """settings.js's Wi-Fi helpers, runnable in node with LuCI's `_` and String.format stubbed."""
    source = SETTINGS_JS.read_text()
    body = source[source.index("// --- Wi-Fi encryption of the gated network"):source.index("return view.extend(")]
    return ("var _ = function(s) { return s; };\n"
            "String.prototype.format = function() { var a = [].slice.call(arguments), i = 0;"
            " return this.replace(/%s/g, function() { return a[i++]; }); };\n" + body)


def test_settings_page_tells_the_gated_wifis_encryption():
    """Issue 10 item 8: the Settings page says whether the gated network's access points use OWE.
    settings.js (run in node) classifies each `encryption` and picks the enabled AP interfaces of
    the gated network only (a list or a space-separated `network`); tests/test_luci_owrt.py shows it
    in the real LuCI."""
    sections = [
        {".name": "open_lan", "network": "lan", "mode": "ap", "ssid": "Cafe", "encryption": "none",
         "owe_transition_ifname": "owe_lan"},
        {".name": "owe_lan", "network": ["lan", "iot"], "ssid": "Cafe-OWE", "encryption": "owe"},
        {".name": "off", "network": "lan", "encryption": "none", "disabled": "1"},
        {".name": "sta", "network": "lan", "mode": "sta", "encryption": "psk2"},
        {".name": "guest", "network": "guest lan2", "encryption": "none"},
        {".name": "home", "network": "home", "encryption": "sae"},
    ]
    script = _wifi_helpers() + (
        f"var cases = {json.dumps(list(WIFI_CASES))};\n"
        "console.log(JSON.stringify({levels: cases.map(function(e) { return wifiProtection(e)[0]; }),"
        f" lan: gatedWifi({json.dumps(sections)}, 'lan'), lan2: gatedWifi({json.dumps(sections)}, 'lan2'),"
        f" none: gatedWifi({json.dumps(sections)}, 'wan')}}));")
    out = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout)
    assert dict(zip(WIFI_CASES, out["levels"], strict=True)) == WIFI_CASES
    assert [(a["name"], a["level"], a["transition"]) for a in out["lan"]] == [
        ("open_lan", "open", "owe_lan"), ("owe_lan", "owe", "")]
    assert "not encrypted" in out["lan"][0]["text"] and "own keys" in out["lan"][1]["text"]
    assert [a["name"] for a in out["lan2"]] == ["guest"] and out["none"] == []


# --- menu, JSON, Makefile ----------------------------------------------------------------------


def test_all_json_files_parse():
    files = sorted(APP.rglob("*.json"))
    assert ACL in files and MENU in files
    for f in files:
        assert isinstance(json.loads(f.read_text()), dict), f


def test_menu_points_at_the_views():
    menu = json.loads(MENU.read_text())
    assert set(menu) == {"admin/services/bitmesh", "admin/services/bitmesh/settings", "admin/services/bitmesh/status",
                         "admin/services/bitmesh/fleet"}
    views = {name: entry["action"]["path"] for name, entry in menu.items() if entry["action"]["type"] == "view"}
    assert views == {
        "admin/services/bitmesh/settings": "bitmesh/settings",
        "admin/services/bitmesh/status": "bitmesh/status",
        "admin/services/bitmesh/fleet": "bitmesh/fleet",
    }
    assert [menu[name]["order"] for name in sorted(views, key=lambda n: menu[n]["order"])] == [1, 2, 3]
    assert menu["admin/services/bitmesh/fleet"]["title"] == "Fleet"
    for path in views.values():
        assert (VIEWS / f"{path}.js").is_file()
    top = menu["admin/services/bitmesh"]
    assert top["action"] in ({"type": "firstchild"}, {"type": "alias", "path": "admin/services/bitmesh/settings"})
    if top["action"]["type"] == "firstchild":
        first = min(views, key=lambda name: menu[name]["order"])
        assert first == "admin/services/bitmesh/settings"
    # the ACL group decides read-only (LuCI's nodespec.readonly, which Status asks for)
    assert top["depends"] == {"acl": ["luci-app-bitmesh"], "uci": {"bitmesh": True}}


def test_luci_makefile_follows_luci_mk():
    text = (APP / "Makefile").read_text()
    assert "include $(TOPDIR)/rules.mk" in text
    assert "LUCI_TITLE:=" in text
    assert "LUCI_DEPENDS:=+luci-base +bitmesh" in text
    assert "LUCI_PKGARCH:=all" in text
    assert "include $(TOPDIR)/feeds/luci/luci.mk" in text
    assert "# call BuildPackage - OpenWrt buildroot signature" in text
    assert "placeholder" not in text.lower()
    # the version the SDK builds is the service's (luci.mk's git-derived one is not apk-safe)
    assert re.search(r"^PKG_VERSION:=(\S+)$", text, re.M).group(1) == __version__
    assert re.search(r"^PKG_RELEASE:=(\d+)$", text, re.M)


BAND_CASES = [(base, floor, ceiling) for base in ("0", "10") for floor in ("", "0", "1", "10", "11")
              for ceiling in ("", "0", "9", "10", "50")]


def test_demand_pricing_bands_are_validated_by_the_form_as_by_the_service():
    """Demand pricing (issue 11): its options show only with it on (and keep their values while
    hidden), and the form's floor/ceiling check (settings.js priceBand, run here in node) accepts
    exactly the bands the service accepts; an emptied field is the service's default, 0."""
    source = SETTINGS_JS.read_text()

    def _option_block(source: str, name: str) -> str:  # where the option is made (its name is in rechecks too)
        block = source[source.index(f"form.Value, '{name}'"):]
        return block[:block.index("s.taboption(")]

    for name in ("price_floor_sat_per_mb", "price_ceiling_sat_per_mb", "price_floor_sat_per_minute",
                 "price_ceiling_sat_per_minute", "capacity_clients", "demand_target_load_percent",
                 "demand_step_percent_per_minute"):
        assert "o.depends('demand_pricing', '1');" in _option_block(source, name), name
    assert "o.validate = whole(1, 99);" in _option_block(source, "demand_target_load_percent")
    assert "o.validate = whole(1, 100);" in _option_block(source, "demand_step_percent_per_minute")
    assert "o.validate = whole(1, 100000);" in _option_block(source, "capacity_clients")
    for bad in ({"demand_target_load_percent": 100}, {"demand_step_percent_per_minute": 101},
                {"capacity_clients": 100_001}, {"capacity_clients": 0}):
        with pytest.raises(config.ConfigError):
            config.Settings.from_dict(bad)
    helpers = (source[source.index("var DEFAULTS = "):source.index("// Per network")]
               + source[source.index("function current("):source.index("// A change to this option re-checks")])
    script = ("var _ = function(s) { return s; };\n"
              "String.prototype.format = function() { var a = [].slice.call(arguments), i = 0;"
              " return this.replace(/%s/g, function() { return a[i++]; }); };\n" + helpers + """
var cases = JSON.parse(process.argv[1]);
console.log(JSON.stringify(cases.map(function(c) {
    var base = { formvalue: function() { return c[0]; } };
    var self = { map: { lookupOption: function(name) { return [ base, 'main' ]; } } };
    return priceBand('price_sat_per_mb', true).call(self, 'main', c[1]) === true &&
           priceBand('price_sat_per_mb', false).call(self, 'main', c[2]) === true;
})));""")
    run = subprocess.run(["node", "-e", script, json.dumps(BAND_CASES)], capture_output=True, text=True, check=True)
    form = dict(zip(BAND_CASES, json.loads(run.stdout), strict=True))
    for base, floor, ceiling in BAND_CASES:
        options = {"demand_pricing": "1", "price_sat_per_mb": base, "price_sat_per_minute": "5",
                   "price_floor_sat_per_minute": "5", "price_ceiling_sat_per_minute": "5"}
        options.update({k: v for k, v in (("price_floor_sat_per_mb", floor), ("price_ceiling_sat_per_mb", ceiling))
                        if v != ""})  # an emptied field: the option is removed
        try:
            config.Settings.from_dict(options)
            service = True
        except config.ConfigError as e:
            assert e.code == "price_band_invalid", e
            service = False
        assert form[(base, floor, ceiling)] == service, (base, floor, ceiling, form[(base, floor, ceiling)])
    assert sum(form.values()) == 4 + 4  # base 0: empty or 0 twice; base 10: floor 1 or 10, ceiling 10 or 50


def test_uplink_mode_and_demand_pricing_are_exclusive_in_the_form_as_in_the_service():
    """Both set the price of new channels (issue 11, resale): the service refuses both on with
    uplink_demand_pricing_exclusive, and each flag's form check (settings.js exclusiveWith, run
    here in node) refuses exactly what the service refuses."""
    source = SETTINGS_JS.read_text()
    for flag, other in (("demand_pricing", "uplink_enabled"), ("uplink_enabled", "demand_pricing")):
        block = source[source.index(f"form.Flag, '{flag}'"):]
        block = block[:block.index("s.taboption(", 1)]
        assert f"o.validate = exclusiveWith('{other}'," in block, flag
        assert f"o.onchange = recheck([ '{other}' ]);" in block, flag
    helpers = (source[source.index("var DEFAULTS = "):source.index("// Per network")]
               + source[source.index("function current("):source.index("// A change to this option re-checks")])
    cases = [(u, d) for u in ("0", "1") for d in ("0", "1")]
    script = ("var _ = function(s) { return s; };\n"
              "String.prototype.format = function() { var a = [].slice.call(arguments), i = 0;"
              " return this.replace(/%s/g, function() { return a[i++]; }); };\n" + helpers + """
var cases = JSON.parse(process.argv[1]);
console.log(JSON.stringify(cases.map(function(c) {
    var values = { uplink_enabled: c[0], demand_pricing: c[1] };
    var self = { map: { lookupOption: function(name) {
        return [ { formvalue: function() { return values[name]; } }, 'main' ]; } } };
    return exclusiveWith('demand_pricing', 'x').call(self, 'main', c[0]) === true &&
           exclusiveWith('uplink_enabled', 'x').call(self, 'main', c[1]) === true;
})));""")
    run = subprocess.run(["node", "-e", script, json.dumps(cases)], capture_output=True, text=True, check=True)
    form = dict(zip(cases, json.loads(run.stdout), strict=True))
    for uplink, demand in cases:
        try:
            config.Settings.from_dict({"uplink_enabled": uplink, "uplink_budget_sat": "10000",
                                       "demand_pricing": demand, "price_sat_per_minute": "0",
                                       "price_floor_sat_per_mb": "1", "price_ceiling_sat_per_mb": "100"})
            service = True
        except config.ConfigError as e:
            assert e.code == "uplink_demand_pricing_exclusive", e
            service = False
        assert form[(uplink, demand)] == service, (uplink, demand)
    assert form == {("0", "0"): True, ("0", "1"): True, ("1", "0"): True, ("1", "1"): False}


NODE_ID_CASES = ["0123456789abcdef", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "0123456789abcdeg",
                 " 0123456789abcdef", "bitmesh/+", ""]


def test_fleet_nodes_are_validated_by_the_form_as_by_the_service():
    """`fleet_nodes` (issue 11, fleet): a list of node ids on the Marketplace tab; the form's
    validator (run here in node) accepts exactly what the service accepts (empty: no entry)."""
    source = SETTINGS_JS.read_text()
    assert re.search(r"form\.DynamicList, 'fleet_nodes'", source)
    block = _option_block(source, "fleet_nodes")
    validator = re.search(r"o\.validate = (function\(section_id, value\) \{.*?\n\t\t\});", block, re.S).group(1)
    script = ("var _ = function(s) { return s; };\n"
              f"var check = {validator};\n"
              f"console.log(JSON.stringify({json.dumps(NODE_ID_CASES)}"
              ".map(function(v) { return check('main', v) === true; })));")
    run = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True)
    form = dict(zip(NODE_ID_CASES, json.loads(run.stdout), strict=True))
    for value in NODE_ID_CASES[:-1]:
        try:
            config.Settings.from_dict({"fleet_nodes": [value]})
            service = True
        except config.ConfigError as e:
            assert str(e).startswith("fleet_nodes:") and e.code == "config_invalid"
            service = False
        assert form[value] == service, f"{value!r}: form {form[value]}, service {service}"
    assert form[""] is True and sum(form.values()) == 3
    assert "#list fleet_nodes '0123456789abcdef'" in UCI_CONFIG.read_text()
