"""Tariff arithmetic: owed rounds up, allowances never give more than was paid for."""

import pytest

from bitmesh.errors import ConfigError
from bitmesh.tariff import Tariff


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


@pytest.mark.parametrize("paid, used_b, used_s", [(1_000, 0, 0), (1_000, 30_000_000, 120), (5_000, 1, 1)])
def test_combined_tariff_limits_come_from_the_remaining_credit(paid, used_b, used_s):
    t = Tariff(sat_per_mb=10, sat_per_minute=6)
    a = t.allowance(paid, used_b, used_s)
    credit = paid - t.owed(used_b, used_s)
    assert t.owed(a.total_bytes, used_s) <= paid  # spending all credit on bytes stays within paid
    assert t.owed(used_b, a.total_seconds) <= paid
    assert a.total_bytes - used_b == credit * 100_000


def test_no_price_is_a_config_error():
    with pytest.raises(ConfigError):
        Tariff(0, 0)
    with pytest.raises(ConfigError):
        Tariff(-1, 5)
