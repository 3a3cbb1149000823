"""`bitmesh pay` holds the router to its offer: the real command against a real portal on the
regtest node, behind a proxy that makes the router lie (tests/support/faults.py LyingPortal).

- The expiry is judged against a tip the payer checks itself (`--chain-url`), or a warning says
  it trusts the router's.
- The prepay step is the offer's at open; a later answer cannot raise it.
- `owed` is paid only when the elapsed time, the bytes and the tariff fixed at open account for it.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitcoin.wallet import CKey

from bitmesh.chain.address import p2wpkh_script
from bitmesh.channel.payer import MeterBounds, OfferTerms, check_meter, offer_terms
from bitmesh.channel.state import Channel, Phase
from bitmesh.errors import ChannelError
from bitmesh.tariff import Tariff
from tests.support.coins import key_address, new_key
from tests.support.esplora_server import EsploraTestServer
from tests.support.faults import LyingPortal
from tests.support.hotspot import Hotspot, confirmed_tx

ROOT = Path(__file__).resolve().parents[1]
DEPOSIT = 30_000
STEP = 5_000  # a first step whose settlement is economic at regtest's fallback feerate


@pytest.fixture
def router(bcoin, faucet, tmp_path: Path) -> Iterator[Hotspot]:
    """The channel side on the node, without a gate (nothing metered: the offer says so)."""
    rig = Hotspot.start(bcoin, faucet, tmp_path / "state", prepay_step_sat=STEP)
    yield rig
    rig.stop()


@pytest.fixture
def liar(router: Hotspot) -> Iterator[LyingPortal]:
    proxy = LyingPortal(router.url)
    yield proxy
    proxy.close()


def run_pay(portal_url: str, hotspot: Hotspot, tmp_path: Path, *extra: str, duration: float = 3.0,
            deposit: int = DEPOSIT) -> subprocess.CompletedProcess:
    """The real `bitmesh pay`, funded from a fresh coin of the faucet."""
    secret = secrets.token_bytes(32)
    coin, _ = hotspot.faucet.pay(p2wpkh_script(CKey(secret, compressed=True).pub), deposit + 3_000)
    args = [sys.executable, "-m", "bitmesh.cli", "pay", "--portal", portal_url, "--deposit", str(deposit),
            "--refund-address", key_address(new_key()), "--fund-key", secret.hex(),
            "--coin", f"{coin.txid}:{coin.vout}:{coin.value}", "--refund-file", str(tmp_path / "refund.hex"),
            "--channel-file", str(tmp_path / "channel.json"), "--duration", str(duration), "--interval", "0.2", *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def only_channel(hotspot: Hotspot) -> Channel:
    (channel,) = hotspot.manager.channels()
    return channel


pytestmark = pytest.mark.regtest


# --- the expiry ----------------------------------------------------------------------------------


@pytest.fixture
def far_expiry(bcoin, faucet, tmp_path: Path) -> Iterator[tuple[Hotspot, LyingPortal]]:
    """A router that locks deposits for 1500 blocks (more than a payer's 1008) and hides it by
    telling a tip 1000 blocks ahead of the real one."""
    rig = Hotspot.start(bcoin, faucet, tmp_path / "state", expiry_blocks=1500, prepay_step_sat=STEP)
    proxy = LyingPortal(rig.url)
    proxy.lie("/api/offer", lambda offer: {**offer, "tip_height": offer["tip_height"] + 1000})
    yield rig, proxy
    proxy.close()
    rig.stop()


@pytest.mark.parametrize("kind", ["core", "esplora"])
def test_chain_url_judges_the_expiry_against_the_payers_own_node(far_expiry, bcoin, tmp_path: Path, kind: str):
    rig, proxy = far_expiry
    with EsploraTestServer(bcoin) as explorer:
        url = bcoin.rpc_url if kind == "core" else explorer.url
        run = run_pay(proxy.url, rig, tmp_path, "--chain-url", url, "--chain-kind", kind)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "bitmesh: expiry_out_of_range" in run.stderr and "WARNING" not in run.stderr
    channel = only_channel(rig)
    assert channel.phase is Phase.AWAITING_FUNDING and channel.funding is None  # nothing left the payer
    assert not (tmp_path / "refund.hex").exists()


def test_without_chain_url_the_payer_warns_that_it_trusts_the_routers_tip(far_expiry, tmp_path: Path):
    rig, proxy = far_expiry
    run = run_pay(proxy.url, rig, tmp_path, duration=1.0)
    assert "WARNING: no --chain-url: the channel's expiry is judged against the router's own block height" \
        in run.stderr
    # ... which is what it did: the lie passed and the deposit is locked for 1500 blocks
    assert run.returncode == 0, run.stdout + run.stderr
    channel = only_channel(rig)
    assert channel.expiry == rig.node.height() + 1500 and channel.paid == STEP


def test_honest_router_with_chain_url_pays_and_settles(router: Hotspot, bcoin, tmp_path: Path):
    run = run_pay(router.url, router, tmp_path, "--chain-url", bcoin.rpc_url, "--chain-kind", "core",
                  duration=2.0)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr
    channel = only_channel(router)
    # unmetered ("metered": false, its owed is all that was paid): one step, by the payer's own
    # clock nothing more is owed at a byte price
    assert channel.paid == STEP and channel.phase is Phase.SETTLING
    router.mine(1)
    confirmed_tx(router.node, channel.settlement_txid)


# --- the step and the meter ------------------------------------------------------------------------


def _metered(offer: dict) -> dict:
    return {**offer, "metered": True}  # the router claims to meter: its figures are checked


def test_the_step_is_the_offers_a_session_answer_cannot_raise_it(router: Hotspot, liar: LyingPortal, tmp_path):
    liar.lie("/api/offer", _metered)
    liar.lie("/api/session", lambda s: {**s, "prepay_step_sat": s["deposit"] or DEPOSIT, "owed": 0,
                                        "credit": s["paid"]})
    run = run_pay(liar.url, router, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert only_channel(router).paid == STEP  # nothing used: one step of the offer, never the deposit


def _claims(**lie):
    def rewrite(s: dict) -> dict:
        return {**s, **{k: v(s) for k, v in lie.items()}} if s["paid"] else s
    return rewrite


METER_LIES = {
    # all the credit used, though nothing was: 0 bytes at a byte price
    "owed_without_usage": _claims(owed=lambda s: s["paid"], credit=lambda s: 0),
    # a terabyte within seconds: faster than any link
    "bytes_beyond_any_link": _claims(bytes_used=lambda s: 10**12, owed=lambda s: s["paid"]),
    # an hour of access a few seconds after the first payment
    "seconds_beyond_the_clock": _claims(seconds_used=lambda s: s["seconds_used"] + 3600, owed=lambda s: s["paid"]),
}


@pytest.mark.parametrize("lie", sorted(METER_LIES))
def test_an_owed_beyond_plausibility_is_refused_and_nothing_more_is_signed(router: Hotspot, liar: LyingPortal,
                                                                           tmp_path: Path, lie: str):
    liar.lie("/api/offer", _metered)
    liar.lie("/api/session", METER_LIES[lie])
    run = run_pay(liar.url, router, tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "refused: owed_implausible" in run.stdout and "bitmesh: owed_implausible" in run.stderr
    channel = only_channel(router)
    assert channel.paid == STEP  # the first step only: the router got nothing for its claim
    assert channel.phase is Phase.SETTLING  # and the payer closed: what was paid settles


# --- the rule itself (pure) ------------------------------------------------------------------------


def test_offer_terms_are_whole_numbers_or_refused():
    offer = {"prepay_step_sat": 1_000, "tariff": {"sat_per_mb": 10, "sat_per_minute": 0}}
    assert offer_terms(offer) == OfferTerms(1_000, Tariff(10, 0), True)
    assert offer_terms({**offer, "metered": False}).metered is False
    for bad in ({"prepay_step_sat": 0}, {"prepay_step_sat": "1000"}, {"prepay_step_sat": True}, {"tariff": None},
                {"tariff": {"sat_per_mb": 0, "sat_per_minute": 0}},
                {"tariff": {"sat_per_mb": "10", "sat_per_minute": 0}},
                {"tariff": {"sat_per_mb": -1, "sat_per_minute": 5}}, {"metered": "yes"}):
        with pytest.raises(ChannelError) as e:
            offer_terms({**offer, **bad})
        assert e.value.code == "terms_malformed", bad


def test_check_meter_bounds():
    per_mb, per_min = Tariff(10, 0), Tariff(0, 60)
    report = {"owed": 0, "bytes_used": 0, "seconds_used": 0}
    assert check_meter(report, per_mb, 0, None) == 0
    ok = [
        ({"owed": 10, "bytes_used": 1_000_000, "seconds_used": 5}, per_mb, 1_000, 5.0),
        ({"owed": 11, "bytes_used": 1_000_001, "seconds_used": 5}, per_mb, 1_000, 5.0),  # a started sat is owed
        ({"owed": 15, "bytes_used": 0, "seconds_used": 15}, per_min, 1_000, 5.0),  # within the slack
        ({"owed": 5, "bytes_used": 1_000_000, "seconds_used": 5}, per_mb, 1_000, 5.0),  # billing less is fine
    ]
    for rep, tariff, signed, elapsed in ok:
        assert check_meter(rep, tariff, signed, elapsed) == rep["owed"]
    refused = [
        ({"owed": 1, "bytes_used": 0, "seconds_used": 0}, per_mb, 0, None, "owed_implausible"),
        ({"owed": 2_000, "bytes_used": 10**9, "seconds_used": 5}, per_mb, 1_000, 5.0, "owed_implausible"),
        ({"owed": 11, "bytes_used": 1_000_000, "seconds_used": 5}, per_mb, 1_000, 5.0, "owed_implausible"),
        ({"owed": 16, "bytes_used": 0, "seconds_used": 16}, per_min, 1_000, 5.0, "owed_implausible"),
        ({"owed": 10, "bytes_used": 10**10, "seconds_used": 5}, per_mb, 1_000, 5.0, "owed_implausible"),
        ({"owed": "1", "bytes_used": 0, "seconds_used": 0}, per_mb, 1_000, 5.0, "meter_malformed"),
        ({"owed": 1, "bytes_used": -1, "seconds_used": 0}, per_mb, 1_000, 5.0, "meter_malformed"),
        ({"bytes_used": 0, "seconds_used": 0}, per_mb, 1_000, 5.0, "meter_malformed"),
    ]
    for rep, tariff, signed, elapsed, code in refused:
        with pytest.raises(ChannelError) as e:
            check_meter(rep, tariff, signed, elapsed, MeterBounds())
        assert e.value.code == code, rep
