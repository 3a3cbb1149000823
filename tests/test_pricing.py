"""Demand pricing (issue 11 item 2): the pure price rule (bitmesh/market/pricing.py), its config
validation, and, on the real regtest node, what an open does when the price moves between the
offer a client read and its open (docs/protocol.md "Demand pricing")."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmesh.config import ConfigError, Settings
from bitmesh.market import pricing as p
from bitmesh.market.pricing import Band, DemandPricing, PriceState, UnitState
from bitmesh.portal.client import PortalClient, PortalError
from tests.support.coins import NETWORK, key_address, new_key

MINUTE = p.MS_PER_MINUTE


@st.composite
def bands(draw, max_price: int = 10_000) -> Band:
    floor = draw(st.integers(1, max_price))
    base = draw(st.integers(floor, max_price))
    return Band(floor, base, draw(st.integers(base, max_price)))


@st.composite
def pricings(draw) -> DemandPricing:
    mb = draw(bands())
    minute = draw(st.one_of(bands(), st.just(Band(0, 0, 0))))
    return DemandPricing(mb, minute, capacity_clients=draw(st.integers(1, 64)),
                         target_load_percent=draw(st.integers(1, 99)),
                         step_percent_per_minute=draw(st.integers(1, 100)))


# A run: evaluations at increasing times (gaps from 1 ms to 5 minutes) with random loads.
runs = st.lists(st.tuples(st.integers(1, 5 * MINUTE), st.integers(0, 100)), min_size=1, max_size=60)


def replay(pricing: DemandPricing, run: list[tuple[int, int]], t0: int = 1_000) -> list[tuple[int, PriceState]]:
    state, now, out = p.start_state(pricing, t0), t0, []
    for gap, clients in run:
        now += gap
        state = p.step(pricing, state, clients, now)
        out.append((now, state))
    return out


@settings(max_examples=300, deadline=None)
@given(pricings(), runs)
def test_prices_stay_within_floor_and_ceiling_in_whole_satoshis(pricing, run):
    for _, state in replay(pricing, run):
        for unit in p.UNITS:
            band, price = pricing.band(unit), getattr(state, unit).price
            assert type(price) is int
            assert band.floor <= price <= band.ceiling


@settings(max_examples=300, deadline=None)
@given(pricings(), runs)
def test_no_change_exceeds_the_step_per_minute_since_the_previous_change(pricing, run):
    """Checked against the times of the changes themselves (not the module's own clock): a price
    that moved at t moved at most width x step% x (t - time of its previous change) / 1 min."""
    t0 = 1_000
    for unit in p.UNITS:
        band = pricing.band(unit)
        last_price, last_change = band.base, t0
        for now, state in replay(pricing, run, t0):
            price = getattr(state, unit).price
            if price != last_price:
                limit = band.width * pricing.step_percent_per_minute * (now - last_change) / (100 * MINUTE)
                assert abs(price - last_price) <= limit
                last_price, last_change = price, now


def test_an_hour_at_rest_allows_no_jump_across_the_band():
    """The allowance only builds up while the price is on its way: resting at the wanted price
    restarts it, so a sudden full load after an hour moves one minute's step, not the band."""
    pricing = DemandPricing(Band(100, 100, 1100), Band(0, 0, 0), capacity_clients=10, step_percent_per_minute=10)
    state = p.start_state(pricing, 0)
    for minute in range(1, 61):  # an hour with nobody: the floor is wanted, the price is there
        state = p.step(pricing, state, 0, minute * MINUTE)
    assert state.sat_per_mb.price == 100
    state = p.step(pricing, state, 10, 61 * MINUTE)  # everybody at once
    assert state.sat_per_mb.price == 100 + 100  # one minute at 10 % of the 1000-sat band


@settings(max_examples=300, deadline=None)
@given(bands(), st.integers(1, 64), st.integers(1, 99), st.integers(1, 100), st.integers(0, 10_000),
       st.integers(0, 10 * MINUTE), st.integers(0, 100), st.integers(0, 100))
def test_more_load_never_gives_a_lower_price(band, capacity, target, step_pct, current, elapsed, a, b):
    current = band.floor + current % (band.width + 1)
    lo, hi = sorted((a, b))
    assert p.desired_price(band, lo, capacity, target) <= p.desired_price(band, hi, capacity, target)
    assert (p.next_price(current, band, lo, capacity, target, step_pct, elapsed)
            <= p.next_price(current, band, hi, capacity, target, step_pct, elapsed))


@settings(max_examples=100, deadline=None)
@given(pricings(), runs)
def test_the_same_loads_at_the_same_times_give_the_same_prices(pricing, run):
    assert replay(pricing, run) == replay(pricing, run)


def test_the_wanted_price_is_floor_empty_base_at_target_ceiling_full():
    band = Band(10, 40, 100)
    assert p.desired_price(band, 0, 20, 50) == 10
    assert p.desired_price(band, 5, 20, 50) == 25  # half-way to the target: half-way to base
    assert p.desired_price(band, 10, 20, 50) == 40
    assert p.desired_price(band, 15, 20, 50) == 70
    assert p.desired_price(band, 20, 20, 50) == 100
    assert p.desired_price(band, 500, 20, 50) == 100


def test_under_steady_load_the_price_gets_where_the_load_asks_then_back():
    """It moves at all (a rule that never moved would pass the bound tests): full load takes it
    to the ceiling in 100/step minutes, one step per minute, and an empty hotspot back to the floor."""
    pricing = DemandPricing(Band(50, 50, 250), Band(1, 2, 3), capacity_clients=4, step_percent_per_minute=25)
    state, seen = p.start_state(pricing, 0), []
    for minute in range(1, 6):
        state = p.step(pricing, state, 4, minute * MINUTE)
        seen.append(state.prices())
    assert seen == [(100, 2), (150, 3), (200, 3), (250, 3), (250, 3)]  # 0.5 sat/min builds up to 1
    for minute in range(6, 11):
        state = p.step(pricing, state, 0, minute * MINUTE)
    assert state.prices() == (50, 1)


def test_a_unit_not_sold_stays_free():
    pricing = DemandPricing(Band(5, 10, 20), Band(0, 0, 0), capacity_clients=2)
    state = p.step(pricing, p.start_state(pricing, 0), 2, 10 * MINUTE)
    assert state.sat_per_minute == UnitState(0, 10 * MINUTE) and state.sat_per_mb.price == 20


# --- config ----------------------------------------------------------------------------------

ON = {"demand_pricing": "1", "price_sat_per_mb": "10", "price_floor_sat_per_mb": "5", "price_ceiling_sat_per_mb": "50",
      "price_sat_per_minute": "0"}


def test_config_off_by_default_and_a_valid_band_loads():
    assert Settings().demand_pricing is False
    s = Settings.from_dict(ON)
    pricing = p.pricing_from_settings(s)
    assert pricing.sat_per_mb == Band(5, 10, 50) and pricing.sat_per_minute == Band(0, 0, 0)
    assert (pricing.capacity_clients, pricing.target_load_percent, pricing.step_percent_per_minute) == (32, 70, 10)


@pytest.mark.parametrize("change, code, option", [
    ({"price_floor_sat_per_mb": "0"}, "price_band_invalid", "price_floor_sat_per_mb"),
    ({"price_floor_sat_per_mb": "11"}, "price_band_invalid", "price_floor_sat_per_mb"),
    ({"price_ceiling_sat_per_mb": "9"}, "price_band_invalid", "price_ceiling_sat_per_mb"),
    ({"price_ceiling_sat_per_minute": "5"}, "price_band_invalid", "price_floor_sat_per_minute"),
    ({"price_sat_per_minute": "3"}, "price_band_invalid", "price_floor_sat_per_minute"),  # no band for it
    ({"capacity_clients": "0"}, "config_invalid", "capacity_clients"),
    ({"demand_target_load_percent": "100"}, "config_invalid", "demand_target_load_percent"),
    ({"demand_target_load_percent": "0"}, "config_invalid", "demand_target_load_percent"),
    ({"demand_step_percent_per_minute": "0"}, "config_invalid", "demand_step_percent_per_minute"),
    ({"demand_step_percent_per_minute": "101"}, "config_invalid", "demand_step_percent_per_minute"),
    ({"price_floor_sat_per_mb": "-1"}, "config_invalid", "price_floor_sat_per_mb"),
    ({"demand_pricing": "maybe"}, "config_invalid", "demand_pricing"),
])
def test_config_refusals_name_the_option_with_a_stable_code(change, code, option):
    with pytest.raises(ConfigError) as e:
        Settings.from_dict({**ON, **change})
    assert e.value.code == code and e.value.message.startswith(option)


def test_bands_are_only_checked_while_demand_pricing_is_on():
    assert Settings.from_dict({**ON, "demand_pricing": "0", "price_floor_sat_per_mb": "0"}).demand_pricing is False


def test_the_service_does_not_load_demand_pricing_while_it_is_off():
    """The router's resident set: service, config and control never import the module at load."""
    code = ("import sys, bitmesh.service, bitmesh.control, bitmesh.cli; "
            "sys.exit('bitmesh.market.pricing' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- the price at open (real regtest node, in-process portal) ---------------------------------


@pytest.mark.regtest
def test_an_open_naming_a_price_no_longer_current_is_refused_and_creates_nothing(hotspot):
    portal, manager = hotspot.portal, hotspot.manager
    offered = portal.offer()["tariff"]
    assert offered == {"sat_per_mb": 10, "sat_per_minute": 0}
    ok = portal.open_channel(bytes(new_key().pub), 20_000, key_address(new_key()), tariff=offered)
    assert ok["tariff"] == offered and manager.get(ok["channel_id"]).sat_per_mb == 10

    manager.policy = dataclasses.replace(manager.policy, sat_per_mb=13)  # a demand pricing pass
    before = (manager._next_key_index, len(manager.channels()))
    with pytest.raises(PortalError) as e:
        portal.open_channel(bytes(new_key().pub), 20_000, key_address(new_key()), tariff=offered)
    assert e.value.code == "price_changed" and "13 sat/MB" in e.value.message
    assert (manager._next_key_index, len(manager.channels())) == before  # no key handed out
    # A client naming no price gets the current one, and the channel object says which.
    plain = portal.open_channel(bytes(new_key().pub), 20_000, key_address(new_key()))
    assert plain["tariff"] == {"sat_per_mb": 13, "sat_per_minute": 0}
    with pytest.raises(PortalError) as e:
        portal.open_channel(bytes(new_key().pub), 20_000, key_address(new_key()), tariff={"sat_per_mb": "13"})
    assert e.value.code == "field_invalid"


class _PriceMovesAfterOffer(PortalClient):
    """The real portal, with the router's demand pricing pass landing right after each of the
    first `moves` offer reads (the race an open must survive)."""

    def __init__(self, url, manager, moves):
        super().__init__(url)
        self.manager, self.moves, self.offers = manager, moves, 0

    def offer(self) -> dict:
        answer = super().offer()
        self.offers += 1
        if self.offers <= self.moves:
            self.manager.policy = dataclasses.replace(self.manager.policy,
                                                      sat_per_mb=self.manager.policy.sat_per_mb + 1)
        return answer


@pytest.mark.regtest
def test_the_payer_opens_at_the_price_it_read_even_when_the_price_moves_meanwhile(hotspot):
    from bitmesh.paying import OPEN_ATTEMPTS, PayerSession

    portal = _PriceMovesAfterOffer(hotspot.url, hotspot.manager, moves=1)
    payer = PayerSession(portal, tip_height=hotspot.chain.tip_height, refund_address=key_address(new_key()))
    terms = payer.open(20_000)
    assert portal.offers == 2  # refused once (price_changed), the offer read again
    channel = hotspot.manager.get(terms["channel_id"])
    assert (channel.sat_per_mb, channel.sat_per_minute) == (11, 0)
    assert (payer.terms.tariff.sat_per_mb, payer.terms.tariff.sat_per_minute) == (11, 0)  # what it checks bills by
    assert terms["tariff"] == {"sat_per_mb": 11, "sat_per_minute": 0}

    # A price that keeps moving: the payer gives up with the code, and no channel was made.
    portal = _PriceMovesAfterOffer(hotspot.url, hotspot.manager, moves=OPEN_ATTEMPTS)
    n = len(hotspot.manager.channels())
    payer = PayerSession(portal, tip_height=hotspot.chain.tip_height, refund_address=key_address(new_key()))
    with pytest.raises(PortalError) as e:
        payer.open(20_000)
    assert e.value.code == "price_changed" and len(hotspot.manager.channels()) == n


@pytest.mark.regtest
def test_status_and_offer_show_the_current_price_and_a_reload_restores_the_base(bcoin, tmp_path, free_port):
    """The real service (portal and timer loop, no firewall): with nobody paying, the price walks
    down towards the floor; `ubus call bitmesh status` (Control.status) and /api/offer state the
    current price; a reload starts again from the owner's base price."""
    from bitmesh.config import load_settings
    from bitmesh.control import Control
    from bitmesh.service import build_service
    from tests.support.router import uci_config

    config = tmp_path / "config" / "bitmesh"
    config.parent.mkdir()
    config.write_text(uci_config({
        "enabled": 1, "network": NETWORK, "chain_backend": "core", "core_rpc_url": f"http://127.0.0.1:{bcoin.rpc_port}/",
        "core_rpc_user": "x", "core_rpc_password": bcoin.api_key, "payout_address": key_address(new_key()),
        "state_dir": tmp_path / "state", "price_sat_per_mb": 1000, "price_sat_per_minute": 0,
        "demand_pricing": 1, "price_floor_sat_per_mb": 100, "price_ceiling_sat_per_mb": 2000,
        "demand_step_percent_per_minute": 100}))
    service = build_service(load_settings(config), listen=[("127.0.0.1", free_port)], firewall=False,
                            config_path=config, pricing_interval=0.2)
    portal = PortalClient(f"http://127.0.0.1:{free_port}")
    service.start()
    try:
        control = Control(service)
        assert control.status()["price_sat_per_mb"] == portal.offer()["tariff"]["sat_per_mb"] == 1000
        deadline = time.monotonic() + 20
        while (status := control.status())["price_sat_per_mb"] > 900:  # 1900 sat/MB per minute: ~3 s
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["demand_pricing"] is True and status["base_price_sat_per_mb"] == 1000
        assert 100 <= portal.offer()["tariff"]["sat_per_mb"] <= status["price_sat_per_mb"]  # still falling
        assert control.reload()["reloaded"]
        assert service.manager.policy.sat_per_mb == control.status()["price_sat_per_mb"] >= 990  # the base again
        # Turned off by a reload (not a restart option): the base price, and it stays.
        config.write_text(config.read_text().replace("option demand_pricing '1'", "option demand_pricing '0'"))
        assert control.reload() == {"reloaded": True, "restart_required": []}
        time.sleep(1)
        status = control.status()
        assert status["demand_pricing"] is False and status["price_sat_per_mb"] == 1000
    finally:
        service.stop()
        service.shutdown()
