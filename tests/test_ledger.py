"""The journal: every acknowledged record survives; a torn tail is dropped; damage is loud."""

import os

import pytest

from bitmesh.channel.ledger import Ledger, LedgerCorrupt
from bitmesh.channel.state import Channel, Phase


def _channel(i: int = 0) -> Channel:
    return Channel(id=f"ch{i}", key_index=i, client_pubkey=b"\x02" + bytes(32), server_pubkey=b"\x03" + bytes(32),
                   deposit=100_000, expiry=2000, refund_script=b"\x00\x14" + bytes(20), created_at=1, phase=Phase.OPEN)


def test_replay_returns_the_last_payment_of_each_channel(tmp_path):
    ledger = Ledger(tmp_path / "j")
    ledger.load()
    a, b = _channel(0), _channel(1)
    ledger.put(a)
    ledger.put(b)
    for amount in range(1000, 11_000, 1000):
        ledger.put_payment(a.evolve(paid=amount, payment_sig=bytes([amount % 251]) * 71))
    ledger.put_payment(b.evolve(paid=7, payment_sig=b"\x01"))
    ledger.close()
    loaded = Ledger(tmp_path / "j").load()
    assert loaded["ch0"].paid == 10_000 and loaded["ch0"].payment_sig == bytes([10_000 % 251]) * 71
    assert loaded["ch1"].paid == 7
    assert os.stat(tmp_path / "j").st_mode & 0o777 == 0o600


def test_torn_last_line_is_cut_and_earlier_records_kept(tmp_path):
    ledger = Ledger(tmp_path / "j")
    ledger.load()
    ledger.put(_channel())
    ledger.put_payment(_channel().evolve(paid=5000, payment_sig=b"\x01"))
    ledger.close()
    good = (tmp_path / "j").read_bytes()
    (tmp_path / "j").write_bytes(good + b'1234abcd {"t":"pay","id":"ch0","pa')  # power cut mid-append
    reloaded = Ledger(tmp_path / "j")
    assert reloaded.load()["ch0"].paid == 5000
    assert (tmp_path / "j").read_bytes() == good
    reloaded.put_payment(_channel().evolve(paid=6000, payment_sig=b"\x02"))  # appends cleanly after the cut
    reloaded.close()
    assert Ledger(tmp_path / "j").load()["ch0"].paid == 6000


def test_damage_before_the_end_is_refused(tmp_path):
    ledger = Ledger(tmp_path / "j")
    ledger.load()
    ledger.put(_channel())
    ledger.put_payment(_channel().evolve(paid=5000, payment_sig=b"\x01"))
    ledger.close()
    data = bytearray((tmp_path / "j").read_bytes())
    data[20] ^= 0x01  # flip a bit inside the first record
    (tmp_path / "j").write_bytes(bytes(data))
    with pytest.raises(LedgerCorrupt):
        Ledger(tmp_path / "j").load()


def test_compaction_keeps_every_channel_and_shrinks_the_file(tmp_path):
    ledger = Ledger(tmp_path / "j", compact_bytes=4096)
    ledger.load()
    for i in range(3):
        ledger.put(_channel(i))
    for amount in range(1, 200):
        ledger.put_payment(_channel(1).evolve(paid=amount, payment_sig=b"\x05" * 72))
    ledger.close()
    assert (tmp_path / "j").stat().st_size < 4096
    loaded = Ledger(tmp_path / "j").load()
    assert sorted(loaded) == ["ch0", "ch1", "ch2"]
    assert loaded["ch1"].paid == 199 and loaded["ch0"].paid == 0
