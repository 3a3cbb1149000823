"""Resale, what a reseller tells and whom it buys from (issue 11 item 5):

- while it is not selling (its upstream credit cannot be kept ahead), its portal refuses new
  channels with 503 not_selling and a Retry-After, /api/offer says `selling: false` with the
  reason, and its signed MQTT offer says it too; once it sells again, opens are taken at the
  resale price;
- with MQTT on, the marketplace's verified live offers are upstream candidates beside the
  configured portal: the cheapest whose portal answers from here as the node that signed the
  offer is bought from; forged, unreachable, not-selling and its own offers are not.

Real parts: the upstream and reseller portals (tests/support/hotspot.py, the real bottle API on the
real HTTP server, channels on the bcoin regtest node), the uplink buyer with its wallet, a real
mosquitto with offers signed by node keys and published by bitmesh.market.bus. The two-hop layout
with both routers' `bitmesh serve` is tests/test_resale_netns.py's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from bitcoin.wallet import CKey

from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
from bitmesh.config import Settings
from bitmesh.market.bus import BrokerConfig, Bus
from bitmesh.market.identity import node_id_of, node_key
from bitmesh.market.offer import Terms, encode, make_offer, verify_offer
from bitmesh.portal.api import make_app
from bitmesh.portal.httpserver import HttpServer
from bitmesh.tariff import Tariff
from bitmesh.uplink import buyer
from bitmesh.uplink.buyer import UplinkPolicy
from bitmesh.uplink.offers import OfferBoard, candidates
from bitmesh.uplink.service import Uplink, UplinkRunner
from bitmesh.uplink.wallet import UplinkWallet
from tests.support.bcoin import BcoinNode, free_port
from tests.support.coins import NETWORK, Faucet
from tests.support.hotspot import Hotspot
from tests.support.mosquitto import Mosquitto, available

pytestmark = pytest.mark.regtest

STEP = 1_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Shop:
    """The part of bitmesh.service.Service the uplink runner drives: the reseller's channel manager
    (a real one behind a real portal) and the announcement of changed terms."""

    def __init__(self, rig: Hotspot):
        self.manager = rig.manager
        self.offers_changed = 0

    def offer_changed(self) -> None:
        self.offers_changed += 1

    def watch_soon(self) -> None:
        pass


def _http(url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _open_body(rig: Hotspot, tariff: dict) -> dict:
    key = CKey(bytes(range(40, 72)), compressed=True)
    return {"client_pubkey": bytes(key.pub).hex(), "deposit": 20_000, "tariff": tariff,
            "refund_address": UplinkWallet(bytes(range(9, 41)), None, NETWORK).address}


@pytest.fixture
def rigs(bcoin: BcoinNode, faucet: Faucet, tmp_path: Path):
    started: list[Hotspot] = []

    def start(name: str, sat_per_minute: int) -> Hotspot:
        rig = Hotspot.start(bcoin, faucet, tmp_path / name, sat_per_mb=0, sat_per_minute=sat_per_minute,
                            prepay_step_sat=STEP)
        started.append(rig)
        return rig

    yield start
    for rig in started:
        rig.stop()


def test_a_reseller_that_is_not_selling_refuses_opens_and_says_so(rigs, faucet: Faucet, tmp_path: Path):
    upstream, reseller = rigs("upstream", 600), rigs("reseller", 5)
    shop = Shop(reseller)
    wallet = UplinkWallet(bytes(range(5, 37)), upstream.chain, NETWORK)
    uplink = Uplink(UplinkPolicy(budget_sat=5_000, deposit_sat=30_000), wallet, upstream.url, tmp_path / "book",
                    upstream.chain, clock=Clock())
    (tmp_path / "book").mkdir()
    runner = UplinkRunner(shop, uplink)

    runner.apply(uplink.verdict)  # what start() does: nothing sold before an uplink channel is funded
    assert reseller.manager.policy.closed_reason == buyer.NO_CHANNEL and shop.offers_changed == 1
    runner.apply(uplink.tick())  # the wallet is empty: no uplink channel
    assert reseller.manager.policy.closed_reason == buyer.WALLET_EMPTY and shop.offers_changed == 2

    status, offer, _ = _http(reseller.url + "/api/offer")
    assert status == 200 and (offer["selling"], offer["closed_reason"]) == (False, buyer.WALLET_EMPTY)
    status, answer, headers = _http(reseller.url + "/api/channels", _open_body(reseller, offer["tariff"]))
    assert status == 503 and answer["error"]["code"] == "not_selling", answer
    assert answer["error"]["reason"] == buyer.WALLET_EMPTY
    assert headers["Retry-After"] == str(answer["error"]["retry_after"]) == "30"
    assert reseller.manager.channels() == []  # nothing reserved, nothing kept

    faucet.pay(wallet.script, 100_000)  # the owner funds the wallet: the next pass buys and sells again
    runner.apply(uplink.tick())
    assert uplink.verdict.selling and reseller.manager.policy.closed_reason is None and shop.offers_changed == 3
    status, offer, _ = _http(reseller.url + "/api/offer")
    assert (offer["selling"], offer["closed_reason"]) == (True, None)
    assert offer["tariff"] == {"sat_per_mb": 0, "sat_per_minute": 720}  # 600 x 1.2
    status, answer, _ = _http(reseller.url + "/api/channels", _open_body(reseller, offer["tariff"]))
    assert status == 200 and answer["state"] == "awaiting_funding", answer
    runner.apply(uplink.verdict)  # the same verdict again: nothing to announce
    assert shop.offers_changed == 3


def test_the_signed_offer_says_not_selling(rigs, tmp_path: Path):
    """The MQTT offer (bitmesh.market.publisher) carries selling/closed_reason under its signature."""
    from bitmesh.market.publisher import MarketPublisher

    reseller = rigs("reseller", 5)
    settings = Settings.from_dict({"mqtt_enabled": "1", "mqtt_broker": "127.0.0.1:1", "network": NETWORK,
                                   "payout_address": UplinkWallet(bytes(32), None, NETWORK).address})

    class Service:
        manager, lan = reseller.manager, None

    Service.settings = settings
    publisher = MarketPublisher(Service(), wireless=tmp_path / "none")
    now = int(time.time() * 1000)
    selling = verify_offer(encode(publisher.offer()), now, NETWORK)
    assert "selling" not in selling  # an offer of a selling node is what it always was
    reseller.manager.policy = dataclasses.replace(reseller.manager.policy, closed_reason=buyer.BUDGET_SPENT)
    closed = verify_offer(encode(publisher.offer()), now, NETWORK)  # signed: it verifies
    assert (closed["selling"], closed["closed_reason"]) == (False, buyer.BUDGET_SPENT)
    tampered = {**closed, "selling": True}
    with pytest.raises(Exception) as refused:
        verify_offer(encode(tampered), now, NETWORK)
    assert getattr(refused.value, "code", None) == "offer_signature_invalid"
    assert candidates([{**closed, "state": "online"}], "someone-else") == []


def _signed(seed: bytes, url: str, sat_per_minute: int) -> tuple[str, dict]:
    key = node_key(ChannelKeychain(seed))
    terms = Terms(network=NETWORK, sat_per_mb=0, sat_per_minute=sat_per_minute, prepay_step_sat=STEP,
                  min_deposit_sat=10_000, max_deposit_sat=1_000_000, fee_policy={}, load=0, capacity=32,
                  portal_url=url)
    offer = make_offer(key, terms, int(time.time() * 1000), int(time.time() * 1000))
    return offer["node_id"], offer


def _as_node(rig: Hotspot, host: str = "127.0.0.1") -> tuple[HttpServer, bytes]:
    """The rig's portal as a node answers it (its node_id from its seed, as build_service does)."""
    seed = load_or_create_seed(rig.state_dir / "seed", create=False)
    node_id = node_id_of(bytes(node_key(ChannelKeychain(seed)).pub))
    http = HttpServer(make_app(rig.manager, node_id), [(host, 0)])
    http.start()
    return http, seed


@pytest.mark.skipif(not available(), reason="needs mosquitto and openssl (tools/deps.sh)")
def test_the_cheapest_reachable_verified_upstream_is_bought_from(rigs, faucet: Faucet, tmp_path: Path):
    configured = rigs("configured", 600)  # uplink_portal: the dearest
    cheaper = rigs("cheaper", 300)  # on the broker, its portal answers: the one to buy from
    cheapest = rigs("cheapest", 60)  # real and cheapest, but its offer on the broker is forged
    elsewhere = rigs("elsewhere", 40)  # real, signed, answers: but not where our packets leave
    portals = []
    try:
        cheaper_http, cheaper_seed = _as_node(cheaper)
        cheapest_http, cheapest_seed = _as_node(cheapest)
        elsewhere_http, elsewhere_seed = _as_node(elsewhere, "127.0.0.2")
        portals += [cheaper_http, cheapest_http, elsewhere_http]
        own_seed = bytes(range(7, 39))
        own_id, own_offer = _signed(own_seed, configured.url, 1)  # this node's own offer: never bought from
        cheaper_id, cheaper_offer = _signed(cheaper_seed, f"http://127.0.0.1:{cheaper_http.port}/", 300)
        cheapest_id, genuine = _signed(cheapest_seed, f"http://127.0.0.1:{cheapest_http.port}/", 60)
        forged = {**genuine, "sat_per_minute": 6}  # a price its node never signed
        gone_id, gone = _signed(bytes(range(11, 43)), f"http://127.0.0.1:{free_port()}/", 10)  # no portal there
        impostor_id, impostor = _signed(bytes(range(13, 45)), f"http://127.0.0.1:{cheapest_http.port}/", 20)
        elsewhere_id, afar = _signed(elsewhere_seed, f"http://127.0.0.2:{elsewhere_http.port}/", 40)
        broker = Mosquitto(tmp_path / "mosquitto").start()
        try:
            publisher = Bus(BrokerConfig("127.0.0.1", broker.port, client_id="market-test")).start()
            for node, offer in ((own_id, own_offer), (cheaper_id, cheaper_offer), (cheapest_id, forged),
                                (gone_id, gone), (impostor_id, impostor), (elsewhere_id, afar)):
                publisher.set_current(f"bitmesh/v1/{node}/offer", encode(offer))
            settings = Settings.from_dict({"mqtt_enabled": "1", "mqtt_broker": broker.broker, "network": NETWORK,
                                           "payout_address": UplinkWallet(bytes(32), None, NETWORK).address})
            board = OfferBoard(settings, own_id).begin()
            deadline = time.monotonic() + 10
            while len(board.latest) < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            publisher.stop()
            assert len(board.latest) == 6, board.latest
            listed = [o["node_id"] for o in board.offers()]
            # verified, not ours, cheapest first; the forged one is dropped by its signature
            assert listed == [gone_id, impostor_id, elsewhere_id, cheaper_id], listed

            wallet = UplinkWallet(own_seed, configured.chain, NETWORK)
            faucet.pay(wallet.script, 100_000)
            (tmp_path / "book").mkdir()
            uplink = Uplink(UplinkPolicy(budget_sat=5_000, deposit_sat=30_000), wallet, configured.url,
                            tmp_path / "book", configured.chain, clock=Clock(), market=board,
                            first_hops=lambda: {"127.0.0.1"})  # the WAN's gateway, as the kernel's table names it
            verdict = uplink.tick()
            assert verdict.selling, (verdict, uplink.error)
            ch = uplink.book.channel
            assert ch is not None and ch.tariff == Tariff(0, 300)
            assert [c.id for c in cheaper.manager.channels()] == [ch.channel_id]
            assert configured.manager.channels() == [] and cheapest.manager.channels() == []
            assert elsewhere.manager.channels() == []
            assert uplink.status()["portal"] == f"http://127.0.0.1:{cheaper_http.port}"
            assert json.loads((tmp_path / "book" / "uplink.json").read_text())["extra"]["portal"] == \
                uplink.status()["portal"]
            # a restart resumes the open channel at the upstream it was opened with
            again = Uplink(UplinkPolicy(budget_sat=5_000, deposit_sat=30_000), wallet, configured.url,
                           tmp_path / "book", configured.chain, clock=Clock(), market=board)
            assert again.portal.base_url == uplink.portal.base_url
            board.stop()
        finally:
            broker.stop()
    finally:
        for http in portals:
            http.stop()


def test_candidates_are_live_selling_offers_of_others_cheapest_first():
    def offer(node: str, minute: int, **kw) -> dict:
        return {"node_id": node, "sat_per_mb": 0, "sat_per_minute": minute, "state": "online",
                "portal_url": f"http://{node}:8088/", **kw}

    offers = [offer("b", 30), offer("a", 20), offer("own", 1), offer("off", 2, state="offline"),
              offer("shut", 3, selling=False, closed_reason="budget_spent"), offer("nourl", 4, portal_url=""),
              offer("file", 5, portal_url="file:///etc/passwd"), offer("unknown", 40, state="unknown")]
    assert [o["node_id"] for o in candidates(offers, "own")] == ["a", "b", "unknown"]
    hops = {"a", "unknown"}  # the WAN's first hops: others are not even probed
    assert [o["node_id"] for o in candidates(offers, "own", hops)] == ["a", "unknown"]
    afar = [offer(f"n{i}", 1 + i) for i in range(9)]  # cheaper offers elsewhere do not crowd the gateway's out
    assert [o["node_id"] for o in candidates(afar + offers, "own", hops)] == ["a", "unknown"]
    many = [offer(f"n{i}", 100 + i) for i in range(9)]
    assert [o["node_id"] for o in candidates(many, "own")] == [f"n{i}" for i in range(5)]  # the cheapest probed


@pytest.mark.browser
def test_the_splash_page_says_plainly_that_it_is_not_selling(rigs):
    """The splash page's wallet (static/wallet.js) in headless Chromium: an offer with `selling:
    false` is said in words and the open button is off; an open refused with not_selling (the
    router stopped between the page's read and the click) shows the same words and creates nothing."""
    from playwright.sync_api import expect, sync_playwright

    from tests.support.browser import collect_errors, launch_chromium, phone_context_args

    reseller = rigs("reseller", 5)
    policy = reseller.manager.policy
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            context = browser.new_context(**phone_context_args())
            page = context.new_page()
            errors = collect_errors(page)
            reseller.manager.policy = dataclasses.replace(policy, closed_reason=buyer.BUDGET_SPENT)
            page.goto(reseller.url + "/")
            expect(page.locator("#error")).to_have_text(
                "This hotspot is not selling access right now. Nothing was charged; try again later.")
            expect(page.locator("#open-btn")).to_be_disabled()

            reseller.manager.policy = policy  # selling again: a fresh read of the page shows the form
            page.reload()
            expect(page.locator("#open-btn")).to_be_enabled()
            expect(page.locator("#error")).to_be_hidden()
            reseller.manager.policy = dataclasses.replace(policy, closed_reason=buyer.UPSTREAM_UNREACHABLE)
            page.click("#open-btn")
            expect(page.locator("#error")).to_contain_text("This hotspot is not selling access right now")
            expect(page.locator("#open-btn")).to_be_disabled()  # the offer read again says so
            assert reseller.manager.channels() == []
            context.close()
            assert not errors, errors
        finally:
            browser.close()


def test_uplink_mode_without_mqtt_loads_no_mqtt_client():
    """The router's resident memory: the offer board (and paho) only with MQTT on as well."""
    code = ("import sys, bitmesh.service, bitmesh.uplink.service; "
            "print([m for m in sys.modules if m.startswith(('paho', 'bitmesh.uplink.offers', 'bitmesh.market'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[]"
