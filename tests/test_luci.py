"""The LuCI app against the service it drives: every ubus method a view declares is granted by
the rpcd ACL and implemented by the service's ubus object, the ACL grants nothing else, the
settings form covers exactly the UCI config's options and judges values as the service does,
the menu points at existing views and every view is valid JavaScript. (LuCI itself runs only
on an OpenWrt image: qemu/run.sh.)"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
from pathlib import Path

import pytest

from bitmesh import __version__, config
from bitmesh.chain.address import script_to_address
from bitmesh.control import Control
from bitmesh.errors import ConfigError
from bitmesh.ubus_object import METHODS, OBJECT

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "luci-app-bitmesh"
VIEWS = APP / "htdocs" / "luci-static" / "resources" / "view"
SETTINGS_JS = VIEWS / "bitmesh" / "settings.js"
ACL = APP / "root" / "usr" / "share" / "rpcd" / "acl.d" / "luci-app-bitmesh.json"
MENU = APP / "root" / "usr" / "share" / "luci" / "menu.d" / "luci-app-bitmesh.json"
UCI_CONFIG = ROOT / "files" / "etc" / "config" / "bitmesh"
MAKEFILES = [APP / "Makefile", ROOT / "openwrt/package/bitmesh/luci-app-bitmesh/Makefile"]
READ_ONLY = {"status", "clients", "channels", "earnings"}
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
    """(object, method) -> params of every rpc.declare({...}) in the views."""
    calls: dict[tuple[str, str], list[str]] = {}
    for view in _views():
        source = view.read_text()
        for m in re.finditer(r"rpc\.declare\(\s*(?=\{)", source):
            body = _balanced(source, m.end())
            obj = re.search(r"\bobject:\s*'([^']+)'", body)
            method = re.search(r"\bmethod:\s*'([^']+)'", body)
            assert obj and method, f"{view.name}: rpc.declare without object/method: {body}"
            params = re.search(r"\bparams:\s*\[([^\]]*)\]", body)
            key = (obj.group(1), method.group(1))
            assert key not in calls, f"{key} declared twice"
            calls[key] = re.findall(r"'([^']+)'", params.group(1)) if params else []
    return calls


def test_views_exist_and_are_valid_javascript(tmp_path):
    names = {p.relative_to(VIEWS).as_posix() for p in _views()}
    assert names == {"bitmesh/settings.js", "bitmesh/status.js"}
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


def test_read_only_view_has_no_save_buttons():
    source = (VIEWS / "bitmesh" / "status.js").read_text()
    for handler in ("handleSaveApply", "handleSave", "handleReset"):
        assert re.search(rf"\b{handler}:\s*null\b", source), handler
    assert re.search(r"poll\.add\(", source)


def test_declared_methods_are_the_services_and_the_acl_grants_exactly_them():
    calls = declared_calls()
    assert {obj for obj, _ in calls} == {OBJECT} == {"bitmesh"}
    declared = {method for _, method in calls}
    assert declared == READ_ONLY | ACTIONS

    for (_, method), params in calls.items():
        assert method in METHODS, f"the service has no ubus method {method}"
        assert params == list(METHODS[method]), f"{method}: view passes {params}, service takes {list(METHODS[method])}"

    acl = json.loads(ACL.read_text())
    assert set(acl) == {"luci-app-bitmesh"}
    grants = acl["luci-app-bitmesh"]
    assert set(grants) == {"description", "read", "write"}
    # nothing but ubus on the bitmesh object and uci on the bitmesh config (no file, no cgi-io,
    # no other ubus object)
    granted: dict[str, set[str]] = {}
    for kind in ("read", "write"):
        assert set(grants[kind]) == {"ubus", "uci"}, f"{kind}: {sorted(grants[kind])}"
        assert grants[kind]["uci"] == ["bitmesh"]
        assert set(grants[kind]["ubus"]) == {OBJECT}
        methods = grants[kind]["ubus"][OBJECT]
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
    # the RPC password field is masked
    block = source[source.index("'core_rpc_password'") :]
    block = block[: block.index("s.taboption(")]
    assert "o.password = true;" in block


def test_settings_defaults_and_limits_are_the_services():
    source = SETTINGS_JS.read_text()
    defaults = json.loads(re.search(r"var DEFAULTS = (\{.*?\});", source, re.S).group(1))
    service = config.Settings()
    assert defaults and {k: getattr(service, k) for k in defaults} == defaults
    assert int(re.search(r"var MAX_SAT = (\d+);", source).group(1)) == config.MAX_SAT
    assert int(re.search(r"var DUST_SAT = (\d+);", source).group(1)) == config.DUST_SAT


# --- the form's checks against config.py, value by value ------------------------------------

# Runs settings.js in node with just enough of LuCI's form API to collect the options, then
# says for each set of form values whether LuCI would let the owner save it: every shown
# option's validator accepts its value (a hidden option, one whose `depends` is unmet, is
# removed from the config on save, like an emptied one).
_HARNESS = r"""
'use strict';
const fs = require('fs');
const [source, casesFile] = process.argv.slice(2).map(f => fs.readFileSync(f, 'utf8'));

String.prototype.format = function() {
	const args = Array.from(arguments);
	return this.replace(/%(\d*)[sd]/g, () => String(args.shift()));
};
const L = {
	bind: (fn, self, ...args) => fn.bind(self, ...args),
	isObject: v => v != null && typeof v == 'object',
	toArray: v => v == null ? [] : Array.isArray(v) ? v : [v]
};
const _ = s => s;

class Option {
	constructor(map, kind, name) {
		Object.assign(this, { map, kind, option: name, deps: [], choices: [] });
	}
	depends(name, value) { this.deps.push([name, value]); }
	value(v) { this.choices.push(v); }
	formvalue(sid) { const v = this.map.values[this.option]; return v == null ? '' : v; }
	triggerValidation() { return true; }
}
class FormMap {
	constructor(config) { Object.assign(this, { config, options: [], values: {} }); }
	section(kind, name, type) {
		const map = this;
		const add = (k, n) => { const o = new Option(map, k, n); map.options.push(o); return o; };
		return { name, type, tab() {}, taboption: (tab, k, n) => add(k, n), option: (k, n) => add(k, n) };
	}
	lookupOption(name, sid) {
		const o = this.options.find(o => o.option == name);
		return o ? [o, sid] : null;
	}
	render() { return this; }
}
const form = { Map: FormMap };
for (const k of ['NamedSection', 'Flag', 'Value', 'ListValue', 'DynamicList', 'TextValue'])
	form[k] = k;
const widgets = { NetworkSelect: 'NetworkSelect' };
const view = { extend: o => o };

const map = new Function('L', '_', 'view', 'form', 'widgets', source)(L, _, view, form, widgets).render();
const verdicts = JSON.parse(casesFile).map(values => {
	map.values = values;
	const errors = [], active = [];
	for (const o of map.options) {
		if (o.deps.length && !o.deps.some(([n, v]) => String(map.values[n] || '') == v))
			continue;
		active.push(o.option);
		const v = values[o.option];
		const check = x => {
			const r = o.validate ? o.validate.call(o, 'main', x) : true;
			if (r !== true) errors.push(o.option + ': ' + r);
		};
		if (o.kind == 'DynamicList')
			(v || []).forEach(check);
		else if ((o.kind == 'ListValue' || o.kind == 'Flag') && v != null && v !== '') {
			const ok = o.kind == 'Flag' ? ['0', '1'] : o.choices;
			if (!ok.includes(v)) errors.push(o.option + ': not a choice');
		}
		else
			check(v == null ? '' : v);
	}
	return { active, errors };
});
process.stdout.write(JSON.stringify(verdicts));
"""


def _address(network: str, kind: str = "p2wpkh") -> str:
    script = {
        "p2wpkh": b"\x00\x14" + bytes(range(20)),
        "p2tr": b"\x51\x20" + bytes(range(32)),
        "p2pkh": b"\x76\xa9\x14" + bytes(range(20)) + b"\x88\xac",
        "p2sh": b"\xa9\x14" + bytes(range(20)) + b"\x87",
    }[kind]
    return script_to_address(script, network)


def _base() -> dict[str, object]:
    """The shipped config with a payout address: what the service accepts."""
    values: dict[str, object] = {}
    for line in UCI_CONFIG.read_text().splitlines():
        m = re.match(r"\s*option\s+(\w+)\s+'([^']*)'", line)
        if m:
            values[m.group(1)] = m.group(2)
    values["payout_address"] = _address("main")
    return values


def _cases() -> list[dict[str, object]]:
    """Form values, each the shipped config with a few options changed: good values, and bad
    ones the service refuses."""
    changes: list[dict[str, object]] = [
        {},
        {"enabled": "1"},
        {"price_sat_per_mb": "0"},
        {"price_sat_per_minute": "0"},
        {"price_sat_per_mb": "0", "price_sat_per_minute": "0"},
        {"price_sat_per_mb": "0", "price_sat_per_minute": ""},  # empty: the default 10
        {"price_sat_per_mb": "-1"},
        {"price_sat_per_mb": "1.5"},
        {"price_sat_per_mb": "abc"},
        {"price_sat_per_minute": str(config.MAX_SAT)},
        {"price_sat_per_minute": str(config.MAX_SAT + 1)},
        {"prepay_step_sat": "0"},
        {"prepay_step_sat": "5000"},
        {"prepay_step_sat": "5001"},
        {"prepay_step_sat": "700", "min_deposit_sat": "600"},
        {"min_deposit_sat": "545"},
        {"min_deposit_sat": "546"},
        {"min_deposit_sat": "300000"},
        {"min_deposit_sat": "300000", "max_deposit_sat": "300000"},
        {"max_deposit_sat": "4999"},
        {"max_deposit_sat": ""},
        {"expiry_blocks": "1"},
        {"expiry_blocks": "2", "settle_margin_blocks": "1"},
        {"settle_margin_blocks": "0"},
        {"settle_margin_blocks": "143"},
        {"settle_margin_blocks": "144"},
        {"expiry_blocks": "12"},
        {"zero_conf_max_sat": "0"},
        {"zero_conf_max_sat": "x"},
        {"min_conf": "0"},
        {"min_conf": "100"},
        {"min_conf": "101"},
        {"interface": "wwan"},
        {"interface": "a_very_long_name"},
        {"network": "test", "payout_address": _address("test")},
        {"network": "signet", "payout_address": _address("signet", "p2tr")},
        {"network": "regtest", "payout_address": _address("regtest", "p2sh")},
        {"network": "regtest-bcoin", "payout_address": _address("regtest-bcoin", "p2pkh")},
        {"network": "regtest-bcoin", "payout_address": _address("regtest-bcoin", "p2sh")},
        {"network": "test", "payout_address": _address("main")},
        {"payout_address": _address("main", "p2tr")},
        {"payout_address": _address("main", "p2pkh")},
        {"payout_address": _address("main", "p2sh")},
        {"payout_address": _address("main").upper()},
        {"payout_address": _address("test")},
        {"payout_address": ""},
        {"payout_address": "", "enabled": "1"},
        {"payout_address": "bc1 not an address"},
        {"state_dir": "/tmp/bitmesh"},
        {"state_dir": "tmp/bitmesh"},
        {"state_dir": "/etc/../tmp"},
        {"chain_backend": "core"},
        {
            "chain_backend": "core",
            "core_rpc_url": "http://[::1]:8332",
            "core_rpc_user": "u",
            "core_rpc_password": "p w",
        },
        {"chain_backend": "core", "core_rpc_url": "http://user:pw@127.0.0.1:8332"},
        {"chain_backend": "core", "core_rpc_url": "http://127.0.0.1:99999"},
        {"chain_backend": "core", "core_rpc_url": "http://127.0.0.1:port"},
        {"chain_backend": "core", "core_rpc_password": "x\x01y"},
        {"chain_backend": "core", "core_rpc_user": "u" * 257},
        {"chain_backend": "core", "esplora_url": "ftp://hidden.example"},  # hidden: removed on save
        {"esplora_url": "https://blockstream.info/api"},
        {"esplora_url": "http://10.0.0.1:3000"},
        {"esplora_url": "ftp://mempool.space/api"},
        {"esplora_url": "https://"},
        {"esplora_url": "mempool.space/api"},
        {"esplora_url": "https://mempool.space/a pi"},
        {"portal_port": "0"},
        {"portal_port": "65535"},
        {"portal_port": "65536"},
        {"portal_title": ""},
        {"portal_title": "   "},
        {"portal_title": "t" * 121},
        {"portal_text": "two\nlines"},
        {"portal_text": "bell\x07"},
        {"walled_garden_host": ["mempool.space", "10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1"]},
        {"walled_garden_host": ["bad_host"]},
        {"walled_garden_host": ["a..b"]},
        {"walled_garden_host": [":"]},
        {"walled_garden_host": ["1:2:3:4:5:6:7:8:9"]},
        {"mqtt_enabled": "1"},
        {"mqtt_enabled": "1", "mqtt_broker": "[::1]:1883", "mqtt_topic_prefix": "a/b"},
        {"mqtt_enabled": "1", "mqtt_broker": "broker.example"},
        {"mqtt_enabled": "1", "mqtt_broker": "broker.example:0"},
        {"mqtt_enabled": "1", "mqtt_broker": "bad_host:1883"},
        {"mqtt_enabled": "1", "mqtt_topic_prefix": "a//b"},
        {"mqtt_enabled": "1", "mqtt_topic_prefix": "a/#"},
        {"mqtt_enabled": "0", "mqtt_topic_prefix": "a/#"},  # hidden: removed on save
    ]
    return [{**_base(), **change} for change in changes]


def _service_accepts(values: dict[str, object], active: list[str]) -> bool:
    """What the service makes of the config LuCI saves: hidden and empty options removed."""
    saved = {k: v for k, v in values.items() if k in active and v not in ("", [])}
    try:
        config.Settings.from_dict(saved)
    except ConfigError:
        return False
    return True


def test_settings_form_accepts_what_the_service_accepts(tmp_path):
    harness, source, cases_file = tmp_path / "harness.js", tmp_path / "settings.js", tmp_path / "cases.json"
    harness.write_text(_HARNESS)
    source.write_text(SETTINGS_JS.read_text())
    cases = _cases()
    cases_file.write_text(json.dumps(cases))
    run = subprocess.run(["node", str(harness), str(source), str(cases_file)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    verdicts = json.loads(run.stdout)
    assert len(verdicts) == len(cases)
    base = _base()
    mismatches = []
    for values, verdict in zip(cases, verdicts, strict=True):
        form_ok = not verdict["errors"]
        service_ok = _service_accepts(values, verdict["active"])
        if form_ok != service_ok:
            changed = {k: v for k, v in values.items() if base.get(k) != v}
            mismatches.append(
                f"{changed}: form {'accepts' if form_ok else verdict['errors']}, "
                f"service {'accepts' if service_ok else 'refuses'}"
            )
    assert not mismatches, "\n".join(mismatches)
    # the cases do test both ways
    assert sum(not v["errors"] for v in verdicts) > 20 and sum(bool(v["errors"]) for v in verdicts) > 20


# --- menu, JSON, Makefiles ---------------------------------------------------------------------


def test_all_json_files_parse():
    files = sorted(APP.rglob("*.json"))
    assert ACL in files and MENU in files
    for f in files:
        assert isinstance(json.loads(f.read_text()), dict), f


def test_menu_points_at_the_views():
    menu = json.loads(MENU.read_text())
    assert set(menu) == {"admin/services/bitmesh", "admin/services/bitmesh/settings", "admin/services/bitmesh/status"}
    views = {name: entry["action"]["path"] for name, entry in menu.items() if entry["action"]["type"] == "view"}
    assert views == {
        "admin/services/bitmesh/settings": "bitmesh/settings",
        "admin/services/bitmesh/status": "bitmesh/status",
    }
    for path in views.values():
        assert (VIEWS / f"{path}.js").is_file()
    top = menu["admin/services/bitmesh"]
    assert top["action"] in ({"type": "firstchild"}, {"type": "alias", "path": "admin/services/bitmesh/settings"})
    if top["action"]["type"] == "firstchild":
        first = min(views, key=lambda name: menu[name]["order"])
        assert first == "admin/services/bitmesh/settings"
    assert top["depends"] == {"acl": ["luci-app-bitmesh"], "uci": {"bitmesh": True}}


@pytest.mark.parametrize("makefile", MAKEFILES, ids=["app", "sdk-feed"])
def test_luci_makefiles_follow_luci_mk(makefile):
    text = makefile.read_text()
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


def test_sdk_feed_links_to_the_app():
    feed = MAKEFILES[1].parent
    for sub in ("htdocs", "root"):
        link = feed / sub
        assert link.is_symlink() and link.resolve() == (APP / sub).resolve()


# --- the status view with LuCI's runtime stubbed: renders every reply, acts through rpc --------

# Runs status.js in node with stand-ins for E(), rpc.declare (replies from a table, `expect`
# applied as rpc.js does), poll, dom and ui; renders, refreshes twice, clicks every Kick and
# Close button and prints what happened.
_STATUS_HARNESS = r"""
'use strict';
const fs = require('fs');
const [source, repliesFile] = process.argv.slice(2).map(f => fs.readFileSync(f, 'utf8'));
const replies = JSON.parse(repliesFile);

String.prototype.format = function() {
	const args = Array.from(arguments);
	return this.replace(/%(0?\d*)(\.\d+)?(\d*)([sdm])B?/g, (m, pad, prec, base, type) => {
		const v = args.shift();
		return type == 'd' ? String(~~v).padStart(pad.length ? +pad : 0, '0') : String(v);
	});
};
const L = {
	bind: (fn, self, ...args) => fn.bind(self, ...args),
	isObject: v => v != null && typeof v == 'object' && !Array.isArray(v),
	toArray: v => v == null ? [] : Array.isArray(v) ? v : [v]
};
const _ = s => s;
const E = (tag, attrs, children) => {
	if (children === undefined && (typeof attrs != 'object' || Array.isArray(attrs) || attrs == null || attrs.tag))
		[attrs, children] = [{}, attrs];
	if (typeof tag != 'string') throw new Error('E(' + JSON.stringify(tag) + ')');
	return { tag, attrs: attrs || {}, children: L.toArray(children) };
};
const text = n => n == null ? '' : typeof n != 'object' ? String(n)
	: Array.isArray(n) ? n.map(text).join(' ') : n.children.map(text).join(' ');
const find = (n, pred, out = []) => {
	if (Array.isArray(n)) n.forEach(c => find(c, pred, out));
	else if (n && typeof n == 'object') { if (pred(n)) out.push(n); n.children.forEach(c => find(c, pred, out)); }
	return out;
};

const calls = [], notifications = [], polls = [];
const rpc = {
	declare: opts => function() {
		const params = {};
		(opts.params || []).forEach((p, i) => params[p] = arguments[i]);
		calls.push({ method: opts.method, params });
		const queue = replies[opts.method];   // one reply per call, the last one repeats
		let ret = queue.length > 1 ? queue.shift() : queue[0];
		for (const key in (opts.expect || {})) {
			if (ret != null && key != '') ret = ret[key];
			if (ret == null || Object.prototype.toString.call(ret) != Object.prototype.toString.call(opts.expect[key]))
				ret = opts.expect[key];
			break;
		}
		return Promise.resolve(ret);
	}
};
const ui = {
	addNotification: (title, body, cls) => notifications.push([cls, text(body)]),
	createHandlerFn: (ctx, fn, ...args) => ev => (typeof fn == 'string' ? ctx[fn] : fn).call(ctx, ...args, ev)
};
const poll = { add: (fn, interval) => polls.push([fn, interval]) };
let container = null;
const dom = { content: (node, children) => { node.children = L.toArray(children); } };
global.document = { getElementById: id => container };
global.confirm = () => true;
const view = { extend: o => o };

(async () => {
	const v = new Function('L', '_', 'E', 'view', 'dom', 'poll', 'rpc', 'ui', source)(
		L, _, E, view, dom, poll, rpc, ui);
	const page = v.render(await v.load());
	container = find(page, n => n.attrs.id == 'bitmesh-status')[0];
	const firstText = text(page);
	await polls[0][0]();   // refreshes: the same errors are not notified again
	await polls[0][0]();
	const buttons = label => find(page, n => n.tag == 'button' && text(n) == label);
	for (const b of buttons('Kick').concat(buttons('Close')))
		await b.attrs.click({});
	process.stdout.write(JSON.stringify({
		firstText, text: text(page), calls, notifications, poll: polls.map(p => p[1]),
		kick: buttons('Kick').length, close: buttons('Close').length,
		saveHandlers: [v.handleSaveApply, v.handleSave, v.handleReset]
	}));
})().catch(e => { console.error(e.stack); process.exit(1); });
"""

_CHANNEL_ID = "a1" * 32
_EARNINGS = {
    "settled_sat": 2_400_000_000,
    "settled_channels": 1,
    "settling_sat": 0,
    "settling_channels": 0,
    "open_paid_sat": 300,
    "open_owed_sat": 260,
    "open_channels": 1,
    "recent": [
        {
            "channel_id": "b2" * 32,
            "txid": "cd" * 32,
            "payout_sat": 2_400_000_000,
            "state": "settled",
            "updated_at": 1_759_999_000,
        },
    ],
}
# method -> its replies, one per call (the last one repeats): the contract of bitmesh/control.py
_REPLIES = {
    "status": {
        "running": True,
        "version": __version__,
        "enabled": True,
        "network": "main",
        "interface": "lan",
        "device": "br-lan",
        "portal_url": "http://192.168.1.1:8088/",
        "firewall": True,
        "chain": {"backend": "esplora", "url": "https://mempool.space/api", "ok": True, "tip_height": 870123},
        "clients_online": 1,
        "channels_open": 1,
        "price_sat_per_mb": 1,
        "price_sat_per_minute": 10,
        "prepay_step_sat": 100,
        "payout_address": "bc1qpayout",
    },
    "clients": {
        "clients": [
            {
                "mac": "02:00:00:00:00:01",
                "ip": "192.168.1.50",
                "channel_id": _CHANNEL_ID,
                "state": "open",
                "bytes_used": 3_500_000,
                "seconds_used": 754,
                "paid": 300,
                "owed": 260,
                "credit": 40,
                "deposit": 50_000,
                "bytes_remaining": None,
                "seconds_remaining": None,
            }
        ]
    },
    "channels": {
        "channels": [
            {
                "channel_id": _CHANNEL_ID,
                "state": "open",
                "deposit": 50_000,
                "paid": 300,
                "owed": 260,
                "client_mac": "02:00:00:00:00:01",
                "client_ip": "192.168.1.50",
                "funding": "ab" * 32 + ":1",
                "expiry": 870200,
                "settlement_txid": None,
                "close_reason": None,
                "created_at": 1_760_000_000,
            },
            {
                "channel_id": "b2" * 32,
                "state": "settled",
                "deposit": 20_000,
                "paid": 2_500_000_000,
                "owed": None,
                "client_mac": "02:00:00:00:00:02",
                "client_ip": "192.168.1.51",
                "funding": None,
                "expiry": 870100,
                "settlement_txid": "cd" * 32,
                "close_reason": "exhausted",
                "created_at": 1_759_990_000,
            },
        ]
    },
    # the service refuses on load and on the first poll (notified once), then answers
    "earnings": [{"error": {"code": "ledger_busy", "message": "the ledger is being written"}}] * 2 + [_EARNINGS],
    # a bare ubus status code (4: no such object) instead of a reply
    "kick": 4,
    "close_channel": {"channel_id": _CHANNEL_ID, "state": "settling", "settlement_txid": "ef" * 32},
}


def test_status_view_renders_the_replies_and_acts_through_rpc(tmp_path):
    harness, source, replies = tmp_path / "harness.js", tmp_path / "status.js", tmp_path / "replies.json"
    harness.write_text(_STATUS_HARNESS)
    source.write_text((VIEWS / "bitmesh" / "status.js").read_text())
    replies.write_text(json.dumps({k: v if isinstance(v, list) else [v] for k, v in _REPLIES.items()}))
    run = subprocess.run(["node", str(harness), str(source), str(replies)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)

    assert out["poll"] == [5]
    assert out["saveHandlers"] == [None, None, None]
    for shown in (
        "870123",
        "192.168.1.50",
        "02:00:00:00:00:01",
        "12m 34s",
        "40 sat",
        "300 sat",
        "50000 sat",
        "2500000000 sat",
        "bc1qpayout",
        "2400000000 sat in 1 channels",
        "260 sat owed of 300 sat paid",
        "cdcdcdcdcdcd",
    ):
        assert shown in out["text"], shown
    assert "the ledger is being written" in out["firstText"] and "2400000000" not in out["firstText"]
    # one Kick per client, Close only for the open channel
    assert (out["kick"], out["close"]) == (1, 1)
    reads = [c for c in out["calls"] if c["method"] in READ_ONLY]
    assert len(reads) == 5 * 4  # load, two polls, and a refresh after each action
    assert {c["method"] for c in reads} == READ_ONLY and all(c["params"] == {} for c in reads)
    actions = [c for c in out["calls"] if c["method"] in ACTIONS]
    assert actions == [
        {"method": "kick", "params": {"mac": "02:00:00:00:00:01"}},
        {"method": "close_channel", "params": {"channel_id": _CHANNEL_ID}},
    ]
    notes = out["notifications"]
    # the refusal is notified once although every refresh sees it again; the failed kick (a bare
    # ubus code) and the close are notified as they happen
    assert sum("the ledger is being written" in n for _, n in notes) == 1
    assert any(cls == "danger" and "does not answer" in n for cls, n in notes)
    assert any(cls == "info" and "ef" * 32 in n for cls, n in notes)
