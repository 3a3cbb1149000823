"""Full flash and failing writes: a refused change is never acknowledged, nothing acknowledged
is lost, the journal always loads, a compaction never loses a channel or lowers the key mark.

Which tests use what:
- a real full file system (tests/support/flash.py: a small tmpfs, and ext4 on a loop device
  with real fdatasync), filled to the last byte by a file: the payment, compaction, open and
  settlement tests, and the end-to-end one with the real `bitmesh serve` and `bitmesh pay`;
- fault injection at the ledger's I/O edge (a `Disk` subclass, bitmesh/channel/storage.py) for
  what a real file system cannot be timed to do: fdatasync failing (EIO), a write cut short
  in the middle of one record, a failed cut-back, a compaction's rename or directory sync failing.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from bitmesh.chain.address import address_to_script
from bitmesh.channel.contract import Outpoint
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.state import Channel, Phase
from bitmesh.channel.storage import Disk
from bitmesh.errors import StorageError, StorageFull
from bitmesh.portal.client import PortalError
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.flash import KINDS, fill, small_fs
from tests.support.hotspot import Hotspot, confirmed_tx

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system: needs root")


def _channel(i: int, **changes) -> Channel:
    return Channel(id=f"ch{i:04d}", key_index=i, client_pubkey=b"\x02" + bytes(32), server_pubkey=b"\x03" + bytes(32),
                   deposit=100_000, expiry=2000, refund_script=b"\x00\x14" + bytes(20), created_at=1000 + i,
                   phase=Phase.OPEN, funding=Outpoint(f"{i:064x}", 0)).evolve(**changes)


def _pay(ledger: Ledger, ch: Channel, amount: int) -> Channel:
    paid = ch.evolve(paid=amount, payment_sig=amount.to_bytes(4, "big") * 18)
    ledger.put_payment(paid)
    return paid


def _reload(journal: Path) -> tuple[dict[str, Channel], Ledger]:
    """What a restarted service reads: a copy of the files, so the test does not change them."""
    copy = journal.parent.parent / f"reload-{time.monotonic_ns()}"
    copy.mkdir()
    for f in journal.parent.glob(journal.stem + ".*"):
        shutil.copy2(f, copy / f.name)
    ledger = Ledger(copy / journal.name)
    channels = ledger.load()
    ledger.close()
    return channels, ledger


@pytest.fixture(params=KINDS)
def flash(request, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounts a small file system: needs root")
    with small_fs(tmp_path / "flash", request.param, size_kib=512 if request.param == "tmpfs" else 4096) as m:
        yield m


# --- a real full file system ------------------------------------------------------------------


def test_full_flash_refuses_the_payment_and_loses_nothing_acknowledged(flash):
    journal = flash / "channels.journal"
    ledger = Ledger(journal)
    ledger.load()
    ch = _channel(0)
    ledger.put(ch)
    filler = fill(flash)
    acked, refusal = 0, None
    for amount in range(1_000, 200_000, 1_000):  # the journal's last page fills, then no more room
        try:
            _pay(ledger, ch, amount)
        except Exception as e:  # noqa: BLE001 - what the old code raised is part of the finding
            refusal = e
            break
        acked = amount
    assert acked, "the journal's last page took no payment at all"
    loaded, _ = _reload(journal)
    assert loaded["ch0000"].paid == acked  # every acknowledged payment is there, the journal loads
    assert isinstance(refusal, StorageFull) and refusal.code == "storage_full" and refusal.http_status == 507
    assert "not acknowledged" in refusal.message
    size = journal.stat().st_size
    with pytest.raises(StorageFull):
        _pay(ledger, ch, acked + 500)
    assert journal.stat().st_size == size  # nothing half-written left behind
    # Room again: the same ledger goes on appending cleanly after the refused records.
    filler.unlink()
    _pay(ledger, ch, acked + 1_000)
    ledger.close()
    assert _reload(journal)[0]["ch0000"].paid == acked + 1_000


def test_full_flash_compaction_keeps_every_channel_and_the_key_mark(flash):
    journal = flash / "channels.journal"
    ledger = Ledger(journal, compact_bytes=8 * 1024)
    ledger.load()
    channels = [_channel(i) for i in range(40)]
    for ch in channels:
        ledger.put(ch)
    mark = 40  # key indexes 0..39 are taken
    filler = fill(flash)
    acked: dict[str, int] = {}
    refused = False
    for k in range(1, 400):  # compactions fall due and fail (no room for the new file) ...
        ch = channels[k % 40]
        try:
            _pay(ledger, ch, k * 10)
        except StorageFull:
            refused = True
            break
        acked[ch.id] = k * 10  # ... while the payments that fit are stored and acknowledged
    assert refused and acked
    loaded, reloaded = _reload(journal)
    assert sorted(loaded) == [ch.id for ch in channels]
    assert all(loaded[i].paid == amount for i, amount in acked.items())
    assert reloaded.key_mark >= mark
    # Room again: the next payment compacts, and still every channel and the mark are there.
    filler.unlink()
    last = _pay(ledger, channels[0], 100_000)
    ledger.close()
    loaded, reloaded = _reload(journal)
    assert journal.stat().st_size < 40 * 1000  # compacted
    assert sorted(loaded) == [ch.id for ch in channels] and loaded[last.id].paid == 100_000
    assert reloaded.key_mark >= mark


@needs_root
@pytest.mark.regtest
def test_open_on_full_flash_is_refused_before_a_key_is_handed_out(bcoin, faucet, tmp_path):
    with small_fs(tmp_path / "state", "tmpfs", size_kib=64) as state:
        hotspot = Hotspot.start(bcoin, faucet, state)
        try:
            filler = fill(state)
            with pytest.raises(PortalError) as refused:  # the key block must be reserved first
                hotspot.portal.open_channel(bytes(new_key().pub), 50_000, key_address(new_key()))
            assert (refused.value.code, refused.value.http_status) == ("storage_full", 507)
            assert hotspot.manager.ledger.key_mark == 0 and not hotspot.manager.channels()
            filler.unlink()
            opened = hotspot.portal.open_channel(bytes(new_key().pub), 50_000, key_address(new_key()))
            assert opened["state"] == "awaiting_funding"
        finally:
            hotspot.stop()


@needs_root
@pytest.mark.regtest
def test_settlement_that_cannot_be_journaled_is_never_broadcast(bcoin, faucet, tmp_path):
    with small_fs(tmp_path / "state", "tmpfs", size_kib=64) as state:
        hotspot = Hotspot.start(bcoin, faucet, state)
        try:
            payer = hotspot.funded_payer(60_000)
            channel_id = payer.channel_id or ""
            filler = fill(state)
            acked = 0
            for amount in range(1_000, 60_000, 1_000):  # until the journal's last page is full
                try:
                    acked = payer.pay_exact(amount)["paid"]
                except PortalError as e:
                    assert e.code == "storage_full"
                    break
            funding = hotspot.manager.get(channel_id).funding
            assert funding is not None
            with pytest.raises(PortalError) as refused:
                payer.close()
            assert refused.value.code == "storage_full"
            # Signed but not journaled: never broadcast, the channel still open as it was.
            assert not hotspot.chain.get_outspend(funding.txid, funding.vout).spent
            assert hotspot.portal.channel(channel_id)["state"] == "open"
            assert _reload(state / "channels.journal")[0][channel_id].phase is Phase.OPEN
            # Room again: one settlement, for the last acknowledged payment, checked by Core's interpreter.
            filler.unlink()
            closed = payer.close()
            hotspot.mine(1)
            settlement = confirmed_tx(bcoin, closed["settlement_txid"])
            assert settlement.vout[0].nValue == 60_000 - acked
        finally:
            hotspot.stop()


# --- injected faults at the I/O edge ----------------------------------------------------------


class FaultyDisk(Disk):
    """The real file system, with the next few calls of a kind made to fail."""

    def __init__(self) -> None:
        self.fail: dict[str, list[OSError | int]] = {}  # op -> queued faults (an int: a short write)
        self.tmp_room: int | None = None  # bytes a `.tmp` file may take before ENOSPC

    def arm(self, op: str, *faults: OSError | int) -> None:
        self.fail.setdefault(op, []).extend(faults)

    def _fault(self, op: str) -> OSError | int | None:
        queue = self.fail.get(op)
        return queue.pop(0) if queue else None

    def _write(self, fd: int, data: memoryview) -> int:
        if self.tmp_room is not None and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            room = self.tmp_room - os.fstat(fd).st_size
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super()._write(fd, data[:room])
        fault = self._fault("write")
        if isinstance(fault, OSError):
            raise fault
        if isinstance(fault, int):
            return super()._write(fd, data[:fault])
        return super()._write(fd, data)

    def _fdatasync(self, fd: int) -> None:
        if fault := self._fault("fdatasync"):
            raise fault
        super()._fdatasync(fd)

    def _ftruncate(self, fd: int, size: int) -> None:
        if fault := self._fault("ftruncate"):
            raise fault
        super()._ftruncate(fd, size)

    def _replace(self, src: Path, dst: Path) -> None:
        if fault := self._fault("replace"):
            raise fault
        super()._replace(src, dst)

    def _fsync(self, fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}") and (fault := self._fault("fsync_dir")):
            raise fault
        super()._fsync(fd)


EIO = OSError(errno.EIO, "Input/output error")
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def faulty(tmp_path) -> tuple[Ledger, FaultyDisk, Path]:
    disk = FaultyDisk()
    journal = tmp_path / "state" / "channels.journal"
    ledger = Ledger(journal, disk=disk)
    ledger.load()
    yield ledger, disk, journal
    ledger.close()


def test_fdatasync_error_refuses_the_payment_and_cuts_it_back(faulty):
    ledger, disk, journal = faulty
    ch = _pay(ledger, _put(ledger, _channel(0)), 1_000)
    size = journal.stat().st_size
    disk.arm("fdatasync", EIO)
    with pytest.raises(StorageError) as refused:
        _pay(ledger, ch, 2_000)
    assert refused.value.code == "storage_failed" and refused.value.http_status == 507
    assert journal.stat().st_size == size  # the record that may not be on disk is gone
    assert _reload(journal)[0]["ch0000"].paid == 1_000
    _pay(ledger, ch, 3_000)  # the next one is stored normally
    assert _reload(journal)[0]["ch0000"].paid == 3_000


def test_a_record_cut_short_is_cut_back_and_the_journal_stays_loadable(faulty):
    """The old ledger ignored os.write's count: the torn record stayed in the middle of the
    journal once the next one was appended, and the journal no longer loaded."""
    ledger, disk, journal = faulty
    ch = _pay(ledger, _put(ledger, _channel(0)), 1_000)
    disk.arm("write", 40, ENOSPC)  # 40 bytes of the record, then the flash is full
    with pytest.raises(StorageFull):
        _pay(ledger, ch, 2_000)
    _pay(ledger, ch, 3_000)
    ledger.put(_channel(1))
    loaded, _ = _reload(journal)
    assert loaded["ch0000"].paid == 3_000 and "ch0001" in loaded


def test_a_failed_cut_back_stops_every_write_until_reloaded(faulty):
    ledger, disk, journal = faulty
    ch = _pay(ledger, _put(ledger, _channel(0)), 1_000)
    disk.arm("write", 40, ENOSPC)
    disk.arm("ftruncate", EIO)  # the partial record stays at the end of the file
    with pytest.raises(StorageError):
        _pay(ledger, ch, 2_000)
    assert journal.read_bytes().endswith(b"\n") is False
    with pytest.raises(StorageError) as stopped:  # the disk works again, but the tail is unsure
        _pay(ledger, ch, 3_000)
    assert stopped.value.code == "storage_failed" and "restart" in stopped.value.message
    # The restart: the torn last line is dropped, everything acknowledged is there.
    assert ledger.load()["ch0000"].paid == 1_000
    _pay(ledger, ch, 4_000)
    assert _reload(journal)[0]["ch0000"].paid == 4_000


def test_a_short_compaction_keeps_the_old_journal_every_channel_and_the_key_mark(faulty):
    """The old ledger renamed a compacted file cut short over the journal: a channel was lost
    and, with it, its key index (handed out again)."""
    ledger, disk, journal = faulty
    ledger.compact_bytes = 4096
    ledger.reserve_key(0)
    channels = [_put(ledger, _channel(i)) for i in range(5)]
    disk.tmp_room = 2_000  # the new file gets 2000 bytes, then the flash is full
    acked = {}
    for k in range(1, 40):  # compaction falls due on the way and fails: the payments still count
        ch = channels[k % 5]
        _pay(ledger, ch, k * 100)
        acked[ch.id] = k * 100
    assert not journal.with_name(journal.name + ".tmp").exists()
    loaded, reloaded = _reload(journal)
    assert sorted(loaded) == [ch.id for ch in channels]
    assert all(loaded[i].paid == amount for i, amount in acked.items())
    assert reloaded.key_mark == 64
    disk.tmp_room = None  # room again: the compaction is retried after a few more records
    for k in range(1, 10):
        _pay(ledger, channels[0], 10_000 + k)
    loaded, reloaded = _reload(journal)
    assert b'"t":"head"' in journal.read_bytes().split(b"\n")[0]  # compacted
    assert sorted(loaded) == [ch.id for ch in channels] and reloaded.key_mark == 64


def test_a_compaction_interrupted_after_archiving_counts_history_once(faulty):
    ledger, disk, journal = faulty
    ledger.compact_bytes = 4096
    settled = []
    for i in range(6):
        ch = _pay(ledger, _put(ledger, _channel(i)), 2_000)
        settled.append(ch.evolve(phase=Phase.SETTLED, owed=2_000, settlement_txid=f"{i:064x}"))
    disk.arm("replace", *[EIO] * 10)  # archive appended and synced, then the journal's rename fails
    for ch in settled:
        ledger.put(ch)
    assert journal.with_suffix(".archive").stat().st_size > 0
    loaded, reloaded = _reload(journal)  # a restart at this point
    assert sorted(loaded) == [ch.id for ch in settled] and reloaded.history.channels == 0
    # The same ledger's next compaction archives them once.
    disk.fail.clear()
    ledger.put(_channel(10))
    for k in range(1, 20):
        _pay(ledger, _channel(10), k * 10)
    loaded, reloaded = _reload(journal)
    assert sorted(loaded) == ["ch0010"]
    assert reloaded.history.channels == 6


def test_a_compaction_whose_directory_sync_fails_stops_writes_and_loses_nothing(faulty):
    ledger, disk, journal = faulty
    ledger.compact_bytes = 4096
    channels = [_put(ledger, _channel(i)) for i in range(5)]
    disk.arm("fsync_dir", EIO)
    k = 0
    with pytest.raises(StorageError) as stopped:
        while True:  # the payment whose compaction fails is stored; the next one is refused
            k += 1
            _pay(ledger, channels[k % 5], k * 100)
    assert stopped.value.code == "storage_failed"
    loaded = ledger.load()  # the restart
    assert sorted(loaded) == [ch.id for ch in channels]
    assert loaded[channels[(k - 1) % 5].id].paid == (k - 1) * 100


def _put(ledger: Ledger, ch: Channel) -> Channel:
    ledger.put(ch)
    return ch


# --- the whole hotspot: the real `bitmesh serve` and `bitmesh pay`, the flash fills mid-session ---


@needs_root
@pytest.mark.netns
@pytest.mark.regtest
@pytest.mark.skipif(not shutil.which("nft"), reason="needs nft")
def test_flash_fills_mid_session_nothing_acknowledged_is_lost_and_the_session_goes_on(bcoin, faucet, tmp_path):
    from tests.support.netns import Topology
    from tests.support.router import Payer, RouterService, portal_call

    up = "http://10.77.2.2:8080"
    deposit = 30_000
    with Topology(n_clients=1, gso=False) as topo, small_fs(tmp_path / "router" / "state", "tmpfs", 64) as state:
        topo.bridge_tcp(topo.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        topo.http_server(topo.upstream.ns, "UPSTREAM", [8080])
        c = topo.clients[0]
        service = RouterService(topo, bcoin, tmp_path / "router", {"prepay_step_sat": 500}).start()
        payer: Payer | None = None
        try:
            payer = Payer(topo, c, service, faucet, deposit, tmp_path / "payer", duration=300)
            payer.wait_for(r"^paid \d+ sat")
            filler = fill(state)
            mark = len(payer.lines)
            for _ in range(40):  # browse until the journal's last page is full and a payment refused
                topo.call(c.ns, "download", f"{up}/bytes/1000000", idle=2, rate=4_000_000)
                if any("storage full" in line for _, line in payer.lines[mark:]):
                    break
            # The payer got the clear refusal (507 storage_full) and keeps retrying.
            payer.wait_for(r"storage full while storing the payment: not stored, not acknowledged", after=mark)
            acked = payer.payments()[-1]
            session = payer.session()  # the channel's, proven by its key
            assert session["paid"] == acked  # what the router holds is what it acknowledged ...
            assert _reload(state / "channels.journal")[0][session["channel_id"]].paid == acked  # ... on disk
            # Room again, and a restart (procd's respawn): the session continues from there.
            filler.unlink()
            service.kill()
            service.start()
            assert portal_call(c.ns, service.url, "channel", session["channel_id"])["paid"] >= acked
            mark = len(payer.lines)
            got = topo.call(c.ns, "download", f"{up}/bytes/2000000", idle=5, rate=2_000_000)
            assert got["complete"], payer.output()
            payer.wait_for(r"^paid \d+ sat", after=mark)
            assert payer.payments()[-1] > acked
            payer.kill()
            s = payer.session()
            assert s["paid"] >= payer.payments()[-1]
            closed = payer.close()
            bcoin.mine(1, service.payout_address)
            # Mined, and its input checked by Bitcoin Core's consensus interpreter: output 0 is the
            # client's change exactly as it signed it in the last acknowledged payment.
            settlement = confirmed_tx(bcoin, closed["settlement_txid"])
            change = settlement.vout[0]
            assert change.nValue == deposit - s["paid"]
            assert bytes(change.scriptPubKey) == address_to_script(payer.refund_address, NETWORK)
        finally:
            if payer is not None:
                payer.kill()
            service.stop()
