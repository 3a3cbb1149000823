"""Channel figures: payment updates validated and durably stored per second beside the bare
ECDSA verify rate (their ratio is what parsing, checks and the journal cost), measured
interleaved in rounds on one machine state and given as medians with their spread (min, max);
the bytes each payment makes the process write (our journal vs SQLite, WAL, synchronous=FULL);
and the journal with a long history: its live size after thousands of finished channels, the
bytes written per payment then, per unpaid open and per archived channel."""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut, lx
from bitcoin.wallet import CKey

from bitmesh.chain.address import p2wpkh_script
from bitmesh.chain.base import ChainBackend, OutSpend, TxStatus
from bitmesh.channel import contract as c
from bitmesh.channel import wire
from bitmesh.channel.keys import ChannelKeychain
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.payer import PayerChannel
from bitmesh.channel.server import ChannelPolicy
from bitmesh.channel.state import Channel, Phase

ROUNDS = 31  # interleaved: verify batch, update batch, verify batch, ...
PER_ROUND = 120
N_PAYMENTS = ROUNDS * PER_ROUND
HISTORY = 2000  # finished channels in the history scenario
UNPAID_OPENS = 1000


class FixedTip(ChainBackend):
    """The payment path reads only the cached tip; anything else would be a bench bug."""

    def tip_height(self) -> int:
        return 1000

    def median_time_past(self) -> int:
        return 1_700_000_000

    def get_tx(self, txid: str) -> TxStatus | None:
        raise AssertionError("payment path touched the chain")

    def get_outspend(self, txid: str, vout: int) -> OutSpend:
        raise AssertionError("payment path touched the chain")

    def broadcast(self, raw: bytes) -> str:
        raise AssertionError("payment path touched the chain")

    def estimate_feerate(self, target_blocks: int = 6) -> float:
        raise AssertionError("payment path touched the chain")


def _written_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def _setup(state_dir: Path, compact_bytes: int | None = None) -> tuple[ChannelManager, Channel, PayerChannel]:
    keychain = ChannelKeychain(bytes(32))
    client = CKey(bytes(range(1, 33)))
    refund = p2wpkh_script(client.pub)
    policy = ChannelPolicy(network="regtest-bcoin", payout_script=refund, max_deposit_sat=10_000_000)
    deposit = 10_000_000
    channel = Channel(id="bench", key_index=0, client_pubkey=bytes(client.pub),
                      server_pubkey=bytes(keychain.key(0).pub), deposit=deposit, expiry=5000,
                      refund_script=refund, created_at=0, phase=Phase.OPEN, funding=c.Outpoint("ab" * 32, 0))
    journal = state_dir / "channels.journal"
    ledger = Ledger(journal)
    ledger.load()
    ledger.put(channel)
    ledger.close()
    ledger = Ledger(journal) if compact_bytes is None else Ledger(journal, compact_bytes=compact_bytes)
    manager = ChannelManager(policy, ledger, keychain, FixedTip())
    manager.chain_view(refresh=True)
    payer = PayerChannel(channel.contract, client, deposit, refund)
    payer.prepare_refund(channel.funding, 2.0)
    return manager, channel, payer


def _signed(payer: PayerChannel, amounts: range) -> list[bytes]:
    """Signed in advance: the bench times the router, not the payer."""
    return [json.dumps(payer.payment_message(a)).encode() for a in amounts]


def _verify_rate(n: int) -> float:
    key = CKey(bytes(range(2, 34)))
    digest = bytes(range(32))
    sig = key.sign(digest)
    pub = key.pub
    start = time.perf_counter()
    for _ in range(n):
        pub.verify(digest, sig)
    return n / (time.perf_counter() - start)


def _update_rate(manager: ChannelManager, channel_id: str, bodies: list[bytes]) -> float:
    start = time.perf_counter()
    for body in bodies:
        manager.pay(channel_id, wire.parse_payment(wire.parse_json(body)))
    return len(bodies) / (time.perf_counter() - start)


def _bench_updates(state_dir: Path) -> dict[str, float]:
    """Rounds of (verify batch, update batch) on one core: each round's ratio is taken on the
    same machine state; the median and the spread of the rounds are reported."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(allowed)})  # one core, as a router's: no migrations mid-round
    try:
        return _rounds(state_dir)
    finally:
        os.sched_setaffinity(0, allowed)


def _rounds(state_dir: Path) -> dict[str, float]:
    # No compaction inside the timed rounds, so the record size can be read off the file.
    manager, channel, payer = _setup(state_dir, compact_bytes=64 * 1024 * 1024)
    bodies = _signed(payer, range(100, (N_PAYMENTS + 1) * 100, 100))
    journal = state_dir / "channels.journal"
    size0, io0 = journal.stat().st_size, _written_bytes()
    verify, updates, ratios = [], [], []
    for r in range(ROUNDS):
        v = _verify_rate(PER_ROUND)
        u = _update_rate(manager, channel.id, bodies[r * PER_ROUND:(r + 1) * PER_ROUND])
        verify.append(v)
        updates.append(u)
        ratios.append(u / v)
    io_bytes = _written_bytes() - io0
    assert manager.get(channel.id).paid == N_PAYMENTS * 100
    record_bytes = (journal.stat().st_size - size0) / N_PAYMENTS
    manager.ledger.close()
    return {
        "channel.updates_per_s": round(statistics.median(updates), 1),
        "channel.updates_per_s_min": round(min(updates), 1),
        "channel.updates_per_s_max": round(max(updates), 1),
        "channel.verify_per_s": round(statistics.median(verify), 1),
        "channel.verify_per_s_min": round(min(verify), 1),
        "channel.verify_per_s_max": round(max(verify), 1),
        "channel.updates_to_verify_ratio": round(statistics.median(ratios), 3),
        "channel.updates_to_verify_ratio_min": round(min(ratios), 3),
        "channel.updates_to_verify_ratio_max": round(max(ratios), 3),
        "channel.bench_rounds": ROUNDS,
        "channel.journal_record_bytes": round(record_bytes, 1),
        "channel.journal_write_bytes_per_payment": round(io_bytes / N_PAYMENTS, 1),
    }


def _settlement(channel: Channel, paid: int, payout_script: bytes) -> bytes:
    outs = [CTxOut(channel.deposit - paid, channel.refund_script), CTxOut(paid - 300, payout_script)]
    return CTransaction([CTxIn(COutPoint(lx(channel.funding.txid), 0))], outs, 0, 2).serialize()


def _bench_history(state_dir: Path) -> dict[str, float]:
    """Unpaid opens, then HISTORY channels each funded, paid 5 times and settled, all through
    the manager's ledger with its default compaction; then payments on a live channel."""
    manager, channel, payer = _setup(state_dir)
    ledger = manager.ledger
    journal = state_dir / "channels.journal"
    req = wire.OpenRequest(client_pubkey=channel.client_pubkey, deposit=100_000, refund_script=channel.refund_script)
    io0 = _written_bytes()
    for _ in range(UNPAID_OPENS):
        manager.open_channel(req, client_mac="02:00:00:00:00:01", client_ip="10.0.0.5")
    per_open = (_written_bytes() - io0) / UNPAID_OPENS
    io0 = _written_bytes()
    live_max = 0
    for i in range(HISTORY):
        ch = channel.evolve(id=f"h{i:06d}", key_index=10_000 + i, deposit=100_000, created_at=i,
                            funding=c.Outpoint(f"{i:064x}", 0), client_mac="02:00:00:00:00:02", client_ip="10.0.0.6")
        ledger.put(ch)
        for k in range(1, 6):
            ch = ch.evolve(paid=k * 1_000, payment_sig=bytes([k]) * 71, bytes_used=k * 100_000)
            ledger.put_payment(ch)
        ledger.put(ch.evolve(phase=Phase.SETTLED, owed=ch.paid, settlement_txid=f"{i:064x}",
                             settlement_raw=_settlement(ch, ch.paid, channel.refund_script)))
        live_max = max(live_max, ledger.size)
    history_io = _written_bytes() - io0
    live_bytes = journal.stat().st_size
    archive = journal.with_suffix(".archive")
    archive_bytes = archive.stat().st_size if archive.exists() else 0
    # Payments with that history behind: appends plus their share of compactions.
    n = 2000
    bodies = _signed(payer, range(100, (n + 1) * 100, 100))
    io0 = _written_bytes()
    for body in bodies:
        manager.pay(channel.id, wire.parse_payment(wire.parse_json(body)))
    per_payment = (_written_bytes() - io0) / n
    ledger.close()
    return {
        f"channel.journal_live_bytes_after_{HISTORY}_channels": live_bytes,
        f"channel.journal_live_bytes_max_over_{HISTORY}_channels": live_max,
        f"channel.journal_write_bytes_per_payment_after_{HISTORY}_channels": round(per_payment, 1),
        f"channel.ledger_write_bytes_per_finished_channel_{HISTORY}": round(history_io / HISTORY, 1),
        "channel.archive_bytes_per_paid_channel": round(archive_bytes / HISTORY, 1),
        "channel.write_bytes_per_unpaid_open": round(per_open, 1),
    }


def _bench_sqlite_bytes(state_dir: Path) -> float:
    """The same durability with SQLite: one row updated and committed per payment."""
    db = sqlite3.connect(state_dir / "channels.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE channel (id TEXT PRIMARY KEY, paid INTEGER, sig BLOB)")
    db.execute("INSERT INTO channel VALUES ('bench', 0, x'')")
    sig = bytes(72)
    io0 = _written_bytes()
    for k in range(1, N_PAYMENTS + 1):
        db.execute("BEGIN")
        db.execute("UPDATE channel SET paid = ?, sig = ? WHERE id = 'bench'", (k * 100, sig))
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    io_bytes = _written_bytes() - io0
    db.close()
    return io_bytes / N_PAYMENTS


def run() -> dict[str, float]:
    # On the repo's disk, not tmpfs: fdatasync must reach a real device to mean anything.
    build = Path(__file__).resolve().parents[1] / "build"
    build.mkdir(exist_ok=True)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=build) as tmp:
        results.update(_bench_updates(Path(tmp) / "updates"))
    with tempfile.TemporaryDirectory(dir=build) as tmp:
        results.update(_bench_history(Path(tmp)))
        results["channel.sqlite_write_bytes_per_payment"] = round(_bench_sqlite_bytes(Path(tmp)), 1)
    return results
