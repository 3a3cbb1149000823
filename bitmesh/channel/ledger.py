"""The crash-safe ledger: a small live journal on flash, and an archive of finished channels.

Journal (`channels.journal`): one line per record, `<crc32 as 8 hex> <json>\\n`, appended with
O_APPEND and fdatasync'd before the caller acknowledges anything. Records:

- `head`: first line of a compacted journal: the archive's committed length and the key mark;
- `keys`: key indexes below `next` may have been handed out (reserved `KEY_BLOCK` at a time, so
  after a crash indexes continue above the mark and no server key is ever reused);
- `chan`: a channel's full state; `pay`: a payment (amount, signature, usage), ~200 bytes.

What is on disk when: a key index is reserved before its key leaves the router; an open stays
in memory until it is funded (its first record is the funded channel: an open never funded costs
no record at all, only its share of a key block); from then on every state change and payment is
synced before it is acknowledged. Every write is checked (bitmesh/channel/storage.py): one that
does not fully reach the disk is cut back off the file and refused (`storage_full`,
`storage_failed`), so the journal always loads and nothing refused was acknowledged.

Compaction is triggered by the live size, not by history: when the journal passes
max(`compact_bytes`, twice its length right after the last compaction). Final channels that
carried money are appended to the archive (`channels.archive`, same line format, synced), final
channels that never did are dropped, and the rest are written as a new journal (head + one
record per channel) to a temporary file, synced, renamed over the journal, directory synced. A
crash between the two steps leaves an archive longer than the head says: that tail is cut at
load (the old journal still holds those channels). So the live journal stays the size of the
live channels however many were ever opened, and each payment costs one append (one flash page
synced) plus a small share of a rare compaction. The archive's summary is bitmesh/channel/history.py.

Why not SQLite: with the same durability (WAL, synchronous=FULL, one commit per payment)
it makes the process write about twice the bytes per payment (`make bench`:
channel.sqlite_write_bytes_per_payment vs channel.journal_write_bytes_per_payment: the WAL
frame plus its checkpoint back into the database), and python3-sqlite3 is one more package
on a small router. README.md ("The ledger and flash wear") has the figures.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from bitmesh.channel.history import (
    Archived,
    History,
    HistoryBuilder,
    archivable,
    archive_record,
    archived_from_record,
    at_rest,
    payout_of,
)
from bitmesh.channel.state import Channel
from bitmesh.channel.storage import Disk, WritesStopped
from bitmesh.errors import BitMeshError, StorageError

log = logging.getLogger(__name__)

KEY_BLOCK = 64  # key indexes reserved per synced `keys` record
FORMAT = 2  # journal format of the `head` record (format 1 had no head, keys or archive)


class LedgerCorrupt(BitMeshError):
    """The journal has a damaged record before its end: refuse to guess about money."""

    code = "ledger_corrupt"


def _encode(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode(line: bytes) -> dict | None:
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


# --- the pure part: what the journal says, what a compaction does ---------------------------


@dataclass
class Replay:
    channels: dict[str, Channel] = field(default_factory=dict)
    key_mark: int = 0  # indexes below it may have been handed out
    archive_size: int = 0  # the archive's committed length
    good_end: int = 0  # bytes of whole, valid records


def replay(lines: list[bytes], where: str) -> Replay:
    """The journal's records applied in order. A damaged last line is a torn append (never
    acknowledged) and is left out; damage anywhere before it is LedgerCorrupt."""
    r = Replay()
    for i, line in enumerate(lines):
        record = _decode(line)
        if record is None:
            if i == len(lines) - 1:
                break
            raise LedgerCorrupt(f"{where}: damaged record at line {i + 1}")
        _apply(r, record, where)
        r.good_end += len(line)
    r.key_mark = max([r.key_mark, *(ch.key_index + 1 for ch in r.channels.values())])
    return r


def _apply(r: Replay, record: dict, where: str) -> None:
    kind = record.get("t")
    if kind == "chan":
        channel = Channel.from_record(record["c"])
        r.channels[channel.id] = channel
    elif kind == "pay":
        prev = r.channels.get(record["id"])
        if prev is None:
            raise LedgerCorrupt(f"{where}: payment for unknown channel {record['id']!r}")
        r.channels[prev.id] = prev.evolve(
            paid=record["paid"], payment_sig=bytes.fromhex(record["sig"]),
            access_started_at=record.get("a", prev.access_started_at),
            bytes_used=record.get("b", prev.bytes_used), seconds_used=record.get("s", prev.seconds_used),
        )
    elif kind == "keys":
        r.key_mark = max(r.key_mark, int(record["next"]))
    elif kind == "head":
        r.archive_size = int(record["archive"])
        r.key_mark = max(r.key_mark, int(record["keys"]))
    else:
        raise LedgerCorrupt(f"{where}: unknown record type {kind!r}")


@dataclass(frozen=True)
class CompactionPlan:
    keep: list[Channel]  # live: rewritten into the new journal
    archive: list[Channel]  # final, carried money: appended to the archive
    drop: list[Channel]  # final, never carried money: gone


def plan_compaction(channels: dict[str, Channel]) -> CompactionPlan:
    keep, archive, drop = [], [], []
    for ch in channels.values():
        (archive if archivable(ch) else drop if at_rest(ch) else keep).append(ch)
    return CompactionPlan(keep, archive, drop)


def compaction_due(size: int, live_size: int, floor: int) -> bool:
    """Rewrite once the appends since the last compaction outweigh the live state (amortised:
    each byte appended is rewritten at most about once), never for a small file."""
    return size > max(floor, 2 * live_size)


# --- the ledger ----------------------------------------------------------------------------


class Ledger:
    def __init__(self, path: Path, compact_bytes: int = 64 * 1024, disk: Disk | None = None):
        self.path = Path(path)
        self.archive_path = self.path.with_suffix(".archive")
        self.compact_bytes = compact_bytes
        self.disk = disk or Disk()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._archive_fd: int | None = None
        self._channels: dict[str, Channel] = {}
        self._size = 0  # the journal's length: every byte of it a whole, synced record
        self._live_size = 0  # its length right after the last compaction
        self._archive_size = 0  # the archive's committed length (the head's)
        self._archive_dirty = False  # an uncommitted tail may follow it: cut before appending
        self._compact_retry_at = 0  # after a failed compaction, not before this length
        self._key_mark = 0
        self._stopped: StorageError | None = None  # set: every write refused until reloaded
        self._history = History()
        self._evicted: list[str] = []
        self.appends = 0  # records written since open (the bench reads it)

    # --- reading -------------------------------------------------------------------------

    def on_record(self) -> bool:
        """Whether channels may be on record here (a journal or an archive exists): a first
        start has neither."""
        return self.path.exists() or self.archive_path.exists()

    def load(self) -> dict[str, Channel]:
        """Replay the journal and summarise the archive; returns the live channels."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.close()
        if not self.path.exists() and self.archive_path.exists():
            raise LedgerCorrupt(f"{self.path} is missing but {self.archive_path.name} is there: restore the journal "
                                "(starting without it could reuse server keys)", code="journal_missing")
        r = Replay()
        if self.path.exists():
            with open(self.path, "rb") as f:
                lines = f.readlines()
            r = replay(lines, str(self.path))
        fd = self.disk.open_append(self.path)
        try:
            if r.good_end != os.fstat(fd).st_size:
                self.disk.cut_back(fd, r.good_end)  # the torn tail of a power cut
            history, archived_keys = self._load_archive(r.archive_size)
        except BaseException:
            self.disk.close(fd)
            raise
        with self._lock:
            self._fd = fd
            self._channels = r.channels
            self._size = r.good_end
            self._live_size = 0
            self._archive_size = r.archive_size
            self._archive_dirty = False
            self._compact_retry_at = 0
            self._key_mark = max(r.key_mark, archived_keys)
            self._stopped = None
            self._history = history
            self._evicted = []
        return dict(r.channels)

    def _load_archive(self, committed: int) -> tuple[History, int]:
        """The archive up to its committed length, streamed; a longer file is an interrupted
        compaction's tail and is cut off."""
        builder = HistoryBuilder()
        key_mark = 0
        if not self.archive_path.exists():
            if committed:
                raise LedgerCorrupt(f"{self.archive_path} is missing ({committed} bytes on record)")
            return builder.build(), key_mark
        where = str(self.archive_path)
        offset = 0
        with open(self.archive_path, "rb") as f:
            for i, line in enumerate(f):
                if offset >= committed:
                    break
                record = _decode(line)
                if record is None or record.get("t") != "arch" or offset + len(line) > committed:
                    raise LedgerCorrupt(f"{where}: damaged record at line {i + 1}")
                builder.add(archived_from_record(record))
                key_mark = max(key_mark, int(record["c"]["key_index"]) + 1)
                offset += len(line)
        if offset < committed:
            raise LedgerCorrupt(f"{where} is shorter ({offset} bytes) than on record ({committed})")
        if self.archive_path.stat().st_size > committed:
            fd = self.disk.open_append(self.archive_path)
            try:
                self.disk.cut_back(fd, committed)
            finally:
                self.disk.close(fd)
        return builder.build(), key_mark

    @property
    def history(self) -> History:
        """Final channels that left the live journal: totals and the newest (an immutable snapshot)."""
        return self._history

    @property
    def key_mark(self) -> int:
        """The first key index never handed out."""
        return self._key_mark

    @property
    def size(self) -> int:
        """The live journal's length in bytes."""
        return self._size

    def holds(self, channel_id: str) -> bool:
        """Whether the live journal has a record of this channel."""
        return channel_id in self._channels

    def drain_evicted(self) -> list[str]:
        """Ids of the channels compactions took out of the live journal since the last call."""
        with self._lock:
            out, self._evicted = self._evicted, []
        return out

    # --- writing: each returns only once the record is on disk; raises StorageError if not --

    def reserve_key(self, index: int) -> None:
        """Make sure `index` is below the durable key mark before its key is handed out."""
        with self._lock:
            if index < self._key_mark:
                return
            mark = index + KEY_BLOCK
            self._append({"t": "keys", "next": mark}, "reserving server keys")
            self._key_mark = mark

    def put(self, channel: Channel) -> None:
        """Persist a channel's full state."""
        with self._lock:
            self._append({"t": "chan", "c": channel.to_record()}, "storing the channel")
            self._stored(channel)

    def put_payment(self, channel: Channel) -> None:
        """Persist a new payment (amount and signature) of a channel: a small delta record."""
        record = {
            "t": "pay", "id": channel.id, "paid": channel.paid, "sig": channel.payment_sig.hex(),
            # usage rides along for free: the record is written anyway
            "a": channel.access_started_at, "b": channel.bytes_used, "s": channel.seconds_used,
        }
        with self._lock:
            if channel.id not in self._channels:  # a delta needs its channel on record first
                record = {"t": "chan", "c": channel.to_record()}
            self._append(record, "storing the payment")
            self._stored(channel)

    def _append(self, record: dict, what: str) -> None:
        if self._stopped is not None:
            raise StorageError(f"{what}: refused, an earlier storage failure left the journal unsure "
                               f"({self._stopped.message}); restart the service", code=self._stopped.code)
        if self._fd is None:
            raise RuntimeError("ledger not loaded")
        try:
            self._size = self.disk.append(self._fd, _encode(record), self._size, what)
        except WritesStopped as e:
            self._stopped = e
            raise
        self.appends += 1

    def _stored(self, channel: Channel) -> None:
        self._channels[channel.id] = channel
        if compaction_due(self._size, self._live_size, self.compact_bytes) and self._size >= self._compact_retry_at:
            try:
                self._compact()
            except StorageError as e:  # the record itself is stored: only the rewrite waits
                self._compact_retry_at = self._size + self.compact_bytes // 4
                log.error("journal compaction failed, retried later: %s: %s", e.code, e.message)

    def _compact(self) -> None:
        plan = plan_compaction(self._channels)
        archived = [Archived(ch, payout_of(ch)) for ch in plan.archive]
        archive_size = self._archive_size
        if plan.archive:
            if self._archive_fd is None:
                self._archive_fd = self.disk.open_append(self.archive_path)
            if self._archive_dirty:
                self.disk.cut_back(self._archive_fd, self._archive_size)
                self._archive_dirty = False
            self._archive_dirty = True  # until the new head commits what follows
            records = b"".join(_encode(archive_record(item)) for item in archived)
            archive_size = self.disk.append(self._archive_fd, records, self._archive_size, "archiving channels")
        head = {"t": "head", "v": FORMAT, "archive": archive_size, "keys": self._key_mark}
        chunks = [_encode(head), *(_encode({"t": "chan", "c": ch.to_record()}) for ch in plan.keep)]
        try:
            size = self.disk.write_file(self.path, chunks)
        except WritesStopped as e:
            self._stopped = e  # renamed but maybe not durably: appends to either file are unsure
            raise
        # The new journal is in place: from here on it is the one appended to.
        self._archive_size = archive_size
        self._archive_dirty = False
        self.disk.close(self._fd)
        self._fd = None
        try:
            self._fd = self.disk.open_append(self.path)
        except StorageError as e:
            self._stopped = e
            raise
        self._size = self._live_size = size
        gone = [*plan.archive, *plan.drop]
        for ch in gone:
            del self._channels[ch.id]
        self._evicted.extend(ch.id for ch in gone)
        if archived:  # memory keeps what the archive keeps (no signatures, no raw transactions)
            self._history = self._history.plus([archived_from_record(archive_record(a)) for a in archived])
        log.info("journal compacted: %d live channels, %d archived, %d dropped, %d bytes",
                 len(plan.keep), len(plan.archive), len(plan.drop), size)

    def close(self) -> None:
        with self._lock:
            for name in ("_fd", "_archive_fd"):
                fd = getattr(self, name)
                if fd is not None:
                    self.disk.close(fd)
                    setattr(self, name, None)
