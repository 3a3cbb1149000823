"""Server channel keys: one fresh key per channel, derived from an HD seed kept 0600.

BIP32 hardened derivation m/1017'/0'/<index>' from a 32-byte seed: the owner can re-derive
any channel key from the seed and the index the ledger records, and no two channels share a
key. Only hardened steps are used, so no xpub ever needs to exist.

The seed is created on the first start only. Once channels are on record a missing seed is a
stop (`seed_missing`), never a new seed: settlements signed with another seed never verify.
A key is checked against the server pubkey the channel recorded before anything is signed
with it (`seed_mismatch`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from bitcoin.wallet import CKey

from bitmesh.errors import ConfigError, KeyMismatch

_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HARDENED = 0x80000000
PURPOSE = 1017  # arbitrary, fixed: BitMesh channel keys live under m/1017'/0'


def load_or_create_seed(path: Path, create: bool = True) -> bytes:
    """Read the seed, or create it (0600, written atomically) on a first start; `create` False
    (channels are on record) makes a missing seed an error."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{path} is readable by others (mode {mode:o}); chmod 600 it", code="seed_insecure")
        data = bytes.fromhex(path.read_text().strip())
        if len(data) != 32:
            raise ConfigError(f"{path} does not hold a 32-byte hex seed", code="seed_invalid")
        return data
    if not create:
        raise ConfigError(
            f"{path} is missing but channels are on record in {path.parent}: restore the seed from your backup "
            "(a new one could not sign for those channels); only a first start, with no journal, creates one",
            code="seed_missing")
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, seed.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # the name too must survive a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return seed


def _ckd_hardened(key: int, chain: bytes, index: int) -> tuple[int, bytes]:
    data = b"\x00" + key.to_bytes(32, "big") + (index | _HARDENED).to_bytes(4, "big")
    digest = hmac.new(chain, data, hashlib.sha512).digest()
    il = int.from_bytes(digest[:32], "big")
    child = (il + key) % _ORDER
    if il >= _ORDER or child == 0:  # probability < 2^-127; BIP32 says skip to the next index
        raise ValueError("invalid child key")
    return child, digest[32:]


class ChannelKeychain:
    """Derives the server key of channel number `index`."""

    def __init__(self, seed: bytes):
        digest = hmac.new(b"Bitcoin seed", seed, hashlib.sha512).digest()
        key, chain = int.from_bytes(digest[:32], "big"), digest[32:]
        for step in (PURPOSE, 0):
            key, chain = _ckd_hardened(key, chain, step)
        self._account = (key, chain)

    def key(self, index: int) -> CKey:
        key, _ = _ckd_hardened(*self._account, index)
        return CKey(key.to_bytes(32, "big"), compressed=True)

    def channel_key(self, index: int, server_pubkey: bytes) -> CKey:
        """The key of channel number `index`, checked against the pubkey the channel recorded."""
        key = self.key(index)
        if bytes(key.pub) != server_pubkey:
            raise KeyMismatch(f"the seed derives {bytes(key.pub).hex()} for key index {index} but the channel "
                              f"was opened with {server_pubkey.hex()}: wrong seed, not signing")
        return key

    def __repr__(self) -> str:  # never show key material
        return "ChannelKeychain(<secret>)"
