"""Channel figures: payment updates validated and durably stored per second, beside the bare
ECDSA verify rate (their ratio is what parsing, checks and the journal cost), and the bytes
each payment makes the process write: our journal vs SQLite (WAL, synchronous=FULL)."""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path

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

N_PAYMENTS = 3000


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


def _setup(state_dir: Path) -> tuple[ChannelManager, Channel, list[bytes]]:
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
    # No compaction inside the timed loop, so the record size can be read off the file.
    manager = ChannelManager(policy, Ledger(journal, compact_bytes=64 * 1024 * 1024), keychain, FixedTip())
    manager.chain_view(refresh=True)
    payer = PayerChannel(channel.contract, client, deposit, refund)
    payer.prepare_refund(channel.funding, 2.0)
    # Signed in advance: the bench times the router, not the payer.
    bodies = [json.dumps(payer.payment_message(k * 100)).encode() for k in range(1, N_PAYMENTS + 1)]
    return manager, channel, bodies


def _bench_updates(state_dir: Path) -> tuple[float, float, float]:
    manager, channel, bodies = _setup(state_dir)
    journal = state_dir / "channels.journal"
    size0, io0 = journal.stat().st_size, _written_bytes()
    start = time.perf_counter()
    for body in bodies:
        manager.pay(channel.id, wire.parse_payment(wire.parse_json(body)))
    elapsed = time.perf_counter() - start
    io_bytes = _written_bytes() - io0
    assert manager.get(channel.id).paid == N_PAYMENTS * 100
    record_bytes = (journal.stat().st_size - size0) / N_PAYMENTS
    manager.ledger.close()
    return N_PAYMENTS / elapsed, io_bytes / N_PAYMENTS, record_bytes


def _bench_verify() -> float:
    key = CKey(bytes(range(2, 34)))
    digest = bytes(range(32))
    sig = key.sign(digest)
    pub = key.pub
    start = time.perf_counter()
    for _ in range(N_PAYMENTS):
        pub.verify(digest, sig)
    return N_PAYMENTS / (time.perf_counter() - start)


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
    with tempfile.TemporaryDirectory(dir=build) as tmp:
        # verify measured before and after the updates, so both share the machine's state
        verify_a = _bench_verify()
        updates, journal_bytes, record_bytes = _bench_updates(Path(tmp))
        verify_b = _bench_verify()
        sqlite_bytes = _bench_sqlite_bytes(Path(tmp))
    verify = (verify_a + verify_b) / 2
    return {
        "channel.updates_per_s": round(updates, 1),
        "channel.verify_per_s": round(verify, 1),
        "channel.updates_to_verify_ratio": round(updates / verify, 3),
        "channel.journal_record_bytes": round(record_bytes, 1),
        "channel.journal_write_bytes_per_payment": round(journal_bytes, 1),
        "channel.sqlite_write_bytes_per_payment": round(sqlite_bytes, 1),
    }
