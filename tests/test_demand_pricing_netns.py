"""Demand pricing with real load: the real `bitmesh serve` (firewall on) in a router namespace,
real `bitmesh pay` payers in client namespaces, the session's bcoin regtest node.

Under load (three paid clients of a capacity of three) the price of new channels rises, never
outside floor..ceiling nor faster than the step per minute of the service clock; a channel opened
before the rise is billed and settled at its opening price; a channel opened during the rise
records the price offered then; when the clients leave the price falls back to the floor.

The service runs its pricing pass every second (`--pricing-interval 1`, a test-only option of
`bitmesh serve`, not in UCI) instead of every minute; the step limit stays per minute of clock.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time

import pytest

from bitmesh.meter import SESSION_READ_BUSY_AGE
from tests.support.netns import Topology
from tests.support.router import RouterService, expected_split, payers, portal_call, read_settlement, router_services

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

UP = "http://10.77.2.2"
BASE = FLOOR = 5000  # sat/MB: the owner's price is the floor, so an idle hotspot stays at it
CEILING = 20_000
STEP_PERCENT = 100  # of the band per minute: 15000 sat/MB per minute, 250 per second
DEPOSIT = 60_000
RISE = 2500  # what the test waits to see
PRICING = {
    "price_sat_per_mb": BASE, "price_sat_per_minute": 0, "prepay_step_sat": 2000,
    "demand_pricing": 1, "price_floor_sat_per_mb": FLOOR, "price_ceiling_sat_per_mb": CEILING,
    "capacity_clients": 3, "demand_target_load_percent": 34, "demand_step_percent_per_minute": STEP_PERCENT,
}
_ON = re.compile(r"demand pricing on at t=(\d+) ms: (\d+) sat/MB")
_CHANGE = re.compile(r"demand pricing at t=(\d+) ms: (\d+) of (\d+) paid clients: (\d+) -> (\d+) sat/MB")


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=4, gso=False) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.http_server(t.upstream.ns, "UPSTREAM", [8080])
        yield t


def offered(topo, service) -> int:
    """The sat/MB /api/offer states now, as a client on the LAN reads it."""
    return portal_call(topo.clients[3].ns, service.url, "offer")["tariff"]["sat_per_mb"]


def wait_price(topo, service, done, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not done(price := offered(topo, service)):
        assert time.monotonic() < deadline, f"price stuck at {price}:\n{service.log.read_text()[-3000:]}"
        time.sleep(0.5)
    return price


def price_changes(service) -> list[tuple[int, int, int]]:
    """(service clock ms, old, new) of every change the service logged, from its start line."""
    text = service.log.read_text()
    start = _ON.search(text)
    assert start, text[-2000:]
    out = [(int(start.group(1)), int(start.group(2)), int(start.group(2)))]
    out += [(int(m.group(1)), int(m.group(4)), int(m.group(5))) for m in _CHANGE.finditer(text)]
    return out


def check_bounds_and_steps(changes: list[tuple[int, int, int]]) -> None:
    for (t0, _, p0), (t1, old, new) in zip(changes, changes[1:], strict=False):
        assert old == p0 and FLOOR <= new <= CEILING
        # at most the step per minute of the service clock since the previous change
        assert abs(new - old) <= (CEILING - FLOOR) * STEP_PERCENT * (t1 - t0) / (100 * 60_000)


def test_price_follows_load_and_each_channel_keeps_its_opening_price(topo, bcoin, faucet, tmp_path):
    with router_services(topo) as started, payers(topo, faucet, tmp_path) as pay:
        service = RouterService(topo, bcoin, tmp_path / "router", PRICING, serve_args=("--pricing-interval", "1"))
        started.append(service.start())
        assert offered(topo, service) == BASE

        # The early client: its channel opens at the base price; it browses 1 MB.
        early = pay(service, DEPOSIT, client=0)
        early.wait_for(r"^paid \d+ sat")
        got = topo.call(topo.clients[0].ns, "download", f"{UP}:8080/bytes/1000000", idle=5, rate=2_000_000)
        assert got["complete"], early.output()
        time.sleep(3)
        assert offered(topo, service) == BASE  # one client of three: below the target load

        # Two more paid clients: full load, the price of new channels rises.
        others = [pay(service, DEPOSIT, client=i) for i in (1, 2)]
        for payer in others:
            payer.wait_for(r"^paid \d+ sat", timeout=60)
        risen = wait_price(topo, service, lambda price: price >= BASE + RISE, timeout=40)
        assert risen <= CEILING

        # A client arriving now opens at the price offered now, not the base.
        late = pay(service, DEPOSIT, client=3)
        late.wait_for(r"^paid \d+ sat", timeout=60)
        late_tariff = portal_call(topo.clients[3].ns, service.url, "channel", late.channel_id)["tariff"]
        assert BASE + RISE <= late_tariff["sat_per_mb"] <= CEILING and late_tariff["sat_per_minute"] == 0

        # The early channel is billed, and settles, at its opening price.
        early.kill()
        time.sleep(SESSION_READ_BUSY_AGE + 0.5)
        s = early.session()
        now_price = offered(topo, service)
        assert s["bytes_used"] >= 1_000_000
        assert s["owed"] == math.ceil(s["bytes_used"] * BASE / 1_000_000)
        assert math.ceil(s["bytes_used"] * now_price / 1_000_000) > s["owed"]  # the rise would have shown
        closed = early.close()
        assert closed.get("settlement_txid"), closed
        bcoin.mine(1, service.payout_address)
        settlement = read_settlement(bcoin, closed["settlement_txid"], DEPOSIT, early.refund_address,
                                     service.payout_address)
        assert settlement.confirmations == 1
        assert (settlement.change, settlement.payout, settlement.unused) == expected_split(
            DEPOSIT, s["paid"], s["owed"], settlement.fee)

        # Everybody leaves: the price falls back to the floor.
        for payer in [*others, late]:
            payer.kill()
            payer.close()
        wait_price(topo, service, lambda price: price == FLOOR, timeout=75)

        changes = price_changes(service)
        check_bounds_and_steps(changes)
        assert max(new for _, _, new in changes) >= BASE + RISE and changes[-1][2] == FLOOR
