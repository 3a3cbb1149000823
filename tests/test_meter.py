"""The meter's decisions, pure: what a reading bills, when the credit is used up, and which of a
device's channels its kernel grant (and count) belongs to."""

from __future__ import annotations

from bitmesh.channel.state import Channel, Phase
from bitmesh.meter import device_holders, read_usage

T0 = 1_700_000_000
MAC = "02:00:00:00:00:01"


def _channel(sat_per_mb: int = 1, sat_per_minute: int = 10, **kw) -> Channel:
    base = dict(id="c1", key_index=0, client_pubkey=b"\x02" * 33, server_pubkey=b"\x03" * 33, deposit=200_000,
                expiry=2_000, refund_script=b"\x00\x14" + b"\x01" * 20, created_at=1, phase=Phase.OPEN,
                sat_per_mb=sat_per_mb, sat_per_minute=sat_per_minute, client_mac=MAC, client_ip="10.0.0.5")
    return Channel(**{**base, **kw})


def test_combined_tariff_reading_stops_billing_time_when_the_credit_is_gone():
    ch = _channel(paid=100, access_started_at=T0)
    r = read_usage(ch, T0 + 300, kernel_bytes=20_000_000)  # 20 MB = 20 sat, 5 min = 50 sat
    assert (r.bytes_used, r.seconds_used, r.owed) == (20_000_000, 300, 70)
    assert (r.bytes_left, r.seconds_left) == (30_000_000, 180) and not r.exhausted
    later = read_usage(ch, T0 + 3_600, kernel_bytes=20_000_000)  # cut off for most of an hour
    assert (later.seconds_used, later.owed, later.seconds_left) == (480, 100, 0) and later.exhausted


def test_owed_never_exceeds_paid_and_counts_never_go_down():
    ch = _channel(sat_per_minute=0, paid=1_000, access_started_at=T0, bytes_used=900_000_000)
    r = read_usage(ch, T0 + 5, kernel_bytes=10)  # a kernel count behind the ledger's: the ledger's stays
    assert r.bytes_used == 900_000_000 and r.owed == 900 and r.bytes_left == 100_000_000
    over = read_usage(ch, T0 + 5, kernel_bytes=1_000_001_500)  # one packet past the quota
    assert over.owed == 1_000 and over.bytes_left == 0 and over.exhausted
    assert over.seconds_left is None and over.seconds_used == 5  # time is free, only counted


def test_time_only_tariff_reading():
    ch = _channel(sat_per_mb=0, sat_per_minute=60, paid=90, access_started_at=T0)
    assert read_usage(ch, T0 + 30).seconds_left == 60
    r = read_usage(ch, T0 + 1_000)
    assert (r.seconds_used, r.owed, r.seconds_left, r.exhausted) == (90, 90, 0, True)


def test_unpaid_and_closed_channels():
    assert read_usage(_channel(paid=0), T0).owed == 0  # nothing paid: the clock never started
    closed = _channel(phase=Phase.SETTLING, paid=500, access_started_at=T0, bytes_used=3_000_000, seconds_used=60)
    r = read_usage(closed, None)  # no longer open: its clock stands still at its last reading
    assert (r.seconds_used, r.owed) == (60, 13)  # 3 MB and one minute


def test_a_device_is_granted_and_billed_through_its_oldest_open_paid_channel():
    older = _channel(id="a", created_at=10, paid=1_000)
    newer = _channel(id="b", created_at=20, paid=1_000)
    other = _channel(id="c", created_at=5, paid=1_000, client_mac="02:00:00:00:00:02", client_ip="10.0.0.6")
    unpaid = _channel(id="d", created_at=1, paid=0)
    settling = _channel(id="e", created_at=2, paid=1_000, phase=Phase.SETTLING)
    no_mac = _channel(id="f", created_at=3, paid=1_000, client_mac="", client_ip="10.0.0.7")
    holders = device_holders([newer, older, other, unpaid, settling, no_mac])
    assert {mac: ch.id for mac, ch in holders.items()} == {MAC: "a", "02:00:00:00:00:02": "c"}
    assert device_holders([newer, settling]) == {MAC: newer}  # the older one closed: the newer takes over
