"""The ledger's I/O edge: every write to flash checked, nothing half-done left behind.

`os.write` may write less than asked (the file system filled up mid-record), `fdatasync` may
fail (ENOSPC on some file systems, EIO on a dying flash); both used to be ignored. Here a record
is either all on disk and synced, or cut back off the file and refused with a clear code
(`storage_full`, `storage_failed`). When even the cut-back fails the file may end in a partial
record, and a rename whose directory could not be synced may not survive a power cut: `Disk`
then raises `WritesStopped` and the ledger takes no more writes until it is reloaded (which
drops a torn last line).

The primitives (`_write`, `_fdatasync` ...) are the os calls; tests subclass `Disk` to inject
faults a real full file system cannot time (tests/test_ledger_faults.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from bitmesh.errors import StorageError, StorageFull

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_error(e: OSError, what: str) -> StorageError:
    if e.errno in _FULL:
        return StorageFull(f"storage full while {what}: not stored, not acknowledged ({e.strerror})")
    return StorageError(f"storage failed while {what}: not stored, not acknowledged ({e.strerror or e})")


class WritesStopped(StorageError):
    """What is on disk is no longer known exactly (a partial record not cut back, a rename not
    synced): the ledger refuses every write until it is reloaded."""

    code = "storage_failed"


class Disk:
    # --- primitives: the os calls, one place to inject faults ------------------------------

    def _open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def _write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def _fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def _fsync(self, fd: int) -> None:
        os.fsync(fd)

    def _ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def _replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def close(self, fd: int) -> None:
        os.close(fd)

    # --- checked operations -------------------------------------------------------------------

    def open_append(self, path: Path) -> int:
        """Open for appending (created 0600); a new file's directory entry is synced too."""
        created = not path.exists()
        try:
            fd = self._open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as e:
            raise storage_error(e, f"opening {path.name}") from e
        if created:
            try:
                self.fsync_dir(path.parent)
            except StorageError:
                self.close(fd)
                raise
        return fd

    def append(self, fd: int, data: bytes, at: int, what: str) -> int:
        """Append `data` to a file now `at` bytes long and sync it; the new length. On any
        failure the file is cut back to `at` and the error raised (WritesStopped if it could not)."""
        try:
            self._write_all(fd, data)
            self._fdatasync(fd)
        except OSError as e:
            self.cut_back(fd, at)
            raise storage_error(e, what) from e
        return at + len(data)

    def cut_back(self, fd: int, size: int) -> None:
        try:
            self._ftruncate(fd, size)
            self._fdatasync(fd)
        except OSError as e:
            raise WritesStopped(f"storage failed and a partial record could not be cut back ({e.strerror or e}); "
                           "nothing more is stored until the service restarts") from e

    def write_file(self, path: Path, chunks: Iterable[bytes]) -> int:
        """Replace `path` atomically: a temporary file written, synced, renamed over it, the
        directory synced. On a failure before the rename `path` is untouched (StorageError); once
        renamed, a failed directory sync raises WritesStopped. Returns the new length."""
        tmp = path.with_name(path.name + ".tmp")
        size = 0
        try:
            fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                for chunk in chunks:
                    self._write_all(fd, chunk)
                    size += len(chunk)
                self._fsync(fd)
            finally:
                self.close(fd)
            self._replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise storage_error(e, f"rewriting {path.name}") from e
        try:
            self.fsync_dir(path.parent)
        except StorageError as e:
            raise WritesStopped(f"{path.name} rewritten but its directory not synced ({e})") from e
        return size

    def fsync_dir(self, path: Path) -> None:
        try:
            fd = self._open(path, os.O_RDONLY)
            try:
                self._fsync(fd)
            finally:
                self.close(fd)
        except OSError as e:
            raise storage_error(e, f"syncing {path}") from e

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._write(fd, view)
            if n <= 0:  # a regular file writes nothing only when there is no room
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
