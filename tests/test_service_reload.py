"""Service.reload (SIGHUP, `ubus call bitmesh reload`): what it takes over while running, and the
options it reports as needing a restart instead of half-applying them. The service here is the
real one without a firewall (no root needed); the procd side is tests/test_init_script.py."""

from __future__ import annotations

import pytest

from bitmesh.config import Settings, load_settings
from bitmesh.errors import ConfigError
from bitmesh.service import RESTART_OPTIONS, build_service, restart_required
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.router import uci_config

BASE = {
    "enabled": 1, "network": NETWORK, "chain_backend": "esplora", "esplora_url": "http://127.0.0.1:9/api",
    "price_sat_per_mb": 1000, "price_sat_per_minute": 0, "portal_port": 8088,
}


@pytest.fixture
def running(tmp_path, free_port):
    """(service, write(**options)): a built service (not started) and a way to change its file."""
    path = tmp_path / "config" / "bitmesh"
    path.parent.mkdir()
    options = {**BASE, "payout_address": key_address(new_key()), "state_dir": tmp_path / "state"}

    def write(**changes) -> None:
        options.update(changes)
        path.write_text(uci_config(options))

    write()
    service = build_service(load_settings(path), listen=[("127.0.0.1", free_port)], firewall=False,
                            config_path=path)
    yield service, write
    service.manager.ledger.close()


def test_prices_apply_restart_options_are_reported_and_keep_running_values(running):
    service, write = running
    write(price_sat_per_mb=1500, portal_port=8090, portal_title="Corner Cafe")
    assert service.reload() == ["portal_port", "portal_title"]
    assert service.manager.policy.sat_per_mb == 1500  # taken over
    assert (service.settings.portal_port, service.settings.portal_title) == (8088, "BitMesh Wi-Fi")  # as running
    assert service.restart_required == ["portal_port", "portal_title"]
    # Back to the running value: nothing pending any more.
    write(portal_port=8088, portal_title="BitMesh Wi-Fi")
    assert service.reload() == [] and service.restart_required == []


def test_a_change_only_a_restart_makes_valid_is_not_half_applied(running):
    service, write = running
    # Another network and an address of that network: valid together, not with the running network.
    write(network="test", payout_address="tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx", price_sat_per_mb=7)
    assert service.reload() == ["network"]
    assert service.manager.policy.sat_per_mb == 1000 and service.settings.network == NETWORK


def test_a_bad_config_is_refused_and_changes_nothing(running):
    service, write = running
    write(price_sat_per_mb="ten", portal_port=8090)
    assert service.reload() == []
    with pytest.raises(ConfigError, match="price_sat_per_mb"):
        service.reload(strict=True)
    assert service.manager.policy.sat_per_mb == 1000 and service.restart_required == []


def test_restart_options_cover_what_the_running_service_built_at_start():
    base = Settings.from_dict({**BASE, "payout_address": key_address(new_key())})
    for name, value in {"interface": "br-guest", "portal_port": 9000, "state_dir": "/tmp/elsewhere",
                        "chain_backend": "core", "core_rpc_password": "pw", "enabled": False}.items():
        assert restart_required(base, base.replace(**{name: value})) == [name]
    assert restart_required(base, base.replace(price_sat_per_mb=5, walled_garden_host=("example.org",))) == []
    assert "payout_address" not in RESTART_OPTIONS and "min_deposit_sat" not in RESTART_OPTIONS



def test_a_sighup_taken_by_another_thread_still_reloads_at_once(running):
    """The kernel hands a process's signal to any of its threads; Python runs the handler in the
    main thread only. A SIGHUP taken by another thread while the main one sleeps in `run()` is
    applied at once (it waited for the next signal: a procd reload lost)."""
    import signal
    import threading
    import time

    service, write = running
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    outcome: dict[str, float] = {}

    def elsewhere() -> None:
        deadline = time.monotonic() + 20
        while not service.servers[0]._thread and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # run() is asleep by now
        write(price_sat_per_mb=1234)
        sent = time.monotonic()
        signal.pthread_kill(threading.get_ident(), signal.SIGHUP)  # to this thread, not the main one
        while service.manager.policy.sat_per_mb != 1234 and time.monotonic() - sent < 5:
            time.sleep(0.02)
        outcome["applied_after_s"] = time.monotonic() - sent if service.manager.policy.sat_per_mb == 1234 else -1
        service.stop()

    helper = threading.Thread(target=elsewhere)
    helper.start()
    try:
        service.run()
    finally:
        helper.join(30)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert 0 <= outcome["applied_after_s"] < 5, outcome


def test_a_reload_in_uplink_mode_keeps_selling_as_the_uplink_decided(running, tmp_path):
    """In uplink mode the uplink decides whether new channels are sold (closed_reason) and at
    what price; a reload rebuilds the policy from the config and must not open the shop (or drop
    the resale price) until the next uplink pass: the reloaded policy goes through the uplink's
    terms at once."""
    from bitmesh.uplink import buyer
    from bitmesh.uplink.buyer import UplinkPolicy
    from bitmesh.uplink.service import Uplink, UplinkRunner
    from bitmesh.uplink.wallet import UplinkWallet

    service, write = running
    state = tmp_path / "uplink"
    state.mkdir()
    chain = service.manager.chain  # an Esplora URL nobody answers: no pass runs here anyway
    uplink = Uplink(UplinkPolicy(budget_sat=5_000, deposit_sat=30_000), UplinkWallet(bytes(range(32)), chain, NETWORK),
                    "http://127.0.0.1:9", state, chain)
    service.uplink = UplinkRunner(service, uplink)  # not started: its verdict is the first one
    service.uplink.apply(uplink.verdict)
    assert service.manager.policy.closed_reason == buyer.NO_CHANNEL
    write(price_sat_per_mb=1500)
    assert service.reload() == []
    assert service.manager.policy.closed_reason == buyer.NO_CHANNEL  # still not selling
    assert service.manager.policy.sat_per_mb == 1500  # no uplink channel yet: no resale price to keep
