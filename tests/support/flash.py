"""A small real file system to fill up: a tmpfs, or ext4 on a loop device (real fdatasync,
delayed allocation). Root only. Used by tests/test_ledger_faults.py."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

KINDS = ("tmpfs", "ext4")


def _run(*argv: object) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def small_fs(mountpoint: Path, kind: str = "tmpfs", size_kib: int = 512) -> Iterator[Path]:
    """`kind` mounted at `mountpoint` (made if needed), unmounted afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    image = mountpoint.with_name(mountpoint.name + ".img")
    if kind == "tmpfs":
        _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", mountpoint)
    elif kind == "ext4":
        with open(image, "wb") as f:
            f.truncate(size_kib * 1024)
        # 4 KiB blocks like a flash page; no blocks reserved for root (the tests run as root)
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", image)
        _run("mount", "-o", "loop", image, mountpoint)
    else:
        raise ValueError(kind)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        image.unlink(missing_ok=True)


def fill(mountpoint: Path, name: str = "filler") -> Path:
    """Take every free byte of the file system with one file (synced); returns it."""
    filler = mountpoint / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = 1 << 16
        while chunk:
            try:
                if os.write(fd, b"\0" * chunk) < chunk:
                    chunk //= 2
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    return filler


def free_bytes(mountpoint: Path) -> int:
    st = os.statvfs(mountpoint)
    return st.f_bavail * st.f_frsize
