"""The LuCI app against the service it drives: every ubus method a view declares is granted by
the rpcd ACL and implemented by the service's ubus object, the ACL grants nothing else, the
settings form covers exactly the UCI config's options, the menu points at existing views and
every view is valid JavaScript. (LuCI itself runs only on an OpenWrt image: qemu/run.sh.)"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
from pathlib import Path

import pytest

from bitmesh.control import Control
from bitmesh.ubus_object import METHODS, OBJECT

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "luci-app-bitmesh"
VIEWS = APP / "htdocs" / "luci-static" / "resources" / "view"
ACL = APP / "root" / "usr" / "share" / "rpcd" / "acl.d" / "luci-app-bitmesh.json"
MENU = APP / "root" / "usr" / "share" / "luci" / "menu.d" / "luci-app-bitmesh.json"
UCI_CONFIG = ROOT / "files" / "etc" / "config" / "bitmesh"
READ_ONLY = {"status", "clients", "channels", "earnings"}

_DECLARE = re.compile(r"rpc\.declare\(\s*\{(?P<body>[^}]*)\}\s*\)")


def _views() -> list[Path]:
    return sorted(VIEWS.rglob("*.js"))


def declared_calls() -> dict[tuple[str, str], list[str]]:
    """(object, method) -> params of every rpc.declare in the views."""
    calls: dict[tuple[str, str], list[str]] = {}
    for view in _views():
        for m in _DECLARE.finditer(view.read_text()):
            body = m.group("body")
            obj = re.search(r"object:\s*'([^']+)'", body).group(1)
            method = re.search(r"method:\s*'([^']+)'", body).group(1)
            params = re.search(r"params:\s*\[([^\]]*)\]", body)
            calls[(obj, method)] = re.findall(r"'([^']+)'", params.group(1)) if params else []
    return calls


def test_views_exist_and_are_valid_javascript(tmp_path):
    names = {p.relative_to(VIEWS).as_posix() for p in _views()}
    assert names == {"bitmesh/settings.js", "bitmesh/status.js"}
    for view in _views():
        source = view.read_text()
        assert source.startswith("'use strict';")
        # A LuCI view is the body of a function LuCI builds around it (it ends in a top-level
        # `return view.extend(...)`), which `node --check` refuses at top level: check it
        # wrapped the same way.
        wrapped = tmp_path / view.name
        wrapped.write_text(f"(function(L, view, form, rpc, poll, ui, widgets) {{\n{source}\n}});\n")
        run = subprocess.run(["node", "--check", str(wrapped)], capture_output=True, text=True)
        assert run.returncode == 0, f"{view.name}: {run.stderr}"


def test_every_declared_method_is_granted_and_implemented_and_nothing_more():
    calls = declared_calls()
    assert {obj for obj, _ in calls} == {OBJECT}
    declared = {method for _, method in calls}
    assert declared == {"status", "clients", "channels", "earnings", "kick", "close_channel"}
    for (_, method), params in calls.items():
        assert method in METHODS, f"the service has no ubus method {method}"
        assert params == list(METHODS[method]), f"{method}: view passes {params}, service takes {list(METHODS[method])}"
        assert callable(getattr(Control, method))
        assert list(inspect.signature(getattr(Control, method)).parameters)[1:] == params

    acl = json.loads(ACL.read_text())
    assert set(acl) == {"luci-app-bitmesh"}
    grants = acl["luci-app-bitmesh"]
    assert set(grants) == {"description", "read", "write"}
    assert set(grants["read"]) == {"ubus", "uci"} and set(grants["write"]) == {"ubus", "uci"}
    assert grants["read"]["uci"] == ["bitmesh"] and grants["write"]["uci"] == ["bitmesh"]
    assert set(grants["read"]["ubus"]) == {OBJECT} and set(grants["write"]["ubus"]) == {OBJECT}
    read, write = grants["read"]["ubus"][OBJECT], grants["write"]["ubus"][OBJECT]
    assert len(read) == len(set(read)) and len(write) == len(set(write))
    # exactly what the views use: reading under read, acting under write
    assert set(read) == declared & READ_ONLY
    assert set(write) == declared - READ_ONLY
    # `reload` is for scripts (procd's SIGHUP does it for LuCI): the service has it, LuCI may not
    assert "reload" in METHODS and "reload" not in read + write


def _config_options() -> set[str]:
    names = set()
    for line in UCI_CONFIG.read_text().splitlines():
        m = re.match(r"\s*#?\s*(?:option|list)\s+(\w+)\s", line)
        if m:
            names.add(m.group(1))
    return names


def test_settings_form_covers_exactly_the_config_options():
    source = (VIEWS / "bitmesh" / "settings.js").read_text()
    assert "new form.Map('bitmesh'" in source
    form_options = set(re.findall(r"s\.taboption\('\w+',\s*(?:form|widgets)\.\w+,\s*'(\w+)'", source))
    form_options |= set(re.findall(r"s\.option\((?:form|widgets)\.\w+,\s*'(\w+)'", source))
    assert form_options == _config_options()
    assert re.search(r"'core_rpc_password'[^;]*;\s*o\.depends\([^;]*;\s*o\.password = true", source), \
        "the RPC password field must be masked"


def test_menu_points_at_the_views():
    menu = json.loads(MENU.read_text())
    paths = [entry["action"]["path"] for entry in menu.values() if entry["action"]["type"] == "view"]
    assert sorted(paths) == ["bitmesh/settings", "bitmesh/status"]
    for path in paths:
        assert (VIEWS / f"{path}.js").is_file()
    top = menu["admin/services/bitmesh"]
    assert top["depends"]["acl"] == ["luci-app-bitmesh"]


@pytest.mark.parametrize("makefile", [APP / "Makefile", ROOT / "openwrt/package/bitmesh/luci-app-bitmesh/Makefile"])
def test_luci_makefiles_follow_luci_mk(makefile):
    text = makefile.read_text()
    assert "include $(TOPDIR)/feeds/luci/luci.mk" in text
    assert "LUCI_DEPENDS:=+luci-base +bitmesh" in text
    assert "placeholder" not in text.lower()
