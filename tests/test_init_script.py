"""files/etc/init.d/bitmesh as shipped, run by OpenWrt's own procd with OpenWrt's rc.common and
procd.sh under busybox ash, in the router namespace of a test topology (tests/support/procd.py).

Settings change the way LuCI's Save & Apply changes them: uhttpd's /ubus, rpcd's `uci set`,
`uci apply` (which commits and sends procd `config.change`), `uci confirm`; procd's trigger runs
`/etc/init.d/bitmesh reload`. The service is the real `bitmesh serve` from the installed package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bitmesh.service import RESTART_OPTIONS
from tests.support.coins import key_address, new_key
from tests.support.netns import Topology, run_in
from tests.support.procd import ProcdRouter, router_options
from tests.support.router import Payer

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "files" / "etc" / "init.d" / "bitmesh"
PORT = 8088
UP = "http://10.77.2.2"
TRIGGER_S = 2.5  # procd's trigger delay (1 s) plus the init script


def test_script_is_an_ash_procd_script_with_the_service_restart_options():
    subprocess.run(["busybox", "ash", "-n", str(INIT)], check=True)  # OpenWrt's /bin/sh
    text = INIT.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("USE_PROCD=1", "START=95", "STOP=10"):
        assert f"\n{line}\n" in text
    assert INIT.stat().st_mode & 0o111
    # The options the script restarts for are exactly those the service cannot take over on
    # SIGHUP (`enabled` is the instance's presence itself).
    listed = re.search(r'^RESTART_OPTIONS="([^"]*)"', text, re.M)
    assert listed and set(listed.group(1).split()) == set(RESTART_OPTIONS) - {"enabled"}


def on_router(test):
    """The marks of a test on the procd router: OpenWrt's daemons, namespaces, the bcoin node."""
    for mark in (pytest.mark.owrt, pytest.mark.netns, pytest.mark.regtest,
                 pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=2) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.http_server(t.upstream.ns, "UPSTREAM", [80, 8080])
        yield t


@pytest.fixture
def router(topo, bcoin, tmp_path, free_port):
    """`router(**options)`: the package installed and started as its postinst does (`enable`,
    `start`) with these bitmesh.main options; everything stops at the end of the test."""
    started: list[ProcdRouter] = []

    def start(**options) -> ProcdRouter:
        opts = router_options(topo, bcoin, key_address(new_key()), **options)
        r = ProcdRouter.start(topo, tmp_path / f"root{len(started)}", opts, free_port)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
    run_in(topo.router.ns, "nft", "delete", "table", "inet", "bitmesh", check=False)
    run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)


def captive(topo, host, port: int) -> bool:
    """An unpaid client's HTTP to the outside ends on the portal's splash page at `port`."""
    got = topo.call(host.ns, "http_get", f"{UP}/", timeout=3)
    return got["ok"] and "<html" in got["body"].lower() and not topo.call(host.ns, "http_get", f"{UP}:8080/",
                                                                          timeout=1)["ok"]


def table_loaded(topo) -> bool:
    return "table inet bitmesh" in run_in(topo.router.ns, "nft", "list", "tables").stdout


@contextlib.contextmanager
def table_gaps(topo) -> Iterator[list[float]]:
    """Samples `nft list tables` in the router every 10 ms while the block runs; yields the list
    of the moments (seconds from the start) the table was missing: a restart must leave none."""
    gaps: list[float] = []
    done = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            if not table_loaded(topo):
                gaps.append(round(time.monotonic() - t0, 3))
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield gaps
    finally:
        done.set()
        thread.join()


@on_router
def test_enable_disable_and_saves_in_any_order(topo, router):
    r = router(enabled=0)
    # A fresh install: registered with its config trigger, nothing running.
    assert r.has_reload_trigger() and r.instance() is None

    # A setting saved while the hotspot is off: still registered, still off.
    r.luci_apply(price_sat_per_mb=2000)
    time.sleep(TRIGGER_S)
    assert r.has_reload_trigger(), f"the save deleted the service and its trigger: {r.service()}"
    assert r.instance() is None and not r.bitmesh_processes()

    # Enable + Save & Apply starts it.
    r.luci_apply(enabled=1)
    first = r.wait_serving(PORT)
    assert table_loaded(topo) and captive(topo, topo.clients[1], PORT)

    # Unticking Enable stops it (the table goes with it) and keeps the trigger.
    r.luci_apply(enabled=0)
    r.wait_no_instance()
    assert r.has_reload_trigger() and not table_loaded(topo)
    assert not r.portal(topo.clients[1], PORT, timeout=1)["ok"]

    # Another save while off, then Enable again: it starts again.
    r.luci_apply(portal_title="Corner Cafe")
    time.sleep(TRIGGER_S)
    assert r.has_reload_trigger() and r.instance() is None
    r.luci_apply(enabled=1)
    second = r.wait_serving(PORT, not_pid=first)
    offer = json.loads(r.portal(topo.clients[1], PORT)["body"])
    assert offer["portal_title"] == "Corner Cafe" and offer["tariff"]["sat_per_mb"] == 2000

    # The command line way (`uci commit` does not notify procd; `reload_config` does).
    r.root.run(["/sbin/reload_config"], check=True)  # records the configs' checksums
    r.uci("set", "bitmesh.main.enabled=0")
    r.uci("commit", "bitmesh")
    r.root.run(["/sbin/reload_config"], check=True)
    r.wait_no_instance()
    r.uci("set", "bitmesh.main.enabled=1")
    r.uci("commit", "bitmesh")
    r.root.run(["/sbin/reload_config"], check=True)
    r.wait_serving(PORT, not_pid=second)

    # `/etc/init.d/bitmesh stop` while enabled: stopped, and the LAN open again (no table left
    # captive with nobody serving the portal).
    r.init("stop")
    r.wait_no_instance()
    assert not table_loaded(topo)


@on_router
def test_price_change_is_a_hup_portal_port_change_a_restart(topo, router, bcoin, faucet, tmp_path):
    c, unpaid = topo.clients
    r = router(enabled=1, prepay_step_sat=2000)
    pid = r.wait_serving(PORT)
    payer = Payer(topo, c, SimpleNamespace(url=f"http://{topo.router.ipv4}:{PORT}"), faucet, 30_000,
                  tmp_path / "payer")
    try:
        payer.wait_for(r"^paid \d+ sat")
        assert topo.call(c.ns, "http_get", f"{UP}:8080/")["body"] == "UPSTREAM"
        before = payer.session()  # the channel's, proven by its key

        # A price: SIGHUP to the same process; the paid client stays online with its bytes.
        mark = len(r.logread())
        r.luci_apply(price_sat_per_mb=1500)
        r.wait_log("config reloaded", after=mark)
        assert r.pid() == pid
        assert json.loads(r.portal(unpaid, PORT)["body"])["tariff"]["sat_per_mb"] == 1500
        assert topo.call(c.ns, "http_get", f"{UP}:8080/")["body"] == "UPSTREAM"
        now = payer.session()
        assert now["state"] == "open" and now["channel_id"] == before["channel_id"]
        assert now["bytes_used"] >= before["bytes_used"] and now["paid"] >= before["paid"]
    finally:
        payer.kill()  # paid ahead; its channel stays open across the restart below

    # The portal port: a restart, and unpaid clients are sent to the new port. The table stays
    # loaded throughout (fail-closed): nobody unpaid gets out while the new process starts.
    with table_gaps(topo) as gaps:
        r.luci_apply(portal_port=8090)
        new_pid = r.wait_serving(8090, not_pid=pid)
    assert gaps == [], f"table inet bitmesh missing during the restart at {gaps[:5]} s"
    assert not r.portal(unpaid, PORT, timeout=1)["ok"]
    assert captive(topo, unpaid, 8090)
    assert topo.call(c.ns, "http_get", f"{UP}:8080/")["body"] == "UPSTREAM"  # restored from the journal
    # Fingerprint, not credentials: the RPC password is nowhere in procd's record.
    assert bcoin.api_key not in json.dumps(r.service())
    assert r.instance()["env"]["BITMESH_RESTART_KEY"]

    # Back to the old port with the CLI: the same.
    r.uci("set", f"bitmesh.main.portal_port={PORT}")
    r.uci("commit", "bitmesh")
    r.init("reload")
    restarted = r.wait_serving(PORT, not_pid=new_pid)
    assert captive(topo, unpaid, PORT)

    # `/etc/init.d/bitmesh restart` (also what an upgrade runs) keeps the table too.
    with table_gaps(topo) as gaps:
        r.init("restart")
        latest = r.wait_serving(PORT, not_pid=restarted)
    assert gaps == [], f"table inet bitmesh missing during `restart` at {gaps[:5]} s"
    assert topo.call(c.ns, "http_get", f"{UP}:8080/")["body"] == "UPSTREAM"

    # `/etc/init.d/firewall stop` (fw4 flush) under the procd-run service, its ubus loop running:
    # the table is back at once (tests/test_fw4_restore_netns.py measures it).
    run_in(topo.router.ns, "nft", "flush", "ruleset")
    deadline = time.monotonic() + 2
    while not table_loaded(topo):
        assert time.monotonic() < deadline, f"table not restored: {r.logread()[-2000:]}"
        time.sleep(0.02)
    assert r.pid() == latest and captive(topo, unpaid, PORT)
    assert topo.call(c.ns, "http_get", f"{UP}:8080/")["body"] == "UPSTREAM"
    r.wait_log("was deleted from the kernel")


@on_router
def test_a_reload_right_after_a_restart_does_not_kill_the_new_process(topo, router):
    r = router(enabled=1)
    old = r.wait_serving(PORT)
    r.init("restart")
    new = None
    deadline = time.monotonic() + 15
    while new is None or new == old:
        assert time.monotonic() < deadline, "not restarted"
        new = r.pid()
        time.sleep(0.01)
    # The new process has just been exec'd: a price saved now must not be a SIGHUP it dies of.
    r.uci("set", "bitmesh.main.price_sat_per_mb=1234")
    r.uci("commit", "bitmesh")
    r.init("reload")
    assert r.wait_serving(PORT) == new
    time.sleep(6)  # procd would have respawned a killed instance after 5 s
    assert r.pid() == new, f"the new process died: {r.logread()[-2000:]}"
    assert json.loads(r.portal(topo.clients[1], PORT)["body"])["tariff"]["sat_per_mb"] == 1234


@on_router
def test_config_errors_show_in_logread_and_a_fix_recovers(topo, router):
    r = router(enabled=1)
    pid = r.wait_serving(PORT)
    # A bad price on SIGHUP: refused with its code, the running config kept.
    mark = len(r.logread())
    r.luci_apply(price_sat_per_mb="ten")
    line = r.wait_log("config_invalid", after=mark)
    assert "price_sat_per_mb" in line and "bitmesh[" in line
    assert r.pid() == pid and r.portal(topo.clients[1], PORT)["ok"]
    # A bad restart option: the new process refuses to start and says why.
    mark = len(r.logread())
    r.luci_apply(price_sat_per_mb=1000, portal_port="80000")
    line = r.wait_log("bitmesh: config_invalid: portal_port", after=mark)
    assert "bitmesh[" in line
    assert not r.portal(topo.clients[1], PORT, timeout=1)["ok"]
    # Fixed in LuCI: running again.
    r.luci_apply(portal_port=PORT)
    r.wait_serving(PORT, not_pid=pid)
