"""The whole hotspot with real packets: `bitmesh serve` (firewall on) in a router namespace,
`bitmesh pay` in client namespaces, a real bcoin regtest node, an upstream web server.

Traffic stays inside namespaces created here (10.77.x.x, fd77::). What was delivered is counted
by nft counters at the endpoints (client and upstream namespaces), independently of the router.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from bitmesh.chain.address import address_to_script, p2wpkh_script
from bitmesh.meter import SESSION_READ_BUSY_AGE
from tests.support.browser import OUTPUT, collect_errors, launch_chromium, phone_context_args
from tests.support.coins import NETWORK, key_address, new_key, sign_p2wpkh_spend
from tests.support.netns import Topology
from tests.support.router import (
    RouterService,
    UbusCallError,
    expected_split,
    payers,
    portal_call,
    read_payout,
    read_settlement,
    router_services,
)
from tools.demo import run_story

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

SINK = 9999  # upstream UDP port with no listener: arrivals are counted, never answered
MTU_PACKET = 1500
UP = "http://10.77.2.2"


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=3, gso=False) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.http_server(t.upstream.ns, "UPSTREAM", [80, 8080])
        t.udp_echo(t.upstream.ns, [53, 7])
        c1 = t.clients[0]
        t.install_counters(t.upstream.ns, {
            "from_c1": f"ip saddr {c1.ipv4}",
            "sink_c1ip": f"ip saddr {c1.ipv4} udp dport {SINK}",
            "dns_any": "meta l4proto { tcp, udp } th dport 53",
        })  # fmt: skip
        t.install_counters(c1.ns, {"from_up": f"ip saddr {t.upstream.ipv4}"})
        yield t


@pytest.fixture
def router(topo, bcoin, tmp_path):
    """`router(**uci_options)` starts the service; it is stopped (table removed) afterwards."""
    with router_services(topo) as started:
        def start(with_ubus: bool = False, **options) -> RouterService:
            service = RouterService(topo, bcoin, tmp_path / "router", options, with_ubus=with_ubus).start()
            started.append(service)
            return service

        yield start


@pytest.fixture
def pay(topo, faucet, tmp_path):
    """`pay(service, deposit)`: `bitmesh pay` in client 1; killed at the end of the test."""
    with payers(topo, faucet, tmp_path, counted=(topo.upstream.ns, topo.clients[0].ns)) as start:
        yield start


def http(topo, host, url, **kw):
    return topo.call(host.ns, "http_get", url, **kw)


def delivered(topo) -> int:
    """Bytes that crossed the router between client 1 and upstream, as the endpoints saw them."""
    return topo.read_counters(topo.upstream.ns)["from_c1"] + topo.read_counters(topo.clients[0].ns)["from_up"]


def assert_captured(topo, host, service):
    splash = http(topo, host, f"{service.url}/")["body"]
    assert "<html" in splash.lower()
    # HTTP to anywhere is the portal's splash page, over IPv4 and IPv6, OS probes included.
    assert http(topo, host, f"{UP}/")["body"] == splash
    assert http(topo, host, "http://[fd77:2::2]/")["body"] == splash
    assert http(topo, host, f"{UP}/generate_204")["body"] == splash
    # Nothing else upstream: another port, IPv6, an outside DNS server (UDP and TCP).
    assert not http(topo, host, f"{UP}:8080/", timeout=1)["ok"]
    assert not http(topo, host, "http://[fd77:2::2]:8080/", timeout=1)["ok"]
    assert topo.call(host.ns, "udp_probe", "10.77.2.2", 53)["replies"] == 0
    assert topo.call(host.ns, "udp_probe", "fd77:2::2", 53)["replies"] == 0
    assert not topo.call(host.ns, "tcp_connect", "10.77.2.2", 53)["ok"]


def test_unpaid_client_is_captured(topo, router):
    service = router()
    topo.reset_counters(topo.upstream.ns)
    assert_captured(topo, topo.clients[0], service)
    assert topo.read_counters(topo.upstream.ns)["dns_any"] == 0


def test_paying_client_reaches_upstream_a_spoofer_gets_nothing(topo, router, pay):
    c, other, spoofer = topo.clients
    service = router()
    payer = pay(service, 30_000)
    payer.wait_for(r"^paid \d+ sat")
    assert http(topo, c, f"{UP}:8080/")["body"] == "UPSTREAM"
    assert http(topo, c, f"{UP}/")["body"] == "UPSTREAM"  # no more redirect
    assert topo.call(c.ns, "udp_probe", "10.77.2.2", 53)["replies"] == 3  # outside DNS now fine
    # Browsing while the payer stays one prepay step ahead of the meter.
    got = topo.call(c.ns, "download", f"{UP}:8080/bytes/2000000", idle=5, rate=2_000_000)
    assert got == {"bytes": 2_000_000, "complete": True}
    assert len(payer.payments()) >= 3 and payer.payments() == sorted(set(payer.payments()))
    assert_captured(topo, other, service)
    payer.kill()  # the channel stays open and paid ahead
    # A second device takes the paid client's IP with its own MAC: nothing of it gets through.
    topo.reset_counters(topo.upstream.ns)
    with topo.impersonating(spoofer, c.ipv4):
        topo.call(spoofer.ns, "udp_probe", "10.77.2.2", SINK, n=5, timeout=0.05)
        assert not topo.call(spoofer.ns, "tcp_connect", "10.77.2.2", 8080)["ok"]
        assert topo.read_counters(topo.upstream.ns, "packets")["sink_c1ip"] == 0
    # Control: the same datagrams from the paid client itself arrive.
    topo.call(c.ns, "udp_probe", "10.77.2.2", SINK, n=5, timeout=0.05)
    assert topo.read_counters(topo.upstream.ns, "packets")["sink_c1ip"] == 5


def test_byte_tariff_stops_within_one_packet_of_the_paid_quota(topo, router, pay):
    c = topo.clients[0]
    # One payment of the whole deposit: 5000 sat at 10000 sat/MB buys exactly 500 000 bytes.
    service = router(price_sat_per_mb=10_000, prepay_step_sat=5_000, min_deposit_sat=5_000)
    payer = pay(service, 5_000)
    payer.wait_for(r"^paid 5000 sat")
    quota = 500_000
    got = topo.call(c.ns, "download", f"{UP}:8080/bytes/5000000", idle=1.5)
    assert not got["complete"]
    total = delivered(topo)
    assert quota - MTU_PACKET < total <= quota  # upload plus download, counted at the endpoints
    assert not topo.call(c.ns, "tcp_connect", "10.77.2.2", 8080)["ok"]
    session = payer.session()  # the channel's, proven by its key
    assert session["bytes_used"] == total and session["paid"] == 5_000


def test_time_tariff_ends_at_the_paid_second(topo, router, pay):
    c = topo.clients[0]
    # 60 000 sat/minute = 1000 sat/s: one payment of the whole 4000 sat deposit buys 4 s.
    service = router(price_sat_per_mb=0, price_sat_per_minute=60_000, prepay_step_sat=4_000,
                     min_deposit_sat=4_000)
    payer = pay(service, 4_000)
    payer.wait_for(r"^paid 4000 sat")
    # The paid second: access began at the (whole) second of the first payment, which the
    # meter shows as seconds_used; asked within one wall-clock second so it is unambiguous.
    while True:
        before = time.time()
        s = payer.session()
        if int(before) == int(time.time()):
            break
    end = int(before) - s["seconds_used"] + 4
    assert s["seconds_remaining"] == end - int(before)
    r = topo.call(c.ns, "udp_until", "10.77.2.2", 7, end + 2)
    assert r["first_ok"] is not None and r["first_ok"] < end - 1.5  # it worked while paid
    assert abs(r["last_ok"] - end) <= 1.0  # and stopped at the paid second
    assert r["first_fail_after"] is not None and abs(r["first_fail_after"] - end) <= 1.0
    assert not http(topo, c, f"{UP}:8080/", timeout=1)["ok"]
    # The payer sees its deposit used and closes by itself.
    payer.wait_for(r"^closed: state settling, settlement [0-9a-f]{64}", timeout=15)
    assert payer.wait() == 0


def test_service_restart_keeps_paid_clients_online(topo, router, pay, bcoin):
    c, other = topo.clients[0], topo.clients[1]
    service = router(prepay_step_sat=2_000)
    payer = pay(service, 30_000)
    payer.wait_for(r"^paid \d+ sat")
    got = topo.call(c.ns, "download", f"{UP}:8080/bytes/1000000", idle=5, rate=2_000_000)
    assert got["complete"]
    used_before = payer.session()["bytes_used"]

    service.kill()  # SIGKILL: the kernel table stays, nobody cleans up
    assert http(topo, c, f"{UP}:8080/")["body"] == "UPSTREAM"
    service.start()  # procd respawns it
    assert http(topo, c, f"{UP}:8080/")["body"] == "UPSTREAM"
    assert not http(topo, other, f"{UP}:8080/", timeout=1)["ok"]
    assert payer.session()["bytes_used"] >= used_before  # counts carried

    # The payer rode out the outage (whether or not one of its polls fell into it): it is still
    # running, and more browsing brings more payments.
    assert payer.proc.poll() is None, payer.output()
    paid_before = payer.payments()[-1]
    mark = len(payer.lines)
    got = topo.call(c.ns, "download", f"{UP}:8080/bytes/3000000", idle=5, rate=2_000_000)
    assert got["complete"], payer.output()
    payer.wait_for(r"^paid \d+ sat", after=mark)
    assert payer.payments()[-1] > paid_before

    # Close with credit left: the unused part goes back to the client at settlement. A session
    # answer may state a kernel reading up to SESSION_READ_BUSY_AGE old: once that has passed
    # since the download, the payer (which tops up from the session) and this test see its end.
    time.sleep(SESSION_READ_BUSY_AGE + 0.5)
    deadline = time.monotonic() + 15
    while (s := payer.session())["credit"] < 1_000 and time.monotonic() < deadline:
        time.sleep(0.2)
    payer.kill()
    time.sleep(SESSION_READ_BUSY_AGE + 0.5)  # a session answer may state a reading up to this old
    s = payer.session()
    closed = payer.close()
    bcoin.mine(1, service.payout_address)
    owed = math.ceil(delivered(topo) * 1000 / 1_000_000)
    assert owed == s["owed"]
    settlement = read_settlement(bcoin, closed["settlement_txid"], 30_000, payer.refund_address,
                                 service.payout_address)
    assert settlement.confirmations == 1
    assert settlement.unused == s["paid"] - owed >= 1_000
    assert (settlement.change, settlement.payout, settlement.unused) == expected_split(
        30_000, s["paid"], owed, settlement.fee)


def test_demo_settlement_is_mined_with_exact_amounts(bcoin, faucet, tmp_path):
    with Topology(n_clients=1, gso=False) as t:
        story = run_story(t, bcoin, faucet, tmp_path, say=lambda _line: None)
    deposit, paid, delivered_bytes = story["deposit"], story["paid"], story["delivered"]
    owed = min(paid, math.ceil(delivered_bytes * 1000 / 1_000_000))
    s = read_settlement(bcoin, story["settlement"].txid, deposit, story["refund_address"], story["payout_address"])
    assert s.confirmations >= 1
    assert s.change == deposit - paid  # the client's signed change, untouched
    # Used up to the cut-off: what was prepaid but not used is under the dust limit, so it is
    # not returned but goes with the owner's share, which pays the fee.
    assert paid - owed < 546 and s.unused == 0
    assert s.payout == owed - s.fee + (paid - owed)
    assert 0 < s.fee < 1_000 and s.change + s.payout + s.unused + s.fee == deposit
    tx = bcoin.rpc("getrawtransaction", s.txid, 1)
    assert f"{tx['vin'][0]['txid']}:{tx['vin'][0]['vout']}" == story["funding"]


@pytest.mark.browser
def test_browser_in_the_client_namespace_pays_browses_and_closes(topo, router, faucet, bcoin, tmp_path):
    """A phone behind the firewall: Chromium runs in client 1's namespace, is captured, opens and
    funds a channel from the splash page (a raw tx made here), pays by itself while browsing
    upstream, closes; the settlement is mined with exact amounts."""
    c = topo.clients[0]
    deposit = 30_000
    service = router(price_sat_per_mb=1000, prepay_step_sat=2_000)
    with sync_playwright() as pw:
        browser = launch_chromium(pw, netns=c.ns, workdir=tmp_path)
        context = browser.new_context(**phone_context_args())
        page = context.new_page()
        errors = collect_errors(page)

        page.goto(f"{UP}/some/news/page")  # any web page: the firewall and portal send it to the splash
        expect(page.locator("#step-open")).to_be_visible()
        assert page.url == f"{service.url}/"
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "netns-splash.png"), full_page=True)
        refund_address = page.locator("#refund-address").input_value()
        refund_script = address_to_script(refund_address, NETWORK)
        page.fill("#deposit", str(deposit))
        page.click("#open-btn")
        expect(page.locator("#step-fund")).to_be_visible()
        channel_id = page.locator("#channel-id").inner_text().strip()
        ch = portal_call(c.ns, service.url, "channel", channel_id)
        assert ch["state"] == "awaiting_funding" and ch["refund_script"] == refund_script.hex()

        # The phone's wallet pays the deposit to the contract; its raw transaction is pasted.
        key = new_key()
        coin, _ = faucet.pay(p2wpkh_script(key.pub), deposit + 10_000)
        funding = sign_p2wpkh_spend(key, [coin], [(p2wpkh_script(key.pub), 7_000),
                                                  (bytes.fromhex(ch["funding_script"]), deposit)])
        page.fill("#funding-tx", funding.serialize().hex())
        with page.expect_download() as dl:
            page.click("#refund-link")
        assert dl.value.suggested_filename == f"refund-{channel_id}.txt"
        page.click("#submit-funding")
        expect(page.locator("#step-session")).to_be_visible()
        expect(page.locator("#s-channel")).to_have_text("open", timeout=10_000)

        # Upstream opens in another tab once the first payment is in; a 3 MB download at
        # 1000 sat/MB uses more than the first step, so the page must pay again by itself.
        # the page's channel as the router has it (its session is the page's: only its key reads it)
        first = wait_until(lambda: portal_call(c.ns, service.url, "channel", channel_id)["paid"], 15,
                           "the first payment")
        assert first == 2_000
        web = context.new_page()
        web.goto(f"{UP}:8080/")
        assert web.locator("body").inner_text().strip() == "UPSTREAM"
        got = web.evaluate("fetch('/bytes/3000000').then(r => r.arrayBuffer()).then(b => b.byteLength)")
        assert got == 3_000_000
        wait_until(lambda: portal_call(c.ns, service.url, "channel", channel_id)["paid"] > first, 15,
                   "a payment by the page")
        web.close()

        page.click("#close-btn")
        expect(page.locator("#settlement")).to_contain_text("Settled in transaction", timeout=15_000)
        s = portal_call(c.ns, service.url, "channel", channel_id)  # paid and the owed it settled for
        txid = s["settlement_txid"]
        assert txid in page.locator("#settlement").inner_text()
        context.close()
        browser.close()
    assert not errors, f"the page logged errors: {errors}"

    bcoin.mine(1, service.payout_address)
    paid, owed = s["paid"], s["owed"]
    assert paid > first and 3_000 <= owed <= paid
    settlement = read_settlement(bcoin, txid, deposit, refund_address, service.payout_address)
    assert settlement.confirmations == 1 and 0 < settlement.fee < 1_000
    assert (settlement.change, settlement.payout, settlement.unused) == expected_split(deposit, paid, owed,
                                                                                       settlement.fee)
    assert bcoin.rpc("getrawtransaction", txid, 1)["vin"][0]["txid"] == funding.GetTxid()[::-1].hex()


def wait_until(value, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (v := value()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return v


@pytest.mark.owrt
def test_owner_controls_the_hotspot_over_ubus(topo, router, pay, bcoin):
    """The ubus object of the running service on OpenWrt's own ubusd, through OpenWrt's `ubus`
    command line: status, clients, channels, reload, kick, close_channel, earnings and the
    bitmesh.* events as `ubus listen` prints them."""
    c, other = topo.clients[0], topo.clients[1]
    service = router(with_ubus=True)
    status = service.ubus_call("status")
    assert status["running"] and status["firewall"] and status["interface"] == status["device"] == topo.LAN
    assert status["chain"]["ok"] and status["chain"]["tip_height"] == bcoin.height()
    assert status["clients_online"] == 0 and status["price_sat_per_mb"] == 1000
    assert status["portal_url"] == f"{service.url}/"
    assert bcoin.api_key not in json.dumps(status)  # the RPC password is never shown
    assert service.ubus_call("clients") == {"clients": []}

    payer = pay(service, 30_000)
    payer.wait_for(r"^paid \d+ sat")
    (row,) = service.ubus_call("clients")["clients"]
    assert (row["mac"], row["ip"], row["state"], row["channel_id"]) == (c.mac, c.ipv4, "open", payer.channel_id)
    assert row["paid"] >= 500 and row["credit"] == row["paid"] - row["owed"]
    assert service.ubus_call("status")["clients_online"] == 1
    assert [ch["state"] for ch in service.ubus_call("channels")["channels"]] == ["open"]
    started = ("bitmesh.session.start", {"channel_id": payer.channel_id, "mac": c.mac, "ip": c.ipv4,
                                         "deposit": 30_000})
    wait_until(lambda: started in service.ubus_events(), 5, "the session event")  # sent within LOOP_MS

    # LuCI's Save & Apply: new prices for new channels, the paid client stays online.
    text = service.config.read_text()
    service.config.write_text(text.replace("option price_sat_per_mb '1000'", "option price_sat_per_mb '2000'"))
    assert service.ubus_call("reload") == {"reloaded": True, "restart_required": []}
    assert service.ubus_call("status")["price_sat_per_mb"] == 2000
    assert http(topo, c, f"{UP}:8080/")["body"] == "UPSTREAM"
    service.config.write_text(text.replace(service.payout_address, "nonsense"))
    refused = service.ubus_call("reload")
    assert refused["error"]["code"] == "config_invalid" and "payout_address" in refused["error"]["message"]
    assert service.ubus_call("status")["price_sat_per_mb"] == 2000  # the running config stays

    # Bad requests change nothing.
    assert service.ubus_call("kick", mac="not-a-mac")["error"]["code"] == "firewall_bad_client"
    for method, args in (("kick", {}), ("kick", {"mac": c.mac, "extra": 1}), ("status", {"verbose": 1})):
        with pytest.raises(UbusCallError) as refused:  # python3-ubus checks arguments first
            service.ubus_call(method, **args)
        assert refused.value.status == 2 and "Invalid argument" in refused.value.message
    assert service.ubus_call("kick", mac=other.mac)["error"]["code"] == "client_unknown"
    assert service.ubus_call("close_channel", channel_id="00" * 16)["error"]["code"] == "channel_unknown"
    assert http(topo, c, f"{UP}:8080/")["body"] == "UPSTREAM"

    # Kick: cut off now, settled for what was used.
    # (enough use that the owner's share pays its settlement: a few hundred sat would be uneconomic)
    assert topo.call(c.ns, "download", f"{UP}:8080/bytes/3000000", idle=5, rate=2_000_000)["complete"]
    kicked = service.ubus_call("kick", mac=c.mac.upper())
    assert kicked == {"kicked": [payer.channel_id]}
    assert not http(topo, c, f"{UP}:8080/", timeout=1)["ok"]
    payer.wait_for(r"channel closed by the router", timeout=10)
    (ch,) = service.ubus_call("channels")["channels"]
    assert ch["state"] == "settling" and ch["close_reason"] == "owner_kick" and ch["settlement_txid"]
    wait_until(lambda: len(service.ubus_events()) == 3, 5, "the stop and settlement events")
    names = [name for name, _ in service.ubus_events()]
    assert names == ["bitmesh.session.start", "bitmesh.session.stop", "bitmesh.settlement"]

    # close_channel: the owner settles a second session of the same client.
    second = pay(service, 20_000)
    second.wait_for(r"^paid \d+ sat")
    assert topo.call(c.ns, "download", f"{UP}:8080/bytes/2000000", idle=5, rate=2_000_000)["complete"]
    closed = service.ubus_call("close_channel", channel_id=second.channel_id)
    assert closed["state"] == "settling" and closed["settlement_txid"]
    assert not http(topo, c, f"{UP}:8080/", timeout=1)["ok"]
    earnings = service.ubus_call("earnings")
    assert earnings["settling_channels"] == 2 and earnings["settled_sat"] == 0

    # the owner's closes are signed at once and broadcast by the service's watch pass
    for ch in service.ubus_call("channels")["channels"]:
        wait_until(lambda ch=ch: bcoin.mempool_has(ch["settlement_txid"]), 15, "settlement in the mempool")
    bcoin.mine(1, key_address(new_key()))
    settled = {ch["settlement_txid"]: ch for ch in service.ubus_call("channels")["channels"]}
    payouts = {}
    for txid, channel in settled.items():
        deposit = channel["deposit"]
        refund = payer.refund_address if channel["channel_id"] == payer.channel_id else second.refund_address
        payouts[txid] = read_settlement(bcoin, txid, deposit, refund, service.payout_address).payout
    deadline = time.monotonic() + 15
    while (earnings := service.ubus_call("earnings"))["settled_channels"] < 2:
        assert time.monotonic() < deadline, earnings
        time.sleep(0.3)
    # the owner's share waits on the router's hold output until the settlement is in a block,
    # then moves on to the payout address: earnings count what reaches the owner
    received = {}
    for ch in service.ubus_call("channels")["channels"]:
        assert ch["state"] == "settled" and ch["payout_txid"]
        received[ch["settlement_txid"]] = read_payout(bcoin, ch["payout_txid"], service.payout_address)
        assert 0 < payouts[ch["settlement_txid"]] - received[ch["settlement_txid"]] < 1_000  # the payout's fee
    assert earnings["settled_sat"] == sum(received.values()) > 0 and earnings["settling_sat"] == 0
    assert {r["txid"]: r["payout_sat"] for r in earnings["recent"]} == received
