"""files/etc/init.d/bitmesh: syntax, and what start/reload hand to procd (run under a tiny stub)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "files" / "etc" / "init.d" / "bitmesh"

# Stand-ins for /etc/rc.common, /lib/functions.sh and procd.sh: each call is printed, one per line.
STUB = r"""
rec() { printf '%s\n' "$*"; }
procd_open_instance() { rec "open_instance $*"; }
procd_set_param() { rec "set_param $*"; }
procd_close_instance() { rec "close_instance"; }
procd_add_reload_trigger() { rec "reload_trigger $*"; }
procd_send_signal() { rec "send_signal $*"; }
config_load() { rec "config_load $*"; }
config_get_bool() { eval "$1=\${STUB_ENABLED:-$4}"; rec "config_get_bool $2 $3"; }
ubus() { rec "ubus $*"; [ "$STUB_RUNNING" = 1 ] && echo '{"bitmesh": {"instances": {"bitmesh": {"running": true}}}}'; }
start() { rec "start"; }
stop() { rec "stop"; }
. "$INIT"
"$ACTION"
"""


def run(action: str, enabled: str | None = None, running: str = "0") -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "INIT": str(INIT), "ACTION": action, "STUB_RUNNING": running}
    if enabled is not None:
        env["STUB_ENABLED"] = enabled
    out = subprocess.run(["sh", "-c", STUB], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_syntax_and_procd_markers():
    subprocess.run(["sh", "-n", str(INIT)], check=True)
    text = INIT.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("USE_PROCD=1", "START=95", "STOP=10"):
        assert f"\n{line}\n" in text
    assert INIT.stat().st_mode & 0o111


def test_start_when_enabled_sets_command_and_params():
    calls = run("start_service", enabled="1")
    assert calls[:2] == ["config_load bitmesh", "config_get_bool main enabled"]
    assert calls[2:] == [
        "open_instance bitmesh",
        "set_param command /usr/bin/bitmesh serve --config /etc/config/bitmesh",
        "set_param respawn 3600 5 5",
        "set_param stdout 1",
        "set_param stderr 1",
        "close_instance",
    ]


@pytest.mark.parametrize("enabled", ["0", None])
def test_start_does_nothing_unless_enabled(enabled):
    calls = run("start_service", enabled=enabled)
    assert not [c for c in calls if c.startswith(("open_instance", "set_param"))]


def test_reload_trigger_on_config():
    assert run("service_triggers") == ["reload_trigger bitmesh"]


def test_reload_sends_sighup_to_a_running_service():
    calls = run("reload_service", enabled="1", running="1")
    assert calls[-1] == "send_signal bitmesh bitmesh HUP"
    assert "stop" not in calls and "start" not in calls


def test_reload_starts_a_newly_enabled_service_and_stops_a_disabled_one():
    assert run("reload_service", enabled="1", running="0")[-1] == "start"
    calls = run("reload_service", enabled="0", running="1")
    assert calls[-1] == "stop" and not [c for c in calls if c.startswith("send_signal")]
