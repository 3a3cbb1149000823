"""The uplink buyer's decisions (bitmesh/uplink/buyer.py), pure: top-ups stay ahead of use and
within the payer rule, the budget is never exceeded (over many channels, whatever the usage),
the reseller stops selling then cuts when it cannot top up, resale prices round up."""

from __future__ import annotations

import random

import pytest

from bitmesh.channel.contract import DUST_LIMIT_SAT
from bitmesh.tariff import Tariff
from bitmesh.uplink.buyer import (
    BUDGET_SPENT,
    NO_CHANNEL,
    UPSTREAM_UNREACHABLE,
    WALLET_EMPTY,
    Book,
    UplinkChannel,
    UplinkPolicy,
    channel_spent,
    cheapest,
    next_deposit,
    next_payment,
    resale_tariff,
    verdict,
)

STEP = 1_000


def _channel(deposit: int = 20_000, paid: int = 0, signed_max: int | None = None) -> UplinkChannel:
    return UplinkChannel(0, "c0", deposit, STEP, Tariff(10, 0), paid, paid if signed_max is None else signed_max)


def test_a_top_up_keeps_one_step_ahead_and_no_more():
    ch = _channel()
    assert next_payment(ch, owed=0, budget_left=10**9) == STEP  # the first step, before any use
    ch.paid = ch.signed_max = STEP
    assert next_payment(ch, owed=400, budget_left=10**9) is None  # 600 of credit: more than half a step
    assert next_payment(ch, owed=501, budget_left=10**9) == 1_501  # owed + one step, never more


def test_a_top_up_never_passes_the_budget_and_avoids_dust_change():
    ch = _channel(paid=STEP)
    assert next_payment(ch, owed=900, budget_left=300) == 1_300  # capped by the budget left
    assert next_payment(ch, owed=900, budget_left=0) is None
    assert next_payment(ch, owed=1_200, budget_left=200) is None  # would not even cover what is owed
    near_end = _channel(deposit=20_000, paid=18_800)
    assert next_payment(near_end, owed=18_700, budget_left=10**9) == 20_000  # 300 change would be dust
    assert next_payment(near_end, owed=18_700, budget_left=1_000) == 20_000 - DUST_LIMIT_SAT


@pytest.mark.parametrize("seed", range(20))
def test_the_budget_is_never_exceeded_across_channels(seed: int):
    """Clients use the uplink at random rates; the buyer tops up, opens channel after channel,
    and stops when the budget is spent. What it ever signed never passes the budget, it was
    always at most owed + one step, and selling stops before the credit is gone."""
    rnd = random.Random(seed)
    policy = UplinkPolicy(budget_sat=rnd.randrange(5_000, 80_000), deposit_sat=rnd.randrange(10_000, 30_000))
    book = Book()
    owed_total = 0  # what all the channels' meters say, together
    selling_ever_stopped = False
    for _ in range(2_000):
        ch = book.channel
        if ch is None or channel_spent(ch, min(owed_total - book.spent_closed, ch.deposit)):
            book.retire()
            deposit, why = next_deposit(policy, book, wallet_total=10**8, fee_reserve=500, min_deposit=2_000,
                                        max_deposit=10**6, prepay_step=STEP)
            if why is not None:
                assert why == BUDGET_SPENT
                v = verdict(None, 0, False, why)
                assert (v.selling, v.cut, v.reason) == (False, True, BUDGET_SPENT)
                selling_ever_stopped = True
                break
            book.channel = ch = UplinkChannel(book.next_number, f"c{book.next_number}", deposit, STEP, Tariff(10, 0))
            book.next_number += 1
            owed_total = book.spent_closed  # a new channel starts from nothing owed
        owed = owed_total - book.spent_closed
        amount = next_payment(ch, owed, book.budget_left(policy))
        if amount is not None:
            assert amount <= owed + ch.prepay_step or amount == ch.deposit  # the payer rule (dust: all)
            ch.signed_max = max(ch.signed_max, amount)  # on disk first, then sent
            assert book.committed <= policy.budget_sat
            ch.paid = amount
        v = verdict(ch, owed, amount is not None or ch.paid - owed >= ch.prepay_step // 2,
                    None if book.budget_left(policy) else BUDGET_SPENT)
        if not v.selling:
            selling_ever_stopped = True
            if v.cut:
                assert ch.paid - owed < ch.prepay_step // 4
        # the clients use up to what the upstream allows (never past what was paid)
        owed_total = book.spent_closed + min(ch.paid, owed + rnd.randrange(0, 700))
    assert book.committed <= policy.budget_sat
    assert selling_ever_stopped
    assert policy.budget_sat - book.committed < max(2_000, DUST_LIMIT_SAT) + STEP


def test_next_deposit_is_bounded_by_budget_wallet_and_upstream_limits():
    policy = UplinkPolicy(budget_sat=50_000, deposit_sat=30_000)
    book = Book(spent_closed=35_000)
    assert next_deposit(policy, book, 10**6, 500, 10_000, 10**6, STEP) == (15_000, None)  # budget left
    assert next_deposit(policy, Book(spent_closed=45_000), 10**6, 500, 10_000, 10**6, STEP) == (10_000, None)
    assert next_deposit(policy, Book(), 30_500, 500, 10_000, 10**6, STEP) == (30_000, None)  # wallet minus fee
    assert next_deposit(policy, Book(), 10**6, 500, 10_000, 25_000, STEP) == (25_000, None)  # upstream max
    assert next_deposit(policy, Book(), 30_499, 500, 10_000, 10**6, STEP) == (0, WALLET_EMPTY)
    assert next_deposit(policy, Book(spent_closed=49_001), 10**6, 500, 10_000, 10**6, STEP) == (0, BUDGET_SPENT)


def test_the_book_counts_every_signed_amount_once():
    book = Book()
    book.channel = _channel(paid=3_000, signed_max=4_000)  # one payment signed, its answer lost
    assert book.committed == 4_000 and book.budget_left(UplinkPolicy(10_000, 5_000)) == 6_000
    book.retire()
    assert book.channel is None and book.spent_closed == 4_000 and book.history[0]["signed_max"] == 4_000
    book.retire()  # nothing open: nothing counted twice
    assert book.committed == 4_000


def test_selling_stops_before_the_cut_and_the_cut_comes_before_the_credit_is_gone():
    ch = _channel(paid=5_000)
    assert verdict(ch, 4_600, True, None) == verdict(ch, 0, True, None)
    assert verdict(ch, 4_600, True, None).selling and not verdict(ch, 4_600, True, None).cut
    v = verdict(ch, 4_600, False, UPSTREAM_UNREACHABLE)  # 400 of credit: stop selling, keep serving
    assert (v.selling, v.cut, v.reason) == (False, False, UPSTREAM_UNREACHABLE)
    v = verdict(ch, 4_800, False, BUDGET_SPENT)  # 200 < a quarter step: cut the paid clients
    assert (v.selling, v.cut, v.reason) == (False, True, BUDGET_SPENT)
    assert verdict(None, 0, False, None).reason == NO_CHANNEL


def test_resale_price_is_upstream_times_the_margin_rounded_up():
    assert resale_tariff(Tariff(10, 0), 20) == Tariff(12, 0)
    assert resale_tariff(Tariff(7, 3), 10) == Tariff(8, 4)  # 7.7 -> 8, 3.3 -> 4: never below cost
    assert resale_tariff(Tariff(1, 0), 0) == Tariff(1, 0)
    assert resale_tariff(Tariff(100, 0), 250) == Tariff(350, 0)


def test_the_cheapest_offer_is_picked():
    offers = [("http://a", Tariff(10, 0)), ("http://b", Tariff(4, 5)), ("http://c", Tariff(8, 0))]
    assert cheapest(offers) == "http://c"  # b costs 9 sat per minute at 1 MB/min
    assert cheapest(offers, mb_per_minute=10) == "http://b"
    assert cheapest([]) is None
