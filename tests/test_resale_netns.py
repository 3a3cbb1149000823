"""Resale with real packets and both routers real: client -> reseller router -> upstream router
-> internet, each router the real `bitmesh serve` with its nftables gate, one bcoin regtest node.

The reseller's WAN is a client of the upstream hotspot: it funds an uplink channel from its own
wallet (the deposit address of its seed, funded from the faucet), pays upstream as its client
uses, resells at a 50 % margin, cuts its client when its budget ends, and both channels settle
on-chain: the reseller's earnings minus its costs are its margin on the bytes carried.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from bitmesh.market.bus import BrokerConfig, Bus, Subscription
from bitmesh.market.offer import encode, verify_offer
from bitmesh.tariff import Tariff
from bitmesh.uplink.wallet import UplinkWallet
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.mosquitto import Mosquitto, available
from tests.support.netns import Topology
from tests.support.owrt import wait_for
from tests.support.router import RouterService, payers, portal_call, python_in, read_settlement, router_services

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

UP_PRICE = 1_000  # sat per MB upstream: 1 sat per kB
MARGIN = 50
UP_STEP = 1_000  # the upstream's prepay step: 1 MB
BUDGET = 3_000  # the reseller buys 3 MB at most
RATE = 100_000  # bytes/s the client reads: the meters (2 s) and the uplink pass (2 s) keep within half a step


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=1) as t:
        t.internet_behind_upstream()
        for ns in (t.router.ns, t.upstream.ns):
            t.bridge_tcp(ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.http_server(t.internet.ns, "INTERNET", [80])
        yield t


def _seed(state_dir, seed: bytes) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "seed", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(seed.hex() + "\n")


def _book(reseller: RouterService) -> dict:
    path = reseller.workdir / "state" / "uplink.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _wait(what, check, timeout: float = 30.0, every: float = 0.2):
    return wait_for(check, timeout, what, every)


_OPEN = """
import json, sys, urllib.error, urllib.request
from bitcoin.wallet import CKey
body = {"client_pubkey": bytes(CKey(bytes(range(1, 33)), compressed=True).pub).hex(), "deposit": 20000,
        "refund_address": sys.argv[2]}
req = urllib.request.Request(sys.argv[1] + "/api/channels", data=json.dumps(body).encode(), method="POST",
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        print(json.dumps([resp.status, json.loads(resp.read()), resp.headers.get("Retry-After")]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, json.loads(e.read()), e.headers.get("Retry-After")]))
"""


def try_open(ns: str, url: str) -> tuple[int, dict, str | None]:
    """POST /api/channels from `ns`: (status, answer, Retry-After)."""
    return tuple(json.loads(python_in(ns, _OPEN, url, key_address(new_key())).stdout))


def start_resale(topo, bcoin, faucet, workdir, started, budget: int = BUDGET) -> tuple[RouterService, RouterService]:
    """The upstream hotspot, then the reseller with a funded wallet; returns once the reseller
    sells at its margin (its uplink channel funded)."""
    upstream = RouterService(topo, bcoin, workdir / "upstream", {
        "interface": topo.upstream.ifname, "price_sat_per_mb": UP_PRICE, "prepay_step_sat": UP_STEP,
    }, host=topo.upstream).start()
    started.append(upstream)
    seed = os.urandom(32)
    _seed(workdir / "reseller" / "state", seed)
    wallet = UplinkWallet(seed, None, NETWORK)  # its address only: the service reads the coins
    faucet.pay(wallet.script, 100_000)  # unconfirmed: bcoin lists mempool coins (test_uplink_wallet.py)
    reseller = RouterService(topo, bcoin, workdir / "reseller", {
        "price_sat_per_mb": 1, "prepay_step_sat": 1_000,
        "uplink_enabled": 1, "uplink_portal": upstream.url, "uplink_margin_percent": MARGIN,
        "uplink_budget_sat": budget, "uplink_deposit_sat": 20_000,
    }).start()
    started.append(reseller)
    client = topo.clients[0]
    resale = Tariff(UP_PRICE * (100 + MARGIN) // 100, 0)
    _wait("the resale price", lambda: portal_call(client.ns, reseller.url, "offer").get("tariff") == resale.to_json())
    return upstream, reseller


def test_a_client_browses_through_two_hops_and_the_margin_is_earned(topo, bcoin, faucet, tmp_path):
    client = topo.clients[0]
    url = f"http://{topo.internet.ipv4}"
    with router_services(topo) as started, payers(topo, faucet, tmp_path) as pay:
        upstream, reseller = start_resale(topo, bcoin, faucet, tmp_path, started)
        book = _book(reseller)
        uplink_id = book["channel"]["channel_id"]
        up_channel = portal_call(topo.router.ns, upstream.url, "channel", uplink_id)
        assert up_channel["state"] == "open" and up_channel["paid"] == UP_STEP  # one step ahead
        # unpaid, the client is captured by the reseller: nothing reaches the internet
        assert topo.call(client.ns, "http_get", f"{url}/", timeout=1)["body"] != "INTERNET"

        payer = pay(reseller, 20_000, interval=0.2)
        payer.wait_for(r"^paid \d+ sat")
        _wait("the first page through two hops",
              lambda: topo.call(client.ns, "http_get", f"{url}/", timeout=1).get("body") == "INTERNET")
        got = topo.call(client.ns, "download", f"{url}/bytes/1500000", idle=5.0, rate=RATE)
        assert got["complete"], got
        paid_up = portal_call(topo.router.ns, upstream.url, "channel", uplink_id)["paid"]
        assert paid_up > UP_STEP  # the reseller paid upstream as its client used
        assert paid_up <= BUDGET

        # the budget ends: the reseller stops selling, its client is cut, the uplink channel closes
        carried, cut = got["bytes"], False
        for _ in range(6):
            got = topo.call(client.ns, "download", f"{url}/bytes/1000000", idle=4.0, rate=RATE)
            carried += got["bytes"]
            if got["bytes"] < 1_000_000:  # stalled, or the reseller's captive portal answered instead
                cut = True
                break
        assert cut, "the client was never cut"
        payer.wait_for(r"channel closed by the router", timeout=20)
        book = _wait("the uplink channel retired", lambda: (b := _book(reseller)) and b["channel"] is None and b)
        assert book["spent_closed"] <= BUDGET
        # not selling: the offer says why, an open is refused with a time to come back
        offer = portal_call(client.ns, reseller.url, "offer")
        assert (offer["selling"], offer["closed_reason"]) == (False, "uplink_budget_spent"), offer
        status, refused, retry = try_open(topo.router.ns, reseller.url)
        assert (status, refused["error"]["code"], retry) == (503, "not_selling", "30"), refused
        assert topo.call(client.ns, "http_get", f"{url}/", timeout=1).get("body") != "INTERNET"

        # both channels settle on-chain
        client_ch = portal_call(client.ns, reseller.url, "channel", payer.channel_id)
        up_ch = portal_call(topo.router.ns, upstream.url, "channel", uplink_id)
        for ch in (client_ch, up_ch):
            _wait("a settlement broadcast", lambda ch=ch: ch.get("settlement_txid") or None, timeout=1)
        bcoin.mine(1, key_address(new_key()))
        sold = read_settlement(bcoin, client_ch["settlement_txid"], 20_000, payer.refund_address,
                               reseller.payout_address)
        uplink_deposit = book["history"][0]["deposit"]  # the budget left, raised to the upstream's minimum
        bought = read_settlement(bcoin, up_ch["settlement_txid"], uplink_deposit, UplinkWallet(
            bytes.fromhex((reseller.workdir / "state" / "seed").read_text().strip()), None, NETWORK).address,
            upstream.payout_address)
        earned = sold.payout + sold.fee  # what the client owed the reseller (the fee comes out of it)
        cost = bought.payout + bought.fee  # what the reseller owed upstream
        assert cost <= BUDGET and bought.change == uplink_deposit - book["spent_closed"], (sold, bought, book)
        # earnings - costs = the margin on the bytes carried, within one prepay step
        assert abs((earned - cost) - cost * MARGIN / 100) <= UP_STEP, (earned, cost, carried)
        assert earned > cost
        # what upstream billed is the bytes carried (payload plus headers) at its price
        assert carried * UP_PRICE / 1e6 <= cost <= carried * UP_PRICE / 1e6 * 1.1 + 1


@pytest.mark.skipif(not available(), reason="needs mosquitto and openssl (tools/deps.sh)")
def test_the_reseller_buys_from_an_upstream_it_finds_on_the_broker(topo, bcoin, faucet, tmp_path):
    """MQTT on for both routers: the reseller's configured upstream portal does not answer, the
    upstream router's signed offer on the broker names its portal, reachable from the reseller's
    WAN: the reseller buys from it, at its real price; a forged cheaper copy of that offer is not
    believed."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        for ns in (topo.router.ns, topo.upstream.ns):
            topo.bridge_tcp(ns, broker.port, ("127.0.0.1", broker.port))
        mqtt = {"mqtt_enabled": 1, "mqtt_broker": broker.broker}
        with router_services(topo) as started:
            upstream = RouterService(topo, bcoin, tmp_path / "upstream", {
                "interface": topo.upstream.ifname, "price_sat_per_mb": UP_PRICE, "prepay_step_sat": UP_STEP, **mqtt,
            }, host=topo.upstream).start()
            started.append(upstream)
            reader = Bus(BrokerConfig("127.0.0.1", broker.port, client_id="resale-test")).start()
            try:
                sub = Subscription(BrokerConfig("127.0.0.1", broker.port), ["bitmesh/v1/+/offer"]).start()
                portal = f"http://{topo.upstream.ipv4}:"
                found = sub.wait_for(lambda t, p: p and verify_offer(p, int(time.time() * 1000))["portal_url"]
                                     .startswith(portal), timeout=20)
                assert found is not None, "the upstream's offer never reached the broker"
                genuine = json.loads(found[1])
                # a copy at a tenth of the price, the signature left as it was: no node signed that price
                reader.set_current(found[0], encode({**genuine, "sat_per_mb": UP_PRICE // 10}))
                sub.stop()

                seed = os.urandom(32)
                _seed(tmp_path / "reseller" / "state", seed)
                wallet = UplinkWallet(seed, None, NETWORK)
                faucet.pay(wallet.script, 100_000)
                reseller = RouterService(topo, bcoin, tmp_path / "reseller", {
                    "price_sat_per_mb": 1, "prepay_step_sat": 1_000, **mqtt,
                    "uplink_enabled": 1, "uplink_portal": "http://127.0.0.1:1", "uplink_margin_percent": MARGIN,
                    "uplink_budget_sat": BUDGET, "uplink_deposit_sat": 20_000,
                }).start()
                started.append(reseller)
                # while the broker holds only the forgery the reseller has no candidate: not selling
                time.sleep(3)
                assert _book(reseller).get("channel") is None
                offer = portal_call(topo.clients[0].ns, reseller.url, "offer")
                assert offer["selling"] is False, offer
                reader.set_current(found[0], found[1])  # the upstream's own signed offer again
                resale = Tariff(UP_PRICE * (100 + MARGIN) // 100, 0)
                _wait("the resale price", lambda: (o := portal_call(topo.clients[0].ns, reseller.url, "offer"))
                      ["selling"] and o["tariff"] == resale.to_json())
                book = _book(reseller)
                assert book["extra"]["portal"].rstrip("/") == genuine["portal_url"].rstrip("/")
                up_channel = portal_call(topo.router.ns, upstream.url, "channel", book["channel"]["channel_id"])
                assert up_channel["state"] == "open" and up_channel["tariff"] == {"sat_per_mb": UP_PRICE,
                                                                                   "sat_per_minute": 0}
            finally:
                reader.stop()
    finally:
        broker.stop()
