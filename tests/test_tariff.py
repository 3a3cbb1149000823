"""Tariff arithmetic: owed rounds up, allowances never give more than was paid for, and the
billing clock runs only while the client has credit."""

import pytest

from bitmesh.channel.state import Channel, Phase
from bitmesh.errors import ConfigError
from bitmesh.tariff import Tariff, clock_origin, seconds_billed

DEFAULT = Tariff(sat_per_mb=1, sat_per_minute=10)  # files/etc/config/bitmesh ships this tariff


def test_byte_tariff_owes_per_started_satoshi_and_allows_exactly_what_is_paid():
    t = Tariff(sat_per_mb=10)
    assert t.owed(0, 999) == 0
    assert t.owed(1, 0) == 1  # a started satoshi
    assert t.owed(100_000, 0) == 1 and t.owed(100_001, 0) == 2
    assert t.allowance(1_000, 0, 0).total_bytes == 100_000_000
    assert t.allowance(1_000, 0, 0).total_seconds is None
    assert t.owed(t.allowance(1_234, 0, 0).total_bytes, 0) == 1_234


def test_time_tariff():
    t = Tariff(sat_per_minute=60)  # 1 sat a second
    assert t.owed(10**9, 30) == 30
    assert t.allowance(90, 0, 0).total_seconds == 90
    assert t.allowance(90, 0, 0).total_bytes is None
    assert Tariff(sat_per_minute=7).allowance(100, 0, 0).total_seconds == 857  # floor: never more


@pytest.mark.parametrize("tariff", [DEFAULT, Tariff(10, 6), Tariff(1_000, 60_000), Tariff(7, 0), Tariff(0, 13)])
@pytest.mark.parametrize("paid, used_b, used_s", [(1_000, 0, 0), (1_000, 30_000_000, 120), (5_000, 1, 1),
                                                  (3, 123_457, 7), (100, 0, 600), (100, 100_000_000, 0)])
def test_each_limit_is_exact_given_the_other(tariff, paid, used_b, used_s):
    """Spending every remaining satoshi on bytes (or on time) stays within `paid`, and one more
    byte (or second) would not: the kernel's limits give exactly what was paid for."""
    a = tariff.allowance(paid, used_b, used_s)
    if tariff.sat_per_mb:
        if tariff.owed(used_b, used_s) <= paid:
            assert tariff.owed(a.total_bytes, used_s) <= paid < tariff.owed(a.total_bytes + 1, used_s)
        else:
            assert a.total_bytes <= used_b  # already past it: nothing left
    if tariff.sat_per_minute:
        if tariff.owed(used_b, used_s) <= paid:
            assert tariff.owed(used_b, a.total_seconds) <= paid < tariff.owed(used_b, a.total_seconds + 1)


def test_combined_allowance_keeps_the_fraction_of_a_started_satoshi():
    # 1 byte and 1 second cost 6 000 600 / 60 000 000 sat: one satoshi is started, not used up.
    t = Tariff(sat_per_mb=10, sat_per_minute=6)
    assert t.owed(1, 1) == 1
    assert t.allowance(5_000, 1, 1).total_bytes == 499_990_000  # not 1 + 4 999 x 100 000


def test_no_price_is_a_config_error():
    with pytest.raises(ConfigError):
        Tariff(0, 0)
    with pytest.raises(ConfigError):
        Tariff(-1, 5)


# --- the billing clock -------------------------------------------------------------------------


def _channel(tariff: Tariff = DEFAULT, **kw) -> Channel:
    base = dict(id="c1", key_index=0, client_pubkey=b"\x02" * 33, server_pubkey=b"\x03" * 33, deposit=200_000,
                expiry=2_000, refund_script=b"\x00\x14" + b"\x01" * 20, created_at=1, phase=Phase.OPEN,
                sat_per_mb=tariff.sat_per_mb, sat_per_minute=tariff.sat_per_minute, client_mac="02:00:00:00:00:01",
                client_ip="10.0.0.5")
    return Channel(**{**base, **kw})


def test_an_hour_cut_off_is_not_billed_and_a_top_up_buys_its_full_worth():
    """The issue's case, shipped tariff (1 sat/MB, 10 sat/min): 100 sat buy 10 minutes; the client
    stays cut off an hour, then pays 100 more."""
    t0 = 1_700_000_000
    ch = _channel(paid=100, access_started_at=t0)
    assert seconds_billed(ch, t0 + 300) == 300  # within its credit the clock runs
    assert seconds_billed(ch, t0 + 600) == 600
    gap_end = t0 + 600 + 3_600
    assert seconds_billed(ch, gap_end) == 600  # stopped where the credit ran out: the hour is free
    assert DEFAULT.owed(0, seconds_billed(ch, gap_end)) == 100  # not 700 (the old bill, capped at paid)
    # The top-up restarts the clock where it stopped...
    origin = clock_origin(ch, gap_end)
    assert origin == gap_end - 600
    topped = ch.evolve(paid=200, access_started_at=origin)
    # ...so it buys 10 whole minutes from the moment it is paid.
    assert seconds_billed(topped, gap_end) == 600
    assert seconds_billed(topped, gap_end + 599) == 1_199
    assert seconds_billed(topped, gap_end + 600) == seconds_billed(topped, gap_end + 5_000) == 1_200
    assert DEFAULT.allowance(200, 0, 600).total_seconds - 600 == 600


def test_a_client_within_its_credit_keeps_its_origin():
    t0 = 1_700_000_000
    ch = _channel(paid=100, access_started_at=t0)
    assert clock_origin(ch, t0 + 599) == t0
    assert clock_origin(_channel(paid=0), t0 + 5) == t0 + 5  # the first payment starts the clock


def test_bytes_used_stop_the_clock_earlier():
    # 100 sat at 1 sat/MB + 10 sat/min: after 40 MB (40 sat), 60 sat of time are left: 6 minutes.
    t0 = 1_700_000_000
    ch = _channel(paid=100, access_started_at=t0, bytes_used=40_000_000)
    assert seconds_billed(ch, t0 + 10_000) == 360
    assert DEFAULT.owed(40_000_000, 360) == 100


def test_the_clock_never_goes_back_and_stands_still_when_not_running():
    t0 = 1_700_000_000
    # a reading past what the credit now covers (bytes counted after it): kept, never reduced
    ch = _channel(paid=100, access_started_at=t0, bytes_used=90_000_000, seconds_used=200)
    assert seconds_billed(ch, t0 + 1_000) == 200
    assert seconds_billed(ch, None) == 200  # a closed channel's clock does not run
    assert seconds_billed(_channel(Tariff(sat_per_mb=10), paid=100, access_started_at=t0), t0 + 9_999) == 9_999
