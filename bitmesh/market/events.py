"""Event and state payloads a node publishes (pure builders: JSON-able dicts).

Only whitelisted fields leave the router: a channel id, amounts, byte and second counts, phases
and settlement txids. Never a client secret: no proof, no signature, no transaction hex, no client
pubkey, no refund address, and no MAC or IP at all. A hashed MAC would not hide it: a MAC has 48
bits, 24 of them the vendor's well-known prefix, so its hash is reversed by enumeration in
seconds; the channel id already ties a session's events together.

The retained state and totals are signed with the node's identity key, as offers are (`sign`):
a reader with the node_id (bound to the key) can tell them from what anybody with write access
to the broker publishes under that node's topic (bitmesh.market.fleet verifies them).
"""

from __future__ import annotations

import hashlib

from bitmesh.channel.history import payout_of
from bitmesh.channel.state import Channel, Phase
from bitmesh.market.offer import canonical

SIGNED_KINDS = ("state", "totals")


def channel_events(new: Channel, old: Channel | None, now_ms: int) -> list[dict]:
    """What a channel change announces: session start (the channel opens), payment (paid grew),
    session stop (it leaves the open phase), settlement (a settlement txid appears)."""
    out: list[dict] = []
    was_open = old is not None and old.phase is Phase.OPEN
    base = {"channel_id": new.id, "at": now_ms}
    if new.phase is Phase.OPEN and not was_open:
        out.append({"type": "session_start", **base, "deposit_sat": new.deposit,
                    "sat_per_mb": new.sat_per_mb, "sat_per_minute": new.sat_per_minute})
    if new.paid > (old.paid if old is not None else 0):
        out.append({"type": "payment", **base, "paid_sat": new.paid, "bytes_used": new.bytes_used,
                    "seconds_used": new.seconds_used})
    if was_open and new.phase is not Phase.OPEN:
        out.append({"type": "session_stop", **base, "state": new.phase.value, "reason": new.close_reason,
                    "paid_sat": new.paid, "bytes_used": new.bytes_used, "seconds_used": new.seconds_used})
    if new.settlement_txid and (old is None or old.settlement_txid != new.settlement_txid):
        out.append({"type": "settlement", **base, "txid": new.settlement_txid, "owner_sat": payout_of(new),
                    "paid_sat": new.paid})
    return out


def state_payload(node_id: str, online: bool, now_ms: int) -> dict:
    """The retained state; the offline one is also the connection's last will."""
    return {"node_id": node_id, "state": "online" if online else "offline", "at": now_ms}


def totals_payload(node_id: str, earnings: dict, clients_now: int, payments: int, since_ms: int,
                   now_ms: int) -> dict:
    """The retained running totals (Control.earnings() plus counts) for a fleet view."""
    return {
        "node_id": node_id, "at": now_ms,
        "earned_sat": earnings["settled_sat"] + earnings["settling_sat"],
        "settled_sat": earnings["settled_sat"], "settling_sat": earnings["settling_sat"],
        "open_paid_sat": earnings["open_paid_sat"], "open_owed_sat": earnings["open_owed_sat"],
        "clients_now": clients_now,
        "clients_total": earnings["settled_channels"] + earnings["settling_channels"] + earnings["open_channels"],
        "payments": payments, "payments_since": since_ms,
    }


def signed_digest(kind: str, body: dict) -> bytes:
    """SHA256("bitmesh <kind> 1 " + canonical body): a domain of its own per kind (and apart from
    offers and transactions), so a signed state is never taken for totals."""
    return hashlib.sha256(f"bitmesh {kind} 1 ".encode() + canonical(body)).digest()


def sign(key, kind: str, body: dict) -> dict:
    """`body` plus `pubkey` and `sig` (the identity key's DER signature, hex) over signed_digest."""
    body = {**body, "pubkey": bytes(key.pub).hex()}
    return {**body, "sig": key.sign(signed_digest(kind, body)).hex()}
