"""The journal: every acknowledged record survives; a torn tail is dropped; damage is loud; the
live journal stays small however many channels were ever opened (history goes to the archive,
unfunded opens write nothing, key indexes are reserved in blocks). Full flash and injected
faults: tests/test_ledger_faults.py."""

import os

import pytest
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut, lx

from bitmesh.chain.address import p2wpkh_script
from bitmesh.channel.contract import Outpoint
from bitmesh.channel.ledger import KEY_BLOCK, Ledger, LedgerCorrupt
from bitmesh.channel.state import Channel, Phase
from bitmesh.portal.client import PortalError
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.hotspot import TEST_POLICY, Hotspot, mine_to


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


# --- item 5: history leaves the live journal; opens cost no record; keys reserved in blocks ----

REFUND = b"\x00\x14" + b"\x11" * 20
PAYOUT = b"\x00\x14" + b"\x22" * 20


def _settlement(paid: int, deposit: int = 100_000) -> bytes:
    outs = [CTxOut(deposit - paid, REFUND), CTxOut(paid - 300, PAYOUT)]
    tx = CTransaction([CTxIn(COutPoint(lx("ab" * 32), 0))], outs, 0, 2)
    return tx.serialize()


def _funded(i: int, **changes) -> Channel:
    return _channel(i).evolve(id=f"ch{i:05d}", refund_script=REFUND, created_at=1000 + i, updated_at=1000 + i,
                              funding=Outpoint(f"{i:064x}", 0), **changes)


def _written() -> int:
    """Bytes this process has handed to write() so far (the ledger's appends and rewrites)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _settle_one(ledger: Ledger, i: int, payments: int = 3) -> None:
    ch = _funded(i)
    ledger.put(ch)
    for k in range(1, payments + 1):
        ch = ch.evolve(paid=k * 1_000, payment_sig=bytes([k]) * 72)
        ledger.put_payment(ch)
    ledger.put(ch.evolve(phase=Phase.SETTLED, owed=ch.paid, settlement_txid=f"{i:064x}",
                         settlement_raw=_settlement(ch.paid)))


def test_live_journal_stays_small_however_many_channels_settled(tmp_path):
    journal = tmp_path / "channels.journal"
    ledger = Ledger(journal, compact_bytes=16 * 1024)
    ledger.load()
    live = [_funded(100_000 + i, paid=500, payment_sig=b"\x07" * 72) for i in range(3)]
    for ch in live:
        ledger.put(ch)
    n = 1500
    written = _written()
    for i in range(n):
        _settle_one(ledger, i)
        # The live journal's size does not follow history: the same bound after 10 or 1500 channels.
        assert journal.stat().st_size <= 2 * 16 * 1024 + 4096, f"after {i + 1} channels"
    # Bytes written per record stay about one record: appends plus a small share of compactions
    # (the archive is written once per channel, at a compaction).
    assert (_written() - written) / (n * 5) < 2 * 400
    ledger.close()

    reloaded = Ledger(journal)
    channels = reloaded.load()
    assert {ch.id for ch in live} <= set(channels)  # nothing live was lost
    history = reloaded.history
    settled_live = [ch for ch in channels.values() if ch.phase is Phase.SETTLED]
    assert history.channels + len(settled_live) == n  # every settled channel: archived or still live
    assert history.settled_channels + len(settled_live) == n
    assert history.settled_sat + sum(ch.paid - 300 for ch in settled_live) == n * (3_000 - 300)
    # The newest archived channels are kept for the control plane, newest first.
    assert len(history.recent) == 200
    created = [a.channel.created_at for a in history.recent]
    assert created == sorted(created, reverse=True) and created[0] >= 1000 + n - 1 - len(settled_live)
    assert reloaded.key_mark >= 100_003  # above every index ever recorded
    reloaded.close()


def test_compaction_follows_the_live_size_not_a_fixed_threshold(tmp_path):
    """500 live channels (~380 KB of live state) and 1000 payments: a fixed 64 KiB threshold
    would rewrite the whole file on every payment."""
    ledger = Ledger(tmp_path / "channels.journal", compact_bytes=64 * 1024)
    ledger.load()
    channels = [_funded(i) for i in range(500)]
    for ch in channels:
        ledger.put(ch)
    written = _written()
    for k in range(1, 1001):
        ch = channels[k % 500]
        ledger.put_payment(ch.evolve(paid=k, payment_sig=b"\x01" * 72))
        # a rewrite only when the appends since the last one outweigh the live state: each byte
        # appended is rewritten about once at most
        assert _written() - written < 3 * 250 * k + 800 * 500, f"after {k} payments"
    ledger.close()
    assert len(Ledger(tmp_path / "channels.journal").load()) == 500


def test_key_index_is_reserved_in_blocks_and_never_reused_after_a_crash(tmp_path):
    ledger = Ledger(tmp_path / "j")
    ledger.load()
    ledger.reserve_key(0)
    assert ledger.appends == 1 and ledger.key_mark == KEY_BLOCK
    for index in range(1, KEY_BLOCK):
        ledger.reserve_key(index)  # inside the reserved block: no write
    assert ledger.appends == 1
    ledger.reserve_key(KEY_BLOCK)
    assert ledger.appends == 2
    ledger.close()  # "crash": no channel record was ever written
    assert Ledger(tmp_path / "j").load() == {}
    again = Ledger(tmp_path / "j")
    again.load()
    assert again.key_mark == 2 * KEY_BLOCK  # the next key handed out is above every earlier one
    again.close()


@pytest.mark.regtest
def test_unpaid_opens_write_no_channel_record_and_never_reuse_a_key(hotspot):
    journal = hotspot.state_dir / "channels.journal"
    before = journal.stat().st_size
    opened = [hotspot.portal.open_channel(bytes(new_key().pub), 50_000, key_address(new_key())) for _ in range(100)]
    # 100 opens cost two key-block records (~40 bytes each), no channel records
    assert journal.stat().st_size - before < 200
    assert hotspot.manager.ledger.appends <= 2
    # A restart (crash) forgets the unfunded opens but hands out no key twice.
    hotspot.stop()
    restarted = Hotspot.start(hotspot.node, hotspot.faucet, hotspot.state_dir)
    try:
        fresh = restarted.portal.open_channel(bytes(new_key().pub), 50_000, key_address(new_key()))
        assert fresh["server_pubkey"] not in {o["server_pubkey"] for o in opened}
        assert restarted.manager.get(fresh["channel_id"]).key_index >= 100
        with pytest.raises(PortalError) as forgotten:
            restarted.portal.channel(opened[0]["channel_id"])
        assert forgotten.value.code == "channel_unknown"
        # An open that expires unfunded leaves no record either.
        mine_to(restarted, restarted.manager.get(fresh["channel_id"]).expiry - TEST_POLICY["settle_margin_blocks"])
        size = journal.stat().st_size
        restarted.manager.watch()
        assert fresh["channel_id"] not in {ch.id for ch in restarted.manager.channels()}
        assert journal.stat().st_size == size
    finally:
        restarted.stop()


def test_control_plane_lists_and_counts_archived_channels(tmp_path, free_port):
    from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
    from bitmesh.config import load_settings
    from bitmesh.control import Control
    from bitmesh.service import build_service
    from tests.support.router import uci_config

    state = tmp_path / "state"
    keychain = ChannelKeychain(load_or_create_seed(state / "seed"))
    ledger = Ledger(state / "channels.journal", compact_bytes=8 * 1024)
    ledger.load()
    n = 400
    for i in range(n):
        _settle_one(ledger, i, payments=1)
    open_one = _funded(n, phase=Phase.OPEN, server_pubkey=bytes(keychain.key(n).pub), key_index=n)
    ledger.put(open_one)
    ledger.close()
    config = tmp_path / "config" / "bitmesh"
    config.parent.mkdir()
    config.write_text(uci_config({"enabled": 1, "network": NETWORK, "chain_backend": "esplora",
                                  "esplora_url": "http://127.0.0.1:9/api", "payout_address": key_address(new_key()),
                                  "state_dir": state}))
    service = build_service(load_settings(config), listen=[("127.0.0.1", free_port)], firewall=False)
    try:
        assert service.manager.history.channels > 300  # most of the history is archived
        control = Control(service)
        listed = control.channels()["channels"]
        assert len(listed) == 200
        assert [row["created_at"] for row in listed] == list(range(1000 + n, 1000 + n - 200, -1))
        assert listed[1]["state"] == "settled" and listed[1]["paid"] == 1_000
        earnings = control.earnings()
        assert earnings["settled_channels"] == n
        assert earnings["settled_sat"] == n * (1_000 - 300)
        assert len(earnings["recent"]) == 20 and earnings["recent"][0]["channel_id"] == f"ch{n - 1:05d}"
        # A recently archived channel still answers GET /api/channels/{id} (read only).
        assert service.manager.get(f"ch{n - 1:05d}").phase is Phase.SETTLED
    finally:
        service.manager.ledger.close()


def test_a_settled_channel_stays_live_until_its_hold_output_is_paid_out(tmp_path):
    """The settlement pays the router's hold output; the payout to the owner follows it. Until
    that payout confirms the channel must stay where watch() sees it."""
    server_pub = b"\x03" + bytes(32)
    hold = p2wpkh_script(server_pub)
    tx = CTransaction([CTxIn(COutPoint(lx("ab" * 32), 0))], [CTxOut(97_000, REFUND), CTxOut(2_700, hold)], 0, 2)
    ledger = Ledger(tmp_path / "j", compact_bytes=4096)
    ledger.load()
    held = _funded(1, server_pubkey=server_pub, paid=3_000, payment_sig=b"\x01" * 72, phase=Phase.SETTLED,
                   settlement_txid="cd" * 32, settlement_raw=tx.serialize())
    ledger.put(held)
    for i in range(2, 30):  # enough finished channels for several compactions
        _settle_one(ledger, i)
    assert ledger.holds(held.id) and ledger.history.channels > 0
    ledger.put(held.evolve(payout_txid="ef" * 32, payout_confirmed=True))
    for i in range(30, 60):
        _settle_one(ledger, i)
    assert not ledger.holds(held.id)
    assert any(a.channel.id == held.id and a.payout == 2_700 for a in ledger.history.recent)
    ledger.close()


def test_an_archive_record_keeps_what_the_owner_reads_and_drops_the_signatures():
    from bitmesh.channel.history import Archived, archive_record, archived_from_record

    ch = _funded(7, paid=5_000, owed=0, payment_sig=b"\x01" * 72, phase=Phase.CLOSED_ELSEWHERE,
                 settlement_raw=_settlement(5_000), client_mac="02:00:00:00:00:07", bytes_used=12_345)
    back = archived_from_record(archive_record(Archived(ch, 4_700)))
    assert back.payout == 4_700
    assert back.channel == ch.evolve(payment_sig=b"", settlement_raw=b"")  # owed 0 stays 0, not None
