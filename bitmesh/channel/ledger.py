"""The crash-safe ledger: an append-only journal on flash.

One line per record, `<crc32 as 8 hex> <json>\\n`, appended with O_APPEND and fdatasync'd
before the caller acknowledges anything. A payment is a ~200-byte delta record; a state
change is a full channel record. On load the journal is replayed; a torn last line (power
cut mid-write) is cut off, since it was never acknowledged. When the file grows past
`compact_bytes` it is rewritten to one full record per channel (write temp, fsync, rename,
fsync the directory), so flash sees a small append per payment and a rare rewrite.

Why not SQLite: with the same durability (WAL, synchronous=FULL, one commit per payment)
it makes the process write about twice the bytes per payment (`make bench`:
channel.sqlite_write_bytes_per_payment vs channel.journal_write_bytes_per_payment: the WAL
frame plus its checkpoint back into the database), and python3-sqlite3 is one more package
on a small router. README.md ("The ledger and flash wear") has the figures.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from pathlib import Path

from bitmesh.channel.state import Channel
from bitmesh.errors import BitMeshError


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    def __init__(self, path: Path, compact_bytes: int = 256 * 1024):
        self.path = Path(path)
        self.compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._channels: dict[str, Channel] = {}
        self.appends = 0  # records written since open (the bench reads it)

    # --- reading -------------------------------------------------------------------------

    def load(self) -> dict[str, Channel]:
        """Replay the journal; returns every channel it holds, newest state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        channels: dict[str, Channel] = {}
        good_end = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                lines = f.readlines()
            for i, line in enumerate(lines):
                record = _decode(line)
                if record is None:
                    if i == len(lines) - 1:
                        break  # torn tail: never acknowledged, safe to drop
                    raise LedgerCorrupt(f"{self.path}: damaged record at line {i + 1}")
                _apply(channels, record)
                good_end += len(line)
            if good_end != self.path.stat().st_size:
                os.truncate(self.path, good_end)
        self._channels = channels
        self._open_for_append()
        return dict(channels)

    def _open_for_append(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            _fsync_dir(self.path.parent)

    # --- writing: each returns only once the record is on disk ----------------------------

    def put(self, channel: Channel) -> None:
        """Persist a channel's full state."""
        self._write({"t": "chan", "c": channel.to_record()}, channel)

    def put_payment(self, channel: Channel) -> None:
        """Persist a new payment (amount and signature) of a channel: a small delta record."""
        record = {
            "t": "pay", "id": channel.id, "paid": channel.paid, "sig": channel.payment_sig.hex(),
            # usage rides along for free: the record is written anyway
            "a": channel.access_started_at, "b": channel.bytes_used, "s": channel.seconds_used,
        }
        self._write(record, channel)

    def _write(self, record: dict, channel: Channel) -> None:
        data = _encode(record)
        with self._lock:
            if self._fd is None:
                raise RuntimeError("ledger not loaded")
            os.write(self._fd, data)
            os.fdatasync(self._fd)
            self._channels[channel.id] = channel
            self.appends += 1
            if os.fstat(self._fd).st_size > self.compact_bytes:
                self._compact()

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".compact")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for channel in self._channels.values():
                os.write(fd, _encode({"t": "chan", "c": channel.to_record()}))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._open_for_append()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _apply(channels: dict[str, Channel], record: dict) -> None:
    kind = record.get("t")
    if kind == "chan":
        channel = Channel.from_record(record["c"])
        channels[channel.id] = channel
    elif kind == "pay":
        prev = channels[record["id"]]
        channels[prev.id] = prev.evolve(
            paid=record["paid"], payment_sig=bytes.fromhex(record["sig"]),
            access_started_at=record.get("a", prev.access_started_at),
            bytes_used=record.get("b", prev.bytes_used), seconds_used=record.get("s", prev.seconds_used),
        )
    else:
        raise LedgerCorrupt(f"unknown record type {kind!r}")
