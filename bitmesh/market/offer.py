"""Signed offers: what a node advertises on `P/v1/<node_id>/offer`. Pure: no I/O, no clock
of its own (callers pass `now_ms`).

An offer is one JSON object: the body fields below plus `sig`, the identity key's ECDSA
signature (strict DER, low S, hex) over SHA256("bitmesh offer 1 " + canonical body), where the
canonical body is the object without `sig` serialised with sorted keys, no spaces, UTF-8. The
domain prefix keeps the digest apart from any transaction digest and from the channel proofs
(wire.proof_digest). Verification refuses with stable codes (OfferError.code), in this order:
offer_too_large, offer_malformed, offer_field_invalid, offer_version_unsupported,
offer_node_id_mismatch, offer_signature_invalid, offer_network_mismatch, offer_stale,
offer_future.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from bitmesh.channel import contract as c
from bitmesh.errors import BitMeshError
from bitmesh.market.identity import node_id_of

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import Any

OFFER_VERSION = 1
MAX_OFFER_BYTES = 4096
OFFER_TTL_MS = 600_000  # an offer is valid 10 min; the node re-signs it every REPUBLISH_MS
REPUBLISH_MS = OFFER_TTL_MS // 2
MAX_FUTURE_MS = 120_000  # clock skew tolerated between a node and a reader
# The reference use that turns a time price into a price per MB (effective_msat_per_mb).
REFERENCE_MB_PER_MINUTE = 10

# Body fields and their JSON types (int never a bool).
_FIELDS: dict[str, type] = {
    "version": int, "node_id": str, "pubkey": str, "seq": int, "issued_at": int, "valid_until": int,
    "network": str, "sat_per_mb": int, "sat_per_minute": int, "prepay_step_sat": int,
    "min_deposit_sat": int, "max_deposit_sat": int, "fee_policy": dict, "load": int, "capacity": int,
    "portal_url": str, "ssid": str,
}
_TEXT_MAX = {"node_id": 16, "pubkey": 66, "network": 32, "portal_url": 512, "ssid": 64}


class OfferError(BitMeshError):
    """An offer was refused (see the module's codes)."""

    code = "offer_invalid"
    http_status = 400


@dataclass(frozen=True)
class Terms:
    """What the node advertises, read from its policy and state at publish time."""

    network: str
    sat_per_mb: int
    sat_per_minute: int
    prepay_step_sat: int
    min_deposit_sat: int
    max_deposit_sat: int
    fee_policy: dict
    load: int
    capacity: int
    portal_url: str = ""
    ssid: str = ""


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def offer_digest(body: dict[str, Any]) -> bytes:
    return hashlib.sha256(b"bitmesh offer 1 " + canonical(body)).digest()


def make_offer(key, terms: Terms, seq: int, now_ms: int, ttl_ms: int = OFFER_TTL_MS) -> dict[str, Any]:
    """The signed offer (a dict: `encode` it for the wire). `seq` must grow per node: the
    publisher uses the issue time in ms (no flash write, survives restarts)."""
    pubkey = bytes(key.pub)
    body: dict[str, Any] = {
        "version": OFFER_VERSION, "node_id": node_id_of(pubkey), "pubkey": pubkey.hex(), "seq": seq,
        "issued_at": now_ms, "valid_until": now_ms + ttl_ms,
        "network": terms.network, "sat_per_mb": terms.sat_per_mb, "sat_per_minute": terms.sat_per_minute,
        "prepay_step_sat": terms.prepay_step_sat, "min_deposit_sat": terms.min_deposit_sat,
        "max_deposit_sat": terms.max_deposit_sat, "fee_policy": dict(terms.fee_policy), "load": terms.load,
        "capacity": terms.capacity, "portal_url": terms.portal_url, "ssid": terms.ssid,
    }
    return {**body, "sig": key.sign(offer_digest(body)).hex()}


def encode(offer: dict[str, Any]) -> bytes:
    return canonical(offer)


def load_object(payload: bytes, max_bytes: int, what: str, error: type[BitMeshError], prefix: str = "offer") -> dict:
    """A published JSON object, before its signature is looked at: `error` with code
    `<prefix>_too_large` or `<prefix>_malformed` for anything else (offers, and the state and
    totals records of bitmesh.market.fleet)."""
    if len(payload) > max_bytes:
        raise error(f"{what} larger than {max_bytes} bytes", code=f"{prefix}_too_large")
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what} is not JSON: {e}", code=f"{prefix}_malformed") from None
    if not isinstance(obj, dict):
        raise error(f"{what} must be a JSON object", code=f"{prefix}_malformed")
    return obj


def verify_offer(payload: bytes, now_ms: int, network: str | None = None,
                 max_future_ms: int = MAX_FUTURE_MS) -> dict[str, Any]:
    """The offer in `payload` if it is well formed, signed by the key its node_id stands for,
    of `network` (when given) and current at `now_ms`; else OfferError with a stable code."""
    offer = load_object(payload, MAX_OFFER_BYTES, "offer", OfferError)
    for name, kind in {**_FIELDS, "sig": str}.items():
        value = offer.get(name)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise OfferError(f"field {name!r} missing or not a {'non-negative ' if kind is int else ''}"
                             f"{kind.__name__}", code="offer_field_invalid")
        if kind is str and len(value) > _TEXT_MAX.get(name, 160):
            raise OfferError(f"field {name!r} too long", code="offer_field_invalid")
    if offer["version"] != OFFER_VERSION:
        raise OfferError(f"offer version {offer['version']} unsupported", code="offer_version_unsupported")
    try:
        pubkey, der = bytes.fromhex(offer["pubkey"]), bytes.fromhex(offer["sig"])
    except ValueError:
        raise OfferError("pubkey and sig must be hex", code="offer_field_invalid") from None
    if len(pubkey) != 33 or pubkey[0] not in (2, 3):
        raise OfferError("pubkey must be a compressed public key", code="offer_field_invalid")
    if offer["node_id"] != node_id_of(pubkey):
        raise OfferError(f"node_id {offer['node_id']} is not the one of key {offer['pubkey']}",
                         code="offer_node_id_mismatch")
    body = {k: v for k, v in offer.items() if k != "sig"}
    try:
        c.check_signature(pubkey, offer_digest(body), der)
    except BitMeshError as e:
        raise OfferError(f"offer signature refused: {e.message}", code="offer_signature_invalid") from None
    if network is not None and offer["network"] != network:
        raise OfferError(f"offer is for network {offer['network']}, not {network}", code="offer_network_mismatch")
    if offer["valid_until"] <= now_ms:
        raise OfferError("offer expired", code="offer_stale")
    if offer["issued_at"] > now_ms + max_future_ms:
        raise OfferError("offer issued in the future (clock skew or replay bait)", code="offer_future")
    return offer


def effective_msat_per_mb(offer: dict[str, Any]) -> int:
    """The price a buyer compares: millisatoshi per MB at the advertised prices, the time price
    counted at REFERENCE_MB_PER_MINUTE (a minute of 10 MB use)."""
    return offer["sat_per_mb"] * 1000 + offer["sat_per_minute"] * 1000 // REFERENCE_MB_PER_MINUTE
