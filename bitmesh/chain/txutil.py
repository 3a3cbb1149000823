"""Small transaction helpers shared by the backends."""

from __future__ import annotations

from bitcoin.core import CTransaction, b2lx

from bitmesh.errors import BroadcastRejected


def parse_tx(raw: bytes) -> CTransaction:
    """Deserialize, or refuse the broadcast: sending garbage to a node teaches nothing."""
    try:
        return CTransaction.deserialize(raw)
    except Exception as exc:  # bitcoinlib raises several kinds on truncated or junk input
        raise BroadcastRejected(f"not a valid transaction: {exc}") from None


def txid_of(tx: CTransaction) -> str:
    """Big-endian hex, as explorers and RPC show it."""
    return b2lx(tx.GetTxid())


def raw_txid(raw: bytes) -> str:
    return txid_of(parse_tx(raw))


def output_count(raw: bytes) -> int:
    return len(parse_tx(raw).vout)


def is_txid(value: str) -> bool:
    """64 hex digits: checked before a txid goes into a URL path."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)
