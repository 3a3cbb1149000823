"""Channel messages on the wire: JSON bodies in, typed requests out, channels out as JSON.

Transport-neutral (the bottle portal and the payer's HTTP client both use it), like
Electrum's lnpeer is to its channel state machine. Every malformed field is refused here
with a stable code before any channel code runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from bitcoin.core import CTransaction

from bitmesh.chain.address import address_to_script, get_network, script_to_address
from bitmesh.channel import contract as c
from bitmesh.channel.server import ChannelPolicy, Payment
from bitmesh.channel.state import Channel
from bitmesh.errors import ChannelError, RequestError

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 1
MAX_BODY_BYTES = 64 * 1024  # a raw funding transaction is the largest message
MAX_TX_BYTES = 50_000


def parse_json(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"body larger than {MAX_BODY_BYTES} bytes", code="body_too_large", http_status=413)
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"body is not valid JSON: {e}", code="json_malformed") from None
    if not isinstance(data, dict):
        raise RequestError("body must be a JSON object", code="json_malformed")
    return data


def _field(data: dict, name: str, kind: type, *, optional: bool = False):
    if name not in data or data[name] is None:
        if optional:
            return None
        raise RequestError(f"missing field {name!r}", code="field_missing")
    value = data[name]
    # bool is an int in Python; a JSON true is never an amount
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"field {name!r} must be {kind.__name__}", code="field_invalid")
    return value


def _amount(data: dict, name: str) -> int:
    value = _field(data, name, int)
    if not 0 < value < 21_000_000 * 100_000_000:
        raise RequestError(f"field {name!r} out of range", code="field_invalid")
    return value


def _hex(data: dict, name: str, max_bytes: int, *, optional: bool = False) -> bytes | None:
    value = _field(data, name, str, optional=optional)
    if value is None:
        return None
    if len(value) > 2 * max_bytes:
        raise RequestError(f"field {name!r} too long", code="field_invalid")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise RequestError(f"field {name!r} is not hex", code="field_invalid") from None


def _tx(data: dict, name: str, *, optional: bool = False) -> CTransaction | None:
    raw = _hex(data, name, MAX_TX_BYTES, optional=optional)
    if raw is None:
        return None
    try:
        tx = CTransaction.deserialize(raw)
    except Exception:  # python-bitcoinlib raises several types on garbage
        raise RequestError(f"field {name!r} is not a transaction", code="tx_malformed") from None
    return tx


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenRequest:
    client_pubkey: bytes
    deposit: int
    refund_script: bytes
    # The offer's prices the client accepts (sat_per_mb, sat_per_minute); None: whatever the
    # router records (the channel object states it). Demand pricing may move the price between
    # the offer and the open: a named tariff that is no longer current is refused (price_changed).
    tariff: tuple[int, int] | None = None


def parse_open(data: dict, network: str) -> OpenRequest:
    pubkey = _hex(data, "client_pubkey", 33)
    assert pubkey is not None
    c.check_pubkey(pubkey, "client_pubkey")
    tariff = _field(data, "tariff", dict, optional=True)
    if tariff is not None:
        prices = tuple(_field(tariff, unit, int) for unit in ("sat_per_mb", "sat_per_minute"))
        if set(tariff) - {"sat_per_mb", "sat_per_minute"} or not all(0 <= p < 21_000_000 * 100_000_000 for p in prices):
            raise RequestError("field 'tariff' must be {sat_per_mb, sat_per_minute} in sat", code="field_invalid")
    return OpenRequest(
        client_pubkey=pubkey,
        deposit=_amount(data, "deposit"),
        refund_script=address_to_script(_field(data, "refund_address", str), network),
        tariff=prices if tariff is not None else None,
    )


@dataclass(frozen=True)
class FundingRequest:
    tx: CTransaction | None  # the raw funding transaction: the router broadcasts it
    outpoint: c.Outpoint | None  # or where it already is


def parse_funding(data: dict) -> FundingRequest:
    tx = _tx(data, "tx", optional=True)
    txid = _field(data, "txid", str, optional=True)
    vout = _field(data, "vout", int, optional=True)
    if tx is None and txid is None:
        raise RequestError("give either 'tx' (raw hex) or 'txid' and 'vout'", code="field_missing")
    if txid is not None:
        if len(txid) != 64 or any(ch not in "0123456789abcdef" for ch in txid):
            raise RequestError("field 'txid' must be 64 lowercase hex digits", code="field_invalid")
        if tx is not None and c.txid_of(tx) != txid:
            raise RequestError("'txid' does not match 'tx'", code="field_invalid")
    if vout is not None and not 0 <= vout < 100_000:
        raise RequestError("field 'vout' out of range", code="field_invalid")
    if tx is None and vout is None:
        raise RequestError("'txid' needs 'vout'", code="field_missing")
    outpoint = c.Outpoint(txid or c.txid_of(tx), vout) if vout is not None else None
    return FundingRequest(tx=tx, outpoint=outpoint)


def parse_payment(data: dict) -> Payment:
    tx = _tx(data, "tx")
    sig = _hex(data, "signature", 74)
    assert tx is not None and sig is not None
    return Payment(amount=_amount(data, "amount"), tx=tx, signature=sig)


# --- proofs: acting on a channel takes its client key (docs/protocol.md 5c) -----------------

PROOF_ACTIONS = ("session", "close")


def proof_digest(action: str, channel_id: str) -> bytes:
    """What the client key signs to read a channel's session or close it: one fixed text per
    action and channel (a single SHA256 of ASCII, so it can never be a transaction's digest)."""
    if action not in PROOF_ACTIONS:
        raise ValueError(f"no proof for {action!r}")
    return hashlib.sha256(f"bitmesh proof 1 {action} {channel_id}".encode()).digest()


def sign_proof(key, action: str, channel_id: str) -> str:
    """The payer's proof (hex strict DER, low S: python-bitcoinlib normalises) for `action`."""
    return key.sign(proof_digest(action, channel_id)).hex()


def check_proof(client_pubkey: bytes, action: str, channel_id: str, proof: object) -> None:
    """Refuses (403) a proof that is missing or not the channel's client key's signature of
    `action` on `channel_id`; the caller's address never counts."""
    if proof is None or proof == "":
        raise RequestError(f"acting on a channel ({action}) needs its proof: the client key's signature",
                           code="proof_missing", http_status=403)
    if not isinstance(proof, str) or len(proof) > 2 * 72:
        raise RequestError("proof must be a hex DER signature", code="proof_invalid", http_status=403)
    try:
        der = bytes.fromhex(proof)
    except ValueError:
        raise RequestError("proof must be a hex DER signature", code="proof_invalid", http_status=403) from None
    try:
        c.check_signature(client_pubkey, proof_digest(action, channel_id), der)
    except ChannelError as e:
        raise RequestError(f"proof refused: {e.message}", code="proof_invalid", http_status=403) from None


# --- responses -----------------------------------------------------------------------------


# Who pays the settlement's fee (docs/protocol.md 3.4): the owner, out of its share (`owed`). The
# client's signed change is never touched, and its unused credit (`paid - owed`) comes back whole
# unless it is below the dust limit: then it joins the fee, so a client loses at most this much.
FEE_POLICY = {"paid_from": "owner_share", "client_max_sat": c.DUST_LIMIT_SAT - 1}


def offer_json(policy: ChannelPolicy, node_id: str, extra: dict | None = None) -> dict:
    net = get_network(policy.network)
    return {
        "protocol": PROTOCOL_VERSION,
        "node_id": node_id,
        "network": net.name,
        "min_deposit_sat": policy.min_deposit_sat,
        "max_deposit_sat": policy.max_deposit_sat,
        "expiry_blocks": policy.expiry_blocks,
        "settle_margin_blocks": policy.settle_margin_blocks,
        "zero_conf_max_sat": policy.zero_conf_max_sat,
        "min_conf": policy.min_conf,
        "prepay_step_sat": policy.prepay_step_sat,
        "dust_limit_sat": c.DUST_LIMIT_SAT,
        "fee_policy": dict(FEE_POLICY),
        **(extra or {}),
    }


def _btc(sat: int) -> str:
    """Exact decimal BTC for BIP21 (no float rounding)."""
    return f"{sat // 100_000_000}.{sat % 100_000_000:08d}"


def channel_json(channel: Channel, network: str, *, owed: int) -> dict:
    """The channel object. `owed` is the figure the router commits to settle for (the meter's,
    now; fixed once the settlement is signed): the payer checks the settlement against it."""
    contract = channel.contract
    address = script_to_address(contract.script_pubkey, network)
    scheme = get_network(network).bip21_scheme
    return {
        "channel_id": channel.id,
        "state": channel.phase.value,
        "server_pubkey": channel.server_pubkey.hex(),
        "client_pubkey": channel.client_pubkey.hex(),
        "deposit": channel.deposit,
        "expiry": channel.expiry,
        "witness_script": contract.witness_script.hex(),
        "funding_address": address,
        "funding_script": contract.script_pubkey.hex(),
        "bip21": f"{scheme}:{address}?amount={_btc(channel.deposit)}",
        "refund_script": channel.refund_script.hex(),
        "funding": str(channel.funding) if channel.funding else None,
        "funding_confirmations": channel.funding_confirmations,
        "paid": channel.paid,
        "owed": owed,
        "tariff": {"sat_per_mb": channel.sat_per_mb, "sat_per_minute": channel.sat_per_minute},  # fixed at open
        "settlement_txid": channel.settlement_txid,
        "close_reason": channel.close_reason or None,
    }
