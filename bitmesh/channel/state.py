"""A server-side channel: its state and how it is written to and read from the ledger."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from bitmesh.channel.contract import Contract, Outpoint


class Phase(StrEnum):
    AWAITING_FUNDING = "awaiting_funding"  # terms given, no funding seen yet
    FUNDING_UNCONFIRMED = "funding_unconfirmed"  # seen, above the 0-conf cap: waits for min_conf
    OPEN = "open"  # payments accepted
    SETTLING = "settling"  # settlement signed, persisted and broadcast; waits to confirm
    SETTLED = "settled"  # settlement confirmed
    FAILED = "failed"  # funding vanished (double spend), or never funded before expiry
    CLOSED_ELSEWHERE = "closed_elsewhere"  # the client took its refund after expiry
    EXPIRED = "expired"  # closed with nothing paid: nothing to settle, the client refunds
    # Paid, but the owner's share does not cover the settlement fee at the feerate needed (plus
    # dust): not broadcast at a loss; the client takes its whole deposit back with its refund.
    UNECONOMIC = "uneconomic"

    @property
    def accepts_payments(self) -> bool:
        return self is Phase.OPEN

    @property
    def final(self) -> bool:
        return self in (Phase.SETTLED, Phase.FAILED, Phase.CLOSED_ELSEWHERE, Phase.EXPIRED, Phase.UNECONOMIC)


@dataclass(frozen=True)
class Channel:
    """Immutable: every change makes a new value, so a refused request cannot half-change one."""

    id: str
    key_index: int
    client_pubkey: bytes
    server_pubkey: bytes
    deposit: int
    expiry: int
    refund_script: bytes
    created_at: int
    phase: Phase = Phase.AWAITING_FUNDING
    funding: Outpoint | None = None
    funding_confirmations: int = 0
    paid: int = 0
    payment_sig: bytes = b""  # the client's signature for `paid` (DER + sighash byte)
    owed: int | None = None  # what the meter said was used, fixed at settlement
    settlement_txid: str | None = None
    settlement_raw: bytes = b""
    close_reason: str = ""
    # Fee bumps (CPFP children of the settlement through the router's hold output, in chain
    # order) and the payout: the hold output moved on to the owner's address once settled.
    bumps: tuple[bytes, ...] = ()
    payout_txid: str | None = None
    payout_raw: bytes = b""
    payout_confirmed: bool = False
    # The client's session: where access is granted, since when, and what it has used (as of
    # the last payment or meter pass; the kernel's counters are the live truth).
    sat_per_mb: int = 0  # the tariff offered when the channel opened: later price changes
    sat_per_minute: int = 0  # apply to new channels only
    client_mac: str = ""
    client_ip: str = ""
    access_started_at: int = 0  # the billing clock's origin (bitmesh.tariff: moved by the time it stood still)
    bytes_used: int = 0
    seconds_used: int = 0
    updated_at: int = field(default=0, compare=False)

    @property
    def contract(self) -> Contract:
        return Contract(self.server_pubkey, self.client_pubkey, self.expiry)

    def evolve(self, **changes) -> Channel:
        return replace(self, **changes)

    # --- ledger form: plain JSON types --------------------------------------------------

    def to_record(self) -> dict:
        rec = asdict(self)
        for name in ("client_pubkey", "server_pubkey", "refund_script", "payment_sig", "settlement_raw"):
            rec[name] = rec[name].hex()
        rec["phase"] = self.phase.value
        rec["funding"] = str(self.funding) if self.funding else None
        rec["bumps"] = [raw.hex() for raw in self.bumps]
        rec["payout_raw"] = self.payout_raw.hex()
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> Channel:
        rec = dict(rec)
        for name in ("client_pubkey", "server_pubkey", "refund_script", "payment_sig", "settlement_raw"):
            rec[name] = bytes.fromhex(rec.get(name) or "")
        rec["phase"] = Phase(rec["phase"])
        rec["bumps"] = tuple(bytes.fromhex(raw) for raw in rec.get("bumps") or ())
        rec["payout_raw"] = bytes.fromhex(rec.get("payout_raw") or "")
        if rec.get("funding"):
            txid, vout = rec["funding"].rsplit(":", 1)
            rec["funding"] = Outpoint(txid, int(vout))
        return cls(**rec)
