"""The one interface every chain backend implements.

The channel code sees the chain only through `ChainBackend`; the backends (Bitcoin Core
JSON-RPC, Esplora REST) live beside this file and are interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from bitmesh.errors import ChainError

# Used when the backend gives no estimate (regtest, empty mempool, outage): low but
# relayable on every network.
FALLBACK_FEERATE_SAT_VB = 2.0
MIN_FEERATE_SAT_VB = 1.0
MAX_FEERATE_SAT_VB = 500.0


@dataclass(frozen=True)
class TxStatus:
    """A transaction the backend knows: raw bytes and how deep it is (0 = in the mempool)."""

    txid: str
    raw: bytes
    confirmations: int
    block_height: int | None = None


@dataclass(frozen=True)
class OutSpend:
    """Whether an output is spent, and by which transaction when the backend can tell."""

    spent: bool
    spending_txid: str | None = None
    confirmations: int = 0


@dataclass(frozen=True)
class Unspent:
    """An unspent output paying an address: where it is, its value, and the height of the block
    that holds it (None: still in the mempool)."""

    txid: str
    vout: int
    value: int  # satoshis
    height: int | None = None


class ChainBackend(ABC):
    """Read the chain and broadcast. Transient failures are retried inside the backend;
    what still fails raises `ChainUnavailable`; a refused broadcast raises `BroadcastRejected`."""

    @abstractmethod
    def tip_height(self) -> int: ...

    @abstractmethod
    def median_time_past(self) -> int:
        """Median time past of the tip (BIP113): what a unix-time CLTV is checked against."""

    @abstractmethod
    def get_tx(self, txid: str) -> TxStatus | None:
        """The transaction if it is in the mempool or the chain, else None."""

    @abstractmethod
    def get_outspend(self, txid: str, vout: int) -> OutSpend: ...

    @abstractmethod
    def broadcast(self, raw: bytes) -> str:
        """Send a transaction and return its txid once the node is seen to hold it."""

    @abstractmethod
    def estimate_feerate(self, target_blocks: int = 6) -> float:
        """sat/vB, clamped to [MIN, MAX]; FALLBACK_FEERATE_SAT_VB when there is no estimate."""

    def address_unspent(self, address: str) -> list[Unspent]:
        """The unspent outputs paying `address` (in the backend's network's spelling), those
        of the mempool included where the backend sees them; outputs already spent by a mempool
        transaction left out where it can tell (see each backend)."""
        raise ChainError(f"{type(self).__name__} cannot list an address's outputs", code="chain_unsupported")

    def fee_estimate(self, target_blocks: int = 6) -> float:
        """Like estimate_feerate, but an outage raises ChainError instead of answering the
        fallback: a settlement's fee must not be chosen from a number nobody gave."""
        return self.estimate_feerate(target_blocks)


def clamp_feerate(value: float | None) -> float:
    if value is None or value != value or value <= 0:  # None, NaN or no estimate
        return FALLBACK_FEERATE_SAT_VB
    return min(max(value, MIN_FEERATE_SAT_VB), MAX_FEERATE_SAT_VB)
