"""The splash page's in-browser wallet, driven in Debian's headless Chromium (Playwright) against a
real channel portal backed by a real bcoin regtest node. Every transaction the page makes (refund,
payments) is judged by the Python server and by the node.

The same flow inside a client network namespace, behind the real firewall, is in
tests/test_hotspot_netns.py.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitcoin.core import CTransaction
from bitcoin.core.script import SIGHASH_ALL
from playwright.sync_api import Browser, Page, expect, sync_playwright

from bitmesh.chain.address import address_to_script, p2wpkh_script
from bitmesh.chain.txutil import txid_of
from bitmesh.channel import contract as c
from bitmesh.errors import BroadcastRejected
from tests.support.browser import OUTPUT, PHONE, collect_errors, launch_chromium, phone_context_args
from tests.support.coins import NETWORK, Coin, new_key, sign_p2wpkh_spend
from tests.support.esplora_server import EsploraTestServer
from tests.support.faults import LyingPortal
from tests.support.hotspot import Hotspot, confirmed_tx, mine_to

pytestmark = [pytest.mark.browser, pytest.mark.regtest]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = launch_chromium(pw)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(**phone_context_args())
    pg = context.new_page()
    errors = collect_errors(pg)
    yield pg
    context.close()
    assert not errors, f"the page logged errors: {errors}"


@pytest.fixture
def metered_hotspot(bcoin, faucet, tmp_path: Path) -> Iterator[Hotspot]:
    """A portal whose price runs fast (500 sat per second) so what is owed grows between two polls
    of the page and the wallet must keep paying on its own. It has no gate ("metered": false: its
    `owed` is all that was paid), so the page pays for the time its own clock counts."""
    rig = Hotspot.start(bcoin, faucet, tmp_path / "state", sat_per_mb=10, sat_per_minute=30_000)
    yield rig
    rig.stop()


def funding_for(hotspot: Hotspot, funding_script: bytes, deposit: int) -> CTransaction:
    """What a phone's wallet would make: a segwit spend paying the deposit at vout 1, change at 0."""
    key = new_key()
    coin, _ = hotspot.faucet.pay(p2wpkh_script(key.pub), deposit + 10_000)
    return sign_p2wpkh_spend(key, [coin], [(p2wpkh_script(key.pub), 7_000), (funding_script, deposit)])


@pytest.fixture
def explorer(bcoin) -> Iterator[EsploraTestServer]:
    """An Esplora explorer over the node (a third party the router cannot answer for)."""
    with EsploraTestServer(bcoin) as server:
        yield server


def open_channel(page: Page, hotspot: Hotspot, deposit: int, explorer: str | None = None,
                 base: str | None = None) -> dict:
    page.goto((base or hotspot.url) + "/")
    expect(page.locator("#step-open")).to_be_visible()
    page.fill("#deposit", str(deposit))
    if explorer is not None:
        page.fill("#explorer-url", explorer)
    page.click("#open-btn")
    expect(page.locator("#step-fund")).to_be_visible()
    channel_id = page.locator("#channel-id").inner_text().strip()
    ch = hotspot.portal.channel(channel_id)
    assert ch["state"] == "awaiting_funding" and ch["deposit"] == deposit
    assert page.locator("#fund-address").inner_text() == ch["funding_address"]
    assert page.locator("#bip21").get_attribute("href") == ch["bip21"]
    assert page.locator("#qr svg path").count() == 1
    return ch


def download_refund(page: Page, channel_id: str) -> bytes:
    expect(page.locator("#refund-link")).to_be_visible()
    with page.expect_download() as dl:
        page.click("#refund-link")
    download = dl.value
    assert download.suggested_filename == f"refund-{channel_id}.txt"
    return bytes.fromhex(Path(download.path()).read_text().strip())


def check_refund(raw: bytes, ch: dict, funding: c.Outpoint) -> CTransaction:
    """The page's refund: protocol 3.2 exactly, signed by the channel's client key."""
    tx = CTransaction.deserialize(raw)
    assert tx.nVersion == 2 and tx.nLockTime == ch["expiry"]
    assert len(tx.vin) == 1 and tx.vin[0].prevout == funding.to_core()
    assert tx.vin[0].nSequence == c.CONTRACT_INPUT_SEQUENCE
    assert len(tx.vout) == 1 and bytes(tx.vout[0].scriptPubKey).hex() == ch["refund_script"]
    assert 0 < ch["deposit"] - tx.vout[0].nValue < 2_000
    sig, empty, script = tx.wit.vtxinwit[0].scriptWitness.stack
    assert empty == b"" and script.hex() == ch["witness_script"]
    contract = c.Contract(bytes.fromhex(ch["server_pubkey"]), bytes.fromhex(ch["client_pubkey"]), ch["expiry"])
    unsigned = CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion)
    der, hashtype = c.split_signature(sig)
    assert hashtype == SIGHASH_ALL
    c.check_signature(contract.client_pubkey, c.contract_sighash(unsigned, contract, ch["deposit"], SIGHASH_ALL), der)
    return tx


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_splash_page_on_a_phone_shows_the_price_and_the_form(page: Page, hotspot: Hotspot):
    page.goto(hotspot.url + "/")
    expect(page.locator("#step-open")).to_be_visible()
    expect(page.locator("#price-main")).to_contain_text("10")
    expect(page.locator("#price-main")).to_contain_text("sat per MB")
    assert page.locator("#title").inner_text() == "BitMesh Wi-Fi"  # the portal's title from the offer
    assert page.locator("#deposit").get_attribute("min") == str(hotspot.policy.min_deposit_sat)
    assert page.locator("#deposit").get_attribute("max") == str(hotspot.policy.max_deposit_sat)
    refund_address = page.locator("#refund-address").input_value()
    assert re.fullmatch(r"rb1q[02-9ac-hj-np-z]{38}", refund_address)
    address_to_script(refund_address, NETWORK)
    # the page fits a phone's width: nothing scrolls sideways
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "splash.png"), full_page=True)
    # plain-words errors: an address of another network is refused before the router sees it
    page.fill("#refund-address", "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4")
    page.click("#open-btn")
    expect(page.locator("#error")).to_contain_text("not a valid address on regtest-bcoin")
    assert hotspot.manager.channels() == []
    page.fill("#refund-address", refund_address)
    page.fill("#deposit", str(hotspot.policy.max_deposit_sat + 1))
    page.click("#open-btn")
    expect(page.locator("#error")).to_contain_text("The deposit must be a whole number")
    assert hotspot.manager.channels() == []


def test_page_opens_at_the_price_it_showed_or_not_at_all(page: Page, hotspot: Hotspot):
    """The page names the offer's tariff in its open: a price that moved between its read of the
    offer and the open (demand pricing) is refused with price_changed, nothing is opened, the page
    shows the new price, and opening again gets a channel at the price now shown."""
    page.goto(hotspot.url + "/")
    shown = hotspot.manager.policy.sat_per_mb
    expect(page.locator("#price-main")).to_contain_text(f"{shown} sat per MB")
    hotspot.manager.policy = dataclasses.replace(hotspot.manager.policy, sat_per_mb=shown + 7)
    page.click("#open-btn")
    expect(page.locator("#error")).to_contain_text("The price changed while the channel was opening")
    assert hotspot.manager.channels() == []
    expect(page.locator("#price-main")).to_contain_text(f"{shown + 7} sat per MB")
    page.click("#open-btn")
    expect(page.locator("#step-fund")).to_be_visible()
    (channel,) = hotspot.manager.channels()
    assert (channel.sat_per_mb, channel.sat_per_minute) == (shown + 7, hotspot.manager.policy.sat_per_minute)


def test_whole_splash_flow_pays_automatically_survives_a_reload_and_settles_exactly(
        page: Page, metered_hotspot: Hotspot, explorer: EsploraTestServer):
    hotspot = metered_hotspot
    deposit = 100_000
    page.goto(hotspot.url + "/")
    refund_script = address_to_script(page.locator("#refund-address").input_value(), NETWORK)
    ch = open_channel(page, hotspot, deposit, explorer=explorer.url)
    channel_id = ch["channel_id"]
    # the expiry was judged against the explorer's height, and the page says so
    expect(page.locator("#tip-note")).to_have_text(
        f"Expiry checked against block {hotspot.node.height()} from {explorer.url.removeprefix('http://')}.")
    assert ch["refund_script"] == refund_script.hex()
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "splash-fund.png"), full_page=True)

    funding_tx = funding_for(hotspot, bytes.fromhex(ch["funding_script"]), deposit)
    funding = c.Outpoint(txid_of(funding_tx), 1)
    expect(page.locator("#submit-funding")).to_be_disabled()
    expect(page.locator("#refund-link")).to_be_hidden()
    page.fill("#funding-tx", funding_tx.serialize().hex())
    expect(page.locator("#funding-info")).to_contain_text(f"{funding.txid}:1")
    refund = check_refund(download_refund(page, channel_id), ch, funding)
    expect(page.locator("#submit-funding")).to_be_enabled()
    assert hotspot.manager.get(channel_id).funding is None  # nothing left the page before the refund

    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # long txids wrap
    page.click("#submit-funding")
    expect(page.locator("#step-session")).to_be_visible()
    assert str(hotspot.manager.get(channel_id).funding) == str(funding)
    # the refund spends the funding but is not final before the expiry
    with pytest.raises(BroadcastRejected):
        hotspot.chain.broadcast(refund.serialize())
    assert "non-final" in (hotspot.node.reject_reason(txid_of(refund)) or "")

    # the page pays by itself as the meter runs: at least two payments, each within owed + step
    seen: list[int] = []

    def paid_values():
        paid = hotspot.manager.get(channel_id).paid
        if paid and (not seen or seen[-1] != paid):
            seen.append(paid)
        return len(seen) >= 2

    wait_for(paid_values, 20, "two automatic payments")
    assert seen[0] == hotspot.policy.prepay_step_sat and seen[1] > seen[0]
    expect(page.locator("#s-session")).not_to_have_text("—")
    expect(page.locator("#s-channel")).to_have_text("open")
    page.screenshot(path=str(OUTPUT / "splash-session.png"), full_page=True)

    # a reload resumes the same channel from localStorage and keeps paying
    before = hotspot.manager.get(channel_id).paid
    page.reload()
    expect(page.locator("#step-session")).to_be_visible()
    stored = page.evaluate("JSON.parse(localStorage.getItem('bitmesh.wallet.v1'))")
    assert stored["channelId"] == channel_id and stored["refund"]["hex"] == refund.serialize().hex()
    wait_for(lambda: hotspot.manager.get(channel_id).paid > before, 20, "a payment after the reload")
    assert len(hotspot.manager.channels()) == 1

    page.click("#close-btn")
    expect(page.locator("#settlement")).to_contain_text("Settled in transaction")
    channel = hotspot.manager.get(channel_id)
    assert channel.settlement_txid and channel.settlement_txid in page.locator("#settlement").inner_text()
    expect(page.locator("#forget-btn")).to_be_visible()
    paid, owed = channel.paid, channel.owed
    assert owed is not None and 0 < owed <= paid < deposit

    hotspot.mine(1)
    tx = confirmed_tx(hotspot.node, channel.settlement_txid)
    outs = [(o.nValue, bytes(o.scriptPubKey)) for o in tx.vout]
    fee = deposit - sum(v for v, _ in outs)
    unused = paid - owed
    assert 0 < fee < 2_000
    assert outs[0] == (deposit - paid, refund_script)  # the change the page signed, exactly
    # the owner's share, less the fee, to the router (its script is the router's business)
    owner_value, owner_script = outs[1]
    assert owner_script != refund_script
    if unused >= c.DUST_LIMIT_SAT:
        assert (owner_value, outs[2:]) == (owed - fee, [(unused, refund_script)])
    else:
        assert (owner_value, outs[2:]) == (paid - fee, [])  # a dust remainder goes to the fee

    page.click("#forget-btn")
    expect(page.locator("#step-open")).to_be_visible()
    archived = page.evaluate("JSON.parse(localStorage.getItem('bitmesh.archive.v1'))")
    assert any(e.get("id") == channel_id and e.get("channelSecret") for e in archived)


def test_refund_from_the_page_is_kept_across_a_reload_and_mined_after_expiry(page: Page, hotspot: Hotspot):
    deposit = 60_000
    ch = open_channel(page, hotspot, deposit)  # no explorer set: on a test chain, the router's height, said so
    channel_id = ch["channel_id"]
    expect(page.locator("#tip-note")).to_contain_text("as the router tells it")
    script = bytes.fromhex(ch["funding_script"])

    # a funding the node refuses (its coin does not exist): the router's error is shown in words
    key = new_key()
    fake = sign_p2wpkh_spend(key, [Coin("ab" * 32, 0, deposit + 5_000, p2wpkh_script(key.pub))], [(script, deposit)])
    page.fill("#funding-tx", fake.serialize().hex())
    download_refund(page, channel_id)
    page.click("#submit-funding")
    expect(page.locator("#error")).to_contain_text("refused the funding transaction")
    expect(page.locator("#step-fund")).to_be_visible()

    funding_tx = funding_for(hotspot, script, deposit)
    funding = c.Outpoint(txid_of(funding_tx), 1)
    page.fill("#funding-tx", funding_tx.serialize().hex())
    refund_raw = download_refund(page, channel_id)
    page.reload()  # the pasted funding and its refund survive a reload
    expect(page.locator("#step-fund")).to_be_visible()
    assert download_refund(page, channel_id) == refund_raw
    stored = page.evaluate("JSON.parse(localStorage.getItem('bitmesh.wallet.v1'))")
    assert set(stored["refunds"]) == {txid_of(fake), funding.txid}
    page.click("#submit-funding")
    expect(page.locator("#step-session")).to_be_visible()
    wait_for(lambda: hotspot.manager.get(channel_id).paid, 10, "the first payment")

    refund = check_refund(refund_raw, ch, funding)
    mine_to(hotspot, ch["expiry"] - 1)
    with pytest.raises(BroadcastRejected):
        hotspot.chain.broadcast(refund.serialize())
    mine_to(hotspot, ch["expiry"])
    txid = hotspot.chain.broadcast(refund.serialize())
    hotspot.mine(1)
    mined = confirmed_tx(hotspot.node, txid)
    assert bytes(mined.vout[0].scriptPubKey).hex() == ch["refund_script"]
    assert mined.vout[0].nValue == refund.vout[0].nValue


# --- a router that lies to the page --------------------------------------------------------------


def fund_through_page(page: Page, hotspot: Hotspot, ch: dict) -> None:
    funding_tx = funding_for(hotspot, bytes.fromhex(ch["funding_script"]), ch["deposit"])
    page.fill("#funding-tx", funding_tx.serialize().hex())
    download_refund(page, ch["channel_id"])
    page.click("#submit-funding")
    expect(page.locator("#step-session")).to_be_visible()


@pytest.fixture
def far_expiry(bcoin, faucet, tmp_path: Path) -> Iterator[tuple[Hotspot, LyingPortal]]:
    """A router that locks deposits for 1500 blocks (more than the page's 1008) and hides it by
    telling a tip 1000 blocks ahead of the real one."""
    rig = Hotspot.start(bcoin, faucet, tmp_path / "state", expiry_blocks=1500)
    proxy = LyingPortal(rig.url)
    proxy.lie("/api/offer", lambda offer: {**offer, "tip_height": offer["tip_height"] + 1000})
    yield rig, proxy
    proxy.close()
    rig.stop()


def test_page_judges_the_expiry_by_the_explorer_not_the_routers_word(
        page: Page, far_expiry, explorer: EsploraTestServer):
    hotspot, liar = far_expiry
    page.goto(liar.url + "/")
    expect(page.locator("#step-open")).to_be_visible()
    page.fill("#deposit", "50000")
    page.fill("#explorer-url", explorer.url)
    page.click("#open-btn")
    real = hotspot.node.height()
    expect(page.locator("#error")).to_contain_text(
        f"The channel would expire at block {real + 1500}, outside {real + 6} to {real + 1008}.")
    expect(page.locator("#step-open")).to_be_visible()  # nothing to fund: the page never went on
    assert page.evaluate("localStorage.getItem('bitmesh.wallet.v1')") is None
    assert page.evaluate("JSON.parse(localStorage.getItem('bitmesh.explorer.v1'))") == {NETWORK: explorer.url}
    # the explorer the user set is kept for the next visit
    page.reload()
    expect(page.locator("#explorer-url")).to_have_value(explorer.url)
    # on this test chain without an explorer, the router's word is all there is, and the lie passes
    page.fill("#explorer-url", "")
    page.click("#open-btn")
    expect(page.locator("#step-fund")).to_be_visible()
    expect(page.locator("#tip-note")).to_contain_text(f"block {real + 1000} as the router tells it")


@pytest.fixture
def liar(hotspot: Hotspot) -> Iterator[LyingPortal]:
    """The hotspot behind a proxy whose offer claims a meter (so its figures are checked)."""
    proxy = LyingPortal(hotspot.url)
    proxy.lie("/api/offer", lambda offer: {**offer, "metered": True})
    yield proxy
    proxy.close()


def _paid_after_polls(hotspot: Hotspot, channel_id: str, polls: int = 3) -> int:
    wait_for(lambda: hotspot.manager.get(channel_id).paid, 10, "the first payment")
    time.sleep(polls * 2.1)  # the page polls the session every 2 s
    return hotspot.manager.get(channel_id).paid


def test_page_keeps_the_prepay_step_of_the_offer(page: Page, hotspot: Hotspot, liar: LyingPortal,
                                                 explorer: EsploraTestServer):
    # every session answer asks for the whole deposit as the step (and nothing is used)
    liar.lie("/api/session", lambda s: {**s, "prepay_step_sat": s["deposit"] or 100_000, "owed": 0,
                                        "credit": s["paid"]})
    ch = open_channel(page, hotspot, 100_000, explorer=explorer.url, base=liar.url)
    fund_through_page(page, hotspot, ch)
    assert _paid_after_polls(hotspot, ch["channel_id"]) == hotspot.policy.prepay_step_sat


def test_page_refuses_an_owed_its_router_cannot_account_for(page: Page, hotspot: Hotspot, liar: LyingPortal,
                                                           explorer: EsploraTestServer):
    # after the first payment the router says all of it is used, though it measured nothing
    liar.lie("/api/session", lambda s: {**s, "owed": s["paid"], "credit": 0})
    ch = open_channel(page, hotspot, 100_000, explorer=explorer.url, base=liar.url)
    fund_through_page(page, hotspot, ch)
    assert _paid_after_polls(hotspot, ch["channel_id"]) == hotspot.policy.prepay_step_sat
    expect(page.locator("#error")).to_contain_text("The router says 1000 sat are owed, but what it measured costs "
                                                   "0 sat at the price agreed when the channel opened. "
                                                   "This page does not pay it.")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "splash-owed-refused.png"), full_page=True)


def test_page_reads_its_session_by_proof_and_shows_concurrent_use(page: Page, hotspot: Hotspot, liar: LyingPortal,
                                                                  explorer: EsploraTestServer):
    """The page reads its channel's session with its key's proof (the proxy only alters 200 answers:
    a refused proof would show nothing) and tells its user when the router saw two devices answer
    for its addresses (a MAC+IP copy spending its credit), with what to do."""
    sightings = {"detected": True, "checked_at": 1_700_000_100, "first_seen": 1_700_000_000,
                 "last_seen": 1_700_000_100, "times": 3, "most_answers": 2}
    liar.lie("/api/session", lambda s: {**s, "concurrent_use": sightings} if "channel_id" in s else s)
    ch = open_channel(page, hotspot, 100_000, explorer=explorer.url, base=liar.url)
    expect(page.locator("#concurrent")).to_be_hidden()
    fund_through_page(page, hotspot, ch)
    box = page.locator("#concurrent")
    expect(box).to_be_visible(timeout=10_000)
    expect(box).to_contain_text("Another device is using this connection: 2 devices answered the router")
    expect(box).to_contain_text("(3 times, last at")
    expect(box).to_contain_text('WPA3 "OWE"')
